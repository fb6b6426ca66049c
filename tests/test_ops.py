"""vitcraft.ops: where the C kernels, SDPA and plain PyTorch are chosen, and the switch that turns the kernels off."""

import collections
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitcraft import ViTConfig, ViTForClassification, cpu_kernels, ops

KERNELS = ("attention", "gelu_tanh", "dropout", "layer_norm")
needs_kernels = pytest.mark.skipif(
    cpu_kernels.find_compiler() is None and os.environ.get("VITCRAFT_CPU_KERNELS") != "require",
    reason="no C compiler for the CPU kernels")


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often each cpu_kernels function was called (they still compute)."""
    assert cpu_kernels.available(), "the kernels did not build: see tests/test_cpu_kernels.py"
    calls = collections.Counter()
    def counting(name):
        kernel = getattr(cpu_kernels, name)

        def counted(*args):
            calls[name] += 1
            return kernel(*args)
        return counted

    for name in KERNELS:
        monkeypatch.setattr(cpu_kernels, name, counting(name))
    return calls


@needs_kernels
def test_without_kernels_the_model_calls_none_and_gives_the_same_logits(kernel_calls):
    torch.manual_seed(0)
    model = ViTForClassification(ViTConfig()).eval()
    x = torch.randn(3, 3, 32, 32)
    with ops.use_kernels(False):
        assert not ops.kernels_enabled()
        without = model(x)[0]
    assert sum(kernel_calls.values()) == 0
    assert ops.kernels_enabled()
    with_kernels = model(x)[0]
    assert {"attention", "gelu_tanh", "layer_norm"} <= set(kernel_calls)
    torch.testing.assert_close(with_kernels, without, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_without_kernels_training_drops_out_in_pytorch(kernel_calls):
    model = ViTForClassification(ViTConfig()).train()
    x = torch.randn(2, 3, 32, 32)
    with ops.use_kernels(False):
        model(x)[0].sum().backward()
    assert sum(kernel_calls.values()) == 0
    model(x)[0].sum().backward()
    assert set(kernel_calls) == set(KERNELS)


def test_use_kernels_is_a_setter_and_a_context_that_restores_what_was_before():
    try:
        ops.use_kernels(False)
        assert not ops.kernels_enabled()
        with ops.use_kernels(True):
            assert ops.kernels_enabled()
            with pytest.raises(ZeroDivisionError), ops.use_kernels(False):
                raise ZeroDivisionError
            assert ops.kernels_enabled()  # restored on the way out of an error too
        assert not ops.kernels_enabled()
    finally:
        ops.use_kernels(True)
    assert ops.kernels_enabled()


@needs_kernels
def test_a_traced_model_gets_pytorchs_operations(kernel_calls):
    # a tracer records PyTorch operations; a ctypes call would be invisible to it
    model = ViTForClassification(ViTConfig()).eval()
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(Logits(model), x, check_trace=False)
    assert sum(kernel_calls.values()) == 0
    torch.testing.assert_close(traced(x), model(x)[0], atol=1e-5, rtol=1e-5)


class Logits(nn.Module):
    """A model's logits alone: a tracer's output must be tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


def reference_attention(qkv, num_queries, bias=None):
    """The attention formula from scratch: (B, N, 3, heads, d) -> (B, Q, heads, d)."""
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scores = query[:, :, :num_queries] @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(dim=-1) @ value).transpose(1, 2)


@pytest.mark.parametrize("num_queries", [None, 1, 5])
def test_every_attention_path_computes_the_formula(num_queries):
    qkv = torch.randn(2, 17, 3, 3, 8)
    expected = reference_attention(qkv, num_queries or 17)
    bias = torch.randn(3, num_queries or 17, 17)
    outputs = {"default": ops.attention(qkv, 0.0, num_queries)}
    with ops.use_kernels(False):
        outputs["pytorch"] = ops.attention(qkv, 0.0, num_queries)
    query, key, value = ops.split_heads(qkv)
    output, probs = ops.softmax_attention(query[:, :, :num_queries], key, value)
    outputs["explicit"] = output.transpose(1, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, num_queries or 17))
    for name, output in outputs.items():
        assert output.shape == (2, num_queries or 17, 3, 8), name
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(ops.attention(qkv, 0.0, num_queries, attention_bias=bias),
                               reference_attention(qkv, num_queries or 17, bias), atol=1e-5, rtol=1e-5)


def test_attention_with_dropout_on_the_cpu_avoids_sdpa(monkeypatch):
    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(k) or sdpa(*a, **k))
    qkv = torch.randn(2, 9, 3, 2, 4)
    bias = torch.zeros(2, 9, 9)
    with ops.use_kernels(False):
        ops.attention(qkv, 0.0)
        assert len(sdpa_calls) == 1  # no dropout: SDPA
        out = ops.attention(qkv, 0.5)  # dropout: the explicit softmax
        assert len(sdpa_calls) == 1 and out.shape == (2, 9, 2, 4)
    ops.attention(qkv, 0.0, attention_bias=bias)  # the kernel takes no bias: SDPA does
    assert len(sdpa_calls) == 2 and sdpa_calls[-1]["attn_mask"] is not None


@needs_kernels
def test_layer_norm_hands_bf16_autocast_bfloat16_only_from_the_kernel():
    norm = ops.LayerNorm(48)
    x = torch.randn(2, 5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x).dtype == torch.bfloat16  # what the Linear after it would round to
        with ops.use_kernels(False):
            assert norm(x).dtype == torch.float32  # PyTorch's LayerNorm under autocast
    torch.testing.assert_close(norm(x), F.layer_norm(x, (48,), norm.weight, norm.bias, norm.eps),
                               atol=1e-5, rtol=1e-5)


def test_op_modules_are_still_the_nn_modules_they_replace():
    norm, dropout = ops.LayerNorm(8, eps=1e-6), ops.Dropout(0.25)
    assert isinstance(norm, nn.LayerNorm) and isinstance(dropout, nn.Dropout)
    plain = nn.LayerNorm(8, eps=1e-6)
    plain.load_state_dict(norm.state_dict(), strict=True)
    x = torch.randn(4, 8)
    torch.testing.assert_close(norm(x), plain(x), atol=1e-6, rtol=1e-5)
    assert torch.equal(dropout.eval()(x), x)
    kept = dropout.train()(torch.ones(100_000))
    assert abs((kept == 0).float().mean().item() - 0.25) < 0.01
    assert torch.allclose(kept[kept != 0], torch.tensor(1 / 0.75))
