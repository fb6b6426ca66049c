"""Named training recipes: ``vitcraft train --recipe NAME`` and ``vitcraft list-recipes``.

A recipe is a model preset (with overrides) and training settings, a
starting point as a preset is: a --config file and flags override any of it.
Pair one with ``--budget`` to fit it to your minutes. Each description states
what it measured, where and how (``benchmarks/recipes.py`` runs them side by
side at one budget); a figure without its CPU class is not given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitcraft.config import duration_seconds
from vitcraft.errors import VitcraftError

COSINE = {"schedule": "cosine", "warmup_fraction": 0.05, "min_lr": 1e-5}
DEIT_AUGMENT = {"auto_augment": "randaugment", "random_erasing": 0.25, "mixup_alpha": 0.8, "cutmix_alpha": 1.0,
                "label_smoothing": 0.1, "weight_decay": 0.05}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # short budgets underfit
# the short-budget ViT recipe: cosine from a higher peak, label smoothing, no dropout
FAST_VIT = {**COSINE, "learning_rate": 2e-3, "grad_clip": 1.0, "label_smoothing": 0.1}
# ... and its model: shifted patch tokens (Lee et al. 2021) and half of the patches per step (FLIP), the two
# levers that paid most in the ablations of docs/training.md
FAST_VIT_MODEL = {**NO_DROPOUT, "shifted_patches": True, "patch_dropout": 0.5}
# ... and from a 30-minute budget on, twice its width and 6 blocks instead of 4: with the longer schedule the small
# model underfits, and the wider one's steps, about 1.8x as long, still pay there (docs/training.md)
FAST_VIT_LARGER = ("30m", {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 6})
# for 32-pixel images only: twice the peak learning rate, and the epochs split between 16, 24 and 32 px (a quarter
# of the tokens early), the two training levers that paid next in the 5-minute ablation
FAST_VIT_32PX = {**FAST_VIT, "learning_rate": 4e-3, "progressive_sizes": [16, 24, 32]}
BF16_MACHINE = "a 2-core x86 CPU with AVX-512 and bf16 units"
AT_B7DCD93 = f"on {BF16_MACHINE}, at commit b7dcd93 (before the fused kernels, in fp32)"


@dataclass(frozen=True)
class Recipe:
    """A model preset with overrides, and the training settings (TrainConfig fields) of one recipe."""

    preset: str
    train: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None  # the recipe whose run distils into this one (pass its run as --teacher)
    description: str = ""
    pretrain: bool = False  # a recipe for vitcraft pretrain, not vitcraft train
    # (a --budget, model overrides over `model`): from that budget on, where a larger model pays, the run takes it
    larger: tuple[str, dict[str, Any]] | None = None

    def model_for(self, budget: str | None) -> dict[str, Any]:
        """The model overrides of a run with ``budget`` (a duration such as ``30m``; None: no budget).

        Without a budget (a run of set epochs) the recipe's own model; with one
        at least as long as ``larger``'s, the larger model.
        """
        if budget is None or self.larger is None or duration_seconds(budget) < duration_seconds(self.larger[0]):
            return dict(self.model)
        return {**self.model, **self.larger[1]}


RECIPES: dict[str, Recipe] = {
    "tutorial": Recipe("seed-tiny", {}, description=(
        "the tutorial's: constant lr 1e-3, flip and crop, 15 epochs. 54.46% on cifar10-jpeg in 32 s an epoch "
        f"on {BF16_MACHINE} (docs/performance.md)")),
    "speedrun": Recipe("seed-tiny", FAST_VIT, model=FAST_VIT_MODEL, larger=FAST_VIT_LARGER, description=(
        "the best pure-ViT recipe for short budgets at any image size (for 32-pixel ones: speedrun-32px): the "
        "tutorial's ViT without dropout, with shifted patch tokens and patch dropout 0.5; cosine lr 2e-3, label "
        "smoothing 0.1, grad clip 1; with --budget 30m or longer width 96 and 6 blocks (479,626 parameters). In "
        "30 minutes on cifar10-jpeg (benchmarks/recipes.py --minutes 30): 77.68% after 49.5 epochs (the "
        f"tutorial's width: 76.34% after 95), on {BF16_MACHINE} (docs/training.md)")),
    "speedrun-32px": Recipe("seed-tiny", FAST_VIT_32PX, model=FAST_VIT_MODEL, larger=FAST_VIT_LARGER, description=(
        "speedrun for 32-pixel images (CIFAR): lr 4e-3 and progressive resizing 16, 24, 32 px. On cifar10-jpeg "
        "(benchmarks/recipes.py): 79.46% in 30 minutes (76 epochs, with --budget 30m's larger model); on a "
        "1.8-minute schedule 56.99%, past the tutorial's 15-epoch 54.9% after 81 s of training and evaluation, "
        f"beside the tutorial's 117-s first epoch; on {BF16_MACHINE} (docs/training.md)")),
    "cosine": Recipe("seed-tiny", {**COSINE, "label_smoothing": 0.1}, description=(
        "the tutorial's with a cosine schedule and label smoothing 0.1")),
    "trivialaugment": Recipe("seed-tiny", {**COSINE, "label_smoothing": 0.1, "auto_augment": "trivialaugment"},
                             description="cosine, label smoothing and TrivialAugment"),
    "deit-aug": Recipe("seed-tiny", {**COSINE, **DEIT_AUGMENT}, description=(
        "DeiT's augmentation: RandAugment, random erasing, MixUp/CutMix, label smoothing, weight decay 0.05")),
    "progressive": Recipe("seed-tiny", {**COSINE, "label_smoothing": 0.1, "progressive_sizes": [16, 24, 32]},
                          description="cosine and label smoothing, the epochs split between 16, 24 and 32 px"),
    "cnn-small": Recipe("cnn-small", {**COSINE, "learning_rate": 2e-3}, description="the small CNN teacher"),
    "cnn-32": Recipe("cnn-small", {**COSINE, "learning_rate": 2e-3, "label_smoothing": 0.1}, model={"width": 32},
                     description=f"the small CNN at width 32 (not a ViT): 82.64% in 30 minutes {AT_B7DCD93} (the "
                                 f"CNN in bf16), 3.1 minutes to the tutorial's 54.9%"),
    "deit-hard": Recipe("deit-seed-tiny", {**COSINE, "label_smoothing": 0.1, "distillation": "hard"},
                        teacher="cnn-small", description="DeiT's hard distillation from a cnn-small run"),
    "deit-soft": Recipe("deit-seed-tiny", {**COSINE, "label_smoothing": 0.1, "distillation": "soft"},
                        teacher="cnn-small", description="DeiT's soft distillation from a cnn-small run"),
    "deit-fast": Recipe("deit-seed-tiny", {**FAST_VIT, "distillation": "hard"}, model=NO_DROPOUT, teacher="cnn-32",
                        description=f"speedrun's training settings (cosine lr 2e-3; without its shifted patches "
                                    f"and patch dropout) plus hard distillation from a cnn-32 run: 59.76% in 30 "
                                    f"minutes {AT_B7DCD93}, 16.7 minutes to 54.9%"),
    # after MAE's recipe (He et al. 2021): cosine after a warmup, weight decay 0.05, crops of 20-100% of the
    # image, no dropout in the encoder
    "mae": Recipe("seed-tiny", {**COSINE, "learning_rate": 2e-3, "weight_decay": 0.05, "crop_scale": [0.2, 1.0]},
                  model=NO_DROPOUT, description=(
                      "masked-autoencoder pretraining for vitcraft pretrain: the tutorial's ViT without dropout, "
                      "cosine lr 2e-3, weight decay 0.05, crops of 20-100% of the image (docs/pretraining.md)"),
                  pretrain=True),
}
DEFAULT_RECIPE = "tutorial"
PRETRAIN_RECIPE = "mae"  # vitcraft pretrain's


def get_recipe(name: str, pretrain: bool = False) -> Recipe:
    """The recipe ``name`` for ``vitcraft train``, or with ``pretrain`` for ``vitcraft pretrain``."""
    if name not in RECIPES:
        raise VitcraftError(f"unknown recipe {name!r}; the recipes: {', '.join(RECIPES)} (vitcraft list-recipes)")
    if RECIPES[name].pretrain != pretrain:
        command, other = ("pretrain", "train") if RECIPES[name].pretrain else ("train", "pretrain")
        raise VitcraftError(f"recipe {name!r} is for vitcraft {command}, not vitcraft {other}")
    return RECIPES[name]


def supervised_recipes() -> list[str]:
    """The recipes of ``vitcraft train``."""
    return [name for name, recipe in RECIPES.items() if not recipe.pretrain]
