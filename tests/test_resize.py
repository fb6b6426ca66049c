"""Other image sizes: position-embedding resampling, dynamic image size, progressive resizing."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import small_run, train_quietly, write_folder_dataset
from timm.layers import resample_abs_pos_embed

from vitcraft import create_model
from vitcraft.cli import main
from vitcraft.config import TrainConfig
from vitcraft.errors import VitcraftError
from vitcraft.files import load_tensors
from vitcraft.resize import progressive_size, resample_position_embeddings
from vitcraft.runs import load_trained_model


@pytest.fixture(scope="module")
def folder16(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("resize") / "data", per_class=(16, 4), size=16)


def test_resampling_is_exact_at_the_same_size_and_keeps_the_prefix_tokens():
    table = torch.randn(1, 2 + 64, 8)
    assert torch.equal(resample_position_embeddings(table, 2, (8, 8), (8, 8)), table)
    bigger = resample_position_embeddings(table, 2, (8, 8), (12, 12))
    assert bigger.shape == (1, 2 + 144, 8)
    assert torch.equal(bigger[:, :2], table[:, :2])  # [CLS] and distillation rows untouched
    # the patch rows equal timm's bicubic resampling, with one prefix token or two
    for prefix in (1, 2):
        for new_grid in ((12, 12), (4, 4), (6, 10)):
            ours = resample_position_embeddings(table[:, 2 - prefix:], prefix, (8, 8), new_grid)
            theirs = resample_abs_pos_embed(table[:, 2 - prefix:], list(new_grid), [8, 8], num_prefix_tokens=prefix)
            torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_resampling_a_smooth_table_follows_the_function():
    # position vectors that are a linear function of the patch centre: bicubic keeps it (inside the border)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    table = torch.cat([torch.zeros(1, 1, 2), torch.stack([rows, cols], -1).reshape(1, 64, 2) / 8], dim=1)
    resampled = resample_position_embeddings(table, 1, (8, 8), (16, 16))[0, 1:].reshape(16, 16, 2)
    # new patch (r, c) has its centre at old-grid coordinate (r + 0.5) / 2 - 0.5
    expected_row = ((torch.arange(16.0) + 0.5) / 2 - 0.5) / 8
    torch.testing.assert_close(resampled[4:12, 6, 0], expected_row[4:12], atol=1e-5, rtol=0)


def test_mismatched_table_is_refused():
    with pytest.raises(ValueError,
                       match="position embeddings have 65 rows, but 2 prefix tokens and a 8x8 grid need 66"):
        resample_position_embeddings(torch.zeros(1, 65, 4), 2, (8, 8), (4, 4))


def test_a_model_trained_at_32_runs_at_48():
    torch.manual_seed(0)
    model = create_model("seed-tiny", num_classes=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):  # a few steps, so the tables are no longer their initial values
        loss = F.cross_entropy(model(torch.randn(8, 3, 32, 32))[0], torch.randint(0, 3, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x32 = torch.randn(2, 3, 32, 32)
    before = model(x32)[0]
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 32, 32\), got \(2, 3, 48, 48\)"):
        model(torch.randn(2, 3, 48, 48))  # not opted in: the clear error stays
    model.set_dynamic_image_size(True)
    logits, attentions = model(torch.randn(2, 3, 48, 48), output_attentions=True)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert attentions[0].shape == (2, 4, 1 + 12 * 12, 1 + 12 * 12)
    torch.testing.assert_close(model(x32)[0], before, atol=0, rtol=0)  # the trained size is unchanged
    assert model.embedding.position_embeddings.shape == (1, 65, 48)  # the parameter keeps its size
    with pytest.raises(ValueError, match=r"H and W multiples of 4, got \(1, 3, 30, 30\)"):
        model(torch.randn(1, 3, 30, 30))


def test_deit_runs_at_another_size_too():
    model = create_model("deit-seed-tiny").eval()
    model.set_dynamic_image_size(True)
    logits, _ = model(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_progressive_schedule_splits_the_epochs_evenly():
    assert [progressive_size([16, 24, 32], e, 9, 32) for e in range(9)] == [16] * 3 + [24] * 3 + [32] * 3
    assert [progressive_size([16, 32], e, 5, 32) for e in range(5)] == [16, 16, 16, 32, 32]
    assert [progressive_size([16, 16, 32], e, 3, 32) for e in range(3)] == [16, 16, 32]
    assert [progressive_size(None, e, 3, 32) for e in range(3)] == [32, 32, 32]


def test_progressive_training_keeps_the_full_size_parameters(folder16, tmp_path):
    out = tmp_path / "run"
    train_quietly(small_run(folder16, tmp_path, progressive_sizes=[8, 16]), out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["image_size"] for r in records] == [8, 16]
    assert all(0 <= r["test_acc"] <= 1 for r in records)
    weights, _ = load_tensors(out / "model.safetensors")
    assert weights["embedding.position_embeddings"].shape == (1, 1 + 16, 32)  # 16x16 images, 4x4 patches
    checkpoint, _ = load_tensors(out / "checkpoint.safetensors")
    moments = [v.shape for k, v in checkpoint.items() if k.startswith("optimizer.") and k.endswith("exp_avg")]
    assert (1, 17, 32) in moments  # the optimizer state of the full-size table
    model, _ = load_trained_model(out)
    assert model(torch.zeros(1, 3, 16, 16))[0].shape == (1, 3)


def test_progressive_sizes_are_checked(folder16, tmp_path):
    with pytest.raises(VitcraftError, match=r"multiples of the patch size 4 of 'seed-tiny', got \[10\]"):
        train_quietly(small_run(folder16, tmp_path, progressive_sizes=[10, 16]), tmp_path / "bad")
    with pytest.raises(VitcraftError, match="progressive_sizes must be a list of positive integers"):
        TrainConfig(progressive_sizes=[0, 16])


def test_progressive_sizes_must_end_at_the_images_size(folder16, tmp_path, capsys):
    # a recipe's sizes for 32-pixel images, on 16-pixel ones: one clear error before any training
    out = tmp_path / "run"
    assert main(["train", "--recipe", "speedrun-32px", "--data", str(folder16), "--out", str(out)]) == 2
    assert ("progressive_sizes must end at the images' size, 16 px (the size the model is evaluated at), "
            "got [16, 24, 32]") in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()
    with pytest.raises(VitcraftError, match=r"must end at the images' size, 16 px .*, got \[8, 12\]"):
        train_quietly(small_run(folder16, tmp_path, progressive_sizes=[8, 12]), tmp_path / "short")


def test_eval_at_another_image_size(folder16, tmp_path, capsys):
    out = tmp_path / "run"
    train_quietly(small_run(folder16, tmp_path, epochs=1), out)
    assert main(["eval", str(out), "--device", "cpu", "--image-size", "24"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(["eval", str(out), "--device", "cpu", "--image-size", "18"]) == 2
    assert "multiples of the patch size 4" in capsys.readouterr().err
