"""ONNX and TorchScript exports give the PyTorch logits for any batch size."""

import warnings

import pytest
import torch

from vitcraft import ViTConfig, ViTForClassification
from vitcraft.export import export_onnx, export_torchscript

ort = pytest.importorskip("onnxruntime")

BATCH_SIZES = (1, 5)  # the example input has 2 images, so both prove the batch axis is free


def small_model(backend: str) -> ViTForClassification:
    return ViTForClassification(ViTConfig(num_hidden_layers=2, attention_backend=backend))


def op_types(path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("onnxruntime_ops", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "per_head"])
def test_onnx_matches_pytorch_for_any_batch(tmp_path, backend, onnxruntime_ops):
    model = small_model(backend)  # left in training mode: export must not depend on the caller's mode
    path = export_onnx(model, tmp_path / "model.onnx", onnxruntime_ops=onnxruntime_ops)
    assert model.training
    # plain ONNX unless asked: onnxruntime's own fused ops only then (the default GELU is the tanh one)
    assert ({"MultiHeadAttention", "FastGelu"} & op_types(path)) == ({"MultiHeadAttention", "FastGelu"}
                                                                    if onnxruntime_ops else set())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    model.eval()
    for batch in BATCH_SIZES:
        x = torch.randn(batch, 3, 32, 32)
        (logits,) = session.run(None, {"pixel_values": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), model(x)[0].detach(), atol=1e-4, rtol=0)


def test_compacting_an_onnx_file_shrinks_it_and_keeps_its_outputs(tmp_path):
    from vitcraft.export import _compact_onnx

    model = small_model("sdpa").eval()
    path = export_onnx(model, tmp_path / "model.onnx", onnxruntime_ops=True)
    x = torch.randn(3, 3, 32, 32)
    before, size = ort.InferenceSession(str(path)).run(None, {"pixel_values": x.numpy()})[0], path.stat().st_size
    _compact_onnx(str(path))
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert (session.run(None, {"pixel_values": x.numpy()})[0] == before).all()
    assert path.stat().st_size < size


def test_torchscript_matches_pytorch_for_any_batch(tmp_path):
    model = small_model("sdpa").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent torch
        path = export_torchscript(model, tmp_path / "model.pt")
        loaded = torch.jit.load(str(path))
    for batch in BATCH_SIZES:
        x = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(loaded(x), model(x)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("onnxruntime_ops", [False, True])
def test_shifted_patches_and_locality_attention_export_with_the_pytorch_logits(tmp_path, onnxruntime_ops):
    model = ViTForClassification(ViTConfig(num_hidden_layers=2, shifted_patches=True, locality_attention=True))
    with torch.no_grad():  # learned temperatures, not their starting 1 / sqrt(head size)
        for block in model.encoder.blocks:
            block.attention.temperature.uniform_(0.1, 0.6)
    path = export_onnx(model, tmp_path / "model.onnx", onnxruntime_ops=onnxruntime_ops)
    # onnxruntime's attention op has no learned scale or mask: the attention stays plain ops
    assert "MultiHeadAttention" not in op_types(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    (logits,) = session.run(None, {"pixel_values": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), model.eval()(x)[0].detach(), atol=1e-4, rtol=0)
