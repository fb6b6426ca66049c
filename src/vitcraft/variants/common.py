"""What the variant models share: config dict I/O, field checks, weight init.

``VariantConfig`` gives a config dataclass the interface ``ViTConfig`` has
(``from_dict``, ``to_dict``, ``replace``, ``field_names``), which is what the
registry, the training loop and checkpoints call. The ``check_*`` functions
raise one ValueError naming the field, like ``ViTConfig.validate``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from vitcraft.config import DictConfig

VariantConfig = DictConfig  # the variant configs' base: ViTConfig's dict I/O


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive_numbers(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not _is_number(value) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_fractions(config: Any, names: tuple[str, ...]) -> None:
    """Dropout-like rates: numbers in [0, 1)."""
    for name in names:
        value = getattr(config, name)
        if not _is_number(value) or not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_bools(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(config, name)!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def init_linear_and_layernorm(module: nn.Module, std: float) -> bool:
    """timm's transformer init for one module; True if it was a Linear or a LayerNorm.

    Linear: weight from N(0, std) truncated at +-2 (timm's trunc_normal_; at
    std 0.02 the cut never bites), zero bias. LayerNorm: unit gain, zero shift.
    For ``model.apply``; the model initialises its other modules itself.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        return True
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
        return True
    return False
