"""Does starting from pretrained weights pay? Transfer between two halves of CIFAR-10, side by side.

    python benchmarks/transfer.py --data ../shared/data/cifar10-jpeg [--pretrain-epochs 30] [--finetune-epochs 100]

1. pretrain: a model trained on the five classes airplane, automobile, bird,
   cat, deer (all their training images);
2. fine-tune it on dog, frog, horse, ship, truck with only ``--per-class``
   labelled training images per class (``vitcraft train --init``), all weights
   (full) or the classifier alone (``--freeze backbone``, the linear probe);
3. the same model from scratch on the same images with the same steps.
Every arm is tested on all test images of the five fine-tuning classes. The
table gives the best and the last test accuracy of each arm and the command
that reproduces it. Then the cost of a fine-tuning step at 224 px for a
ViT-Ti-shaped model (``vit-tiny-p16-224``), full and frozen, in images/s.
The split folders are symbolic links into ``--data``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, images_per_second  # noqa: E402

PRETRAIN_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
FINETUNE_CLASSES = ("dog", "frog", "horse", "ship", "truck")


def link_split(data: Path, out: Path, classes: tuple[str, ...], per_class: int | None) -> Path:
    """An ImageFolder of ``classes`` from ``data``: the first ``per_class`` training images of each (None: all)."""
    for split in ("train", "test"):
        for name in classes:
            folder = out / split / name
            if folder.is_dir():
                continue
            folder.mkdir(parents=True)
            files = sorted((data / split / name).iterdir())
            for path in files[:per_class] if split == "train" and per_class else files:
                (folder / path.name).symlink_to(path.resolve())
    return out


def ensure_run(words: list[str], out: Path) -> None:
    """Run ``vitcraft ...`` unless its run directory ``out`` holds a finished run's metrics."""
    if not (out / "metrics.jsonl").is_file():
        print("$", shlex.join(words), flush=True)
        subprocess.run([sys.executable, "-m", "vitcraft", *words[1:]], check=True)


def run(words: list[str], out: Path) -> dict:
    """Run ``vitcraft train ...`` (unless its run exists), return its best and last test accuracy."""
    ensure_run(words, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"best": max(r["test_acc"] for r in records), "last": records[-1]["test_acc"],
            "steps": records[-1]["step"], "minutes": sum(r["epoch_seconds"] for r in records) / 60,
            "command": shlex.join(words)}


def step_speed(freeze: bool, precision: str = "auto", batch: int = 32, steps: int = 5) -> float:
    """Images per second of fine-tuning steps of vit-tiny-p16-224 at 224 px (10 classes), all weights or the head."""
    from vitcraft import create_model
    from vitcraft.config import TrainConfig
    from vitcraft.device import autocast, autocast_dtype
    from vitcraft.train import build_optimizer, freeze_backbone

    model = create_model("vit-tiny-p16-224", num_classes=10).train()
    if freeze:
        freeze_backbone(model)  # as --freeze backbone does
    optimizer = build_optimizer(model, TrainConfig(learning_rate=1e-4))
    device, images, labels = torch.device("cpu"), torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
    dtype = autocast_dtype(device, precision)

    def step() -> None:
        with autocast(device, dtype):
            loss = torch.nn.functional.cross_entropy(model(images)[0].float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return images_per_second(step, batch, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 in ImageFolder layout")
    parser.add_argument("--work", default="runs/transfer", help="split folders and runs (kept: reruns skip them)")
    parser.add_argument("--preset", default="seed-tiny")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=100, help="labelled fine-tuning images per class")
    parser.add_argument("--batch-size", type=int, default=64, help="of the fine-tuning runs")
    parser.add_argument("--precision", default="auto", help="of every run and the step timing (as-avx2-cpu: fp32)")
    parser.add_argument("--skip-speed", action="store_true", help="leave out the 224 px step timing")
    parser.add_argument("--skip-transfer", action="store_true", help="only the 224 px step timing")
    args = parser.parse_args()
    data, work = Path(args.data), Path(args.work)
    if not args.skip_transfer:
        transfer(args, data, work)
    print("\n" + describe())
    if not args.skip_speed:
        full, frozen = step_speed(False, args.precision), step_speed(True, args.precision)
        print(f"\nfine-tuning step, vit-tiny-p16-224 at 224 px, batch 32, precision {args.precision}:")
        print(f"| all weights | {full:.1f} images/s | 1.00x |")
        print(f"| --freeze backbone | {frozen:.1f} images/s | {frozen / full:.2f}x |")


def transfer(args: argparse.Namespace, data: Path, work: Path) -> None:
    """The three arms after the pretraining run, and their table."""
    first = link_split(data, work / "data-pretrain", PRETRAIN_CLASSES, None)
    second = link_split(data, work / "data-finetune", FINETUNE_CLASSES, args.per_class)
    common = ["--no-figures", "--no-tensorboard", "--precision", args.precision]
    pretrain = work / "pretrain"
    run(["vitcraft", "train", "--data", str(first), "--preset", args.preset, "--epochs", str(args.pretrain_epochs),
         "--schedule", "cosine", "--out", str(pretrain), *common], pretrain)
    finetune = ["--data", str(second), "--epochs", str(args.finetune_epochs), "--batch-size", str(args.batch_size),
                "--schedule", "cosine", *common]
    arms = {  # label: (run directory, flags)
        "fine-tuned, all weights": ("full", ["--init", str(pretrain)]),
        "linear probe (--freeze backbone)": ("probe", ["--init", str(pretrain), "--freeze", "backbone"]),
        "from scratch": ("scratch", ["--preset", args.preset]),
    }
    results = {}
    for label, (name, words) in arms.items():
        results[label] = run(["vitcraft", "train", *words, *finetune, "--out", str(work / name)], work / name)

    print(f"\npretraining: {args.preset}, {args.pretrain_epochs} epochs on {len(PRETRAIN_CLASSES)} classes; "
          f"fine-tuning: {args.per_class} images per class of {', '.join(FINETUNE_CLASSES)}\n")
    print("| start | test accuracy, best | last | steps | minutes |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, result in results.items():
        print(f"| {label} | {100 * result['best']:.2f}% | {100 * result['last']:.2f}% | {result['steps']} | "
              f"{result['minutes']:.1f} |")
    for label, result in results.items():
        print(f"{label}: {result['command']}")


if __name__ == "__main__":
    main()
