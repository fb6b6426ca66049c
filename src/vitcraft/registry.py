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
    "(119,098 parameters).",
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
