"""Loading a state dict into a model with one clear message when it does not fit.

The lowest layer of weight handling: checkpoints, hub folders and interop all
load through :func:`load_state_checked`. Imports nothing of vitcraft but its
exception type.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vitcraft.errors import VitcraftError


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or torch.compile) wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor],
                       source: Path | str = "the state dict") -> nn.Module:
    """A strict load_state_dict that fails with one clear sentence naming ``source`` and the key.

    Either attention layout loads (the attention modules' load hooks convert
    fused and per-head weights). Raises VitcraftError for the first
    mis-shaped, missing or unexpected tensor. Returns the model.
    """
    load_state_listed(model, state, source)
    return model


def load_state_listed(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str = "the state dict",
                      may_stay_new: tuple[str, ...] = ()) -> list[str]:
    """:func:`load_state_checked`, except that the model's weights under the key prefixes ``may_stay_new``
    may be missing from ``state``: they keep their initial values. Returns those keys (the newly initialised)."""
    for key, own in model.state_dict().items():  # in the model's order: the first layer that differs
        if key in state and tuple(own.shape) != tuple(state[key].shape):
            raise VitcraftError(f"{source} has {key!r} of shape {tuple(state[key].shape)}, but this model's is "
                                f"{tuple(own.shape)}; the weights are from a differently shaped model")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a shape mismatch that only shows after layout conversion
        raise VitcraftError(f"{source} does not fit this model: {str(error).splitlines()[-1].strip()}") from None
    missing = [key for key in result.missing_keys if not key.startswith(may_stay_new)]
    if missing:
        raise VitcraftError(f"{source} has no weight {missing[0]!r}, which this model needs")
    if result.unexpected_keys:
        raise VitcraftError(f"{source} has a weight {result.unexpected_keys[0]!r} that this model does not have")
    return list(result.missing_keys)
