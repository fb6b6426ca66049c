"""RandAugment/TrivialAugment per image, random erasing, MixUp and CutMix, and their recipe settings."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import write_folder_dataset

from vitcraft.cli import main
from vitcraft.config import DataConfig, TrainConfig
from vitcraft.deit_augment import DeiTAugment, cutmix, cutmix_box, mix_batch, mixup, random_erasing
from vitcraft.errors import VitcraftError
from vitcraft.runs import RunConfig
from vitcraft.train import train


def distinct_batch(batch=6, size=8):
    """float (B, 3, size, size) whose images differ everywhere, and labels 0..B-1."""
    x = torch.arange(batch, dtype=torch.float).view(-1, 1, 1, 1) + torch.rand(batch, 3, size, size) * 0.5
    return x, torch.arange(batch)


def test_mixup_is_the_convex_combination_with_the_neighbour():
    x, labels = distinct_batch()
    targets = F.one_hot(labels, 6).float()
    mixed, soft = mixup(x, targets, 0.3)
    torch.testing.assert_close(mixed[2], 0.3 * x[2] + 0.7 * x[1])
    torch.testing.assert_close(mixed[0], 0.3 * x[0] + 0.7 * x[5])  # the first pairs with the last
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    assert soft[2, 2] == pytest.approx(0.3) and soft[2, 1] == pytest.approx(0.7)


def test_mix_batch_targets_sum_to_one_and_match_the_images():
    x, labels = distinct_batch()
    for seed in range(8):
        mixed, soft = mix_batch(x, labels, 6, mixup_alpha=0.8, cutmix_alpha=0.0,
                                generator=torch.Generator().manual_seed(seed))
        assert soft.shape == (6, 6)
        torch.testing.assert_close(soft.sum(1), torch.ones(6))
        lam = soft[0, 0].item()
        assert 0 <= lam <= 1 and soft[0, 5].item() == pytest.approx(1 - lam, abs=1e-6)
        torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))


def test_cutmix_box_area_matches_lambda():
    generator = torch.Generator().manual_seed(0)
    for lam in (0.2, 0.5, 0.9):
        side = 32 * math.sqrt(1 - lam)
        for _ in range(50):
            top, left, h, w = cutmix_box(32, 32, lam, generator)
            assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32
            if 0 < top and top + h < 32 and 0 < left and left + w < 32:  # not clipped at a border
                assert abs(h - side) <= 2 and abs(w - side) <= 2
                assert abs(h * w / 1024 - (1 - lam)) < 4 * side / 1024 + 0.01


def test_cutmix_targets_are_the_pasted_pixel_shares():
    x, labels = distinct_batch(size=16)
    targets = F.one_hot(labels, 6).float()
    for seed in range(10):
        mixed, soft = cutmix(x, targets, 0.6, torch.Generator().manual_seed(seed))
        from_neighbour = (mixed != x).all(1)  # (B, H, W): pixels that came from the neighbour
        share = from_neighbour.float().mean((1, 2))
        torch.testing.assert_close(soft[:, labels].diagonal(), 1 - share)  # weight of the own label
        torch.testing.assert_close(soft.sum(1), torch.ones(6))
        kept = ~from_neighbour
        assert torch.equal(mixed.permute(0, 2, 3, 1)[kept], x.permute(0, 2, 3, 1)[kept])
        torch.testing.assert_close(mixed[1][:, from_neighbour[1]], x[0][:, from_neighbour[1]])


def test_mix_prob_zero_leaves_the_batch_and_gives_one_hot_targets():
    x, labels = distinct_batch()
    mixed, soft = mix_batch(x, labels, 6, 0.8, 1.0, mix_prob=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixed, x) and torch.equal(soft, F.one_hot(labels, 6).float())


def test_random_erasing_replaces_one_box_per_image():
    x = torch.full((200, 3, 16, 16), 7.0)
    erased = random_erasing(x, 1.0, torch.Generator().manual_seed(0))
    assert erased.shape == x.shape and erased.dtype == x.dtype
    changed = (erased != 7.0).all(1)  # (B, H, W)
    area = changed.float().mean((1, 2))
    assert (area > 0).float().mean() > 0.95  # an image keeps nothing erased only when no box fits
    assert area.max() <= 1 / 3 + 0.1 and area[area > 0].min() >= 0.02 - 0.015
    rows, cols = changed.any(2), changed.any(1)  # one rectangle: its area is its row count times column count
    torch.testing.assert_close(changed.float().sum((1, 2)), rows.float().sum(1) * cols.float().sum(1))
    assert torch.equal(random_erasing(x, 0.0, torch.Generator().manual_seed(0)), x)
    half = (random_erasing(x, 0.5, torch.Generator().manual_seed(1)) != 7.0).flatten(1).any(1).float().mean()
    assert 0.35 < half < 0.65


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_auto_augment_draws_per_image(policy):
    image = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    batch = image.expand(16, -1, -1, -1).contiguous()  # sixteen copies of one image
    state = torch.get_rng_state()
    out = DeiTAugment(10, auto_augment=policy).policy(batch, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert not torch.equal(out, batch)
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 4  # each copy got its own operations
    again = DeiTAugment(10, auto_augment=policy).policy(batch, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_everything_off_is_the_identity_and_draws_nothing():
    extra = DeiTAugment(10)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    x, labels = torch.randn(4, 3, 8, 8), torch.arange(4)
    assert extra.policy(images, generator) is images
    out, targets = extra.erase_and_mix(x, labels, generator)
    assert out is x and targets is labels
    assert torch.equal(generator.get_state(), state)


def test_soft_targets_train_with_label_smoothing(tmp_path):
    folder = write_folder_dataset(tmp_path / "data16", per_class=(16, 4), size=16)
    run = RunConfig(preset="seed-tiny", model={"hidden_size": 32, "intermediate_size": 64},
                    train=TrainConfig(epochs=2, batch_size=16, num_threads=1, auto_augment="trivialaugment",
                                      random_erasing=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1),
                    data=DataConfig(data=str(folder), cache_dir=str(tmp_path / "cache")))
    last = train(run, tmp_path / "run", progress=False, figures=False, log=lambda *_: None, tensorboard=False)
    assert math.isfinite(last["train_loss"]) and last["step"] == 6
    saved = json.loads((tmp_path / "run" / "run.json").read_text())["run"]["train"]
    assert saved["mixup_alpha"] == 0.8 and saved["auto_augment"] == "trivialaugment"


@pytest.mark.parametrize("settings, message", [
    ({"auto_augment": "autoaugment"}, "auto_augment must be one of randaugment, trivialaugment; got 'autoaugment'"),
    ({"mixup_alpha": -1.0}, "mixup_alpha must be 0 (off) or positive, got -1.0"),
    ({"random_erasing": 1.5}, "random_erasing must be in [0, 1], got 1.5"),
    ({"mix_prob": -0.1}, "mix_prob must be in [0, 1], got -0.1"),
])
def test_bad_settings_are_refused_naming_the_setting(settings, message):
    with pytest.raises(VitcraftError) as info:
        TrainConfig(**settings)
    assert str(info.value) == message


def test_cli_flags_reach_the_recipe_and_are_checked(capsys):
    from vitcraft.cli import build_parser, run_config_from_args

    args = build_parser().parse_args(["train", "--auto-augment", "randaugment", "--mixup-alpha", "0.8",
                                      "--cutmix-alpha", "1", "--mix-prob", "0.5", "--random-erasing", "0.25"])
    recipe = run_config_from_args(args).train
    assert (recipe.auto_augment, recipe.mixup_alpha, recipe.cutmix_alpha, recipe.mix_prob,
            recipe.random_erasing) == ("randaugment", 0.8, 1.0, 0.5, 0.25)
    assert TrainConfig().auto_augment is None and TrainConfig().mixup_alpha == 0  # the seed's recipe: off
    assert main(["train", "--cutmix-alpha", "-2"]) == 2
    assert "vitcraft: error: cutmix_alpha must be 0 (off) or positive, got -2.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--auto-augment", "autoaugment"])
    assert "invalid choice: 'autoaugment'" in capsys.readouterr().err
