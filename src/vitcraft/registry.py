"""Named model presets: ``create_model(name, **overrides)`` and ``list_models()``.

A preset is a ViTConfig recipe plus a one-line description. Overrides are
config fields (``create_model("seed-tiny", num_classes=100)``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from vitcraft.config import ViTConfig
from vitcraft.model import ViTForClassification
from vitcraft.variants.cct import CCTConfig, CCTForClassification
from vitcraft.variants.cnn import CNNConfig, ConvNetForClassification
from vitcraft.variants.deit import DeiTForClassification
from vitcraft.variants.swin import SwinConfig, SwinForClassification


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict[str, Any]
    builder: Callable[[Any], nn.Module] = ViTForClassification
    config_class: type = ViTConfig


_PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    _PRESETS[preset.name] = preset
    return preset


def _vit(width: int, depth: int, heads: int, image_size: int, patch_size: int, num_classes: int) -> dict:
    """A ViT shaped like the paper's / timm's (exact GELU, final LayerNorm, eps 1e-6)."""
    return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                intermediate_size=4 * width, image_size=image_size, patch_size=patch_size,
                num_classes=num_classes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                hidden_act="gelu", final_layernorm=True, layer_norm_eps=1e-6)


register_preset(Preset(
    "seed-tiny",
    "The seed tutorial's CIFAR-10 ViT: 32x32 input, 4x4 patches, width 48, 4 blocks, 4 heads "
    "(119,098 parameters); measured figures for its 15-epoch recipe are in README.",
    ViTConfig().to_dict()))
for _size, (_width, _heads) in {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}.items():
    register_preset(Preset(
        f"vit-{_size}-p4-32",
        f"ViT-{_size[0].upper()} shape (width {_width}, 12 blocks, {_heads} heads) for 32x32 images, 4x4 patches.",
        _vit(_width, 12, _heads, image_size=32, patch_size=4, num_classes=10)))
    register_preset(Preset(
        f"vit-{_size}-p16-224",
        f"ViT-{_size[0].upper()}/16 (width {_width}, 12 blocks, {_heads} heads) for 224x224 images, "
        f"the shape of timm's vit_{_size}_patch16_224.",
        _vit(_width, 12, _heads, image_size=224, patch_size=16, num_classes=1000)))

# DeiT (distillation token) and the CNN teachers it distils from; see variants/deit.py, variants/cnn.py
register_preset(Preset(
    "deit-seed-tiny",
    "seed-tiny plus DeiT's distillation token and head (119,684 parameters); train with --teacher RUN_DIR.",
    ViTConfig().to_dict(), builder=DeiTForClassification))
register_preset(Preset(
    "deit-tiny-p4-32",
    "DeiT-Ti shape (width 192, 12 blocks, 3 heads, distillation token) for 32x32 images, 4x4 patches.",
    _vit(192, 12, 3, image_size=32, patch_size=4, num_classes=10), builder=DeiTForClassification))
register_preset(Preset(
    "cnn-small",
    "A fast CNN teacher: 3x3 conv-BN-ReLU stem of width 16, three conv-pool stages to 128 channels "
    "(99k parameters; --model-arg width=32 for a stronger one).",
    CNNConfig(arch="small", width=16).to_dict(), builder=ConvNetForClassification, config_class=CNNConfig))
register_preset(Preset(
    "resnet18-cifar",
    "torchvision's ResNet-18 with a 3x3 stride-1 stem and no max pooling, for 32x32 images "
    "(11.2M parameters).",
    CNNConfig(arch="resnet18", width=64).to_dict(), builder=ConvNetForClassification, config_class=CNNConfig))

# Swin (shifted windows, a pyramid) and CCT (conv tokenizer, sequence pooling); see variants/swin.py, variants/cct.py
register_preset(Preset(
    "swin-tiny-32",
    "A small Swin for 32x32 images: 2x2 patches (16x16 grid), 4x4 windows, 3 stages of 2 blocks, "
    "widths 48/96/192, heads 3/6/12, mean-pooled (1,268,356 parameters).",
    SwinConfig().to_dict(), builder=SwinForClassification, config_class=SwinConfig))
register_preset(Preset(
    "swin-t-224",
    "Swin-T for 224x224 images: 4x4 patches, 7x7 windows, depths 2/2/6/2, widths 96 to 768, heads "
    "3/6/12/24, stochastic depth 0.2; timm's swin_tiny_patch4_window7_224 shape (28,288,354 parameters).",
    SwinConfig(image_size=224, patch_size=4, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
               num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2).to_dict(),
    builder=SwinForClassification, config_class=SwinConfig))
register_preset(Preset(
    "cct-7-3x1-32",
    "CCT-7/3x1 for 32x32 images: one 3x3 conv + max-pool tokenizer layer (256 tokens), 7 blocks of "
    "width 256, 4 heads, MLP ratio 2, sequence pooling (3,760,139 parameters).",
    CCTConfig().to_dict(), builder=CCTForClassification, config_class=CCTConfig))
register_preset(Preset(
    "cct-2-3x2-32",
    "CCT-2/3x2, fast on a CPU: two 3x3 conv + max-pool tokenizer layers (64 tokens), 2 blocks of "
    "width 128, 2 heads, MLP ratio 1, sequence pooling (283,723 parameters).",
    CCTConfig(num_conv_layers=2, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=128).to_dict(), builder=CCTForClassification, config_class=CCTConfig))


def get_preset(name: str) -> Preset:
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list(_PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (see `vitcraft list-models`)")
    return _PRESETS[name]


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_PRESETS)


def describe_models() -> dict[str, str]:
    return {name: _PRESETS[name].description for name in list_models()}


def preset_config(name: str, **overrides: Any):
    """The config object of a preset with overrides applied (validated)."""
    preset = get_preset(name)
    return preset.config_class.from_dict({**preset.config, **overrides})


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a preset by name, e.g. ``create_model("seed-tiny", num_classes=100)``."""
    return get_preset(name).builder(preset_config(name, **overrides))
