"""vitcraft <-> timm / Hugging Face weight conversion: exact logits both ways, clear refusals."""

import pytest
import torch
from torch import nn

from vitcraft import ViTConfig, ViTForClassification
from vitcraft.convert import fused_state_dict
from vitcraft.errors import VitcraftError
from vitcraft.interop import from_hf, from_timm, to_hf_config, to_hf_state_dict, to_timm_kwargs, to_timm_state_dict
from vitcraft.state_dict import load_state_checked as load_weights

timm_vit = pytest.importorskip("timm.models.vision_transformer")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter with N(0, 0.2) noise, so that no weight is a trivial 0 or 1 that would
    hide a mix-up (timm zero-inits heads, HF's std-0.02 init gives near-constant logits)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return module.eval()


def images(size: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert theirs.std() > 1e-2  # the comparison means something
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def timm_model(**kwargs) -> nn.Module:
    args = dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=5)
    return randomize(timm_vit.VisionTransformer(**{**args, **kwargs}))


TIMM_CASES = {
    "p4-token-bias": dict(img_size=32, patch_size=4, embed_dim=24, depth=1, num_heads=2, global_pool="token"),
    "p8-avg-nobias": dict(img_size=48, patch_size=8, embed_dim=36, depth=2, num_heads=3, qkv_bias=False,
                          global_pool="avg", num_classes=7),
    "p16-224-tanh-eps": dict(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=4, mlp_ratio=2.5,
                             act_layer="gelu_tanh", norm_layer=nn.LayerNorm),  # eps 1e-5
    "p16-depth3-no-final-norm": dict(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=4,
                                     final_norm=False),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_from_timm_module_matches_timm_and_round_trips(case):
    reference = timm_model(**TIMM_CASES[case])
    x = images(reference.patch_embed.img_size[0])
    expected = reference(x)
    ours = from_timm(reference, attention_backend="per_head" if case == "p8-avg-nobias" else "sdpa")
    assert_same_logits(ours(x)[0], expected)

    rebuilt = timm_vit.VisionTransformer(**to_timm_kwargs(ours)).eval()
    rebuilt.load_state_dict(to_timm_state_dict(ours), strict=True)
    assert_same_logits(rebuilt(x), expected)


@pytest.mark.parametrize("backend", ["per_head", "fused", "sdpa"])
def test_from_timm_state_dict_any_backend(backend):
    reference = timm_model(global_pool="avg", depth=2, num_heads=3)
    x = images(32)
    ours = from_timm(reference.state_dict(), num_attention_heads=3, attention_backend=backend)
    assert ours.config.pooling == "mean" and ours.config.layer_norm_eps == 1e-6
    assert_same_logits(ours(x)[0], reference(x))


def test_from_timm_state_dict_needs_the_head_count():
    with pytest.raises(ValueError, match="num_attention_heads"):
        from_timm(timm_model().state_dict())


@pytest.mark.parametrize("kwargs, feature", [
    (dict(class_token=False, global_pool="avg"), "no class token"),
    (dict(reg_tokens=2), "register tokens"),
    (dict(init_values=1e-5), "layer scale"),
    (dict(pre_norm=True), "pre_norm"),
    (dict(qk_norm=True), "qk_norm"),
    (dict(no_embed_class=True), "no_embed_class"),
    (dict(dynamic_img_size=True), "dynamic_img_size"),
    (dict(global_pool="map"), "global_pool='map'"),
    (dict(num_classes=0), "no classifier head"),
    (dict(act_layer="quick_gelu"), "activation QuickGELU"),
])
def test_from_timm_refuses_unsupported_features(kwargs, feature):
    reference = timm_model(**kwargs)
    with pytest.raises(ValueError, match=f"uses {feature}"):
        from_timm(reference)
    if feature not in ("dynamic_img_size", "activation QuickGELU"):  # not visible in the weights
        with pytest.raises(ValueError, match=feature):
            from_timm(reference.state_dict(), num_attention_heads=2)


HF_CASES = {
    "p4-gelu": dict(image_size=32, patch_size=4, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=96),
    "p8-gelu-new-nobias": dict(image_size=48, patch_size=8, hidden_size=36, num_hidden_layers=2,
                               num_attention_heads=3, intermediate_size=72, qkv_bias=False,
                               hidden_act="gelu_new", layer_norm_eps=1e-6),
    "p16-pytorch-tanh": dict(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=3,
                             num_attention_heads=4, intermediate_size=80, hidden_act="gelu_pytorch_tanh"),
}


def hf_model(**kwargs) -> nn.Module:
    return randomize(transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=5, **kwargs)))


@pytest.mark.parametrize("case", list(HF_CASES))
def test_from_hf_matches_hf_and_round_trips(case):
    reference = hf_model(**HF_CASES[case])
    x = images(HF_CASES[case]["image_size"])
    expected = reference(x).logits
    ours = from_hf(reference, attention_backend="per_head" if case == "p4-gelu" else "sdpa")
    assert_same_logits(ours(x)[0], expected)

    rebuilt = transformers.ViTForImageClassification(transformers.ViTConfig(**to_hf_config(ours))).eval()
    rebuilt.load_state_dict(to_hf_state_dict(ours), strict=True)
    assert_same_logits(rebuilt(x).logits, expected)

    # checkpoint-file key names (vit.encoder.layer.N...), with and without the "vit." prefix
    checkpoint = to_hf_state_dict(ours, style="checkpoint")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in checkpoint
    unprefixed = {k.removeprefix("vit."): v for k, v in checkpoint.items()}
    for state in (checkpoint, unprefixed):
        assert_same_logits(from_hf(state, to_hf_config(ours))(x)[0], expected)


def test_hf_config_dict_with_class_names_builds_the_hf_model():
    ours = ViTForClassification(ViTConfig(hidden_act="gelu", final_layernorm=True, num_classes=3))
    config = to_hf_config(ours, class_names=["cat", "dog", "emu"])
    hf = transformers.ViTConfig(**config)
    assert hf.num_labels == 3 and hf.id2label[2] == "emu" and hf.layer_norm_eps == ours.config.layer_norm_eps


def test_hf_refusals():
    with pytest.raises(ValueError, match="pooling='mean'"):
        to_hf_state_dict(ViTForClassification(ViTConfig(pooling="mean", final_layernorm=True)))
    with pytest.raises(ValueError, match="final_layernorm=False"):
        to_hf_config(ViTForClassification(ViTConfig()))
    reference = hf_model(**HF_CASES["p4-gelu"])
    with pytest.raises(ValueError, match="needs hf_config"):
        from_hf(reference.state_dict())
    with pytest.raises(ValueError, match="model_type 'deit'"):
        from_hf(reference.state_dict(), {**reference.config.to_dict(), "model_type": "deit"})
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        from_hf(reference.state_dict(), {**reference.config.to_dict(), "hidden_act": "relu"})
    with pytest.raises(ValueError, match="no classifier"):
        from_hf(transformers.ViTModel(reference.config))


def test_per_head_weights_export_in_the_fused_layout():
    config = ViTConfig(num_hidden_layers=1)
    per_head = ViTForClassification(config.replace(attention_backend="per_head"))
    state = fused_state_dict(per_head)
    assert "encoder.blocks.0.attention.qkv_projection.weight" in state
    fused = load_weights(ViTForClassification(config.replace(attention_backend="fused")), state).eval()
    x = images(32)
    torch.testing.assert_close(fused(x)[0], per_head.eval()(x)[0], atol=1e-5, rtol=0)
    # and a per-head state dict loads into any backend too
    sdpa = load_weights(ViTForClassification(config), per_head.state_dict()).eval()
    torch.testing.assert_close(sdpa(x)[0], per_head(x)[0], atol=1e-5, rtol=0)


def test_load_weights_names_the_mismatched_key_and_shapes():
    state = fused_state_dict(ViTForClassification(ViTConfig(num_classes=10)))
    with pytest.raises(ValueError, match=r"'classifier.weight' of shape \(10, 48\).*model's is \(7, 48\)"):
        load_weights(ViTForClassification(ViTConfig(num_classes=7, attention_backend="per_head")), state)
    with pytest.raises(ValueError, match="has a weight 'extra.weight'"):
        load_weights(ViTForClassification(ViTConfig()), {**state, "extra.weight": torch.zeros(1)})


def test_patch_dropout_trains_on_the_patches_timm_keeps_and_round_trips():
    # in training mode both draw the kept patches from the same generator in the same way (no other
    # randomness with dropout off), so the logits agree; eval uses every patch
    reference = timm_model(patch_drop_rate=0.5, global_pool="token", patch_size=4).train()
    ours = from_timm(reference).train()
    assert ours.config.patch_dropout == 0.5 and to_timm_kwargs(ours)["patch_drop_rate"] == 0.5
    x = images(32)
    torch.manual_seed(3)
    expected = reference(x)
    torch.manual_seed(3)
    assert_same_logits(ours(x)[0], expected)
    torch.manual_seed(4)
    assert (ours(x)[0] - expected).abs().max() > 1e-3  # another draw keeps other patches
    assert_same_logits(ours.eval()(x)[0], reference.eval()(x))


@pytest.mark.parametrize("option", ["shifted_patches", "locality_attention"])
def test_the_small_data_options_have_no_timm_or_hf_equivalent_and_say_so(option):
    model = ViTForClassification(ViTConfig(**{option: True}, final_layernorm=True))
    for convert, library in ((to_timm_kwargs, "timm"), (to_timm_state_dict, "timm"), (to_hf_config, "Hugging Face"),
                             (to_hf_state_dict, "Hugging Face")):
        with pytest.raises(VitcraftError, match=f"{option}=True has no {library} ViT equivalent"):
            convert(model)
