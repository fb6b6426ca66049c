"""TensorBoard scalars of a run: the values of metrics.jsonl, read back from the event files."""

import json
import sys

import pytest
from conftest import small_run, train_quietly

from vitcraft.cli import main
from vitcraft.tensorboard_log import EPOCH_KEYS, TENSORBOARD_DIR, TensorBoardLog
from vitcraft.train import learning_rate_at

TRAIN_IMAGES = 90  # the tiny dataset: 3 classes x 30 training images
COSINE = dict(schedule="cosine", warmup_steps=3)  # a learning rate that changes at every step


def read_scalars(run_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in run_dir/tensorboard (all event files)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        pytest.skip("the tensorboard package is not installed (pip install 'vitcraft[tensorboard]'); "
                    "without it runs write no event files to read back")
    accumulator = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()["scalars"]}


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_scalars_equal_metrics_and_schedule(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(TensorBoardLog, "step_every", 1)
    run, out = small_run(tiny_folder, tmp_path, **COSINE), tmp_path / "run"
    train_quietly(run, out, tensorboard=True)
    scalars = read_scalars(out)
    records = read_metrics(out)
    total_steps = records[-1]["step"]
    assert total_steps == 2 * -(-TRAIN_IMAGES // 16)
    for key in EPOCH_KEYS:
        expected = {record["step"]: record[key] for record in records}
        assert set(scalars[f"epoch/{key}"]) == set(expected), key
        for step, value in expected.items():
            # event files store float32
            assert scalars[f"epoch/{key}"][step] == pytest.approx(value, rel=1e-6), (key, step)
    assert sorted(scalars["step/lr"]) == list(range(1, total_steps + 1))
    for step, value in scalars["step/lr"].items():  # step s trained at the lr of 0-based step s - 1
        assert value == pytest.approx(learning_rate_at(step - 1, run.train, total_steps), rel=1e-6)
    assert sorted(scalars["step/loss"]) == list(range(1, total_steps + 1))
    # the per-step losses of an epoch average (weighted by batch size) to its train_loss
    steps_per_epoch = total_steps // 2
    batch_sizes = [16] * (steps_per_epoch - 1) + [TRAIN_IMAGES - 16 * (steps_per_epoch - 1)]
    first_epoch = sum(scalars["step/loss"][s + 1] * n for s, n in enumerate(batch_sizes)) / TRAIN_IMAGES
    assert first_epoch == pytest.approx(records[0]["train_loss"], rel=1e-5)


def test_steps_are_logged_every_n(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(TensorBoardLog, "step_every", 4)
    out = tmp_path / "run"
    train_quietly(small_run(tiny_folder, tmp_path), out, tensorboard=True)
    assert sorted(read_scalars(out)["step/loss"]) == [4, 8, 12]  # 12 steps in all


def test_resume_replaces_the_stopped_runs_later_steps(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(TensorBoardLog, "step_every", 1)
    out = tmp_path / "run"
    train_quietly(small_run(tiny_folder, tmp_path, epochs=1), out, tensorboard=True)
    # the stopped run got two steps past its checkpoint (step 6) before it died
    stopped = TensorBoardLog(out)
    stopped.log_step(7, 99.0, 1.0)
    stopped.log_step(8, 99.0, 1.0)
    stopped.close()
    train_quietly(small_run(tiny_folder, tmp_path, epochs=2), out, resume=True, tensorboard=True)
    scalars = read_scalars(out)
    records = read_metrics(out)
    assert sorted(scalars["step/loss"]) == list(range(1, 13))
    assert max(scalars["step/loss"].values()) < 5  # the 99s are gone: the resumed run's values replace them
    assert scalars["epoch/test_acc"] == pytest.approx({r["step"]: r["test_acc"] for r in records}, rel=1e-6)


def test_overwrite_clears_event_files_but_keeps_user_files(tiny_folder, tmp_path):
    out = tmp_path / "run"
    train_quietly(small_run(tiny_folder, tmp_path, epochs=1), out, tensorboard=True)
    folder = out / TENSORBOARD_DIR
    old_events = set(folder.glob("events.out.tfevents.*"))
    assert old_events
    (folder / "notes.txt").write_text("mine")
    train_quietly(small_run(tiny_folder, tmp_path, epochs=1, seed=2), out, overwrite=True, tensorboard=True)
    new_events = set(folder.glob("events.out.tfevents.*"))
    assert len(new_events) == 1 and not new_events & old_events
    assert (folder / "notes.txt").read_text() == "mine"
    assert read_scalars(out)["epoch/test_acc"] == pytest.approx({6: read_metrics(out)[0]["test_acc"]}, rel=1e-6)


def test_no_tensorboard_flag_writes_no_folder(tiny_folder, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_folder), "--out", str(out), "--epochs", "1", "--batch-size", "16",
                 "--model-arg", "hidden_size=32", "--model-arg", "intermediate_size=64",
                 "--no-figures", "--no-tensorboard"]) == 0
    assert (out / "metrics.jsonl").is_file() and not (out / TENSORBOARD_DIR).exists()


def test_without_tensorboard_installed_logging_is_a_no_op(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    board = TensorBoardLog(tmp_path / "board")
    assert not board.enabled
    board.log_step(10, 1.0, 0.1)
    board.log_epoch({"step": 10, "test_acc": 0.5})
    board.close()
    out = tmp_path / "run"
    train_quietly(small_run(tiny_folder, tmp_path, epochs=1), out, tensorboard=True)
    assert (out / "metrics.jsonl").is_file() and not (out / TENSORBOARD_DIR).exists()
