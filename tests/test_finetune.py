"""The fine-tuning recipe: --layer-decay, --freeze backbone, --drop-path and --ema, each held to its formula."""

import contextlib
import json

import pytest
import torch
from conftest import small_run, train_quietly
from run_helpers import TIMING_KEYS

from vitcraft import create_model
from vitcraft.config import TrainConfig, ViTConfig
from vitcraft.errors import VitcraftError
from vitcraft.files import load_tensors
from vitcraft.model import Block, DropPath, ViTForClassification
from vitcraft.tensorboard_log import TensorBoardLog
from vitcraft.train import build_optimizer, learning_rate_at

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TOKENS = ("embedding.cls_token", "embedding.position_embeddings")  # matrices, but not decayed


@contextlib.contextmanager
def set_up_run(run, out):
    """``train.set_up`` of a new run in ``out`` (quiet), the thread count restored after."""
    from vitcraft.train import set_up

    threads = torch.get_num_threads()
    try:
        yield set_up(run, out, resume=False, overwrite=False, figures=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)


def train_epoch(t) -> None:
    from vitcraft.train import train_one_epoch

    train_one_epoch(t, 0, TensorBoardLog(t.out_dir, enabled=False), show_bar=False)


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def group_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in optimizer.param_groups]


# ------------------------------------------------------------ layer decay
def expected_scale(name: str, depth: int, rate: float) -> float:
    """The brief's formula, written out independently of train.layer_id."""
    if name.startswith(("embedding.", "tokenizer.", "position_embeddings")):
        return rate ** (depth + 1)
    if name.startswith("encoder.blocks."):
        return rate ** (depth - int(name.split(".")[2]))
    return 1.0


def test_layer_decay_sets_each_groups_rate_by_the_formula_at_every_step(tiny_folder, tmp_path):
    decay, depth = 0.5, 4
    run = small_run(tiny_folder, tmp_path, model={"hidden_size": 32, "intermediate_size": 64, "final_layernorm": True},
                    layer_decay=decay, warmup_steps=4, max_steps=2, weight_decay=0.05)
    with set_up_run(run, tmp_path / "run") as t:
        train_epoch(t)  # 2 steps: the last set lr(step 1) = half the peak (warmup)
        assert t.step == 2
        lr = learning_rate_at(1, t.cfg, t.total_steps)
        assert lr == pytest.approx(run.train.learning_rate / 2)
        names = group_names(t.model, t.optimizer)
        assert len(t.optimizer.param_groups) == 2 * (depth + 2)  # (layer, decayed or not) for 6 layers
        seen = set()
        for group, members in zip(t.optimizer.param_groups, names):
            scales = {expected_scale(name, depth, decay) for name in members}
            assert len(scales) == 1, members  # one layer per group
            assert group["lr_scale"] == pytest.approx(scales.pop())
            assert group["lr"] == pytest.approx(lr * group["lr_scale"], rel=1e-12)
            decayed = {t.model.get_parameter(name).ndim >= 2 and not name.startswith(TOKENS) for name in members}
            assert decayed == {group["weight_decay"] > 0}, members
            seen |= members
        assert seen == {name for name, _ in t.model.named_parameters()}
    by_name = {name: group for group, members in zip(t.optimizer.param_groups, names) for name in members}
    assert by_name["embedding.cls_token"] is by_name["embedding.position_embeddings"]
    assert by_name["embedding.cls_token"]["lr_scale"] == pytest.approx(decay ** 5)
    assert by_name["embedding.patch_embeddings.projection.weight"]["lr_scale"] == pytest.approx(decay ** 5)
    assert by_name["encoder.blocks.0.mlp.dense_1.weight"]["lr_scale"] == pytest.approx(decay ** 4)
    assert by_name["encoder.blocks.3.layernorm_1.weight"]["lr_scale"] == pytest.approx(decay)
    assert by_name["final_layernorm.weight"]["lr_scale"] == by_name["classifier.weight"]["lr_scale"] == 1.0


@pytest.mark.parametrize("preset, embeddings, head", [
    ("deit-seed-tiny", {"embedding.distillation_token"}, {"distillation_classifier.weight"}),
    ("cct-2-3x2-32", {"position_embeddings", "tokenizer.layers.0.weight"},
     {"final_layernorm.weight", "pooling.attention.weight"}),
])
def test_layer_decay_maps_deit_and_cct_parameters_to_layers(preset, embeddings, head):
    model = create_model(preset)
    depth = len(model.encoder.blocks)
    optimizer = build_optimizer(model, TrainConfig(layer_decay=0.75))
    scale = {name: group["lr_scale"] for group, members in zip(optimizer.param_groups, group_names(model, optimizer))
             for name in members}
    assert scale.keys() == {name for name, _ in model.named_parameters()}
    for name, value in scale.items():
        assert value == pytest.approx(expected_scale(name, depth, 0.75)), name
    assert [scale[name] for name in embeddings] == pytest.approx([0.75 ** (depth + 1)] * len(embeddings))
    assert [scale[name] for name in head] == [1.0] * len(head)


def test_without_layer_decay_the_groups_are_the_two_weight_decay_groups():
    model = create_model("seed-tiny")
    optimizer = build_optimizer(model, TrainConfig())
    assert [group["lr_scale"] for group in optimizer.param_groups] == [1.0, 1.0]
    assert [group["weight_decay"] for group in optimizer.param_groups] == [TrainConfig().weight_decay, 0.0]


@pytest.mark.parametrize("preset, kind", [("swin-tiny-32", "SwinForClassification"),
                                          ("cnn-small", "ConvNetForClassification")])
def test_layer_decay_is_refused_for_models_without_encoder_blocks(preset, kind):
    with pytest.raises(VitcraftError, match=rf"--layer-decay .* a {kind} has none; the ViT, DeiT and CCT presets"):
        build_optimizer(create_model(preset), TrainConfig(layer_decay=0.75))


# ------------------------------------------------------------ freeze backbone
def test_freeze_backbone_trains_only_the_classifier(tiny_folder, tmp_path):
    run = small_run(tiny_folder, tmp_path, model={"hidden_size": 32, "intermediate_size": 64, "final_layernorm": True},
                    freeze="backbone", epochs=1)
    with set_up_run(run, tmp_path / "run") as t:
        before = clone_state(t.model)
        assert set().union(*group_names(t.model, t.optimizer)) == {"classifier.weight", "classifier.bias"}
        train_epoch(t)
        after = t.model.state_dict()
    assert t.step == 6
    for name, value in before.items():
        if name.startswith("classifier."):
            assert not torch.equal(after[name], value), name
        else:
            assert torch.equal(after[name], value), name


def test_freeze_backbone_of_deit_trains_both_heads():
    from vitcraft.train import freeze_backbone

    model = create_model("deit-seed-tiny")
    freeze_backbone(model)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier", "distillation_classifier"}


# ------------------------------------------------------------ drop path
def test_drop_path_zeroes_or_scales_whole_samples_at_rate_p():
    torch.manual_seed(0)
    p, samples = 0.3, 4000
    drop = DropPath(p).train()
    x = torch.randn(samples, 5, 6) + 3  # no sample is 0 anywhere
    out = drop(x)
    dropped = (out == 0).flatten(1).all(1)
    kept = torch.isclose(out, x / (1 - p)).flatten(1).all(1)
    assert bool((dropped ^ kept).all())  # each sample entirely one or the other
    assert dropped.float().mean().item() == pytest.approx(p, abs=0.025)  # 3 standard deviations
    assert drop.eval()(x) is x
    assert DropPath(0.0).train()(x) is x


def test_block_drops_each_residual_branch_per_sample_in_training_only():
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, **NO_DROPOUT)
    p, samples = 0.4, 2000
    block = Block(config, drop_path=p)
    plain = Block(config)
    plain.load_state_dict(block.state_dict())
    x = torch.randn(samples, 5, 16)
    with torch.no_grad():
        assert torch.equal(block.eval()(x)[0], plain.eval()(x)[0])
        branch = block.attention(block.layernorm_1(x))[0]
        out = block.train()(x)[0]
        # for each sample: the attention branch kept (scaled) or dropped, then the MLP branch kept or dropped
        candidates = []
        for x1 in (x + branch / (1 - p), x):
            for mlp_kept in (True, False):
                mlp = block.mlp(block.layernorm_2(x1))
                candidates.append(x1 + mlp / (1 - p) if mlp_kept else x1)
        matches = torch.stack([torch.isclose(out, c, atol=1e-5).flatten(1).all(1) for c in candidates])  # (4, B)
    assert bool((matches.sum(0) == 1).all())
    attention_dropped = matches[2:].any(0).float().mean().item()
    mlp_dropped = matches[1::2].any(0).float().mean().item()
    assert attention_dropped == pytest.approx(p, abs=0.035) and mlp_dropped == pytest.approx(p, abs=0.035)


def test_drop_path_rate_rises_linearly_over_the_blocks_and_swin_shares_the_class():
    model = ViTForClassification(ViTConfig(drop_path_rate=0.3, num_hidden_layers=4))
    rates = [block.drop_path.p for block in model.encoder.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 4).tolist())
    swin = create_model("swin-tiny-32")
    assert all(type(block.drop_path) is DropPath for stage in swin.stages for block in stage.blocks)
    # evaluation is unchanged by it
    plain = ViTForClassification(ViTConfig(num_hidden_layers=4))
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.eval()(x)[0], plain.eval()(x)[0])


def test_drop_path_flag_sets_the_models_rate_and_is_refused_without_one(tiny_folder, tmp_path):
    from vitcraft.data import load_splits
    from vitcraft.train import resolve_model_config

    train_set, _ = load_splits(str(tiny_folder), cache_dir=tmp_path / "cache")
    for preset in ("seed-tiny", "deit-seed-tiny", "swin-tiny-32"):
        run = small_run(tiny_folder, tmp_path, preset=preset, model={}, drop_path=0.25)
        assert resolve_model_config(run, train_set).drop_path_rate == 0.25, preset
    run = small_run(tiny_folder, tmp_path, model={"drop_path_rate": 0.1})  # unset: the model config's
    assert resolve_model_config(run, train_set).drop_path_rate == 0.1
    run = small_run(tiny_folder, tmp_path, preset="cct-2-3x2-32", model={}, drop_path=0.1)
    with pytest.raises(VitcraftError, match=r"--drop-path .* model preset 'cct-2-3x2-32' \(CCTConfig\) has no "
                                            r"stochastic depth"):
        resolve_model_config(run, train_set)


def test_drop_path_flag_with_init_sets_the_source_models_rate(tiny_folder, tmp_path):
    import dataclasses

    train_quietly(small_run(tiny_folder, tmp_path, epochs=1), tmp_path / "source")
    run = dataclasses.replace(small_run(tiny_folder, tmp_path, model={}, epochs=1, drop_path=0.1),
                              init=str(tmp_path / "source"))
    train_quietly(run, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["model_config"]["drop_path_rate"] == 0.1 and saved["init"]["new"] == []


def test_timm_interop_carries_the_drop_path_rate():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    from vitcraft.interop import from_timm, to_timm_kwargs

    reference = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2,
                                           num_classes=5, drop_path_rate=0.2)
    ours = from_timm(reference)
    assert ours.config.drop_path_rate == pytest.approx(0.2)
    assert [block.drop_path.p for block in ours.encoder.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert to_timm_kwargs(ours)["drop_path_rate"] == pytest.approx(0.2)


# ------------------------------------------------------------ EMA
def test_ema_equals_the_formula_over_the_steps(tiny_folder, tmp_path):
    decay = 0.8
    run = small_run(tiny_folder, tmp_path, ema=decay, max_steps=5)
    with set_up_run(run, tmp_path / "run") as t:
        snapshots = [clone_state(t.model)]  # the average starts at the initial weights
        t.optimizer.register_step_post_hook(lambda *_: snapshots.append(clone_state(t.model)))
        train_epoch(t)
        assert t.step == 5 and len(snapshots) == 6
        expected = snapshots[0]
        for weights in snapshots[1:]:
            expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
        averaged = t.ema.state_dict()
        assert averaged.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(averaged[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)
            assert not torch.allclose(averaged[key], snapshots[-1][key]) or torch.equal(
                snapshots[0][key], snapshots[-1][key]), key  # an average, not the last weights
        assert not any(p.requires_grad for p in t.ema.module.parameters())


def test_ema_copies_integer_buffers_and_averages_float_ones():
    from vitcraft.ema import ModelEma

    model = create_model("cnn-small")
    ema = ModelEma(model, 0.5)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.add_(2.0)
            module.num_batches_tracked.add_(7)
    ema.update(model)
    for name, value in ema.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert value.item() == 7
        elif name.endswith("running_mean"):
            assert torch.allclose(value, model.state_dict()[name] - 1.0)


@pytest.mark.parametrize("winner", ["ema", "raw"])
def test_the_better_of_ema_and_raw_weights_is_saved_and_said(tiny_folder, tmp_path, monkeypatch, winner):
    from vitcraft import train as train_module

    original = train_module.evaluate

    def evaluate(model, *args, **kwargs):  # the EMA's module is the one without gradients
        result = original(model, *args, **kwargs)
        is_ema = not any(p.requires_grad for p in model.parameters())
        return {**result, "acc": 1.0 if is_ema == (winner == "ema") else 0.0}

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    out, lines = tmp_path / "run", []
    last = train_quietly(small_run(tiny_folder, tmp_path, ema=0.9, epochs=1), out, log=lines.append)
    assert last["saved"] == winner
    assert {"ema_test_loss", "ema_test_acc", "ema_test_top5"} <= last.keys()
    assert f"saved {winner}" in lines[-1] and "ema_test_acc" in lines[-1]
    weights, _ = load_tensors(out / "model.safetensors")
    checkpoint, _ = load_tensors(out / "checkpoint.safetensors")
    prefix = "ema." if winner == "ema" else "model."
    assert not all(torch.equal(checkpoint[f"model.{key}"], checkpoint[f"ema.{key}"]) for key in weights)
    for key, value in weights.items():
        assert torch.equal(value, checkpoint[prefix + key]), key


def test_no_ema_records_no_ema_keys(tiny_folder, tmp_path):
    last = train_quietly(small_run(tiny_folder, tmp_path, epochs=1), tmp_path / "run")
    assert not {"saved", "ema_test_acc"} & last.keys()
    checkpoint, _ = load_tensors(tmp_path / "run" / "checkpoint.safetensors")
    assert not any(key.startswith("ema.") for key in checkpoint)


def test_resume_with_the_whole_recipe_equals_an_uninterrupted_run(tiny_folder, tmp_path):
    recipe = dict(ema=0.7, layer_decay=0.75, drop_path=0.1)
    model = {"hidden_size": 32, "intermediate_size": 64, "final_layernorm": True}
    train_quietly(small_run(tiny_folder, tmp_path, model=model, epochs=2, **recipe), tmp_path / "full")
    train_quietly(small_run(tiny_folder, tmp_path, model=model, epochs=1, **recipe), tmp_path / "part")
    train_quietly(small_run(tiny_folder, tmp_path, model=model, epochs=2, **recipe), tmp_path / "part",
                  resume=True)
    records = {}
    for name in ("full", "part"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records[name] = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]
    assert [r["epoch"] for r in records["part"]] == [1, 2]
    for full, part in zip(records["full"], records["part"]):
        assert full.keys() == part.keys() and "ema_test_acc" in full
        for key in full:
            assert part[key] == (full[key] if isinstance(full[key], str) else
                                 pytest.approx(full[key], rel=1e-5, abs=1e-6)), key
    for file in ("model.safetensors", "checkpoint.safetensors"):
        a, _ = load_tensors(tmp_path / "full" / file)
        b, _ = load_tensors(tmp_path / "part" / file)
        keys = [key for key in a if not key.startswith("rng.")]
        assert any(key.startswith("ema.") for key in keys) or file == "model.safetensors"
        for key in keys:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=f"{file}: {key}")


def test_ema_reads_nothing_from_the_device_per_step(tiny_folder, tmp_path, monkeypatch):
    from test_train import count_device_reads

    calls = count_device_reads(monkeypatch)
    monkeypatch.setattr(TensorBoardLog, "step_every", 1000)
    train_quietly(small_run(tiny_folder, tmp_path, epochs=1, batch_size=8, ema=0.9), tmp_path / "run")
    assert len(calls) == 3  # the epoch's sums, the raw and the EMA evaluation's sums


# ------------------------------------------------------------ flags
@pytest.mark.parametrize("flag, value, message", [
    ("--layer-decay", "0", "layer_decay must be in (0, 1], got 0.0"),
    ("--ema", "1.5", "ema must be in (0, 1), got 1.5"),
    ("--ema", "1", "ema must be in (0, 1), got 1.0"),
    ("--drop-path", "1", "drop_path must be in [0, 1), got 1.0"),
])
def test_bad_recipe_values_give_one_clear_error(flag, value, message, tmp_path, capsys):
    from vitcraft.cli import main

    assert main(["train", flag, value, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"vitcraft: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_train_help_shows_the_recipe_flags(capsys):
    from vitcraft.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--layer-decay R", "--freeze {none,backbone}", "--drop-path P", "--ema DECAY"):
        assert shown in text
