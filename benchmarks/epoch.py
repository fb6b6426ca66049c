"""One whole epoch of the tutorial's recipe (train pass + test pass), tutorial pipeline vs vitcraft.

    python benchmarks/epoch.py --data ../shared/data/cifar10-jpeg [--epochs 1]

The tutorial: torchvision ImageFolder with per-image transforms in 2
DataLoader workers, its fused-attention model. vitcraft: the same recipe
through ``vitcraft.train`` (uint8 data in memory, batched augmentation, its
default model backend). Both train seed-tiny with AdamW lr 1e-3, wd 1e-2,
batch 256, and report seconds per epoch and test accuracy after each epoch.
The vitcraft figure excludes the one-off decode of the folder into its cache,
which is timed and printed on its own. Each pipeline runs in a fresh Python
process, so neither inherits the other's settings (vitcraft's training tunes
the process's malloc, see ``device.keep_freed_memory``), warm caches or RNG.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from reference import tutorial_loaders, tutorial_model  # noqa: E402

from vitcraft.data import load_splits  # noqa: E402
from vitcraft.train import DataConfig, RunConfig, TrainConfig, train  # noqa: E402


def tutorial_epochs(data: str, epochs: int, seed: int = 0) -> list[tuple[float, float]]:
    """Train the tutorial's way; (epoch seconds, test accuracy) per epoch."""
    torch.manual_seed(seed)
    model = tutorial_model(use_faster_attention=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    train_loader, test_loader = tutorial_loaders(data)
    results = []
    for epoch in range(epochs):
        start = time.perf_counter()
        model.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images)[0], labels)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images)[0].argmax(1) == labels).sum().item()
                total += len(labels)
        results.append((time.perf_counter() - start, correct / total))
        print(f"tutorial epoch {epoch + 1}/{epochs}: {results[-1][0]:.1f}s, test accuracy {100 * correct / total:.2f}%",
              flush=True)
    return results


def vitcraft_epochs(data: str, epochs: int) -> list[tuple[float, float]]:
    """Train with ``vitcraft.train`` from a fresh cache; (epoch seconds, test accuracy) per epoch."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        start = time.perf_counter()
        load_splits(data, cache_dir=cache)
        decode_seconds = time.perf_counter() - start
        start = time.perf_counter()
        load_splits(data, cache_dir=cache)
        cached_seconds = time.perf_counter() - start
        print(f"vitcraft one-off decode of {data}: {decode_seconds:.1f}s; later loads from cache: "
              f"{cached_seconds:.1f}s", flush=True)
        run = RunConfig(train=TrainConfig(epochs=epochs), data=DataConfig(data=data, cache_dir=str(cache)))
        train(run, Path(tmp) / "run", progress=False, figures=False,
              log=lambda line: print("vitcraft", line, flush=True))
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch_seconds"], r["test_acc"]) for r in records]


def _run_into(results, function, args) -> None:
    results.put(function(*args))


def in_fresh_process(function, *args):
    """``function(*args)`` in a new Python process (spawned, not forked), its result returned."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_run_into, args=(results, function, args))
    process.start()
    while True:
        try:
            result = results.get(timeout=5)
            break
        except queue.Empty:
            if not process.is_alive():
                raise RuntimeError(f"{function.__name__} failed (exit code {process.exitcode})") from None
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--skip-tutorial", action="store_true")
    args = parser.parse_args()

    ours = in_fresh_process(vitcraft_epochs, args.data, args.epochs)
    theirs = [] if args.skip_tutorial else in_fresh_process(tutorial_epochs, args.data, args.epochs)
    print()
    print(f"{'epoch':>5} {'tutorial s':>11} {'vitcraft s':>11} {'speed-up':>9} {'tutorial acc':>13} "
          f"{'vitcraft acc':>13}")
    for i, (seconds, acc) in enumerate(ours):
        t_seconds, t_acc = theirs[i] if theirs else (float("nan"), float("nan"))
        print(f"{i + 1:>5} {t_seconds:11.1f} {seconds:11.1f} {t_seconds / seconds:9.2f}x {100 * t_acc:12.2f}% "
              f"{100 * acc:12.2f}%")
    if theirs:
        tutorial_median, vitcraft_median = (statistics.median(s for s, _ in runs) for runs in (theirs, ours))
        print(f"median seconds per epoch: tutorial {tutorial_median:.1f}, vitcraft {vitcraft_median:.1f}, "
              f"speed-up {tutorial_median / vitcraft_median:.2f}x")


if __name__ == "__main__":
    main()
