"""Export a trained model for inference outside Python training code: ONNX (fp32 or int8) and TorchScript.

Both exports trace a thin wrapper that returns the logits only (the model
itself returns ``(logits, None)``), in eval mode, on CPU, with the batch
dimension left free. Input ``pixel_values`` (B, C, H, W) float32; output
``logits`` (B, num_classes).

ONNX uses torch's TorchScript-based exporter (``dynamo=False``): the newer
dynamo exporter needs the ``onnxscript`` package, which vitcraft does not
depend on, while the TorchScript one works with torch alone. Every attention
backend exports (sdpa becomes plain ONNX MatMul/Softmax ops, or onnxruntime's
fused ops where asked). Files are written atomically
(vitcraft.files), so a failed export leaves no half file.

int8 (:func:`export_int8`) is onnxruntime's quantisation
(:func:`quantize_onnx`) of a graph whose attention and GELU are onnxruntime's
own fused ops, so the int8 file is for onnxruntime (the float32 export stays plain ONNX):
static (weights and activations in int8, the activations' ranges calibrated on
training images) or dynamic (int8 weights, activation ranges computed per
batch at run time). :class:`OnnxModel` runs an exported file in onnxruntime
behind the model's own call signature, so ``train.evaluate`` scores it as it
scores the PyTorch model.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vitcraft.augment import BatchAugment, Normalization
from vitcraft.data import ImageTensorDataset
from vitcraft.errors import VitcraftError
from vitcraft.files import atomic_write
from vitcraft.model import FasterMultiHeadAttention, MultiHeadAttention, NewGELUActivation, ViTForClassification

DEFAULT_OPSET = 17  # widely supported by onnxruntime; has LayerNormalization


class LogitsOnly(nn.Module):
    """Wrap a ViTForClassification so that forward returns the logits tensor only.

    In: (B, num_channels, image_size, image_size). Out: (B, num_classes).
    """

    def __init__(self, model: ViTForClassification):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)[0]


class _OnnxRuntimeAttention(torch.autograd.Function):
    """Scaled dot-product attention of all heads, which the ONNX exporter writes as one onnxruntime
    ``MultiHeadAttention`` op (com.microsoft domain). In: query (B, Q, hidden), key and value (B, N, hidden),
    the heads side by side. Out: (B, Q, hidden), likewise."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
        batch_size, num_queries, hidden_size = query.shape

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, L, hidden) -> (B, heads, L, head_size)
            return x.view(batch_size, x.shape[1], heads, hidden_size // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(query), split(key), split(value))  # (B, heads, Q, head_size)
        return out.transpose(1, 2).reshape(batch_size, num_queries, hidden_size)

    @staticmethod
    def symbolic(g, query, key, value, heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=heads)
        out.setType(query.type())  # the query's shape and type: torch cannot infer a contrib op's
        return out


class OnnxRuntimeAttention(nn.Module):
    """An attention module as three products (q, k, v), onnxruntime's fused ``MultiHeadAttention`` op, then
    the output projection (export only).

    The products stay plain MatMuls, which onnxruntime's dynamic int8 quantisation turns into int8 ones; the
    attention itself is one kernel instead of a split and a dozen small reshapes, transposes and products.
    ``num_queries`` computes the first tokens' queries only, as FasterMultiHeadAttention does. Calls with a
    bias on the scores (Swin) or the attention probabilities asked for go to the module itself.
    In: (B, N, hidden). Out: ((B, Q, hidden), None), Q = N or ``num_queries``.
    """

    takes_num_queries = True

    def __init__(self, attention: FasterMultiHeadAttention):
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor, output_attentions: bool = False, *,
                attention_bias: torch.Tensor | None = None, num_queries: int | None = None):
        if output_attentions or attention_bias is not None:
            return self.attention(x, output_attentions, attention_bias=attention_bias, num_queries=num_queries)
        qkv = self.attention.qkv_projection
        # (3 * hidden, hidden) rows are [q | k | v]: one constant weight per product in the graph
        weights = qkv.weight.chunk(3)
        biases = qkv.bias.chunk(3) if qkv.bias is not None else (None,) * 3
        queries = x if num_queries is None else x[:, :num_queries]
        query = F.linear(queries, weights[0], biases[0])  # (B, Q, hidden)
        key, value = (F.linear(x, weight, bias) for weight, bias in zip(weights[1:], biases[1:]))  # (B, N, hidden)
        out = _OnnxRuntimeAttention.apply(query, key, value, self.attention.num_attention_heads)
        return self.attention.output_projection(out), None


class _FastGelu(torch.autograd.Function):
    """GELU in its tanh form, which the ONNX exporter writes as onnxruntime's ``FastGelu`` op (the same
    formula, one kernel instead of eight elementwise ops). Any shape in, the same out."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def symbolic(g, x):
        out = g.op("com.microsoft::FastGelu", x)
        out.setType(x.type())
        return out


class OnnxRuntimeGelu(nn.Module):
    """NewGELUActivation as onnxruntime's FastGelu op (export only). In: any shape. Out: the same shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FastGelu.apply(x)


def _with_onnxruntime_ops(model: nn.Module) -> None:
    """Replace, in place, every attention module of ``model`` with OnnxRuntimeAttention (per-head ones fused
    first: FasterMultiHeadAttention loads their weights; locality self-attention stays fused) and every tanh
    GELU with OnnxRuntimeGelu."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, MultiHeadAttention):
                fused = FasterMultiHeadAttention(model.config)
                fused.load_state_dict(child.state_dict())
                child = fused
            if isinstance(child, FasterMultiHeadAttention):
                # locality self-attention scales and masks the scores, which onnxruntime's op cannot
                setattr(parent, name, child if child.temperature is not None else OnnxRuntimeAttention(child))
            elif isinstance(child, NewGELUActivation):
                setattr(parent, name, OnnxRuntimeGelu())


@contextlib.contextmanager
def _export_copy(model: ViTForClassification,
                 onnxruntime_ops: bool = False) -> Iterator[tuple[LogitsOnly, torch.Tensor]]:
    """An eval-mode CPU float32 copy of the model, wrapped, and an example input (2 images).

    A copy, so the caller's model keeps its mode, device and dtype. Tracing
    records the input-shape check in PatchEmbeddings as a constant (torch warns
    about it); that is right, as the image size is fixed, so the warning is hidden.
    """
    copied = copy.deepcopy(model).float().cpu()
    if onnxruntime_ops:
        _with_onnxruntime_ops(copied)
    wrapper = LogitsOnly(copied.eval())  # eval after the swap: the modules it makes are in training mode
    config = model.config
    example = torch.randn(2, config.num_channels, config.image_size, config.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield wrapper, example


def export_onnx(model: ViTForClassification, path: str | os.PathLike, opset: int = DEFAULT_OPSET,
                onnxruntime_ops: bool = False) -> Path:
    """Write the model as an ONNX graph with a dynamic batch axis; returns the path.

    Input ``pixel_values`` (batch, C, H, W), output ``logits`` (batch, num_classes).
    Plain ONNX ops, unless ``onnxruntime_ops``: then each attention is
    onnxruntime's ``MultiHeadAttention`` op (OnnxRuntimeAttention) and each
    tanh GELU its ``FastGelu`` op, a graph only onnxruntime runs, and faster
    there, in float32 and int8 (docs/deploy.md).
    Needs the ``onnx`` package (``pip install 'vitcraft[onnx]'``).
    """
    if importlib.util.find_spec("onnx") is None:  # torch's exporter builds the graph with it
        raise VitcraftError("exporting to ONNX needs the onnx package: pip install onnx")
    with _export_copy(model, onnxruntime_ops) as (wrapper, example), warnings.catch_warnings():
        # torch announces that this exporter is the legacy one; see the module docstring for why
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return atomic_write(path, lambda temp: torch.onnx.export(
            wrapper, (example,), temp, dynamo=False, opset_version=opset,
            input_names=["pixel_values"], output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}}))


INT8_METHODS = ("static", "dynamic")
# the matrix products carry nearly all the arithmetic and the weights; LayerNorm, softmax, GELU and the
# residual adds stay in float32, where int8 would cost accuracy and add quantise/dequantise pairs
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]
# dynamic: the patch convolution stays float32, as onnxruntime's ConvInteger is slower than its float one
DYNAMIC_QUANTIZED_OPS = ["MatMul", "Gemm"]


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """onnxruntime's quantisation tools log advice through the root logger and warnings; keep the CLI's output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def calibration_images(dataset: ImageTensorDataset, normalization: Normalization, count: int,
                       image_size: int) -> torch.Tensor:
    """What static int8 calibrates on: the first ``count`` images of ``dataset`` (a training split) in a fixed
    shuffle, as the model evaluates them: centre-cropped to image_size and normalised by ``normalization``.
    Out: (count, C, image_size, image_size) float32."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count]
    centre = BatchAugment(normalization, flip_p=0.0, crop_scale=None, output_size=image_size)
    return centre(dataset.batch(order))


def _compact_onnx(path: str) -> None:
    """Rewrite the ONNX file ``path`` smaller, computing the same: no shape annotations, node names or doc
    strings, and the tensors between nodes named by number (in a small model's int8 file the names weigh
    as much as the weights). The inputs, outputs and weights keep their names."""
    import onnx

    model = onnx.load(path)
    graph = model.graph
    del graph.value_info[:]
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    renamed: dict[str, str] = {}
    for node in graph.node:  # in topological order: a tensor is renamed where it is made, before it is read
        node.name, node.doc_string = "", ""
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        for i, name in enumerate(node.output):
            if name and name not in keep:
                node.output[i] = renamed[name] = f"t{len(renamed)}"
    onnx.save(model, path)


def quantize_onnx(fp32_path: str | os.PathLike, path: str | os.PathLike, method: str = "dynamic",
                  calibration: torch.Tensor | None = None, batch_size: int = 32) -> Path:
    """Write the int8 quantisation of the ONNX file ``fp32_path`` to ``path``; returns the path.

    ``static``: QDQ format, int8 weights per output channel and int8 activations whose ranges
    come from running ``calibration`` (normalised images, (N, C, H, W) float32) through the
    model in batches; ``dynamic``: int8 weights of the matrix products, activations quantised
    per batch at run time (no calibration). Needs onnxruntime (``pip install onnxruntime``).
    """
    try:
        import onnx
        from onnxruntime import quantization
    except ImportError:
        raise VitcraftError("int8 export needs onnxruntime: pip install onnxruntime") from None
    if method not in INT8_METHODS:
        raise VitcraftError(f"int8 method must be one of {', '.join(INT8_METHODS)}; got {method!r}")
    if method == "static" and (calibration is None or len(calibration) == 0):
        raise VitcraftError("static int8 quantisation needs calibration images")

    class Batches(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration.split(batch_size))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"pixel_values": batch.float().numpy()}

    def write(temp: str) -> None:
        prepared = Path(temp).with_suffix(".prepared.onnx")
        try:
            with _quiet_onnxruntime():
                quantization.quant_pre_process(str(fp32_path), str(prepared))  # shape inference, folding
                if method == "static":
                    quantization.quantize_static(
                        str(prepared), temp, Batches(), quant_format=quantization.QuantFormat.QDQ,
                        op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
                        activation_type=quantization.QuantType.QInt8, weight_type=quantization.QuantType.QInt8)
                else:
                    # only products with a weight: attention's two activation-by-activation products would
                    # quantise both inputs at run time, costing more than their small int8 products save
                    # (the type of a contrib op's output is unknown to ONNX's shape inference: float32)
                    quantization.quantize_dynamic(str(prepared), temp, op_types_to_quantize=DYNAMIC_QUANTIZED_OPS,
                                                  weight_type=quantization.QuantType.QInt8,
                                                  extra_options={"MatMulConstBOnly": True,
                                                                 "DefaultTensorType": onnx.TensorProto.FLOAT})
            _compact_onnx(temp)
        finally:
            prepared.unlink(missing_ok=True)

    return atomic_write(path, write)


def export_int8(model: ViTForClassification, path: str | os.PathLike, method: str = "dynamic",
                calibration: torch.Tensor | None = None) -> Path:
    """Export ``model`` with onnxruntime's fused ops (export_onnx) and write its int8 quantisation
    (quantize_onnx) to ``path``; returns the path. The float32 graph between is not kept."""
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_onnx(model, Path(folder) / "model.onnx", onnxruntime_ops=True)
        return quantize_onnx(fp32, path, method, calibration)


class OnnxModel(nn.Module):
    """An exported ONNX file run by onnxruntime, called like the model it came from.

    In: float (B, C, H, W) normalised images. Out: ``(logits (B, num_classes), None)``,
    as ViTForClassification returns them, so that evaluation code takes either.
    """

    def __init__(self, path: str | os.PathLike, expected: dict | None = None, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise VitcraftError("running an ONNX file needs onnxruntime: pip install onnxruntime") from None
        path = Path(path)
        if not path.is_file():
            raise VitcraftError(f"ONNX file {path} does not exist")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for a corrupt or foreign file
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise VitcraftError(f"{path} is not an ONNX model onnxruntime can run: {reason}") from None
        inputs = [node.name for node in self.session.get_inputs()]
        if inputs != ["pixel_values"]:
            raise VitcraftError(f"{path} takes {inputs}, not the pixel_values vitcraft exports")
        shape = self.session.get_inputs()[0].shape[1:]  # (C, H, W); the batch axis is free
        if expected and shape != [expected["num_channels"], expected["image_size"], expected["image_size"]]:
            raise VitcraftError(f"{path} takes images of shape {shape}, but the run's model "
                                f"{[expected['num_channels'], expected['image_size'], expected['image_size']]}: "
                                f"it was exported from another model")
        self.path = path

    def forward(self, pixel_values: torch.Tensor):
        logits = self.session.run(["logits"], {"pixel_values": pixel_values.float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(pixel_values.device), None


def export_torchscript(model: ViTForClassification, path: str | os.PathLike) -> Path:
    """Write the model as a traced TorchScript module (``torch.jit.load`` reads it); returns the path.

    The traced module maps (B, C, H, W) images to (B, num_classes) logits for any B.
    Recent torch deprecates TorchScript and says so in a FutureWarning, left
    visible on purpose; ONNX is the format with a future.
    """
    with _export_copy(model) as (wrapper, example), torch.no_grad():
        traced = torch.jit.trace(wrapper, example)
    return atomic_write(path, traced.save)
