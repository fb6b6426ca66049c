"""Does masked-autoencoder pretraining pay when labels are few? CIFAR-10 with 10% and 100% of its labels.

    python benchmarks/mae.py --data ../shared/data/cifar10-jpeg [--pretrain-budget 12m] [--epochs 40]

1. ``vitcraft pretrain`` on all 50,000 training images, labels unused, for ``--pretrain-budget``;
2. few labels (``--labels-per-class``, by default 500: 10% of CIFAR-10's), ``--epochs`` epochs each:
   fine-tuned from the pretrained encoder (``train --init``), its linear probe
   (``--freeze backbone``), and the same model from scratch; then from scratch
   again for as long as pretraining and fine-tuning took together (``--budget``);
3. 100% of the labels, ``--full-epochs`` epochs: fine-tuned and from scratch.
Every arm uses the speedrun recipe and is tested on the whole test split. The
table gives each arm's best and last test accuracy, its minutes (set-up,
evaluations and all: what ``--budget`` counts) and the command that
reproduces it. Then the cost of a pretraining step against a supervised step
of the same encoder, side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, images_per_second  # noqa: E402
from transfer import ensure_run, run  # noqa: E402


def elapsed(run_dir: Path) -> float:
    """Seconds the run took, set-up, evaluations and figures included (its last record's elapsed_seconds)."""
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_seconds"]


def step_speeds(preset: str, precision: str, batch: int = 256, steps: int = 10) -> tuple[float, float]:
    """(images/s of a supervised training step, of a pretraining step) of ``preset``'s encoder at its own size."""
    from vitcraft import create_model
    from vitcraft.config import PretrainConfig, TrainConfig
    from vitcraft.device import autocast, autocast_dtype
    from vitcraft.mae import MaskedAutoencoder
    from vitcraft.train import build_optimizer

    device = torch.device("cpu")
    dtype = autocast_dtype(device, precision)
    classifier = create_model(preset).train()
    autoencoder = MaskedAutoencoder(create_model(preset), PretrainConfig()).train()
    size, channels = classifier.config.image_size, classifier.config.num_channels
    images, labels = torch.randn(batch, channels, size, size), torch.randint(0, classifier.config.num_classes, (batch,))

    def stepper(model, loss_of):
        optimizer = build_optimizer(model, TrainConfig())

        def step() -> None:
            with autocast(device, dtype):
                loss = loss_of(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    supervised = stepper(classifier, lambda m: torch.nn.functional.cross_entropy(m(images)[0].float(), labels))
    pretraining = stepper(autoencoder, lambda m: m(images)[0])
    return images_per_second(supervised, batch, steps), images_per_second(pretraining, batch, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 in ImageFolder layout")
    parser.add_argument("--work", default="runs/mae", help="the runs (kept: reruns skip them)")
    parser.add_argument("--pretrain-budget", default="12m")
    parser.add_argument("--labels-per-class", type=int, default=500, help="the few labels: 10%% of CIFAR-10's")
    parser.add_argument("--epochs", type=int, default=40, help="of the 10%%-label runs")
    parser.add_argument("--full-epochs", type=int, default=10, help="of the 100%%-label runs")
    parser.add_argument("--precision", default="auto", help="of every run and the step timing (as-avx2-cpu: fp32)")
    parser.add_argument("--skip-speed", action="store_true", help="leave out the step timing")
    args = parser.parse_args()
    work = Path(args.work)
    common = ["--data", args.data, "--no-figures", "--no-tensorboard", "--precision", args.precision]
    pretrained = work / "mae"
    # with its figures (reconstruction.png), which its budget includes
    pretrain = ["vitcraft", "pretrain", "--budget", args.pretrain_budget, "--out", str(pretrained), "--data",
                args.data, "--precision", args.precision]
    ensure_run(pretrain, pretrained)
    few = ["--recipe", "speedrun", "--labels-per-class", str(args.labels_per_class), *common]
    full = ["--recipe", "speedrun", "--epochs", str(args.full_epochs), *common]
    init = ["--init", str(pretrained)]
    arms = {  # (labels, start): (run directory, flags)
        ("few", "MAE, then fine-tuned"): ("ft10", [*init, "--epochs", str(args.epochs), *few]),
        ("few", "MAE, then linear probe"): ("probe10", [*init, "--freeze", "backbone", "--epochs", str(args.epochs),
                                                       *few]),
        ("few", "from scratch, same epochs"): ("scratch10", ["--epochs", str(args.epochs), *few]),
        ("few", "from scratch, same total time"): ("scratch10-time", few),  # its --budget added below
        ("100%", "MAE, then fine-tuned"): ("ft100", [*init, *full]),
        ("100%", "from scratch, same epochs"): ("scratch100", full),
    }
    results = {}
    for (share, start), (name, words) in arms.items():
        if name == "scratch10-time":  # as long as pretraining and fine-tuning took together
            words = ["--budget", f"{round(elapsed(pretrained) + elapsed(work / 'ft10'))}s", *words]
        results[share, start] = run(["vitcraft", "train", *words, "--out", str(work / name)], work / name)
        results[share, start]["seconds"] = elapsed(work / name)

    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    minutes = elapsed(pretrained) / 60
    print(f"\npretraining: {records[-1]['epoch']} epochs, {minutes:.1f} minutes, final test loss "
          f"{records[-1]['test_loss']:.4f} ({' '.join(pretrain)})\n")
    print("| labels | start | test accuracy, best | last | minutes (+ pretraining) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for (share, start), result in results.items():
        extra = f" + {minutes:.1f}" if start.startswith("MAE") else ""
        print(f"| {share} | {start} | {100 * result['best']:.2f}% | {100 * result['last']:.2f}% | "
              f"{result['seconds'] / 60:.1f}{extra} |")
    for (share, start), result in results.items():
        print(f"{share}, {start}: {result['command']}")
    print("\n" + describe())
    if not args.skip_speed:
        supervised, pretraining = step_speeds("seed-tiny", args.precision)
        print(f"\ntraining step of seed-tiny, batch 256, precision {args.precision}:")
        print(f"| supervised (65 tokens) | {supervised:.0f} images/s | 1.00x |")
        print(f"| MAE pretraining (17 tokens to the encoder, decoder on 65) | {pretraining:.0f} images/s | "
              f"{pretraining / supervised:.2f}x |")


if __name__ == "__main__":
    main()
