"""Masked-autoencoder pretraining (mae.py, ``vitcraft pretrain``) and fine-tuning from it (``train --init``)."""

import json
import math

import pytest
import torch
from conftest import SMALL_VIT, small_run, train_quietly
from run_helpers import assert_same_run, metrics

from vitcraft.cli import main
from vitcraft.config import PretrainConfig, ViTConfig
from vitcraft.data import ImageTensorDataset, per_class_subset
from vitcraft.errors import VitcraftError
from vitcraft.files import load_tensors
from vitcraft.mae import (
    MaskedAutoencoder,
    kept_count,
    masked_mse,
    patchify,
    pixel_targets,
    random_masking,
    restore_order,
    unpatchify,
)
from vitcraft.model import ViTForClassification
from vitcraft.runs import DECODER_FILE, load_trained_model, read_run_file

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
CONFIG = ViTConfig(image_size=8, patch_size=2, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def autoencoder(**pretrain) -> MaskedAutoencoder:
    return MaskedAutoencoder(ViTForClassification(CONFIG), PretrainConfig(**pretrain))


# ------------------------------------------------------------------ the pieces
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9, 0.3])
def test_masking_keeps_the_configured_count_of_distinct_patches(ratio):
    ids_keep, mask, ids_restore = random_masking(5, 16, ratio)
    keep = int(16 * (1 - ratio))
    assert ids_keep.shape == (5, keep) and mask.shape == (5, 16) and ids_restore.shape == (5, 16)
    assert (mask.sum(1) == 16 - keep).all()
    for row in range(5):
        assert len(set(ids_keep[row].tolist())) == keep  # no patch kept twice
        assert (mask[row, ids_keep[row]] == 0).all()  # the kept ones are the unmasked ones
        assert sorted(ids_restore[row].tolist()) == list(range(16))  # a permutation
    assert kept_count(16, 0.99) == 1  # never none


def test_restoring_the_order_undoes_the_shuffle():
    tokens = torch.randn(3, 16, 4)
    ids_keep, mask, ids_restore = random_masking(3, 16, 0.75)
    kept = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, 4))  # (3, 4, 4), the encoder's input
    filler = torch.full((1, 1, 4), 99.0)
    restored = restore_order(kept, filler, ids_restore)
    visible = mask == 0
    assert torch.equal(restored[visible], tokens[visible])  # every kept token back in its own slot
    assert (restored[~visible] == 99.0).all()  # the filler exactly where the patches were hidden


def test_masks_differ_per_image_and_noise_fixes_them():
    noise = torch.rand(4, 16)
    first, second = random_masking(4, 16, 0.75, noise), random_masking(4, 16, 0.75, noise)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert len({tuple(row.tolist()) for row in first[1]}) > 1  # the images got different masks


def test_patchify_cuts_the_patch_embedding_order_and_unpatchify_inverts_it():
    images = torch.randn(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # patch 1 is row 0, column 1; each patch flattened as (row, column, channel)
    assert torch.equal(patches[1, 1], images[1, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))
    assert torch.equal(patches[0, 2], images[0, :, 4:8, 0:4].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 4, 3), images)


def test_normalised_pixel_target_is_the_per_patch_formula():
    patches = torch.randn(2, 3, 12) * 3 + 1
    target = pixel_targets(patches, norm_pix_loss=True)
    values = patches[1, 2].tolist()
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)  # unbiased, as MAE's .var()
    expected = torch.tensor([(v - mean) / math.sqrt(var + 1e-6) for v in values])
    torch.testing.assert_close(target[1, 2], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(pixel_targets(patches, norm_pix_loss=False), patches)


def test_the_loss_counts_only_hidden_patches():
    prediction = torch.randn(2, 6, 5, requires_grad=True)
    target = torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.float32)
    loss = masked_mse(prediction, target, mask)
    hidden = mask.bool()
    torch.testing.assert_close(loss, (prediction[hidden] - target[hidden]).pow(2).mean())
    loss.backward()
    assert (prediction.grad[~hidden] == 0).all()  # a visible patch's prediction gets no gradient
    assert (prediction.grad[hidden] != 0).all()


def test_model_loss_ignores_the_predictions_of_visible_patches():
    torch.manual_seed(0)
    model = autoencoder()
    images, noise = torch.randn(3, 3, 8, 8), torch.rand(3, 16)
    loss, prediction, mask = model(images, noise)
    assert prediction.shape == (3, 16, 12) and mask.shape == (3, 16) and loss.ndim == 0
    target = patchify(images, 2)
    torch.testing.assert_close(loss, (prediction - target).pow(2).mean(-1)[mask.bool()].mean())
    loss.backward()
    # the encoder saw only the kept patches: a change to a hidden patch's pixels changes no encoder output
    model.eval()
    changed = images.clone()
    hidden_patch = int(mask[0].nonzero()[0])
    row, column = divmod(hidden_patch, 4)
    changed[0, :, 2 * row:2 * row + 2, 2 * column:2 * column + 2] += 5
    ids_keep, _, _ = random_masking(3, 16, 0.75, noise)
    assert torch.equal(model.encode_kept(images, ids_keep), model.encode_kept(changed, ids_keep))


def test_reconstruct_pastes_the_visible_patches_back():
    torch.manual_seed(0)
    model = autoencoder(norm_pix_loss=True).eval()
    images, noise = torch.randn(2, 3, 8, 8), torch.rand(2, 16)
    hidden, reconstruction, pasted = model.reconstruct(images, noise)
    assert hidden.shape == (2, 1, 8, 8) and reconstruction.shape == pasted.shape == images.shape
    visible = ~hidden.expand_as(images)
    assert torch.equal(pasted[visible], images[visible])
    assert torch.equal(pasted[~visible], reconstruction[~visible])
    assert hidden.float().mean() == 0.75


def test_only_vit_presets_are_pretrained():
    from vitcraft.registry import create_model

    with pytest.raises(ValueError, match="MAE pretrains the ViT presets"):
        MaskedAutoencoder(create_model("deit-seed-tiny"), PretrainConfig())
    with pytest.raises(ValueError, match="MAE hides patches itself"):  # it would be ignored, not applied
        MaskedAutoencoder(create_model("seed-tiny", patch_dropout=0.5), PretrainConfig())


@pytest.mark.parametrize("values, message", [
    ({"mask_ratio": 1.0}, "mask_ratio"), ({"mask_ratio": 0}, "mask_ratio"), ({"decoder_depth": 0}, "decoder_depth"),
    ({"method": "simclr"}, "method"), ({"norm_pix_loss": "yes"}, "norm_pix_loss")])
def test_bad_pretrain_settings_are_named(values, message):
    with pytest.raises(VitcraftError, match=message):
        PretrainConfig(**values)


def test_per_class_subset_draws_the_same_images_per_seed():
    labels = torch.arange(40) % 4
    dataset = ImageTensorDataset(torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 2, 2).clone(),
                                 labels, ["a", "b", "c", "d"])
    subset = per_class_subset(dataset, 3, seed=1)
    assert torch.bincount(subset.labels).tolist() == [3, 3, 3, 3]
    rows = subset.images[:, 0, 0, 0].long()
    assert torch.equal(labels[rows], subset.labels) and (rows.diff() > 0).all()  # the split's order kept
    assert torch.equal(per_class_subset(dataset, 3, seed=1).images, subset.images)
    assert not torch.equal(per_class_subset(dataset, 3, seed=2).images, subset.images)
    with pytest.raises(VitcraftError, match="class 'a' has only 10 training images"):
        per_class_subset(dataset, 11, seed=0)


# ------------------------------------------------------------------ whole runs
def pretrain_run(folder, tmp_path, **train):
    """8x8 images in 4 patches: with 2 of them seen, the class's bright band can be filled in."""
    run = small_run(folder, tmp_path, model={**SMALL_VIT, **NO_DROPOUT},
                    **{"epochs": 60, "learning_rate": 3e-3, "crop_scale": None, "precision": "fp32", **train})
    run.pretrain = PretrainConfig(decoder_depth=1, mask_ratio=0.5)
    return run


@pytest.fixture(scope="module")
def pretrained(tiny_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mae")
    run = pretrain_run(tiny_folder, tmp)
    train_quietly(run, tmp / "mae", figures=True)
    return tmp / "mae"


def test_pretraining_loss_falls_and_the_run_has_its_files(pretrained):
    records = metrics(pretrained)
    assert len(records) == 60 and "test_acc" not in records[-1]
    # the class's band filled in from the seen patches: far below the error of predicting the mean image
    assert records[-1]["train_loss"] < 0.25 * records[0]["train_loss"]
    assert records[-1]["test_loss"] < 0.25 * records[0]["test_loss"]
    for name in ("reconstruction.png", "curves.png", DECODER_FILE, "model.safetensors", "checkpoint.safetensors"):
        assert (pretrained / name).is_file(), name
    saved = read_run_file(pretrained)
    assert saved["pretraining"]["mask_ratio"] == 0.5 and saved["run"]["pretrain"]["decoder_depth"] == 1
    decoder, _ = load_tensors(pretrained / DECODER_FILE)
    assert decoder and all(key.startswith("decoder.") for key in decoder)


def test_a_pretraining_run_is_not_used_as_a_classifier(pretrained):
    with pytest.raises(VitcraftError, match="pretraining run: its encoder has no trained classifier"):
        load_trained_model(pretrained)


def test_fine_tuning_starts_from_the_pretrained_encoder_exactly(pretrained, tiny_folder, tmp_path):
    from vitcraft.train import set_up

    run = small_run(tiny_folder, tmp_path)
    run.init, run.model = str(pretrained), {}
    t = set_up(run, tmp_path / "fine", resume=False, overwrite=False, figures=False, log=lambda _: None)
    checkpoint, _ = load_tensors(pretrained / "checkpoint.safetensors")  # the autoencoder as it trained
    encoder = {key[len("model.encoder."):]: value for key, value in checkpoint.items()
               if key.startswith("model.encoder.")}
    state = t.model.state_dict()
    compared = [key for key in encoder if not key.startswith("classifier.")]
    assert len(compared) > 10
    for key in compared:
        assert torch.equal(state[key], encoder[key]), key
    init = read_run_file(tmp_path / "fine")["init"]
    assert sorted(init["new"]) == ["classifier.bias", "classifier.weight"]  # the classifier never trained
    assert {key for key in init["dropped"] if key.startswith("decoder.")} == \
        set(load_tensors(pretrained / DECODER_FILE)[0])


def test_linear_probe_and_fine_tuning_after_pretraining_train(pretrained, tiny_folder, tmp_path):
    run = small_run(tiny_folder, tmp_path, freeze="backbone", epochs=2)
    run.init, run.model = str(pretrained), {}
    last = train_quietly(run, tmp_path / "probe")
    assert 0 <= last["test_acc"] <= 1
    model, _ = load_trained_model(tmp_path / "probe")
    source = ViTForClassification.from_pretrained(pretrained)
    assert torch.equal(model.encoder.blocks[0].mlp.dense_1.weight, source.encoder.blocks[0].mlp.dense_1.weight)


def test_a_resumed_pretraining_run_equals_an_uninterrupted_one(tiny_folder, tmp_path):
    whole = pretrain_run(tiny_folder, tmp_path, epochs=2)
    train_quietly(whole, tmp_path / "whole")
    half = pretrain_run(tiny_folder, tmp_path, epochs=1)
    train_quietly(half, tmp_path / "resumed")
    train_quietly(pretrain_run(tiny_folder, tmp_path, epochs=2), tmp_path / "resumed", resume=True)
    assert_same_run(tmp_path / "resumed", tmp_path / "whole")


def test_pretrain_command_refuses_what_needs_labels(tiny_folder, tmp_path, capsys):
    code = main(["pretrain", "--data", str(tiny_folder), "--label-smoothing", "0.1", "--mixup-alpha", "0.8",
                 "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert "does not take label_smoothing, mixup_alpha" in error
    assert not (tmp_path / "run").exists()


def test_eval_of_a_pretraining_run_says_to_fine_tune(pretrained, capsys):
    assert main(["eval", str(pretrained)]) == 2
    assert f"vitcraft train --init {pretrained}" in capsys.readouterr().err


def test_resume_takes_the_run_kind_it_was_started_as(pretrained, capsys):
    assert main(["train", "--resume", str(pretrained)]) == 2
    assert f"vitcraft pretrain --resume {pretrained}" in capsys.readouterr().err


def test_pretrain_command_writes_a_run_and_the_report_explains_the_picture(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(tiny_folder), "--epochs", "1", "--batch-size", "32", "--mask-ratio", "0.5",
                 "--decoder-depth", "1", "--decoder-width", "8", "--decoder-heads", "2", "--norm-pix-loss",
                 "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--no-tensorboard", "--no-figures",
                 "--reconstruction-every-epoch", "--out", str(out)]) == 0
    assert "as a masked autoencoder (mask ratio 0.5" in capsys.readouterr().out
    saved = json.loads((out / "run.json").read_text())
    assert saved["run"]["pretrain"] == {"method": "mae", "mask_ratio": 0.5, "decoder_depth": 1, "decoder_width": 8,
                                        "decoder_heads": 2, "norm_pix_loss": True,
                                        "reconstruction_every_epoch": True}
    # asked for, the picture is drawn after each epoch even without the end-of-run figures
    assert (out / "reconstruction.png").is_file() and not (out / "curves.png").exists()
    assert saved["run"]["train"]["weight_decay"] == 0.05  # the mae recipe
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "What the masked autoencoder reconstructs" in page
    assert 'alt="What the masked autoencoder reconstructs' in page  # the picture is inlined, not missing


def test_the_mae_recipe_is_for_pretrain_alone(tiny_folder, tmp_path, capsys):
    assert main(["train", "--recipe", "mae", "--data", str(tiny_folder), "--out", str(tmp_path / "run")]) == 2
    assert "recipe 'mae' is for vitcraft pretrain, not vitcraft train" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
