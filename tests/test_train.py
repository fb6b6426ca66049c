import inspect
import json
import math
import sys

import pytest
import torch
from conftest import small_run, train_quietly

from vitcraft import create_model
from vitcraft.config import TrainConfig
from vitcraft.errors import VitcraftError
from vitcraft.files import load_tensors
from vitcraft.runs import RunConfig, load_trained_model
from vitcraft.state_dict import load_state_checked
from vitcraft.tensorboard_log import TensorBoardLog
from vitcraft.train import build_optimizer, learning_rate_at


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
    last = train_quietly(small_run(tiny_folder, tmp_path, epochs=4), out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    for key in ("epoch", "train_loss", "test_loss", "test_acc", "test_top5", "lr", "epoch_seconds",
                "images_per_second", "step"):
        assert key in records[-1]
    assert records[-1]["step"] == 4 * math.ceil(90 / 16)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert last["test_acc"] > 0.6  # three easy classes; chance is 1/3
    config = json.loads((out / "run.json").read_text())
    assert config["class_names"] == ["bottom", "middle", "top"]
    assert config["model_config"]["image_size"] == 8 and config["model_config"]["num_classes"] == 3
    # the saved weights reproduce the recorded accuracy
    model, metadata = load_trained_model(out)
    assert metadata["mean"] == [0.5, 0.5, 0.5]
    hub_config = json.loads((out / "config.json").read_text())  # the run directory is a hub folder too
    assert hub_config["model_type"] == "vitcraft-vit" and hub_config["num_classes"] == 3
    assert hub_config["metadata"]["class_names"] == ["bottom", "middle", "top"]


def test_resume_after_stop_equals_uninterrupted_run(tiny_folder, tmp_path):
    full = train_quietly(small_run(tiny_folder, tmp_path, epochs=3), tmp_path / "full")
    train_quietly(small_run(tiny_folder, tmp_path, epochs=1), tmp_path / "part")
    # continue the 1-epoch run to 3 epochs, as `vitcraft train --resume DIR --epochs 3`
    resumed = train_quietly(small_run(tiny_folder, tmp_path, epochs=3), tmp_path / "part", resume=True)
    for key in ("train_loss", "test_loss", "test_acc", "step"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    a, _ = load_tensors(tmp_path / "full" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "part" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_existing_run_is_never_overwritten_unless_asked(tiny_folder, tmp_path):
    out = tmp_path / "run"
    train_quietly(small_run(tiny_folder, tmp_path, epochs=1), out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(VitcraftError, match="already holds a run .*--resume.*--overwrite"):
        train_quietly(small_run(tiny_folder, tmp_path, epochs=1, seed=2), out)
    assert (out / "model.safetensors").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    train_quietly(small_run(tiny_folder, tmp_path, epochs=1, seed=2), out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces only the run's own files


def test_resume_without_checkpoint_is_refused(tmp_path, tiny_folder):
    with pytest.raises(VitcraftError, match="holds no checkpoint"):
        train_quietly(small_run(tiny_folder, tmp_path), tmp_path / "empty", resume=True)


def test_diverging_loss_stops_with_a_clear_message(tiny_folder, tmp_path, monkeypatch):
    run = small_run(tiny_folder, tmp_path, epochs=3, learning_rate=1e30)  # step 1's update breaks the weights
    advice = (r"training diverged\. Try a lower --lr, --grad-clip 1\.0 or --precision fp32; "
              r"the last good checkpoint in .* is kept \(--resume continues from it\)")
    # the loss is read every step_every steps and at the end of an epoch: it names the steps in between
    with pytest.raises(VitcraftError, match=r"the loss became nan between steps 1 and 6 \(epoch 1\): " + advice):
        train_quietly(run, tmp_path / "nan")  # 6 steps per epoch, fewer than step_every
    monkeypatch.setattr(TensorBoardLog, "step_every", 1)
    with pytest.raises(VitcraftError, match=r"the loss became nan at step 2 \(epoch 1\): " + advice):
        train_quietly(run, tmp_path / "nan-every-step")


def test_checkpoint_of_another_shape_names_the_tensor():
    small, big = create_model("seed-tiny"), create_model("seed-tiny", hidden_size=64)
    with pytest.raises(VitcraftError,
                       match=r"'embedding.cls_token' of shape \(1, 1, 64\), but this model's is \(1, 1, 48\)"):
        load_state_checked(small, big.state_dict(), "other.safetensors")


def test_bad_recipe_values_are_refused():
    with pytest.raises(VitcraftError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(VitcraftError, match="schedule must be one of constant, cosine"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="unknown train setting 'epoch'; did you mean 'epochs'"):
        RunConfig.from_dict({"train": {"epoch": 3}})


def test_resume_after_a_kill_between_checkpoint_and_weights_repairs_the_weights(tiny_folder, tmp_path):
    out = tmp_path / "run"
    train_quietly(small_run(tiny_folder, tmp_path, epochs=1), out)
    stale = (out / "model.safetensors").read_bytes()
    train_quietly(small_run(tiny_folder, tmp_path, epochs=2), out, resume=True)
    # as if killed after the last checkpoint was written but before model.safetensors was
    (out / "model.safetensors").write_bytes(stale)
    train_quietly(small_run(tiny_folder, tmp_path, epochs=2), out, resume=True)  # nothing left to train
    weights, _ = load_tensors(out / "model.safetensors")
    checkpoint, _ = load_tensors(out / "checkpoint.safetensors")
    for key, value in weights.items():
        assert torch.equal(value, checkpoint[f"model.{key}"]), key


def test_grayscale_28px_data_trains_without_config_edits(tmp_path):
    from conftest import write_folder_dataset

    folder = write_folder_dataset(tmp_path / "gray", per_class=(8, 2), size=28, mode="L")
    out = tmp_path / "run"
    last = train_quietly(small_run(folder, tmp_path, epochs=1), out, figures=True)
    config = json.loads((out / "run.json").read_text())["model_config"]
    assert (config["image_size"], config["num_channels"], config["num_classes"]) == (28, 1, 3)
    assert 0 <= last["test_acc"] <= 1 and (out / "attention.png").is_file()
    model, _ = load_trained_model(out)
    assert model(torch.zeros(2, 1, 28, 28))[0].shape == (2, 3)


def count_device_reads(monkeypatch) -> list[str]:
    """The modules of vitcraft's own calls of Tensor.item / Tensor.tolist, appended as they happen.

    On a GPU each such call waits for all queued work. Calls from torch's code (AdamW
    reads its step counters, kept on the CPU) are not counted.
    """
    calls = []

    def counting(original):
        def counted(self, *args):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("vitcraft"):
                calls.append(caller)
            return original(self, *args)
        return counted

    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    return calls


def test_values_are_read_from_the_device_per_interval_not_per_step_or_batch(tiny_folder, tmp_path, monkeypatch):
    calls = count_device_reads(monkeypatch)
    monkeypatch.setattr(TensorBoardLog, "step_every", 1000)  # more than any run here has steps
    reads = {}
    # 6 steps and 1 evaluation batch, then 12 steps and 6 evaluation batches
    for batch_size, eval_batch_size in ((16, 24), (8, 4)):
        calls.clear()
        train_quietly(small_run(tiny_folder, tmp_path, epochs=1, batch_size=batch_size,
                                eval_batch_size=eval_batch_size), tmp_path / f"b{batch_size}")
        reads[batch_size] = len(calls)
    assert reads[16] == reads[8] == 2  # the epoch's sums, the evaluation's sums
    monkeypatch.setattr(TensorBoardLog, "step_every", 2)
    calls.clear()
    train_quietly(small_run(tiny_folder, tmp_path, epochs=1, batch_size=8, eval_batch_size=4), tmp_path / "every2")
    assert len(calls) == reads[8] + 12 // 2  # one read per interval


def test_evaluate_equals_a_direct_computation(tiny_folder, tmp_path):
    from vitcraft.augment import Normalization
    from vitcraft.data import load_splits
    from vitcraft.train import evaluate

    _, test_set = load_splits(str(tiny_folder), cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    model = create_model("seed-tiny", image_size=8, num_classes=3, hidden_size=32, intermediate_size=64).eval()
    normalization = Normalization.for_channels(3)
    grad_enabled = []
    model.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    result = evaluate(model, test_set, normalization, torch.device("cpu"), None, 5)  # batches of 5, 5, ... 4
    assert grad_enabled == [False] * 5  # evaluated without autograd's bookkeeping
    with torch.no_grad():
        logits = model(normalization(test_set.images))[0]
    labels = test_set.labels
    predictions = logits.argmax(1)
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result["acc"] == pytest.approx((predictions == labels).double().mean().item())
    assert result["top5"] == 1.0  # 3 classes
    assert result["per_class_acc"] == pytest.approx(
        [(predictions[labels == k] == k).double().mean().item() for k in range(3)])
    assert torch.equal(result["predictions"], predictions)


def test_evaluate_with_flip_averages_the_probabilities_of_each_image_and_its_mirror_image(tiny_folder, tmp_path):
    from vitcraft.augment import Normalization
    from vitcraft.data import load_splits
    from vitcraft.train import evaluate

    _, test_set = load_splits(str(tiny_folder), cache_dir=tmp_path / "cache")
    torch.manual_seed(1)
    model = create_model("seed-tiny", image_size=8, num_classes=3, hidden_size=32, intermediate_size=64).eval()
    normalization = Normalization.for_channels(3)
    result = evaluate(model, test_set, normalization, torch.device("cpu"), None, 7, flip=True)
    images = normalization(test_set.images)
    with torch.no_grad():
        probabilities = (model(images)[0].softmax(1) + model(images.flip(3))[0].softmax(1)) / 2
        plain = evaluate(model, test_set, normalization, torch.device("cpu"), None, 7)
    labels = test_set.labels
    loss = torch.nn.functional.nll_loss(probabilities.log(), labels).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-5) and result["loss"] != pytest.approx(plain["loss"])
    assert torch.equal(result["predictions"], probabilities.argmax(1))
    assert result["acc"] == pytest.approx((probabilities.argmax(1) == labels).double().mean().item())


def test_eval_batch_size_has_one_default():
    from vitcraft.plots import predict_all
    from vitcraft.train import evaluate

    for function in (evaluate, predict_all):
        assert inspect.signature(function).parameters["batch_size"].default == TrainConfig.eval_batch_size
