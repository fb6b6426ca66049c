import json
import math

import pytest
import torch

from vitcraft import create_model
from vitcraft.checkpoint import load_state_checked, load_trained_model
from vitcraft.errors import VitcraftError
from vitcraft.io import load_tensors
from vitcraft.train import (DataConfig, RunConfig, TrainConfig, build_optimizer, learning_rate_at, train)


def tiny_run(folder, tmp_path, **train_overrides) -> RunConfig:
    settings = dict(epochs=2, batch_size=16, eval_batch_size=32, learning_rate=3e-3, seed=1)
    settings.update(train_overrides)
    return RunConfig(preset="seed-tiny", model={"hidden_size": 32, "intermediate_size": 64},
                     train=TrainConfig(**settings),
                     data=DataConfig(data=str(folder), cache_dir=str(tmp_path / "cache")))


def test_learning_rate_schedule():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine", min_lr=0.1)
    assert learning_rate_at(0, cfg, 110) == pytest.approx(0.1)
    assert learning_rate_at(9, cfg, 110) == pytest.approx(1.0)
    assert learning_rate_at(10, cfg, 110) == pytest.approx(1.0)
    assert learning_rate_at(60, cfg, 110) == pytest.approx(0.55)
    assert learning_rate_at(110, cfg, 110) == pytest.approx(0.1)
    constant = TrainConfig(learning_rate=2e-3)
    assert {learning_rate_at(s, constant, 50) for s in range(50)} == {2e-3}


def test_weight_decay_only_on_weight_matrices():
    model = create_model("seed-tiny")
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.05))
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"])
    plain_names = {names[id(p)] for p in plain["params"]}
    assert {"embedding.cls_token", "embedding.position_embeddings", "classifier.bias",
            "encoder.blocks.0.layernorm_1.weight"} <= plain_names
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_training_learns_and_writes_a_complete_run(tiny_folder, tmp_path):
    out = tmp_path / "run"
    last = train(tiny_run(tiny_folder, tmp_path, epochs=4), out, progress=False, figures=False, log=lambda *_: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    for key in ("epoch", "train_loss", "test_loss", "test_acc", "test_top5", "lr", "epoch_seconds",
                "images_per_second", "step"):
        assert key in records[-1]
    assert records[-1]["step"] == 4 * math.ceil(90 / 16)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert last["test_acc"] > 0.6  # three easy classes; chance is 1/3
    config = json.loads((out / "config.json").read_text())
    assert config["class_names"] == ["bottom", "middle", "top"]
    assert config["model_config"]["image_size"] == 8 and config["model_config"]["num_classes"] == 3
    # the saved weights reproduce the recorded accuracy
    model, metadata = load_trained_model(out)
    assert metadata["mean"] == [0.5, 0.5, 0.5]
    _, meta = load_tensors(out / "model.safetensors")
    assert json.loads(meta["vitcraft"])["class_names"] == ["bottom", "middle", "top"]


def test_resume_after_stop_equals_uninterrupted_run(tiny_folder, tmp_path):
    quiet = dict(progress=False, figures=False, log=lambda *_: None)
    full = train(tiny_run(tiny_folder, tmp_path, epochs=3), tmp_path / "full", **quiet)
    train(tiny_run(tiny_folder, tmp_path, epochs=1), tmp_path / "part", **quiet)
    # continue the 1-epoch run to 3 epochs, as `vitcraft train --resume DIR --epochs 3`
    resumed = train(tiny_run(tiny_folder, tmp_path, epochs=3), tmp_path / "part", resume=True, **quiet)
    for key in ("train_loss", "test_loss", "test_acc", "step"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    a, _ = load_tensors(tmp_path / "full" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "part" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_existing_run_is_never_overwritten_unless_asked(tiny_folder, tmp_path):
    quiet = dict(progress=False, figures=False, log=lambda *_: None)
    out = tmp_path / "run"
    train(tiny_run(tiny_folder, tmp_path, epochs=1), out, **quiet)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(VitcraftError, match="already holds a run .*--resume.*--overwrite"):
        train(tiny_run(tiny_folder, tmp_path, epochs=1, seed=2), out, **quiet)
    assert (out / "model.safetensors").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    train(tiny_run(tiny_folder, tmp_path, epochs=1, seed=2), out, overwrite=True, **quiet)
    assert (out / "model.safetensors").read_bytes() != before
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces only the run's own files


def test_resume_without_checkpoint_is_refused(tmp_path, tiny_folder):
    with pytest.raises(VitcraftError, match="holds no checkpoint"):
        train(tiny_run(tiny_folder, tmp_path), tmp_path / "empty", resume=True, progress=False, figures=False)


def test_diverging_loss_stops_with_a_clear_message(tiny_folder, tmp_path):
    run = tiny_run(tiny_folder, tmp_path, epochs=3, learning_rate=1e30)
    with pytest.raises(VitcraftError, match="training diverged"):
        train(run, tmp_path / "nan", progress=False, figures=False, log=lambda *_: None)


def test_checkpoint_of_another_shape_names_the_tensor():
    small, big = create_model("seed-tiny"), create_model("seed-tiny", hidden_size=64)
    with pytest.raises(VitcraftError, match=r"'embedding.cls_token' of shape \(1, 1, 64\), but this model's is \(1, 1, 48\)"):
        load_state_checked(small, big.state_dict(), "other.safetensors")


def test_bad_recipe_values_are_refused():
    with pytest.raises(VitcraftError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(VitcraftError, match="schedule must be one of constant, cosine"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="unknown train setting 'epoch'; did you mean 'epochs'"):
        RunConfig.from_dict({"train": {"epoch": 3}})


def test_resume_after_a_kill_between_checkpoint_and_weights_repairs_the_weights(tiny_folder, tmp_path):
    quiet = dict(progress=False, figures=False, log=lambda *_: None, tensorboard=False)
    out = tmp_path / "run"
    train(tiny_run(tiny_folder, tmp_path, epochs=1), out, **quiet)
    stale = (out / "model.safetensors").read_bytes()
    train(tiny_run(tiny_folder, tmp_path, epochs=2), out, resume=True, **quiet)
    # as if killed after the last checkpoint was written but before model.safetensors was
    (out / "model.safetensors").write_bytes(stale)
    train(tiny_run(tiny_folder, tmp_path, epochs=2), out, resume=True, **quiet)  # nothing left to train
    weights, _ = load_tensors(out / "model.safetensors")
    checkpoint, _ = load_tensors(out / "checkpoint.safetensors")
    for key, value in weights.items():
        assert torch.equal(value, checkpoint[f"model.{key}"]), key


def test_grayscale_28px_data_trains_without_config_edits(tmp_path):
    from conftest import write_folder_dataset

    folder = write_folder_dataset(tmp_path / "gray", per_class=(8, 2), size=28, mode="L")
    out = tmp_path / "run"
    last = train(tiny_run(folder, tmp_path, epochs=1), out, progress=False, figures=True,
                 log=lambda *_: None, tensorboard=False)
    config = json.loads((out / "config.json").read_text())["model_config"]
    assert (config["image_size"], config["num_channels"], config["num_classes"]) == (28, 1, 3)
    assert 0 <= last["test_acc"] <= 1 and (out / "attention.png").is_file()
    model, _ = load_trained_model(out)
    assert model(torch.zeros(2, 1, 28, 28))[0].shape == (2, 3)
