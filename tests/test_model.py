import math

import pytest
import torch
from torch import nn

import vitcraft
from vitcraft import ViTConfig, ViTForClassfication, ViTForClassification, count_parameters, create_model
from vitcraft.model import (
    MLP,
    AttentionHead,
    Block,
    Embeddings,
    Encoder,
    FasterMultiHeadAttention,
    MultiHeadAttention,
    NewGELUActivation,
    PatchEmbeddings,
)

# The tutorial's config, exactly as it writes it.
SEED_CONFIG = {
    "patch_size": 4, "hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4,
    "intermediate_size": 4 * 48, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02, "image_size": 32, "num_classes": 10, "num_channels": 3,
    "qkv_bias": True, "use_faster_attention": True,
}
BACKENDS = ["per_head", "fused", "sdpa"]


def test_tutorial_config_has_tutorial_parameter_count():
    model = ViTForClassfication(SEED_CONFIG)
    assert count_parameters(model) == 119_098
    assert count_parameters(create_model("seed-tiny")) == 119_098
    # the per-head attention has the same parameters, arranged per head
    assert count_parameters(ViTForClassification({**SEED_CONFIG, "use_faster_attention": False})) == 119_098


def test_seed_dict_selects_modules_like_the_tutorial():
    fast = ViTForClassification(SEED_CONFIG)
    slow = ViTForClassification({**SEED_CONFIG, "use_faster_attention": False})
    assert isinstance(fast.encoder.blocks[0].attention, FasterMultiHeadAttention)
    assert fast.config.attention_backend == "sdpa"
    assert isinstance(slow.encoder.blocks[0].attention, MultiHeadAttention)
    assert slow.config.attention_backend == "per_head"


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_shapes_and_attention_rows(backend):
    model = ViTForClassification(ViTConfig(attention_backend=backend)).eval()
    x = torch.randn(3, 3, 32, 32)
    logits, attentions = model(x)
    assert logits.shape == (3, 10) and attentions is None
    logits2, attentions = model(x, output_attentions=True)
    torch.testing.assert_close(logits, logits2)
    assert len(attentions) == 4
    for a in attentions:
        assert a.shape == (3, 4, 65, 65)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, 65))
        assert (a >= 0).all()


def test_attention_rows_sum_to_one_in_training_mode_too():
    model = ViTForClassification(ViTConfig(attention_backend="fused")).train()
    _, attentions = model(torch.randn(2, 3, 32, 32), output_attentions=True)
    torch.testing.assert_close(attentions[-1].sum(-1), torch.ones(2, 4, 65))


@pytest.mark.parametrize("config", [
    ViTConfig(),
    ViTConfig(hidden_act="gelu", final_layernorm=True, layer_norm_eps=1e-6, qkv_bias=False),
    ViTConfig(pooling="mean", final_layernorm=True, image_size=24, patch_size=6, num_attention_heads=6),
])
def test_backends_load_the_same_state_dict_and_agree(config):
    models = {b: ViTForClassification(config.replace(attention_backend=b)).eval() for b in BACKENDS}
    for source in BACKENDS:  # every backend's state dict loads into every other backend
        state = models[source].state_dict()
        for target in BACKENDS:
            models[target].load_state_dict(state, strict=True)
        x = torch.randn(4, 3, config.image_size, config.image_size)
        outputs = {b: models[b](x)[0] for b in BACKENDS}
        for b in BACKENDS:
            torch.testing.assert_close(outputs[b], outputs[source], atol=1e-5, rtol=1e-5)
        # and the per-head weights really are the fused weights, split
        fused_qkv = models["fused"].encoder.blocks[0].attention.qkv_projection.weight
        head1_key = models["per_head"].encoder.blocks[0].attention.heads[1].key.weight
        size = config.attention_head_size
        torch.testing.assert_close(head1_key, fused_qkv[config.hidden_size + size:config.hidden_size + 2 * size])


def test_backends_agree_on_gradients():
    config = ViTConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    x = torch.randn(2, 3, 32, 32)
    reference = ViTForClassification(config.replace(attention_backend="fused"))
    grads = {}
    for backend in BACKENDS:
        model = ViTForClassification(config.replace(attention_backend=backend))
        model.load_state_dict(reference.state_dict())
        model(x)[0].logsumexp(-1).sum().backward()
        grads[backend] = model.embedding.patch_embeddings.projection.weight.grad
    torch.testing.assert_close(grads["sdpa"], grads["fused"], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grads["per_head"], grads["fused"], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", vitcraft.list_models())
def test_every_preset_gets_a_gradient_on_every_parameter(name):
    shrinkable = "num_hidden_layers" in vitcraft.registry.get_preset(name).config_class.field_names()
    overrides = {"num_hidden_layers": 1} if name != "seed-tiny" and shrinkable else {}
    preset = vitcraft.registry.get_preset(name)
    if "depths" in preset.config:  # Swin: one block per stage (tests/test_swin.py runs the full presets)
        overrides = {"depths": [1] * len(preset.config["depths"])}
    model = create_model(name, **overrides)
    c = model.config
    x = torch.randn(2, c.num_channels, c.image_size, c.image_size)
    logits, _ = model(x)
    assert logits.shape == (2, c.num_classes) and torch.isfinite(logits).all()
    logits.sum().backward()
    # a bias added to every score before a softmax over them (CCT's sequence pooling)
    # shifts all scores alike and changes nothing: its gradient is zero up to rounding
    shift_invariant = {"pooling.attention.bias"} if name.startswith("cct") else set()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        if pname in shift_invariant:
            assert p.grad.abs().max() < 1e-6, pname
        else:
            assert p.grad.abs().sum() > 0, pname


def test_new_gelu_is_the_tanh_formula():
    x = torch.linspace(-6, 6, 1001)
    formula = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    torch.testing.assert_close(NewGELUActivation()(x), formula, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(nn.GELU()(x), formula, atol=1e-5)  # exact GELU differs


def test_component_shapes():
    c = ViTConfig()
    x = torch.randn(2, 3, 32, 32)
    patches = PatchEmbeddings(c)(x)
    assert patches.shape == (2, 64, 48)
    emb = Embeddings(c)
    tokens = emb(x)
    assert tokens.shape == (2, 65, 48)
    out, probs = AttentionHead(48, 12, 0.0)(tokens)
    assert out.shape == (2, 65, 12) and probs.shape == (2, 65, 65)
    assert MLP(c)(tokens).shape == (2, 65, 48)
    y, probs = Block(c)(tokens, output_attentions=True)
    assert y.shape == (2, 65, 48) and probs.shape == (2, 4, 65, 65)
    y, all_probs = Encoder(c)(tokens)
    assert y.shape == (2, 65, 48) and all_probs is None


def test_patch_embedding_is_a_per_patch_linear_map():
    c = ViTConfig()
    pe = PatchEmbeddings(c)
    x = torch.randn(1, 3, 32, 32)
    out = pe(x)
    # patch (row 1, col 2) flattened and multiplied by the conv kernel
    patch = x[0, :, 4:8, 8:12].reshape(-1)
    manual = pe.projection.weight.reshape(48, -1) @ patch + pe.projection.bias
    torch.testing.assert_close(out[0, 1 * 8 + 2], manual, atol=1e-5, rtol=1e-5)


def test_seed_initialisation():
    torch.manual_seed(1)
    model = create_model("vit-base-p4-32")
    w = model.encoder.blocks[0].mlp.dense_1.weight
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert model.encoder.blocks[0].mlp.dense_1.bias.abs().max() == 0
    pos = model.embedding.position_embeddings
    assert pos.abs().max() <= 0.04 + 1e-6 and pos.std() > 0.01
    assert (model.encoder.blocks[0].layernorm_1.weight == 1).all()


@pytest.mark.parametrize("preset, backend, kept", [
    ("seed-tiny", "sdpa", 1), ("seed-tiny", "fused", 1), ("seed-tiny", "per_head", 65), ("deit-seed-tiny", "sdpa", 2)])
def test_the_last_block_computes_only_the_pooled_tokens_with_the_same_logits(preset, backend, kept):
    model = create_model(preset, attention_backend=backend).eval()
    x = torch.randn(2, 3, 32, 32)
    queries = []
    model.encoder.blocks[-1].attention.register_forward_hook(lambda m, i, out: queries.append(out[0].shape[1]))
    logits = model(x)[0]
    # the fused attentions compute only [CLS] (DeiT: and its distillation token); per-head all 65
    assert queries == [kept]
    hidden, _ = model.encoder(model.embedding(x))  # every token through every block
    features = model.final_layernorm(hidden[:, :2] if kept == 2 else model.pool(hidden))
    full = (model.classifier(features[:, 0]) + model.distillation_classifier(features[:, 1])) / 2 if kept == 2 \
        else model.classifier(features)
    torch.testing.assert_close(logits, full, atol=1e-6, rtol=1e-5)
    queries.clear()
    model(x, output_attentions=True)  # the maps need every token's queries
    assert queries == [65 if kept != 2 else 66]


def test_mean_pooling_uses_patch_tokens():
    model = ViTForClassification(ViTConfig(pooling="mean", attention_backend="fused")).eval()
    x = torch.randn(2, 3, 32, 32)
    hidden, _ = model.encoder(model.embedding(x))
    torch.testing.assert_close(model(x)[0], model.classifier(hidden[:, 1:].mean(1)))


def test_gradient_checkpointing_gives_the_same_gradients():
    config = ViTConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    a, b = ViTForClassification(config), ViTForClassification(config)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    for m in (a, b):
        m(x)[0].sum().backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_wrong_input_shape_is_a_clear_error():
    model = create_model("seed-tiny")
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 32, 32\), got \(1, 1, 28, 28\)"):
        model(torch.randn(1, 1, 28, 28))


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": 50}, "hidden_size (50) must be divisible by num_attention_heads (4)"),
    ({"image_size": 30}, "image_size (30) must be divisible by patch_size (4)"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"patch_size": -4}, "patch_size must be a positive integer, got -4"),
    ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob must be in [0, 1), got 1.0"),
    ({"attention_probs_dropout_prob": -0.1}, "attention_probs_dropout_prob must be in [0, 1), got -0.1"),
    ({"hidden_sise": 48}, "unknown model config key 'hidden_sise'; did you mean 'hidden_size'?"),
    ({"attention_backend": "flash"}, "attention_backend must be one of per_head, fused, sdpa; got 'flash'"),
    ({"pooling": "max"}, "pooling must be one of cls, mean; got 'max'"),
    ({"hidden_act": "relu"}, "hidden_act must be one of gelu_tanh, gelu; got 'relu'"),
])
def test_bad_configs_fail_at_construction_naming_the_field(changes, message):
    with pytest.raises(ValueError) as info:
        ViTForClassification({**SEED_CONFIG, **changes})
    assert str(info.value) == message


def test_config_round_trip_and_presets():
    c = ViTConfig.from_dict(SEED_CONFIG)
    assert ViTConfig.from_dict(c.to_dict()) == c
    assert "seed-tiny" in vitcraft.list_models()
    imagenet_sizes = {"vit-tiny-p16-224", "vit-small-p16-224", "vit-base-p16-224", "vit-tiny-p4-32"}
    assert imagenet_sizes <= set(vitcraft.list_models())
    m = create_model("seed-tiny", num_classes=100)
    assert m.classifier.out_features == 100
    with pytest.raises(ValueError, match="unknown model 'seed-tiy'; did you mean 'seed-tiny'"):
        create_model("seed-tiy")


def test_dropout_works_in_a_forked_child():
    # the parent's kernel threads (OpenMP, or the Python pool without it) are running;
    # a forked child (a DataLoader worker, say) must still get its dropout done
    import multiprocessing

    from vitcraft.ops import Dropout

    Dropout(0.1).train()(torch.ones(300_000))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_dropout_mean_into, args=(queue,))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    assert abs(queue.get(timeout=5) - 1.0) < 0.01  # unbiased: kept values are scaled by 1 / (1 - p)


def _dropout_mean_into(queue):
    from vitcraft.ops import Dropout

    torch.set_num_threads(1)  # as DataLoader workers do: OpenMP itself is not fork-safe
    queue.put(float(Dropout(0.1).train()(torch.ones(300_000)).mean()))


def test_patch_dropout_keeps_a_random_subset_of_each_images_patches_behind_the_prefix_tokens():
    from vitcraft.model import PatchDropout

    tokens = torch.arange(2 * 17, dtype=torch.float32).view(2, 17, 1).expand(-1, -1, 3)  # token i holds i
    drop = PatchDropout(0.5, num_prefix_tokens=1)
    kept = drop(tokens)
    assert kept.shape == (2, 1 + 8, 3)  # int(16 * 0.5) of the 16 patches
    for image in range(2):
        assert kept[image, 0, 0] == tokens[image, 0, 0]  # [CLS] first
        values = kept[image, 1:, 0].tolist()
        assert len(set(values)) == 8 and set(values) <= set(tokens[image, 1:, 0].tolist())
    assert not torch.equal(kept[0, 1:, 0] - 0, kept[1, 1:, 0] - 17)  # each image draws its own subset
    assert torch.equal(drop.eval()(tokens), tokens)
    assert PatchDropout(0.99, 1).train()(tokens).shape == (2, 2, 3)  # at least one patch stays


def test_a_model_with_patch_dropout_trains_on_fewer_tokens_and_evaluates_on_all():
    model = ViTForClassification(ViTConfig(patch_dropout=0.75))
    x = torch.randn(2, 3, 32, 32)
    assert model.embedding(x).shape == (2, 1 + 16, 48)  # 64 patches, a quarter kept
    model.eval()
    assert model.embedding(x).shape == (2, 1 + 64, 48)
    assert model(x)[0].shape == (2, 10)
    with pytest.raises(ValueError, match=r"patch_dropout must be in \[0, 1\)"):
        ViTConfig(patch_dropout=1.0)


# --------------------------------------------------------------------------- Lee et al. 2021: SPT and LSA
def test_shifted_patches_stack_each_patch_with_its_four_diagonal_half_patch_shifts():
    from vitcraft.model import ShiftedPatchEmbeddings

    torch.manual_seed(0)
    embed = ShiftedPatchEmbeddings(ViTConfig(shifted_patches=True))
    x = torch.randn(2, 3, 32, 32)
    out = embed(x)
    assert out.shape == (2, 64, 48)
    padded = nn.functional.pad(x, (2, 2, 2, 2))  # x[r, c] is padded[r + 2, c + 2]; zeros around
    for row, column in ((0, 0), (1, 1), (7, 3)):  # a corner patch takes zeros from outside the image
        r, c = 4 * row, 4 * column
        pieces = [padded[:, :, r + 2 + dy:r + 6 + dy, c + 2 + dx:c + 6 + dx]  # the patch, then its shifts
                  for dy, dx in ((0, 0), (-2, -2), (-2, 2), (2, -2), (2, 2))]
        vector = torch.cat(pieces, dim=1).flatten(1)  # (B, 5 * 3 * 4 * 4), channels first as unfold
        torch.testing.assert_close(out[:, 8 * row + column], embed.projection(embed.norm(vector)))
    with pytest.raises(ValueError, match="patch_size must be at least 2"):
        ViTConfig(shifted_patches=True, patch_size=1, image_size=8)


def test_locality_attention_masks_the_diagonal_scales_by_learned_temperatures_and_backends_agree():
    from vitcraft import ops

    config = ViTConfig(locality_attention=True, shifted_patches=True, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    models = {b: ViTForClassification(config.replace(attention_backend=b)) for b in BACKENDS}
    temperature = models["fused"].encoder.blocks[0].attention.temperature
    assert temperature.shape == (4,) and torch.all(temperature == 12 ** -0.5)  # starts as 1 / sqrt(head size)
    with torch.no_grad():
        for block in models["fused"].encoder.blocks:
            block.attention.temperature.uniform_(0.1, 0.6)
    for b in BACKENDS:
        models[b].load_state_dict(models["fused"].state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    model = models["fused"].eval()
    logits, attentions = model(x, output_attentions=True)
    assert torch.all(attentions[0].diagonal(dim1=-2, dim2=-1) == 0)  # no token attends to itself
    block = model.encoder.blocks[0]
    qkv = block.attention.qkv_projection(block.layernorm_1(model.embedding(x))).view(3, 65, 3, 4, 12)
    query, key, _ = ops.split_heads(qkv)
    scores = (query @ key.transpose(-1, -2)) * block.attention.temperature[:, None, None]
    scores = ops.with_diagonal_mask(scores, 65, 65, "cpu")
    torch.testing.assert_close(attentions[0], scores.softmax(-1))
    grads = {}
    for b in BACKENDS:  # training mode: sdpa runs the C kernel's diagonal mask
        models[b].train()
        out = models[b](x)[0]
        torch.testing.assert_close(out, logits, atol=1e-5, rtol=1e-5)
        out.logsumexp(-1).sum().backward()
        grads[b] = models[b].encoder.blocks[0].attention.temperature.grad
    assert grads["fused"].abs().min() > 0
    for b in BACKENDS:
        torch.testing.assert_close(grads[b], grads["fused"], atol=1e-6, rtol=1e-4)
