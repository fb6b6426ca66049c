"""benchmarks/recipes.py's ablation rows: RECIPE+KEY=VALUE names resolve to the recipe with those settings."""

import sys
from pathlib import Path

import pytest

from vitcraft.recipes import RECIPES

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import recipes as benchmark  # noqa: E402


def test_a_plain_name_is_the_recipe_itself():
    assert benchmark.resolve("speedrun") == RECIPES["speedrun"]


def test_changes_go_to_the_training_or_the_model_settings_as_json_or_words():
    recipe = benchmark.resolve("speedrun+ema=0.999+progressive_sizes=[16,24,32]+hidden_dropout_prob=0.1"
                               "+auto_augment=randaugment+grad_clip=null")
    speedrun = RECIPES["speedrun"]
    assert recipe.preset == speedrun.preset
    assert recipe.train == {**speedrun.train, "ema": 0.999, "progressive_sizes": [16, 24, 32],
                            "auto_augment": "randaugment", "grad_clip": None}
    assert recipe.model == {**speedrun.model, "hidden_dropout_prob": 0.1}
    assert RECIPES["speedrun"].train == speedrun.train and "ema" not in speedrun.train  # the table is untouched


@pytest.mark.parametrize("name, message", [
    ("fastest", "unknown recipe 'fastest'"),
    ("mae+ema=0.9", "unknown recipe 'mae'"),  # a pretraining recipe, not vitcraft train's
    ("speedrun+emma=0.9", "'emma=0.9' in 'speedrun+emma=0.9' is not KEY=VALUE"),
    ("speedrun+ema", "'ema' in 'speedrun+ema' is not KEY=VALUE"),
])
def test_a_bad_name_says_what_is_wrong(name, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        benchmark.resolve(name)
