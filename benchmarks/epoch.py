"""One whole epoch of the tutorial's recipe (train pass + test pass), tutorial pipeline vs vitcraft.

    python benchmarks/epoch.py --data ../shared/data/cifar10-jpeg [--epochs 1] [--precision auto]

The tutorial: torchvision ImageFolder with per-image transforms in 2
DataLoader workers, its fused-attention model (benchmarks/reference.py, torch.nn
modules only). vitcraft: the same recipe
through ``vitcraft.train`` (uint8 data in memory, batched augmentation, its
default model backend). Both train seed-tiny with AdamW lr 1e-3, wd 1e-2,
batch 256, and report seconds per epoch, the test pass's share of them and
test accuracy after each epoch. ``--precision`` is vitcraft's (the tutorial
trains in fp32); under ``../shared/tools/as-avx2-cpu`` pass ``fp32``, as
vitcraft's own check still sees the machine's bf16 units.
The vitcraft figure excludes the one-off decode of the folder into its cache,
which is timed and printed on its own. Each pipeline runs in a fresh Python
process, so neither inherits the other's settings (vitcraft's training tunes
the process's malloc, see ``device.keep_freed_memory``), warm caches or RNG;
the two take turns, one epoch each, so that both see the same machine (a
shared machine's speed drifts over minutes).
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

from vitcraft.config import DataConfig, TrainConfig
from vitcraft.data import load_splits  # noqa: E402
from vitcraft.runs import RunConfig
from vitcraft.train import train  # noqa: E402


class Turns:
    """Lets two pipelines, each in its own process, take turns: one epoch each, never at the same time.

    A shared machine's speed drifts over minutes; interleaving the epochs
    makes both pipelines see the same drift.
    """

    def __init__(self, context, names):
        self.reports = context.Queue()
        self.go = {name: context.Queue() for name in names}

    # in a pipeline's process
    def end_turn(self, name: str, report=None) -> None:
        """Report, then wait until it is this pipeline's turn again."""
        self.reports.put((name, report))
        self.go[name].get()

    def finish(self, name: str, report) -> None:
        self.reports.put((name, report))

    # in the main process
    def take_turn(self, name: str, process):
        """Let ``name`` run until it reports; its report."""
        self.go[name].put(True)
        return self.wait(name, process)

    def wait(self, name: str, process):
        while True:
            try:
                sender, report = self.reports.get(timeout=5)
                assert sender == name, f"{sender} ran out of turn"
                return report
            except queue.Empty:
                if not process.is_alive():
                    raise RuntimeError(f"the {name} pipeline failed (exit code {process.exitcode})") from None


def tutorial_epochs(turns: Turns, data: str, epochs: int, seed: int = 0) -> None:
    """Train the tutorial's way, one epoch per turn; reports (epoch seconds, test-pass seconds, test accuracy)."""
    torch.manual_seed(seed)
    model = tutorial_model(use_faster_attention=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    train_loader, test_loader = tutorial_loaders(data)
    turns.end_turn("tutorial")  # ready
    for epoch in range(epochs):
        start = time.perf_counter()
        model.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images)[0], labels)
            loss.backward()
            optimizer.step()
        tested = time.perf_counter()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images)[0].argmax(1) == labels).sum().item()
                total += len(labels)
        seconds, test_seconds = time.perf_counter() - start, time.perf_counter() - tested
        print(f"tutorial epoch {epoch + 1}/{epochs}: {seconds:.1f}s (test pass {test_seconds:.1f}s), "
              f"test accuracy {100 * correct / total:.2f}%", flush=True)
        turns.end_turn("tutorial", (seconds, test_seconds, correct / total))
    turns.finish("tutorial", None)


def vitcraft_epochs(turns: Turns, data: str, epochs: int, precision: str = "auto") -> None:
    """Train with ``vitcraft.train`` from a fresh cache, one epoch per turn; reports (epoch seconds, test-pass
    seconds, test accuracy)."""
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "run"
        start = time.perf_counter()
        load_splits(data, cache_dir=cache)
        decode_seconds = time.perf_counter() - start
        start = time.perf_counter()
        load_splits(data, cache_dir=cache)
        cached_seconds = time.perf_counter() - start
        print(f"vitcraft one-off decode of {data}: {decode_seconds:.1f}s; later loads from cache: "
              f"{cached_seconds:.1f}s", flush=True)

        def log(line: str) -> None:
            # train() logs "training ..." before its first epoch and "epoch i/n ..." after
            # each, outside the epoch's timing: the turns are taken there
            print("vitcraft", line, flush=True)
            if line.startswith("training "):
                turns.end_turn("vitcraft")  # ready
            elif line.startswith("epoch "):
                record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
                turns.end_turn("vitcraft", (record["epoch_seconds"], record["epoch_seconds"] - record["train_seconds"],
                                            record["test_acc"]))

        run = RunConfig(train=TrainConfig(epochs=epochs, precision=precision),
                        data=DataConfig(data=data, cache_dir=str(cache)))
        train(run, out, progress=False, figures=False, log=log)
    turns.finish("vitcraft", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--skip-tutorial", action="store_true")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="vitcraft's")
    args = parser.parse_args()

    names = ["vitcraft"] + ([] if args.skip_tutorial else ["tutorial"])
    pipelines = {"vitcraft": vitcraft_epochs, "tutorial": tutorial_epochs}
    context = multiprocessing.get_context("spawn")  # fresh processes, not forks of this one
    turns = Turns(context, names)
    processes = {}
    for name in names:  # one after the other: each gets ready (decodes, builds loaders) alone
        extra = (args.precision,) if name == "vitcraft" else ()
        processes[name] = context.Process(target=pipelines[name], args=(turns, args.data, args.epochs, *extra))
        processes[name].start()
        turns.wait(name, processes[name])
    results = {name: [] for name in names}
    for _ in range(args.epochs):
        for name in names:
            results[name].append(turns.take_turn(name, processes[name]))
    for name in names:
        turns.take_turn(name, processes[name])  # lets it finish
        processes[name].join()
    ours, theirs = results["vitcraft"], results.get("tutorial", [])
    print()
    print(f"{'epoch':>5} {'tutorial s':>11} {'vitcraft s':>11} {'speed-up':>9} {'tutorial test s':>16} "
          f"{'vitcraft test s':>16} {'test speed-up':>14} {'tutorial acc':>13} {'vitcraft acc':>13}")
    for i, (seconds, test_seconds, acc) in enumerate(ours):
        t_seconds, t_test, t_acc = theirs[i] if theirs else (float("nan"),) * 3
        print(f"{i + 1:>5} {t_seconds:11.1f} {seconds:11.1f} {t_seconds / seconds:9.2f}x {t_test:16.1f} "
              f"{test_seconds:16.1f} {t_test / test_seconds:13.2f}x {100 * t_acc:12.2f}% {100 * acc:12.2f}%")
    if theirs:
        for part, index in (("epoch", 0), ("test pass", 1)):
            tutorial_median, vitcraft_median = (statistics.median(r[index] for r in runs) for runs in (theirs, ours))
            print(f"median seconds per {part}: tutorial {tutorial_median:.1f}, vitcraft {vitcraft_median:.1f}, "
                  f"speed-up {tutorial_median / vitcraft_median:.2f}x")


if __name__ == "__main__":
    main()
