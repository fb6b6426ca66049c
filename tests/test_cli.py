"""The vitcraft command as a user runs it: exit codes, one-line errors, files written."""

import json
import re
import subprocess
import sys

import pytest
from conftest import make_image

from vitcraft.cli import main

TINY = ["--epochs", "2", "--batch-size", "16", "--model-arg", "hidden_size=32", "--model-arg", "intermediate_size=64"]


@pytest.fixture(scope="module")
def trained_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data", str(tiny_folder), "--out", str(out), *TINY]) == 0
    return out


def test_train_writes_run_and_figures(trained_run):
    for name in ("run.json", "config.json", "metrics.jsonl", "model.safetensors", "model.json",
                 "checkpoint.safetensors", "samples.png", "curves.png", "attention.png", "rollout.png",
                 "confusion.png"):
        assert (trained_run / name).is_file(), name
    config = json.loads((trained_run / "run.json").read_text())
    assert config["run"]["train"]["epochs"] == 2 and config["run"]["model"]["hidden_size"] == 32


def test_eval_prints_accuracy_matching_training(trained_run, capsys):
    assert main(["eval", str(trained_run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    last = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    top1 = float(re.search(r"top-1\s+([\d.]+)%", out).group(1))
    assert top1 == pytest.approx(100 * last["test_acc"], abs=0.01)
    assert "top-5" in out and "per-class accuracy" in out and "middle" in out


def test_eval_with_tta_flip_scores_the_mirror_images_too(trained_run, capsys, monkeypatch):
    import vitcraft.train as train_module

    # the bands of the tiny images are mirror-symmetric, so the figures barely move: count the calls instead
    batches = []
    real = train_module.flip_averaged
    monkeypatch.setattr(train_module, "flip_averaged", lambda *args: batches.append(1) or real(*args))
    assert main(["eval", str(trained_run), "--device", "cpu"]) == 0
    assert batches == []
    assert main(["eval", str(trained_run), "--device", "cpu", "--tta-flip"]) == 0
    assert batches == [1]  # 24 test images: one batch
    assert "top-1" in capsys.readouterr().out


def test_predict_prints_top_k(trained_run, tmp_path, capsys):
    import numpy as np

    path = tmp_path / "band.png"
    make_image(2, np.random.default_rng(5), size=20).save(path)  # another size: resized as the model needs
    assert main(["predict", str(trained_run), str(path), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(path) and len(lines) == 3
    probabilities = [float(line.split()[-1].rstrip("%")) for line in lines[1:]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 100.01


def test_viz_and_report(trained_run, tmp_path, capsys):
    out = tmp_path / "rollout.png"
    assert main(["viz", str(trained_run), "--method", "rollout", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["viz", str(trained_run), "--layer", "7"]) == 2
    assert "layer must be an integer" in capsys.readouterr().err
    assert main(["report", str(trained_run)]) == 0
    html = (trained_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5


def test_resume_continues_and_existing_run_is_protected(trained_run, tiny_folder, capsys):
    before = (trained_run / "model.safetensors").read_bytes()
    assert main(["train", "--data", str(tiny_folder), "--out", str(trained_run), *TINY]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "Traceback" not in err
    assert (trained_run / "model.safetensors").read_bytes() == before
    assert main(["train", "--resume", str(trained_run), "--epochs", "3", "--no-figures"]) == 0
    assert len((trained_run / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("flags, named", [
    (["--lr", "5"], "--lr"),
    (["--batch-size", "8", "--preset", "vit-tiny-p4-32"], "--preset, --batch-size"),  # in --help order
    (["--model-arg", "hidden_size=64"], "--model-arg"),
    (["--config", "other.yaml"], "--config"),
    (["--data", "cifar10", "--threads", "1"], "--threads, --data"),
    (["--out", "elsewhere", "--overwrite"], "--out, --overwrite"),
    (["--no-augment", "--grad-checkpointing"], "--grad-checkpointing, --no-augment"),
])
def test_resume_refuses_every_flag_it_would_ignore(trained_run, flags, named, capsys):
    before = (trained_run / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(trained_run), "--epochs", "9", *flags, "--no-figures",
                 "--no-tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vitcraft: error: --resume continues {trained_run} with the settings it was started "
                          f"with, so it does not take {named}; only --epochs may change") and err.count("\n") == 1
    assert (trained_run / "metrics.jsonl").read_text() == before


def test_eval_batch_size_default_is_the_train_settings(monkeypatch, capsys):
    import dataclasses

    from vitcraft.cli import build_parser
    from vitcraft.config import TrainConfig

    def eval_help() -> str:
        with pytest.raises(SystemExit):
            main(["eval", "--help"])
        return " ".join(capsys.readouterr().out.split())

    default = TrainConfig().eval_batch_size
    assert f"--batch-size N images per forward pass when evaluating (default: {default})" in eval_help()
    assert build_parser().parse_args(["eval", "run"]).eval_batch_size == default
    spec = next(spec for spec in dataclasses.fields(TrainConfig) if spec.name == "eval_batch_size")
    monkeypatch.setattr(spec, "default", 123)  # one source: eval follows the field
    assert "(default: 123)" in eval_help() and build_parser().parse_args(["eval", "run"]).eval_batch_size == 123


def test_a_model_saved_with_the_dropped_extra_field_still_loads(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "older"
    shutil.copytree(trained_run, run)
    metadata = json.loads((run / "model.json").read_text())
    metadata["model_config"]["extra"] = {}  # as vitcraft wrote it before the field was dropped
    (run / "model.json").write_text(json.dumps(metadata))
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    assert "top-1" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/no/such/folder"], "data folder /no/such/folder does not exist"),
    (["train", "--preset", "vit-huge"], "unknown model 'vit-huge'"),
    (["train", "--resume", "/no/such/run"], "holds no run"),
    (["train", "--model-arg", "hidden_size"], "--model-arg takes KEY=VALUE"),
    (["train", "--model-arg", "hiden_size=3"], "did you mean 'hidden_size'"),
    (["eval", "/no/such/run"], "run directory /no/such/run does not exist"),
    (["predict", "/no/such/run", "x.png"], "run directory /no/such/run does not exist"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitcraft: error: ") and message in err and err.count("\n") == 1


def test_corrupt_image_in_predict_is_named(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main(["predict", str(trained_run), str(bad)]) == 2
    assert f"cannot read image {bad}" in capsys.readouterr().err


@pytest.mark.slow
def test_console_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vitcraft", "list-models"], capture_output=True, text=True)
    assert result.returncode == 0 and "seed-tiny" in result.stdout
    result = subprocess.run([sys.executable, "-m", "vitcraft", "eval", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_eval_with_a_damaged_run_config_is_one_clear_error(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "damaged"
    shutil.copytree(trained_run, run)
    (run / "run.json").write_text('{"model_config": {}}')  # no "run" section
    assert main(["eval", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is not a vitcraft run config" in err and "Traceback" not in err


def test_output_whose_reader_went_away_ends_quietly():
    # `vitcraft list-recipes | head -1`: head closes the pipe; no traceback for that
    process = subprocess.Popen([sys.executable, "-m", "vitcraft", "list-recipes"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # before the command has printed anything
    err = process.stderr.read().decode()
    assert process.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
