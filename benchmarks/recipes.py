"""Training recipes compared under one wall-clock budget each: test accuracy after N minutes.

    python benchmarks/recipes.py --minutes 30 [--recipes tutorial deit-aug ...] [--data ../shared/data/cifar10-jpeg]
    python benchmarks/recipes.py --minutes 5 --recipes speedrun speedrun+ema=0.999 speedrun+drop_path=0.1 ...
    python benchmarks/recipes.py --minutes 30 --tutorial-epochs 15 --recipes speedrun

A name ``RECIPE+KEY=VALUE+...`` is an ablation row: the recipe with those
settings changed, each KEY a TrainConfig field (``ema``, ``label_smoothing``,
``progressive_sizes``) or a model config field (``hidden_dropout_prob``,
``hidden_size``), each VALUE JSON (``0.1``, ``[16,24,32]``, ``null``) or a
bare word (``randaugment``).

Each recipe is a preset plus training settings. Its run gets ``--minutes`` of
wall-clock time: short calibration runs (``--calibration-steps`` steps twice,
then twice as many; not counted) measure the seconds per step (at every image
size, for progressive resizing; with the teacher's forward, for distillation)
and per evaluation, and the real run gets as many steps as fit, with the
learning-rate schedule ending there. The table gives the minutes it really
took, its test accuracy, the minutes until it first reached the tutorial's
15-epoch accuracy and the ``vitcraft train`` command that repeats it. A
distillation recipe trains its teacher recipe first (its own row, its own
budget), or takes the teacher's finished run from ``--teachers-from``.
``--tutorial-epochs N`` first runs the tutorial's own pipeline
(benchmarks/epoch.py's) for N epochs, as one more row and curve: the targets
are measured against its 15 epochs' wall-clock time in the same run. The
runs, the table so far after each one (table.md) and a figure of test
accuracy against wall-clock minutes for every run (accuracy.png) are kept in
``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from epoch import tutorial_epochs  # noqa: E402
from reference import tutorial_model  # noqa: E402

from vitcraft.budget import plan
from vitcraft.config import DataConfig, TrainConfig, ViTConfig
from vitcraft.data import load_splits
from vitcraft.recipes import RECIPES, Recipe, supervised_recipes
from vitcraft.runs import RunConfig
from vitcraft.train import train

TUTORIAL_PIPELINE = "the tutorial's own pipeline"  # its row's name
TUTORIAL_ACCURACY = 0.5488  # the tutorial pipeline's test accuracy after its 15 epochs (benchmarks/epoch.py)
TABLE_HEADER = (f"| recipe | model | parameters | epochs | minutes | test accuracy | "
                f"minutes to {100 * TUTORIAL_ACCURACY:.1f}% | command |\n|---|---|---:|---:|---:|---:|---:|---|")
CLI_FLAGS = {"learning_rate": "--lr", "num_threads": "--threads"}  # train settings whose flag is not --their-name


TRAIN_FIELDS = {field.name for field in dataclasses.fields(TrainConfig)}
MODEL_FIELDS = {field.name for field in dataclasses.fields(ViTConfig)}


def resolve(name: str, budget: str | None = None) -> Recipe:
    """The recipe ``name``, or for ``RECIPE+KEY=VALUE+...`` that recipe with those settings changed; its model that
    of a ``vitcraft train --budget`` run of ``budget`` (``Recipe.model_for``)."""
    base, *changes = name.split("+")
    if base not in supervised_recipes():
        raise ValueError(f"unknown recipe {base!r} in {name!r}; the recipes: {', '.join(supervised_recipes())}")
    recipe = RECIPES[base]
    train, model = dict(recipe.train), recipe.model_for(budget)
    for change in changes:
        key, equals, text = change.partition("=")
        if not equals or key not in TRAIN_FIELDS | MODEL_FIELDS:
            raise ValueError(f"{change!r} in {name!r} is not KEY=VALUE with KEY a TrainConfig or ViTConfig field")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text  # a bare word
        (train if key in TRAIN_FIELDS else model)[key] = value
    return dataclasses.replace(recipe, train=train, model=model)


def batch_size_of(recipe: Recipe, default: int) -> int:
    """The batch size a row trains with: its own (a ``+batch_size=N`` row), else ``default``, the benchmark's."""
    return recipe.train.get("batch_size", default)


def settings_for(recipe: Recipe, steps: int | None, steps_per_epoch: int, teacher_dir: Path | None,
                 threads: int | None, batch_size: int) -> dict[str, Any]:
    """The TrainConfig settings of a recipe, for ``steps`` optimizer steps (None: its own epochs); ``batch_size``
    the benchmark's (``batch_size_of``)."""
    settings = dict(recipe.train)  # a warmup_fraction: training resolves it from the steps
    settings.update(batch_size=batch_size_of(recipe, batch_size), num_threads=threads)
    if steps is not None:
        settings.update(epochs=math.ceil(steps / steps_per_epoch), max_steps=steps)
    if teacher_dir is not None:
        settings["teacher"] = str(teacher_dir)
    return {k: v for k, v in settings.items() if v is not None}


def command(recipe: Recipe, data: str, settings: dict[str, Any], out: Path) -> str:
    """The ``vitcraft train`` command line of a run."""
    words = ["vitcraft", "train", "--data", data, "--preset", recipe.preset]
    for key, value in recipe.model.items():
        # JSON, as --model-arg reads it (true, not Python's True), bare words as they are
        words += ["--model-arg", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    for key, value in settings.items():
        flag = CLI_FLAGS.get(key, "--" + key.replace("_", "-"))
        words += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join([*words, "--out", str(out)])


def run_once(recipe: Recipe, settings: dict[str, Any], args: argparse.Namespace, out: Path) -> tuple[dict, float]:
    """Train one run; (its last metrics record, wall-clock seconds)."""
    run = RunConfig(preset=recipe.preset, model=dict(recipe.model), train=TrainConfig(**settings),
                    data=DataConfig(data=args.data, cache_dir=args.cache_dir))
    started = time.perf_counter()
    last = train(run, out, progress=False, figures=False, tensorboard=False, log=lambda *_: None)
    return last, time.perf_counter() - started


def calibrate(recipe: Recipe, args: argparse.Namespace, teacher_dir: Path | None,
              steps_per_epoch: int) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluation) of a recipe, from short runs.

    A first run of N steps warms the process up (its first steps pay for the
    libraries' choice of kernels, allocations, caches) and is not counted. The
    seconds per step are then the difference of a run of 2N steps and one of N
    over N, so that what every run spends once cancels out instead of
    inflating each step; the seconds per evaluation are the last run's.
    """
    step_seconds, eval_seconds = [], 0.0
    for size in recipe.train.get("progressive_sizes") or [None]:
        train_seconds = []
        for steps in (args.calibration_steps, args.calibration_steps, 2 * args.calibration_steps):
            settings = settings_for(recipe, steps, steps_per_epoch, teacher_dir, args.threads, args.batch_size)
            if size is not None:
                settings["progressive_sizes"] = [size]
            with tempfile.TemporaryDirectory() as tmp:
                last, _ = run_once(recipe, settings, args, Path(tmp) / "run")
            train_seconds.append(last["train_seconds"])
            eval_seconds = last["epoch_seconds"] - last["train_seconds"]
        step_seconds.append((train_seconds[2] - train_seconds[1]) / args.calibration_steps)
    return sum(step_seconds) / len(step_seconds), eval_seconds


class _Reports:
    """epoch.py's ``Turns`` for a pipeline alone in this process: keeps its per-epoch reports."""

    def __init__(self):
        self.reports = []

    def end_turn(self, name: str, report=None) -> None:
        if report is not None:
            self.reports.append(report)

    def finish(self, name: str, report) -> None:
        pass


def tutorial_run(data: str, epochs: int, out: Path) -> tuple[dict, float]:
    """The tutorial's own pipeline (benchmarks/epoch.py's) for ``epochs`` epochs; (its last record, seconds).

    Its epochs go to ``out/metrics.jsonl`` with the fields vitcraft's runs
    record, so that its curve and its minutes to an accuracy come out as theirs.
    """
    reports = _Reports()
    started = time.perf_counter()
    tutorial_epochs(reports, data, epochs)
    seconds = time.perf_counter() - started
    records = [{"epoch": epoch, "epoch_seconds": epoch_seconds, "train_seconds": epoch_seconds - test_seconds,
                "test_acc": accuracy}
               for epoch, (epoch_seconds, test_seconds, accuracy) in enumerate(reports.reports, start=1)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return records[-1], seconds


def minutes_to_reach(run_dir: Path, accuracy: float) -> float | None:
    """Minutes of training and evaluation until the first epoch whose test accuracy reached ``accuracy``."""
    seconds = 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        seconds += record["epoch_seconds"]
        if record["test_acc"] >= accuracy:
            return seconds / 60
    return None


def table_row(name: str, model: str, parameters: int, epochs: float, seconds: float, run_dir: Path, last: dict,
              command_line: str) -> str:
    """A finished run's row of the table (printed as a line too)."""
    reached = minutes_to_reach(run_dir, TUTORIAL_ACCURACY)
    print(f"{name}: test accuracy {100 * last['test_acc']:.2f}% in {seconds / 60:.1f} min", flush=True)
    return (f"| {name} | {model} | {parameters:,} | {epochs:.1f} | {seconds / 60:.1f} | {100 * last['test_acc']:.2f}% "
            f"| {'-' if reached is None else f'{reached:.1f}'} | `{command_line}` |")


def accuracy_curves(run_dirs: dict[str, Path], path: Path) -> None:
    """Draw each run's test accuracy after each epoch against the minutes of training and evaluation so far."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for index, (name, run_dir) in enumerate(run_dirs.items()):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        minutes = [sum(r["epoch_seconds"] for r in records[:i + 1]) / 60 for i in range(len(records))]
        style = "-" if index < 10 else "--"  # matplotlib's colour cycle repeats after ten
        ax.plot(minutes, [100 * r["test_acc"] for r in records], style, marker=".", label=name)
    ax.axhline(100 * TUTORIAL_ACCURACY, color="gray", linestyle="--", linewidth=1,
               label=f"the tutorial's 15-epoch {100 * TUTORIAL_ACCURACY:.1f}%")
    ax.set(xlabel="wall-clock minutes (training and evaluation)", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget of each recipe's run")
    parser.add_argument("--recipes", nargs="+", default=supervised_recipes(), metavar="RECIPE",
                        help=f"recipes to run, or RECIPE+KEY=VALUE variants (default all: "
                             f"{', '.join(supervised_recipes())})")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--calibration-steps", type=int, default=10)
    parser.add_argument("--cache-dir", help="decoded-data cache (default ~/.cache/vitcraft)")
    parser.add_argument("--teachers-from", type=Path, metavar="DIR",
                        help="a teacher recipe with a finished run in DIR/RECIPE is used as is, not trained again")
    parser.add_argument("--tutorial-epochs", type=int, default=0, metavar="N",
                        help="first run the tutorial's own pipeline (benchmarks/epoch.py's) for N epochs, as a row "
                             "and a curve: its 15 epochs are the time the speedrun targets are measured against")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"recipes-{datetime.now():%Y%m%d-%H%M%S}")
    args = parser.parse_args()
    try:
        recipes = {name: resolve(name, f"{args.minutes}m") for name in args.recipes}
    except ValueError as error:
        parser.error(str(error))
    for recipe in list(recipes.values()):  # the teachers that distillation recipes name
        if recipe.teacher is not None:
            recipes.setdefault(recipe.teacher, RECIPES[recipe.teacher])

    train_set, _ = load_splits(args.data, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    run_dirs = {}  # recipe -> its finished run
    if args.teachers_from:
        run_dirs = {recipe: args.teachers_from / recipe for recipe in RECIPES
                    if (args.teachers_from / recipe / "model.json").is_file()}
    order = []  # teachers (not yet trained) before their students
    for recipe in args.recipes:
        teacher = recipes[recipe].teacher
        if teacher is not None and teacher not in run_dirs and teacher not in order:
            order.append(teacher)
        if recipe not in order:
            order.append(recipe)
    rows, curves = [], {}  # curves: row name -> its run, in the order the rows ran

    def write_table_and_figure() -> str:
        # the table so far, kept with the runs: a long benchmark stopped midway keeps what it measured
        table = "\n".join([TABLE_HEADER, *rows]) + "\n"
        (args.out / "table.md").write_text(table)
        accuracy_curves(curves, args.out / "accuracy.png")
        return table

    if args.tutorial_epochs:
        out = args.out / "tutorial-pipeline"
        last, seconds = tutorial_run(args.data, args.tutorial_epochs, out)
        curves[TUTORIAL_PIPELINE] = out
        parameters = sum(p.numel() for p in tutorial_model(use_faster_attention=True).parameters())
        rows.append(table_row(TUTORIAL_PIPELINE, "its seed model", parameters, args.tutorial_epochs, seconds, out,
                              last, f"python benchmarks/epoch.py --epochs {args.tutorial_epochs} --data {args.data}"))
        write_table_and_figure()
    for recipe in order:
        teacher_dir = run_dirs.get(recipes[recipe].teacher)
        steps_per_epoch = math.ceil(len(train_set) / batch_size_of(recipes[recipe], args.batch_size))
        step_seconds, eval_seconds = calibrate(recipes[recipe], args, teacher_dir, steps_per_epoch)
        steps = plan(60 * args.minutes, step_seconds, eval_seconds, steps_per_epoch).steps
        settings = settings_for(recipes[recipe], steps, steps_per_epoch, teacher_dir, args.threads,
                                args.batch_size)
        out = args.out / recipe
        print(f"{recipe}: {step_seconds:.3f} s/step, {eval_seconds:.1f} s/evaluation -> {steps} steps "
              f"({steps / steps_per_epoch:.2f} epochs)", flush=True)
        last, seconds = run_once(recipes[recipe], settings, args, out)
        run_dirs[recipe] = curves[recipe] = out
        parameters = json.loads((out / "model.json").read_text())["num_parameters"]
        rows.append(table_row(recipe, recipes[recipe].preset, parameters, steps / steps_per_epoch, seconds, out, last,
                              command(recipes[recipe], args.data, settings, out)))
        write_table_and_figure()
    print("\n" + write_table_and_figure())


if __name__ == "__main__":
    main()
