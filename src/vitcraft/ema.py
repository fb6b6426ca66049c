"""An exponential moving average of a model's weights (``--ema DECAY``), as timm's ModelEmaV3.

The average of the last few thousand steps' weights often generalises better
than the last step's: it smooths out the noise of the final updates. The
training loop updates it after every optimizer step, evaluates it beside the
raw weights each epoch and saves the better of the two; the checkpoint keeps
it, so a resumed run continues the same average.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vitcraft.state_dict import unwrap


class ModelEma:
    """A copy of a model whose weights follow ``ema = decay * ema + (1 - decay) * weights``.

    ``update(model)`` applies that to every floating-point parameter and buffer
    (BatchNorm's running statistics too) and copies the integer buffers (such
    as BatchNorm's step count). There is no warmup of the decay: the average
    starts at the model's initial weights. ``module`` is the averaged model, in
    eval mode and without gradients; evaluate and save it as any model.
    ``state_dict`` / ``load_state_dict`` are the averaged module's.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged, current = [], []
        for ema_value, value in zip(self.module.state_dict().values(), unwrap(model).state_dict().values()):
            if ema_value.is_floating_point():
                averaged.append(ema_value)
                current.append(value.to(ema_value.dtype))
            else:
                ema_value.copy_(value)
        # ema + (1 - decay) * (value - ema): the formula, in one fused kernel per dtype and device
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state_dict)
