"""CCT: the convolutional tokenizer, sequence pooling, presets, and a training run with its figures."""

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
from vitcraft.model import Block
from vitcraft.registry import get_preset, preset_config
from vitcraft.runs import load_trained_model
from vitcraft.variants.cct import CCTConfig, CCTForClassification, ConvTokenizer, SequencePooling

CCT_PRESETS = [name for name in vitcraft.list_models() if get_preset(name).config_class is CCTConfig]
# two conv layers (32 -> 16 -> 8, 64 tokens), two narrow blocks: fast
TINY = CCTConfig(num_conv_layers=2, conv_channels=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("image_size, layers, side", [(32, 1, 16), (32, 2, 8), (28, 2, 7), (7, 1, 4), (7, 2, 2)])
def test_each_tokenizer_layer_halves_the_grid_rounding_up(image_size, layers, side):
    config = TINY.replace(image_size=image_size, num_conv_layers=layers)
    assert config.grid_size == side
    tokens = ConvTokenizer(config)(torch.randn(2, 3, image_size, image_size))
    assert tokens.shape == (2, side * side, 16)


def test_tokenizer_is_conv_relu_maxpool_and_tokens_are_map_positions():
    tokenizer = ConvTokenizer(TINY.replace(num_conv_layers=1))
    conv = tokenizer.layers[0]
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.bias is None
    x = torch.randn(1, 3, 32, 32)
    feature_map = torch.nn.functional.max_pool2d(conv(x).relu(), 3, stride=2, padding=1)  # (1, 16, 16, 16)
    tokens = tokenizer(x)  # (1, 256, 16)
    torch.testing.assert_close(tokens[0, 5 * 16 + 9], feature_map[0, :, 5, 9])  # row 5, column 9


def test_sequence_pooling_is_a_softmax_weighted_mean():
    pooling = SequencePooling(4)
    x = torch.randn(3, 6, 4)
    pooled, weights = pooling(x)
    assert pooled.shape == (3, 4) and weights.shape == (3, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    expected = torch.softmax(x @ pooling.attention.weight[0] + pooling.attention.bias, dim=-1)  # (3, 6)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(pooled, (expected[:, :, None] * x).sum(1))
    # a token the scorer rates far above the others takes (almost) all the weight
    with torch.no_grad():
        pooling.attention.weight.zero_()
        pooling.attention.weight[0, 0] = 1.0
        x[:, 2, 0] = 100.0
    pooled, weights = pooling(x)
    torch.testing.assert_close(pooled, x[:, 2])


@pytest.mark.parametrize("name", CCT_PRESETS)
def test_presets_shapes_attentions_pooling_weights_and_gradients(name):
    model = create_model(name, num_hidden_layers=1) if name == "cct-7-3x1-32" else create_model(name)
    config = model.config
    tokens = config.num_tokens
    x = torch.randn(2, 3, 32, 32)
    logits, attentions = model(x, output_attentions=True)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert len(attentions) == config.num_hidden_layers
    for attention in attentions:  # no [CLS]: tokens x tokens
        assert attention.shape == (2, config.num_attention_heads, tokens, tokens)
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    model.eval()
    pooled_logits, maps = model.pooling_map(x)
    assert maps.shape == (2, config.grid_size, config.grid_size)
    torch.testing.assert_close(maps.sum((1, 2)), torch.ones(2))
    torch.testing.assert_close(pooled_logits, model(x)[0])
    assert_every_parameter_gets_a_gradient(model, x)


@pytest.mark.parametrize("name", CCT_PRESETS)
def test_preset_descriptions_state_the_parameter_count(name):
    assert_description_states_parameter_count(name)


def test_cct_7_3x1_has_the_papers_shape():
    config = preset_config("cct-7-3x1-32")
    assert (config.num_tokens, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.num_conv_layers, config.conv_kernel_size) == (256, 256, 7, 4, 512, 1, 3)


def test_encoder_is_vitcraft_blocks_and_every_backend_agrees():
    models = {backend: CCTForClassification(TINY.replace(attention_backend=backend)).eval()
              for backend in ("per_head", "fused", "sdpa")}
    assert all(isinstance(block, Block) for block in models["sdpa"].encoder.blocks)
    state = models["fused"].state_dict()
    x = torch.randn(2, 3, 32, 32)
    for model in models.values():
        model.load_state_dict(state)
        torch.testing.assert_close(model(x)[0], models["fused"](x)[0], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    assert_checkpointing_keeps_gradients(lambda: CCTForClassification(TINY), torch.randn(2, 3, 32, 32))


def test_config_round_trips_through_json():
    assert CCTConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY


@pytest.mark.parametrize("changes, message", [
    ({"conv_kernel_size": 4}, "conv_kernel_size must be odd (padding k // 2 then keeps the size), got 4"),
    ({"num_conv_layers": 0}, "num_conv_layers must be a positive integer, got 0"),
    ({"hidden_size": 250}, "hidden_size (250) must be divisible by num_attention_heads (4)"),
    ({"attention_backend": "flash"}, "attention_backend must be one of per_head, fused, sdpa; got 'flash'"),
    ({"patch_size": 4}, "unknown model config key 'patch_size'; did you mean 'image_size'?"),  # no patches
])
def test_bad_configs_fail_naming_the_field(changes, message):
    with pytest.raises(ValueError) as info:
        create_model("cct-7-3x1-32", **changes)
    assert str(info.value) == message


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 32, 32\), got \(1, 1, 28, 28\)"):
        CCTForClassification(TINY)(torch.randn(1, 1, 28, 28))


# --------------------------------------------------------------------------- training and the CLI
@pytest.fixture(scope="module")
def cct_run(folder32, tmp_path_factory):
    # TINY's shape; image size, channels and classes come from the data
    tiny = {key: value for key, value in TINY.to_dict().items()
            if key not in ("extra", "image_size", "num_channels", "num_classes")}
    out, printed = tmp_path_factory.mktemp("cct") / "run", io.StringIO()
    train_quietly(small_run(folder32, out.parent, "cct-2-3x2-32", tiny, epochs=1), out, printed, figures=True)
    return out, printed.getvalue()  # the figures' notes


def test_training_runs_end_to_end_with_the_pooling_map_figure(cct_run):
    out, printed = cct_run
    for name in ("metrics.jsonl", "model.safetensors", "curves.png", "attention.png", "confusion.png"):
        assert (out / name).is_file(), name
    assert not (out / "rollout.png").exists()
    assert "rollout.png skipped: attention rollout is not available for CCTForClassification" in printed
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 3 and 0 <= record["test_acc"] <= 1  # 48 images, batches of 16
    model, _ = load_trained_model(out)
    assert isinstance(model, CCTForClassification) and model.config == TINY.replace(num_classes=3)


def test_viz_draws_pooling_weights_and_refuses_rollout(cct_run, tmp_path, capsys):
    out = tmp_path / "pooling.png"
    assert main(["viz", str(cct_run[0]), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["viz", str(cct_run[0]), "--method", "rollout"]) == 2
    error = capsys.readouterr().err
    assert "vitcraft: error: attention rollout is not available for CCTForClassification" in error
