"""benchmarks/reference.py, the tutorial baseline the benchmarks measure against: plain torch.nn, same numbers."""

import sys
from pathlib import Path

import pytest
import torch

from vitcraft import ViTConfig, ViTForClassification

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import reference  # noqa: E402


@pytest.mark.parametrize("use_faster_attention", [False, True])
def test_the_tutorial_model_is_built_from_torch_nn_and_its_own_classes_only(use_faster_attention):
    model = reference.tutorial_model(use_faster_attention=use_faster_attention)
    kinds = {type(module) for module in model.modules()}
    assert all(kind.__module__.startswith("torch.nn.") or kind.__module__ == reference.__name__ for kind in kinds), \
        sorted(f"{kind.__module__}.{kind.__qualname__}" for kind in kinds)
    assert {torch.nn.LayerNorm, torch.nn.Dropout, torch.nn.Linear, torch.nn.Conv2d} <= kinds
    attention = reference.FasterMultiHeadAttention if use_faster_attention else reference.MultiHeadAttention
    assert attention in kinds
    assert sum(p.numel() for p in model.parameters()) == 119_098  # the tutorial's count


@pytest.mark.parametrize("use_faster_attention", [False, True])
def test_with_vitcrafts_weights_it_gives_the_per_head_models_logits(use_faster_attention):
    torch.manual_seed(0)
    per_head = ViTForClassification(ViTConfig(attention_backend="per_head")).eval()
    # the reference reads the layout it has; vitcraft's modules convert between layouts
    same_layout = ViTForClassification(ViTConfig(attention_backend="fused" if use_faster_attention else "per_head"))
    same_layout.load_state_dict(per_head.state_dict())
    model = reference.tutorial_model(use_faster_attention=use_faster_attention).eval()
    model.load_state_dict(same_layout.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32)
    logits, attentions = model(x, output_attentions=True)
    want_logits, want_attentions = per_head(x, output_attentions=True)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    for got, want in zip(attentions, want_attentions, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and back: vitcraft loads the reference's state dict
    again = ViTForClassification(ViTConfig()).eval()
    again.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(again(x)[0], want_logits, atol=1e-5, rtol=1e-5)
