"""Export a trained model for inference outside Python training code: ONNX and TorchScript.

Both exports trace a thin wrapper that returns the logits only (the model
itself returns ``(logits, None)``), in eval mode, on CPU, with the batch
dimension left free. Input ``pixel_values`` (B, C, H, W) float32; output
``logits`` (B, num_classes).

ONNX uses torch's TorchScript-based exporter (``dynamo=False``): the newer
dynamo exporter needs the ``onnxscript`` package, which vitcraft does not
depend on, while the TorchScript one works with torch alone. Every attention
backend exports (sdpa becomes plain ONNX MatMul/Softmax ops). Files are
written atomically (vitcraft.files), so a failed export leaves no half file.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from vitcraft.errors import VitcraftError
from vitcraft.files import atomic_write
from vitcraft.model import ViTForClassification

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


@contextlib.contextmanager
def _export_copy(model: ViTForClassification) -> Iterator[tuple[LogitsOnly, torch.Tensor]]:
    """An eval-mode CPU float32 copy of the model, wrapped, and an example input (2 images).

    A copy, so the caller's model keeps its mode, device and dtype. Tracing
    records the input-shape check in PatchEmbeddings as a constant (torch warns
    about it); that is right, as the image size is fixed, so the warning is hidden.
    """
    wrapper = LogitsOnly(copy.deepcopy(model).float().cpu().eval())
    config = model.config
    example = torch.randn(2, config.num_channels, config.image_size, config.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield wrapper, example


def export_onnx(model: ViTForClassification, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> Path:
    """Write the model as an ONNX graph with a dynamic batch axis; returns the path.

    Input ``pixel_values`` (batch, C, H, W), output ``logits`` (batch, num_classes).
    Needs the ``onnx`` package (``pip install 'vitcraft[onnx]'``).
    """
    if importlib.util.find_spec("onnx") is None:  # torch's exporter builds the graph with it
        raise VitcraftError("exporting to ONNX needs the onnx package: pip install onnx")
    with _export_copy(model) as (wrapper, example), warnings.catch_warnings():
        # torch announces that this exporter is the legacy one; see the module docstring for why
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return atomic_write(path, lambda temp: torch.onnx.export(
            wrapper, (example,), temp, dynamo=False, opset_version=opset,
            input_names=["pixel_values"], output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}}))


def export_torchscript(model: ViTForClassification, path: str | os.PathLike) -> Path:
    """Write the model as a traced TorchScript module (``torch.jit.load`` reads it); returns the path.

    The traced module maps (B, C, H, W) images to (B, num_classes) logits for any B.
    Recent torch deprecates TorchScript and says so in a FutureWarning, left
    visible on purpose; ONNX is the format with a future.
    """
    with _export_copy(model) as (wrapper, example), torch.no_grad():
        traced = torch.jit.trace(wrapper, example)
    return atomic_write(path, traced.save)
