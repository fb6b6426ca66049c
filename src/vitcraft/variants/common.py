"""What the variant models share beyond their configs: the transformer weight init.

The configs' dict I/O (``DictConfig``) and field checks (``check_*``) are
vitcraft.config's, the same as ViTConfig's.
"""

from __future__ import annotations

from torch import nn


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
