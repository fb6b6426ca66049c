"""--budget: the duration, the plan, and runs that end within their budget, evaluated and saved."""

import json
import math
import time

import pytest
from conftest import small_run, train_quietly

from vitcraft.budget import Deadline, plan
from vitcraft.config import TrainConfig, duration_seconds
from vitcraft.errors import VitcraftError


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400),
                                           ("1.5m", 90), ("5", 300), (" 2M ", 120)])
def test_durations(text, seconds):
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "0s", "10x", "m", "-3m", "3m2h"])
def test_bad_durations_say_what_a_budget_looks_like(text):
    with pytest.raises(ValueError, match="duration such as 90s, 30m|longer than nothing"):
        duration_seconds(text)
    with pytest.raises(ValueError):
        TrainConfig(budget=text)


def test_the_plan_is_the_most_steps_that_fit_with_their_evaluations():
    # 0.1 s a step, 2 s an evaluation, 10 steps an epoch, 3 s of figures, 20 s in all
    planned = plan(20.0, 0.1, 2.0, 10, 3.0)
    cost = lambda steps: steps * 0.1 + math.ceil(steps / 10) * 2.0 + 3.0  # noqa: E731
    assert cost(planned.steps) <= 20.0 < cost(planned.steps + 1)
    assert planned.steps == 50 and planned.epochs == 5  # 5 epochs of 10 steps, 3 s each with its evaluation
    assert planned.seconds == pytest.approx(cost(50))
    with pytest.raises(VitcraftError, match="give a longer --budget"):
        plan(2.5, 0.1, 2.0, 10, 3.0)


def test_the_deadline_keeps_room_for_the_last_step_and_what_follows():
    now = [100.0]
    deadline = Deadline(10.0, step_seconds=1.0, reserve=3.0, clock=lambda: now[0])
    now[0] = 105.9
    assert not deadline.must_stop()  # 4.1 s left: one step and the reserve
    assert deadline.must_stop(steps=2)  # torchrun's ranks look every few steps: those must fit too
    now[0] = 106.1
    assert deadline.must_stop()


def test_a_budget_of_seconds_ends_within_it_evaluated_and_saved(tiny_folder, tmp_path):
    run = small_run(tiny_folder, tmp_path, epochs=1, batch_size=8)
    run.train.budget = "15s"
    said = []
    started = time.perf_counter()
    record = train_quietly(run, tmp_path / "run", log=said.append, figures=True)
    seconds = time.perf_counter() - started
    assert seconds <= 15.0, seconds
    plan_line = next(line for line in said if line.startswith("budget plan: "))
    saved = json.loads((tmp_path / "run" / "run.json").read_text())["run"]["train"]
    steps = int(plan_line.split()[2].replace(",", ""))
    assert saved["max_steps"] == steps and saved["epochs"] == math.ceil(steps / 12) > 1  # planned: 12 steps an epoch
    # all of the plan ran, or a machine busier than at calibration stopped it early, saying so
    assert record["step"] == steps or any(line.startswith("the budget ran out") for line in said)
    assert saved["budget"] == "15s"
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "confusion.png").is_file()
    again = train_quietly(run.__class__.from_dict(json.loads((tmp_path / "run" / "run.json").read_text())["run"]),
                          tmp_path / "run", resume=True)
    # the resumed run continues the plan with what is left of the budget (the gap between the runs not counted)
    assert record["step"] <= again["step"] <= steps and again["elapsed_seconds"] <= 15.0


def test_a_machine_slower_than_calibrated_stops_early_and_still_evaluates_and_saves(tiny_folder, tmp_path,
                                                                                   monkeypatch):
    import vitcraft.train as train_module

    real = train_module.calibrate
    monkeypatch.setattr(train_module, "calibrate", lambda t: (real(t)[0] / 20, real(t)[1]))  # 20x optimistic
    run = small_run(tiny_folder, tmp_path, epochs=1, batch_size=8)
    run.train.budget = "8s"
    said = []
    started = time.perf_counter()
    record = train_quietly(run, tmp_path / "run", log=said.append)
    assert time.perf_counter() - started <= 8.0 + 1.0  # the calibration ran three times here, not once
    planned = json.loads((tmp_path / "run" / "run.json").read_text())["run"]["train"]["max_steps"]
    assert record["step"] < planned
    assert any(line.startswith(f"the budget ran out after step {record['step']:,} of the {planned:,} planned")
               for line in said)
    assert "test_acc" in record and (tmp_path / "run" / "model.safetensors").is_file()


def test_a_progressive_run_is_calibrated_at_each_of_its_sizes(tiny_folder, tmp_path, monkeypatch):
    import vitcraft.train as train_module

    calibration_steps = 2 * (train_module.CALIBRATION_STEPS + 1)  # two sizes, each with a warm-up step
    sizes, planned = [], []
    real_step, real_calibrate = train_module.train_step, train_module.calibrate

    def slow_step(t, images, labels, learning_rate, generator, image_size):
        sizes.append(image_size)
        if len(sizes) <= calibration_steps:  # calibration: 0.1 s a step at 4 px, 0.4 s at 8 px
            time.sleep(0.1 if image_size == 4 else 0.4)
        return real_step(t, images, labels, learning_rate, generator, image_size)

    monkeypatch.setattr(train_module, "train_step", slow_step)
    monkeypatch.setattr(train_module, "calibrate", lambda t: planned.append(real_calibrate(t)) or planned[-1])
    run = small_run(tiny_folder, tmp_path, epochs=1, batch_size=8)
    run.train.budget, run.train.progressive_sizes = "20s", [4, 8, 8]
    train_quietly(run, tmp_path / "run")
    assert sizes[:calibration_steps] == [4] * (calibration_steps // 2) + [8] * (calibration_steps // 2)
    # a third of the steps at 4 px, two thirds at 8 px
    assert planned[0][0] == pytest.approx((0.1 + 0.4 + 0.4) / 3, abs=0.05)


def test_a_bad_budget_flag_is_one_clear_error(tiny_folder, tmp_path, capsys):
    from vitcraft.cli import main

    assert main(["train", "--data", str(tiny_folder), "--budget", "soon", "--out", str(tmp_path / "r")]) == 2
    assert "budget must be a duration such as 90s, 30m, 2h or 1h30m; got 'soon'" in capsys.readouterr().err


# ------------------------------------------------------------------ recipes
def test_list_recipes_names_each_with_its_preset_and_what_it_measured(capsys):
    from vitcraft.cli import main
    from vitcraft.recipes import RECIPES

    assert main(["list-recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [[name, recipe.preset] for name, recipe in RECIPES.items()]
    measured = [line for line in lines if line.split()[0] in ("tutorial", "speedrun", "speedrun-32px")]
    assert len(measured) == 3 and all("%" in line and "AVX-512" in line for line in measured)  # figure, CPU class


def test_a_recipe_is_the_bottom_layer_under_the_config_file_and_the_flags(tmp_path):
    from vitcraft.cli import build_parser, run_config_from_args
    from vitcraft.recipes import RECIPES

    def run_of(*flags):
        return run_config_from_args(build_parser().parse_args(["train", *flags]))

    speedrun = RECIPES["speedrun"]
    run = run_of("--recipe", "speedrun")
    assert run.preset == speedrun.preset and run.model == speedrun.model
    assert (run.train.learning_rate, run.train.schedule, run.train.warmup_fraction) == (2e-3, "cosine", 0.05)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"label_smoothing": 0.2}}))
    run = run_of("--recipe", "speedrun", "--config", str(path), "--lr", "0.01", "--warmup-steps", "7")
    assert (run.train.learning_rate, run.train.label_smoothing, run.train.grad_clip) == (0.01, 0.2, 1.0)
    assert (run.train.warmup_steps, run.train.warmup_fraction) == (7, None)  # steps given: the fraction goes
    assert run_of().train == TrainConfig() and run_of().preset == "seed-tiny"  # the default: the tutorial's
    run = run_of("--recipe", "cnn-32", "--init", "some/folder")  # the source decides the model
    assert run.preset == "seed-tiny" and run.model == {} and run.train.learning_rate == 2e-3


def test_a_long_budget_takes_the_recipes_larger_model_and_flags_still_override_it():
    from vitcraft.cli import build_parser, run_config_from_args
    from vitcraft.recipes import RECIPES

    def model_of(*flags):
        return run_config_from_args(build_parser().parse_args(["train", "--recipe", "speedrun", *flags])).model

    speedrun = RECIPES["speedrun"]
    threshold, larger = speedrun.larger
    assert model_of() == model_of("--budget", "29m") == speedrun.model  # set epochs, or a shorter budget
    assert model_of("--budget", threshold) == model_of("--budget", "2h") == {**speedrun.model, **larger}
    assert larger["hidden_size"] > speedrun.model.get("hidden_size", 48)  # larger: wider than the tutorial's 48
    assert model_of("--budget", "1h", "--model-arg", "num_hidden_layers=5")["num_hidden_layers"] == 5
    assert model_of("--budget", "1h", "--model-arg", "num_hidden_layers=5")["hidden_size"] == larger["hidden_size"]
    # speedrun-32px: speedrun's model (and larger model) with its own training settings
    run = run_config_from_args(build_parser().parse_args(["train", "--recipe", "speedrun-32px", "--budget", "30m"]))
    assert run.model == {**speedrun.model, **larger}
    assert (run.train.learning_rate, run.train.progressive_sizes) == (4e-3, [16, 24, 32])
    assert RECIPES["speedrun-32px"].train == {**speedrun.train, **{"learning_rate": 4e-3,
                                                                   "progressive_sizes": [16, 24, 32]}}
    # a recipe without a larger model keeps its own at every budget
    assert RECIPES["tutorial"].model_for("2h") == RECIPES["tutorial"].model


def test_an_unknown_recipe_is_one_clear_error(capsys):
    from vitcraft.cli import main

    assert main(["train", "--recipe", "fastest"]) == 2
    assert "unknown recipe 'fastest'; the recipes: tutorial, speedrun" in capsys.readouterr().err


def test_a_warmup_fraction_becomes_steps_once_the_steps_are_known(tiny_folder, tmp_path):
    run = small_run(tiny_folder, tmp_path, epochs=2, batch_size=16, warmup_fraction=0.3)  # 6 steps an epoch
    train_quietly(run, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "run.json").read_text())["run"]["train"]
    assert (saved["warmup_steps"], saved["warmup_fraction"]) == (math.ceil(0.3 * 12), None)
