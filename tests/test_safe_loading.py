"""Files that would run code when unpickled, and damaged files, are refused with one clear line.

vitcraft reads tensors from safetensors only; a pickle (plain or torch.save's
zip) put in place of a run's weights or checkpoint is recognised and refused
without being unpickled, so the command it carries never runs.
"""

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import make_image, small_run, train_quietly

from vitcraft.cli import main


class Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_payload(path, kind: str, marker) -> None:
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"weight": Payload(marker)}))
    else:  # what torch.save writes: a zip archive around the pickle
        torch.save({"weight": Payload(marker)}, path)


def unpickle(path, kind: str) -> None:
    if kind == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("safe") / "run"
    train_quietly(small_run(tiny_folder, out.parent, epochs=1), out)
    return out


@pytest.fixture
def run(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


def command(name: str, run_dir, tmp_path) -> tuple[list[str], str]:
    """(CLI arguments, the file of the run they read) for eval, predict and a resume."""
    if name == "resume":
        return ["train", "--resume", str(run_dir), "--no-figures", "--no-tensorboard"], "checkpoint.safetensors"
    if name == "predict":
        image = tmp_path / "image.png"
        make_image(0, np.random.default_rng(0)).save(image)
        return ["predict", str(run_dir), str(image)], "model.safetensors"
    return ["eval", str(run_dir), "--device", "cpu"], "model.safetensors"


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_payload_is_live(kind, tmp_path):
    """The crafted files do run their command when unpickled: the refusals below are real ones."""
    path, marker = tmp_path / "payload", tmp_path / "marker"
    write_payload(path, kind, marker)
    unpickle(path, kind)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("name", ["eval", "predict", "resume"])
def test_pickled_weights_are_refused_unopened(name, kind, run, tmp_path, capsys):
    args, target = command(name, run, tmp_path)
    marker = tmp_path / "marker"
    write_payload(run / target, kind, marker)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"vitcraft: error: {run / target} is a Python pickle (a torch.save file), not safetensors; "
                   f"vitcraft never unpickles files, because unpickling can run any code the file carries\n")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["eval", "resume"])
def test_truncated_safetensors_is_refused(name, run, tmp_path, capsys):
    args, target = command(name, run, tmp_path)
    before = (run / target).read_bytes()
    (run / target).write_bytes(before[: len(before) // 2])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vitcraft: error: {run / target} is not a readable safetensors file "
                          f"(truncated or corrupt?)") and err.count("\n") == 1
    assert (run / target).stat().st_size == len(before) // 2  # refused, not replaced
