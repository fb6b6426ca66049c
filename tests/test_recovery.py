"""Training survives SIGKILL at any moment: resuming gives the uninterrupted run's metrics and weights.

Every file a run writes goes through io.atomic_write (a temporary file, then
os.replace), and a resume restores the weights, optimizer, RNG state and
metrics of the last checkpoint; per-epoch seeds fix the data order and the
augmentation. So however often training is killed, after each kill the
checkpoint is absent or whole, and the finished run equals one never killed.
"""

import json
import os
import random
import signal
import time

import pytest
from conftest import write_folder_dataset
from run_helpers import (
    RESUME,
    SMALL_RUN,
    assert_same_run,
    finish,
    metrics,
    run_cli,
    run_here,
    start,
    temporaries,
    wait_for_line,
)

from vitcraft.files import load_tensors

pytestmark = pytest.mark.slow  # kills training processes and resumes them: not in `pytest -m "not slow"`

# 48 training images in batches of 16: 3 steps per epoch, so checkpoint writes take a good part
# of the time (where kills should land too); dropout and augmentation on (the defaults)
RUN = ["--epochs", "12", "--batch-size", "16", "--seed", "7", *SMALL_RUN]
KILLS = 6


def run_cli_half_writing(args: list[str], log_path: str, env: dict[str, str]) -> None:
    """As run_cli, but the second checkpoint write (epoch 2) stops half-way and waits to be killed."""
    import vitcraft.files

    write, checkpoints = vitcraft.files.save_file, []

    def half_write(tensors, path, metadata=None):
        write(tensors, path, metadata=metadata)
        if os.path.basename(path).startswith(".checkpoint.safetensors."):
            checkpoints.append(path)
            if len(checkpoints) == 2:
                os.truncate(path, os.path.getsize(path) // 2)
                print("HALF WRITTEN")
                time.sleep(600)

    vitcraft.files.save_file = half_write
    run_cli(args, log_path, env)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("recovery") / "data", per_class=(16, 4))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The same run, never interrupted (in this process), and the seconds its epochs took."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_here("train", "--data", str(data), "--out", str(out), *RUN)
    return out, sum(json.loads(line)["epoch_seconds"] for line in (out / "metrics.jsonl").read_text().splitlines())


def assert_whole_or_absent(run_dir) -> int | None:
    """Every file of the run is absent or complete; returns the checkpoint's epoch (None: none yet)."""
    for name in ("run.json", "config.json", "model.json"):
        if (run_dir / name).exists():
            json.loads((run_dir / name).read_text())
    if (run_dir / "model.safetensors").exists():
        load_tensors(run_dir / "model.safetensors")
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    if not (run_dir / "checkpoint.safetensors").exists():
        return None
    _, metadata = load_tensors(run_dir / "checkpoint.safetensors")  # raises on a half-written file
    progress = json.loads(metadata["progress"])
    assert [record["epoch"] for record in progress["history"]] == list(range(1, progress["epoch"] + 1))
    # metrics.jsonl is written just after the checkpoint: it may lag it by one epoch
    assert epochs == list(range(1, len(epochs) + 1)) and progress["epoch"] - len(epochs) in (0, 1)
    return progress["epoch"]


def test_random_kills_then_resume_equal_an_uninterrupted_run(data, reference, tmp_path):
    reference, seconds = reference
    out, log, delays = tmp_path / "run", tmp_path / "log.txt", random.Random(20240611)
    window = seconds / 2  # so that several kills come before the run is through, however fast this machine
    fresh = ["train", "--data", str(data), "--out", str(out), "--overwrite", *RUN]
    for _ in range(KILLS):
        resume = (out / "checkpoint.safetensors").exists()
        process = start(["train", "--resume", str(out), *RESUME] if resume else fresh, log)
        if wait_for_line(process, log, "training "):  # the start-up (data, config) is not of interest
            time.sleep(delays.uniform(0, window))
        status = finish(process, kill=True)
        if status == 0:
            break  # finished before the kill came
        assert status == -signal.SIGKILL, log.read_text()[-3000:]
        assert_whole_or_absent(out)
    if (out / "checkpoint.safetensors").exists():
        run_here("train", "--resume", str(out), *RESUME)
    else:  # every kill came before the first epoch ended
        run_here(*fresh)
    assert temporaries(out) == []
    assert_same_run(out, reference)


def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(data, reference, tmp_path):
    reference, _ = reference
    out, log = tmp_path / "run", tmp_path / "log.txt"
    process = start(["train", "--data", str(data), "--out", str(out), *RUN], log, target=run_cli_half_writing)
    assert wait_for_line(process, log, "HALF WRITTEN"), log.read_text()[-3000:]
    finish(process, kill=True)
    [half] = temporaries(out)  # the interrupted write, beside the intact previous checkpoint
    assert half.startswith(".checkpoint.safetensors.")
    assert assert_whole_or_absent(out) == 1
    assert [record["epoch"] for record in metrics(out)] == [1]
    run_here("train", "--resume", str(out), *RESUME)
    assert temporaries(out) == []  # the resume removed the stale half file
    assert_same_run(out, reference)
