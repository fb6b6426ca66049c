"""benchmarks/recipes.py: RECIPE+KEY=VALUE ablation rows resolve to the recipe with those settings; the tutorial's
own pipeline is recorded like a run."""

import json
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


def test_the_tutorial_pipeline_is_recorded_like_a_run_for_the_table_and_the_figure(tiny_folder, tmp_path):
    out = tmp_path / "tutorial"
    last, seconds = benchmark.tutorial_run(str(tiny_folder), 2, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2] and last == records[-1]
    assert all(0 < record["train_seconds"] < record["epoch_seconds"] for record in records)
    assert sum(record["epoch_seconds"] for record in records) <= seconds and 0 <= last["test_acc"] <= 1
    assert benchmark.minutes_to_reach(out, 0.0) == pytest.approx(records[0]["epoch_seconds"] / 60)
    assert benchmark.minutes_to_reach(out, 1.01) is None
    benchmark.accuracy_curves({benchmark.TUTORIAL_PIPELINE: out}, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_a_rows_command_line_repeats_its_settings_through_vitcraft_train():
    import shlex

    from vitcraft.cli import build_parser, run_config_from_args

    recipe = benchmark.resolve("speedrun+shifted_patches=true+patch_dropout=0.5+hidden_act=gelu+warmup_fraction=0.1")
    settings = benchmark.settings_for(recipe, 400, 196, None, None, 256)
    line = benchmark.command(recipe, "data", settings, Path("out"))
    run = run_config_from_args(build_parser().parse_args(shlex.split(line)[1:]))
    assert run.model == recipe.model and run.model["shifted_patches"] is True  # JSON true, not Python's True
    for key, value in settings.items():
        assert getattr(run.train, key) == value, key


def test_a_rows_model_is_that_of_a_run_with_the_benchmarks_budget():
    speedrun = RECIPES["speedrun"]
    threshold, larger = speedrun.larger
    assert benchmark.resolve("speedrun", "5m").model == speedrun.model
    assert benchmark.resolve("speedrun", threshold).model == {**speedrun.model, **larger}
    # a row's change goes on top of the larger model
    assert benchmark.resolve("speedrun+num_hidden_layers=4", threshold).model == {
        **speedrun.model, **larger, "num_hidden_layers": 4}


def test_a_batch_size_row_keeps_its_batch_size_over_the_benchmarks():
    assert benchmark.settings_for(benchmark.resolve("speedrun+batch_size=128"), 400, 391, None, None, 256)[
        "batch_size"] == 128
    assert benchmark.settings_for(benchmark.resolve("speedrun"), 400, 196, None, None, 512)["batch_size"] == 512
