"""Checks every model variant must pass, shared by tests/test_swin.py and tests/test_cct.py."""

from typing import Callable

import torch
from torch import nn

from vitcraft import create_model
from vitcraft.model import count_parameters
from vitcraft.registry import get_preset


def assert_every_parameter_gets_a_gradient(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    model(x)[0].logsumexp(-1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def assert_checkpointing_keeps_gradients(make_model: Callable[[], nn.Module], x: torch.Tensor) -> None:
    """Recomputing the blocks in the backward pass must give the same gradients (no dropout in make_model)."""
    plain, checkpointed = make_model(), make_model()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    for model in (plain, checkpointed):
        model(x)[0].sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def assert_description_states_parameter_count(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init work
        model = create_model(name)
    assert f"({count_parameters(model):,} parameters)" in get_preset(name).description

