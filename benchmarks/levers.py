"""What each model lever of the speedrun costs a training step, side by side in one run.

    python benchmarks/levers.py [--precision auto] [--rounds 5] [--steps 5] \\
        [--recipes speedrun 'speedrun+hidden_size=96+intermediate_size=192+num_hidden_layers=6' ...]

The rows are models of recipes, written as benchmarks/recipes.py writes them
(``RECIPE+KEY=VALUE+...``); by default the speedrun's model with each of its
levers off and with locality self-attention on. Only the model is taken from a
recipe: every row is timed with the same AdamW step on one random batch
(throughput.py's), round-robin, and printed with its ratio to the first row,
its parameters, its model FLOPs per training image (fewer with patch dropout:
the dropped tokens are not computed) and their share of the measured GEMM
peak. A lever that costs 10% of a step has to buy more than 10% more epochs'
worth of accuracy at a fixed budget: docs/training.md's ablation tables
weigh that.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_class, describe, gemm_peak, round_robin, training_flops_per_image  # noqa: E402
from recipes import resolve  # noqa: E402
from throughput import make_step  # noqa: E402

from vitcraft.device import autocast_dtype  # noqa: E402
from vitcraft.registry import create_model  # noqa: E402

DEFAULT_ROWS = ["speedrun+shifted_patches=false+patch_dropout=0", "speedrun+patch_dropout=0",
                "speedrun+shifted_patches=false", "speedrun", "speedrun+locality_attention=true"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_ROWS, metavar="RECIPE",
                        help="recipes whose models are timed, or RECIPE+KEY=VALUE variants; the first is the "
                             "baseline of the ratios")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    args = parser.parse_args()
    try:
        recipes = {name: resolve(name) for name in args.recipes}
        torch.manual_seed(0)
        models = {name: create_model(recipe.preset, **recipe.model) for name, recipe in recipes.items()}
    except ValueError as error:
        parser.error(str(error))
    images = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))
    dtype = autocast_dtype(torch.device("cpu"), args.precision)
    # counted before timing, in training mode: patch dropout's dropped tokens cost nothing
    flops = {name: training_flops_per_image(model.train(), images[:8]) for name, model in models.items()}
    steps = {name: make_step(model, dtype, True, images, labels) for name, model in models.items()}
    median = round_robin(steps, args.batch_size, args.rounds, args.steps)
    # emulated bf16 has no peak worth the name: measure against fp32's
    peak = gemm_peak(dtype if dtype is not None and "bf16 units: yes" in cpu_class() else torch.float32)
    print(describe())
    print(f"training step, batch {args.batch_size}, precision {args.precision} "
          f"({str(dtype or torch.float32).removeprefix('torch.')}); ratios to the first row; '% peak': model FLOPs "
          f"(forward and backward, counted once) of the measured GEMM peak in that precision")
    baseline = median[args.recipes[0]]
    width = max(len(name) for name in args.recipes)
    print(f"{'model of':<{width}} {'params':>9} {'MFLOP/img':>10} {'img/s':>7} {'x first':>8} {'% peak':>7}")
    for name, rate in median.items():
        parameters = sum(p.numel() for p in models[name].parameters())
        print(f"{name:<{width}} {parameters:9,d} {flops[name] / 1e6:10.1f} {rate:7.0f} {rate / baseline:8.2f} "
              f"{100 * rate * flops[name] / 1e9 / peak:7.1f}")


if __name__ == "__main__":
    main()
