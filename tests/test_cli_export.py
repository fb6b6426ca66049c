"""`vitcraft export`: a run's model as ONNX (run here in onnxruntime) or TorchScript, same logits as PyTorch."""

import warnings

import pytest
import torch
from conftest import small_run, train_quietly

from vitcraft.cli import main
from vitcraft.runs import load_trained_model

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    train_quietly(small_run(tiny_folder, out.parent, epochs=1), out)
    return out


def pytorch_logits(run_dir, images: torch.Tensor) -> torch.Tensor:
    model, _ = load_trained_model(run_dir)
    with torch.no_grad():
        return model(images)[0]


def test_onnx_export_runs_in_onnxruntime_with_any_batch(run, capsys):
    assert main(["export", str(run)]) == 0
    path = run / "model.onnx"
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        images = torch.randn(batch, 3, 8, 8)
        (logits,) = session.run(None, {"pixel_values": images.numpy()})
        assert logits.shape == (batch, 3)
        torch.testing.assert_close(torch.from_numpy(logits), pytorch_logits(run, images), atol=1e-4, rtol=0)


def test_torchscript_export_to_a_chosen_file(run, tmp_path):
    path = tmp_path / "exported" / "vit.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent torch
        assert main(["export", str(run), "--format", "torchscript", "--out", str(path)]) == 0
        loaded = torch.jit.load(str(path))
    images = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(loaded(images), pytorch_logits(run, images), atol=1e-4, rtol=0)


def test_export_never_overwrites_without_asking(run, tmp_path, capsys):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"someone's file")
    assert main(["export", str(run), "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"vitcraft: error: {path} already exists; pass --overwrite to replace it, or another --out\n"
    assert path.read_bytes() == b"someone's file"
    assert main(["export", str(run), "--out", str(path), "--overwrite"]) == 0
    assert ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()[0].name == "logits"


def test_export_of_a_folder_without_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "holds no trained model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
