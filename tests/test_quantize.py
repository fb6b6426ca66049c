"""int8 export with onnxruntime's quantisation, and `vitcraft eval --onnx`: exported models scored like the run."""

import pytest
import torch
from conftest import small_run, train_quietly

from vitcraft.cli import main
from vitcraft.export import OnnxModel, export_onnx
from vitcraft.runs import load_trained_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

# int8 rounds each product's inputs to 256 levels: a test image whose two best classes are
# nearly tied may swap them. On the tiny run's 24 well-separated test images at most one may.
MIN_TOP1_AGREEMENT = 23 / 24


@pytest.fixture(scope="module")
def run_dir(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantize") / "run"
    train_quietly(small_run(tiny_folder, out.parent, epochs=4), out)
    return out


def eval_lines(args, capsys) -> list[str]:
    assert main(["eval", *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_eval_onnx_of_the_fp32_export_equals_eval_of_the_run(run_dir, capsys):
    assert main(["export", str(run_dir)]) == 0 and (run_dir / "model.onnx").is_file()
    capsys.readouterr()
    assert eval_lines([str(run_dir), "--onnx", str(run_dir / "model.onnx")], capsys) == \
        eval_lines([str(run_dir), "--device", "cpu"], capsys)


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_int8_runs_in_onnxruntime_and_agrees_with_fp32(run_dir, tiny_folder, method, tmp_path, capsys):
    out = tmp_path / f"int8-{method}.onnx"
    assert main(["export", str(run_dir), "--quantize", "int8", "--int8-method", method, "--out", str(out)]) == 0
    assert f"(int8, {method}: " in capsys.readouterr().out
    model, metadata = load_trained_model(run_dir)
    from vitcraft.data import load_splits

    test = load_splits(str(tiny_folder), cache_dir=run_dir.parent / "cache")[1]
    pixels = (test.images.float() / 255 - 0.5) / 0.5  # the run's normalisation (the tutorial's)
    with torch.no_grad():
        fp32 = model(pixels)[0].argmax(1)
    int8 = OnnxModel(out)(pixels)[0].argmax(1)
    assert (int8 == fp32).float().mean() >= MIN_TOP1_AGREEMENT
    # the matrix products' weights are int8 now: few float32 numbers are left (norms, positions, biases)
    assert float32_numbers(out) < 0.1 * sum(p.numel() for p in model.parameters())
    # and the graph around them is written compactly: dynamic (the default) a third of the float32 export
    # or less; static adds a quantise/dequantise pair, scale and zero point per activation
    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    assert out.stat().st_size < fp32.stat().st_size / (3 if method == "dynamic" else 2)


def float32_numbers(path) -> int:
    import onnx

    return sum(int(torch.tensor(list(t.dims) or [1]).prod()) for t in onnx.load(path).graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT)


def test_export_refuses_what_it_cannot_do_and_keeps_files(run_dir, capsys):
    kept = run_dir / "model-int8.onnx"
    kept.write_bytes(b"mine")
    cases = [
        (["export", str(run_dir), "--quantize", "int8"], "already exists"),
        (["export", str(run_dir), "--format", "torchscript", "--quantize", "int8"], "use it with --format onnx"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("vitcraft: error:") and message in err and err.count("\n") == 1
    assert kept.read_bytes() == b"mine"
    kept.unlink()


def test_a_missing_corrupt_or_foreign_onnx_file_is_one_clear_error(run_dir, tmp_path, capsys):
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07not a model")
    cases = [(tmp_path / "missing.onnx", "does not exist"),
             (tmp_path / "corrupt.onnx", "is not an ONNX model onnxruntime can run")]
    for path, message in cases:
        assert main(["eval", str(run_dir), "--onnx", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vitcraft: error:") and message in err and "Traceback" not in err


def test_an_onnx_file_of_another_shape_is_refused(run_dir, tmp_path, capsys):
    from vitcraft import ViTConfig, ViTForClassification
    from vitcraft.export import export_onnx

    export_onnx(ViTForClassification(ViTConfig(image_size=16, num_classes=3)), tmp_path / "16px.onnx")
    assert main(["eval", str(run_dir), "--onnx", str(tmp_path / "16px.onnx")]) == 2
    assert "takes images of shape [3, 16, 16], but the run's model [3, 8, 8]" in capsys.readouterr().err
