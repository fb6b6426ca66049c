"""Swin: window masks, relative positions, patch merging, presets, equality with timm, training end to end."""

import io
import json

import pytest
import torch
from conftest import small_run, train_quietly
from model_checks import (
    assert_checkpointing_keeps_gradients,
    assert_description_states_parameter_count,
    assert_every_parameter_gets_a_gradient,
)

import vitcraft
from vitcraft import create_model
from vitcraft.cli import main
from vitcraft.config import TrainConfig
from vitcraft.model import count_parameters
from vitcraft.registry import get_preset
from vitcraft.runs import load_trained_model
from vitcraft.train import build_optimizer
from vitcraft.variants.swin import (
    MASK_VALUE,
    PatchMerging,
    SwinBlock,
    SwinConfig,
    SwinForClassification,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

SWIN_PRESETS = [name for name in vitcraft.list_models() if get_preset(name).config_class is SwinConfig]
# a small Swin whose three stages cover every case: shifted windows on a 16x16 and an 8x8
# grid, and a last 4x4 grid that is one window (no shift)
SMALL = SwinConfig(image_size=32, patch_size=2, embed_dim=24, depths=(2, 2, 1), num_heads=(2, 3, 6),
                   window_size=4, num_classes=7, drop_path_rate=0.0)


def randomize(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every parameter drawn from N(0, 0.3^2): the init's near-zero projections would hide mixing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return module


def block(shift: int, grid: int = 8, window: int = 4) -> SwinBlock:
    return randomize(SwinBlock(SMALL.stage_config(0), grid, window, shift, drop_path=0.0)).eval()


# --------------------------------------------------------------------------- windows and masks
def test_window_partition_order_and_round_trip():
    x = torch.randn(2, 8, 8, 3)
    windows = window_partition(x, 4)  # (2 * 4, 16, 3)
    assert windows.shape == (8, 16, 3)
    # image 1, window row 0, window column 1: rows 0-3, columns 4-7, tokens row-major
    torch.testing.assert_close(windows[4 + 1], x[1, 0:4, 4:8].reshape(16, 3))
    torch.testing.assert_close(window_reverse(windows, 4, 8, 8), x)


def test_shift_mask_entries_by_hand():
    # 8x8 grid rolled up and left by 2, windows of 4: rows/columns 4-5 are the image's own,
    # 6-7 came round from rows/columns 0-1
    mask = shifted_window_mask(grid=8, window=4, shift=2)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # top-left window: nothing wrapped
    # top-right window (columns 4-7): token 0 is column 4, token 2 column 6 (wrapped)
    assert mask[1, 0, 1] == 0 and mask[1, 0, 4] == 0 and mask[1, 0, 2] == MASK_VALUE
    # bottom-left window (rows 4-7): token 0 is row 4, token 8 row 6 (wrapped)
    assert mask[2, 0, 4] == 0 and mask[2, 0, 8] == MASK_VALUE and mask[2, 8, 12] == 0
    # bottom-right window: four regions; (4,4) and (5,5) together, (6,6) and (7,7) together
    assert mask[3, 0, 5] == 0 and mask[3, 10, 15] == 0
    assert mask[3, 0, 3] == MASK_VALUE and mask[3, 0, 12] == MASK_VALUE and mask[3, 5, 10] == MASK_VALUE
    assert MASK_VALUE == -100.0


@pytest.mark.parametrize("grid, window, shift", [(8, 4, 2), (12, 4, 2), (14, 7, 3)])
def test_shift_mask_equals_a_direct_computation(grid, window, shift):
    """Two tokens of a window may attend iff both or neither came round each rolled border."""
    mask = shifted_window_mask(grid, window, shift)
    side = grid // window
    expected = torch.zeros(side * side, window * window, window * window)
    for n in range(side * side):
        top, left = (n // side) * window, (n % side) * window
        cells = [(top + i // window, left + i % window) for i in range(window * window)]
        for i, (ri, ci) in enumerate(cells):
            for j, (rj, cj) in enumerate(cells):
                same = (ri >= grid - shift) == (rj >= grid - shift) and (ci >= grid - shift) == (cj >= grid - shift)
                expected[n, i, j] = 0.0 if same else MASK_VALUE
    torch.testing.assert_close(mask, expected)


def test_unshifted_window_attention_stays_inside_its_window():
    layer = block(shift=0)
    x = torch.randn(1, 8, 8, 24)
    changed = x.clone()
    changed[0, 1, 2] += 3 * torch.randn(24)  # a token of the top-left window (not a constant: LayerNorm removes those)
    with torch.no_grad():
        delta = (layer(changed)[0] - layer(x)[0]).abs().sum(-1)[0]  # (8, 8)
    assert (delta[:4, :4] > 1e-4).all()  # every token of that window sees it
    delta[:4, :4] = 0
    assert delta.max() < 1e-6  # no token outside it does


def test_shifted_windows_cross_borders_but_not_the_wrapped_edge():
    layer = block(shift=2)
    x = torch.randn(1, 8, 8, 24)
    changed = x.clone()
    changed[0, 3, 3] += 3 * torch.randn(24)  # next to the centre: the shifted window covers rows and columns 2-5
    with torch.no_grad():
        delta = (layer(changed)[0] - layer(x)[0]).abs().sum(-1)[0]
    assert delta[4, 4] > 1e-4 and delta[2, 2] > 1e-4 and delta[0, 0] < 1e-6
    # (0, 0) rolls round next to (7, 7) into the bottom-right window; the mask keeps them apart
    changed = x.clone()
    changed[0, 0, 0] += 3 * torch.randn(24)
    with torch.no_grad():
        delta = (layer(changed)[0] - layer(x)[0]).abs().sum(-1)[0]
    assert delta[1, 1] > 1e-4 and delta[7, 7] < 1e-6 and delta[6, 7] < 1e-6
    # and without the mask they would mix: the mask is what stops it
    layer.attention_mask.zero_()
    with torch.no_grad():
        assert (layer(changed)[0] - layer(x)[0]).abs().sum(-1)[0, 7, 7] > 1e-4


# --------------------------------------------------------------------------- relative positions
def test_relative_position_index_by_hand():
    index = relative_position_index(2)  # tokens (0,0), (0,1), (1,0), (1,1); offsets in base 3
    assert index.tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    index = relative_position_index(7)
    assert index.shape == (49, 49) and index.min() == 0 and index.max() == 13 * 13 - 1
    assert (index.diagonal() == 6 * 13 + 6).all()  # offset (0, 0)


@pytest.mark.parametrize("window", [3, 4, 7])
def test_relative_position_index_equals_a_direct_computation(window):
    expected = torch.empty(window ** 2, window ** 2, dtype=torch.long)
    for i in range(window ** 2):
        for j in range(window ** 2):
            dr, dc = i // window - j // window, i % window - j % window
            expected[i, j] = (dr + window - 1) * (2 * window - 1) + (dc + window - 1)
    assert torch.equal(relative_position_index(window), expected)


def test_relative_position_bias_reads_the_table():
    attention = block(shift=0).attention
    with torch.no_grad():
        attention.relative_position_bias_table.normal_()
    bias = attention.relative_position_bias()  # (heads, 16, 16)
    table, index = attention.relative_position_bias_table, relative_position_index(4)
    assert bias.shape == (2, 16, 16)
    for head, i, j in [(0, 0, 0), (1, 0, 15), (1, 15, 0), (0, 5, 6)]:
        assert bias[head, i, j] == table[index[i, j], head]
    # equal offsets share an entry: (0,0)->(1,1) and (2,2)->(3,3) in the window
    assert torch.equal(bias[:, 0, 5], bias[:, 10, 15])


# --------------------------------------------------------------------------- patch merging
def test_patch_merging_halves_the_grid_and_doubles_the_width():
    merge = PatchMerging(6)
    with torch.no_grad():
        merge.layernorm.weight.normal_()
        merge.layernorm.bias.normal_()
    x = torch.randn(2, 8, 8, 6)
    out = merge(x)
    assert out.shape == (2, 4, 4, 12)
    # timm's / the paper's order: x0 (even, even), x1 (odd row), x2 (odd column), x3 (odd, odd)
    neighbours = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    torch.testing.assert_close(out, merge.reduction(merge.layernorm(neighbours)))


# --------------------------------------------------------------------------- the whole model
def test_equals_timm_swin_with_converted_weights():
    """Random weights (not the init's near-zero biases), converted by renaming, give timm's outputs."""
    from timm.models.swin_transformer import SwinTransformer

    reference = SwinTransformer(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2, 1), num_heads=(2, 3, 6),
                                window_size=4, num_classes=7, drop_path_rate=0.0).eval()
    randomize(reference)
    renames = [("patch_embed.proj.", "patch_embeddings.projection."), ("patch_embed.norm.", "patch_norm."),
               ("layers.", "stages."), (".downsample.norm.", ".downsample.layernorm."),
               (".norm1.", ".layernorm_1."), (".norm2.", ".layernorm_2."), (".attn.qkv.", ".attention.qkv_projection."),
               (".attn.proj.", ".attention.output_projection."), (".attn.relative", ".attention.relative"),
               (".mlp.fc1.", ".mlp.dense_1."), (".mlp.fc2.", ".mlp.dense_2."), ("head.fc.", "classifier.")]
    state = {}
    for key, value in reference.state_dict().items():
        key = "final_layernorm." + key[len("norm."):] if key.startswith("norm.") else key
        for old, new in renames:
            key = key.replace(old, new)
        state[key] = value
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected_tokens, expected_logits = reference.forward_features(x), reference(x)
    for backend in ("sdpa", "fused"):
        model = SwinForClassification(SMALL.replace(attention_backend=backend)).eval()
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            tokens, _ = model.forward_tokens(x)  # (3, 4, 4, 96), before pooling
            logits, _ = model(x)
        torch.testing.assert_close(tokens, expected_tokens, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_swin_t_224_has_timm_swin_tiny_shape():
    import timm

    with torch.device("meta"):  # shapes only: no memory, no init work
        ours = create_model("swin-t-224")
        reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    assert count_parameters(ours) == count_parameters(reference) == 28_288_354
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items() if "relative_position_bias_table" in k} == {
        k.replace("layers.", "stages.").replace(".attn.", ".attention."): tuple(v.shape)
        for k, v in reference.state_dict().items() if "relative_position_bias_table" in k}
    config = ours.config
    # 56, 28, 14, 7 tokens a side; the last stage is one 7x7 window, so it has no shift
    assert [config.stage_grid(i) for i in range(4)] == [56, 28, 14, 7]
    assert [config.stage_window(i) for i in range(4)] == [(7, 3), (7, 3), (7, 3), (7, 0)]


@pytest.mark.parametrize("name", SWIN_PRESETS)
def test_preset_descriptions_state_the_parameter_count(name):
    assert_description_states_parameter_count(name)


def test_small_swin_shapes_attentions_and_gradients():
    model = create_model("swin-tiny-32", drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    logits, attentions = model(x, output_attentions=True)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    # (B * windows, heads, 16, 16) per block: 16 windows on 16x16, 4 on 8x8, 1 on 4x4
    assert [tuple(a.shape) for a in attentions] == [(32, 3, 16, 16)] * 2 + [(8, 6, 16, 16)] * 2 + [(2, 12, 16, 16)] * 2
    for attention in attentions:
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    # the masked pairs of a shifted block get (numerically) no attention
    mask = model.stages[0].blocks[1].attention_mask  # (16, 16, 16)
    first_image = attentions[1][:16]  # (16 windows, heads, 16, 16)
    assert first_image.masked_select((mask != 0)[:, None].expand_as(first_image)).max() < 1e-30
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x, output_attentions=True)[0], atol=1e-5, rtol=1e-5)
    assert_every_parameter_gets_a_gradient(model, x)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = SMALL.replace(image_size=16, embed_dim=12, depths=(2, 1), num_heads=(1, 2))  # 8x8, then 4x4
    assert_checkpointing_keeps_gradients(lambda: SwinForClassification(config), torch.randn(2, 3, 16, 16))


def test_onnx_export_takes_another_batch_size(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from vitcraft.export import export_onnx

    model = randomize(SwinForClassification(SMALL)).eval()
    path = export_onnx(model, tmp_path / "swin.onnx")  # traced with 2 images
    x = torch.randn(3, 3, 32, 32)  # the window masks must now repeat 3 times, not 2
    session = onnxruntime.InferenceSession(str(path))
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x)[0], atol=1e-4, rtol=1e-4)


def test_relative_position_tables_are_not_decayed():
    model = SwinForClassification(SMALL)
    decayed, _ = build_optimizer(model, TrainConfig(weight_decay=0.05)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert "stages.0.blocks.0.attention.qkv_projection.weight" in decayed_names
    assert not any("relative_position_bias_table" in n for n in decayed_names)


# --------------------------------------------------------------------------- config
def test_config_round_trips_through_json():
    config = SMALL.replace(window_size=2)
    again = SwinConfig.from_dict(json.loads(json.dumps(config.to_dict())))  # tuples come back as lists
    assert again == config and again.depths == (2, 2, 1)


@pytest.mark.parametrize("changes, message", [
    ({"num_heads": (3, 6)}, "num_heads must have one entry per stage (3, as depths), got 2"),
    ({"num_heads": (5, 6, 12)}, "num_heads[0] (5) must divide stage 1's width (embed_dim * 2**0 = 48)"),
    ({"window_size": 5}, "window_size (5) must divide stage 1's grid side (16 tokens)"),
    ({"depths": (2, 0, 2)}, "depths must be a non-empty list of positive integers, got (2, 0, 2)"),
    ({"image_size": 24, "patch_size": 4}, "the patch grid side (image_size / patch_size = 6) must be divisible by "
                                          "4 to be halved between each of the 3 stages"),
    ({"image_size": 33}, "image_size (33) must be divisible by patch_size (2)"),
    ({"attention_backend": "per_head"}, "attention_backend must be one of fused, sdpa; got 'per_head'"),
    ({"drop_path_rate": 1.0}, "drop_path_rate must be in [0, 1), got 1.0"),
    ({"embed_dims": 48}, "unknown model config key 'embed_dims'; did you mean 'embed_dim'?"),
])
def test_bad_configs_fail_naming_the_field(changes, message):
    with pytest.raises(ValueError) as info:
        create_model("swin-tiny-32", **changes)
    assert str(info.value) == message


# --------------------------------------------------------------------------- training and the CLI
@pytest.fixture(scope="module")
def swin_run(folder32, tmp_path_factory):
    # 4x4 patches: an 8x8 grid of 4x4 windows (shifted in the second block), then one 4x4 window
    out, printed = tmp_path_factory.mktemp("swin") / "run", io.StringIO()
    model = {"embed_dim": 12, "depths": [2, 1], "num_heads": [1, 2], "patch_size": 4}
    train_quietly(small_run(folder32, out.parent, "swin-tiny-32", model, epochs=1), out, printed, figures=True)
    return out, printed.getvalue()  # the figures' notes


def test_training_runs_end_to_end_and_skips_the_cls_figures(swin_run):
    swin_run, printed = swin_run
    assert ("attention.png and rollout.png skipped: attention maps are not available for SwinForClassification"
            in printed)
    for name in ("metrics.jsonl", "model.safetensors", "checkpoint.safetensors", "curves.png", "confusion.png"):
        assert (swin_run / name).is_file(), name
    assert not (swin_run / "attention.png").exists() and not (swin_run / "rollout.png").exists()
    record = json.loads((swin_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 3 and 0 <= record["test_acc"] <= 1  # 48 images, batches of 16
    model, metadata = load_trained_model(swin_run)
    assert isinstance(model, SwinForClassification) and model.config.depths == (2, 1)
    assert metadata["model_config"]["num_classes"] == 3


def test_viz_says_attention_maps_are_not_available(swin_run, capsys):
    assert main(["viz", str(swin_run[0])]) == 2
    error = capsys.readouterr().err
    assert error.startswith("vitcraft: error: attention maps are not available for SwinForClassification")
    assert "[CLS]" in error and "Traceback" not in error
