"""Helpers shared by the tests that run `vitcraft` in other processes (distributed, recovery).

Runs there must be repeatable to float tolerance: one CPU thread per process,
no figures or TensorBoard files, and a small model.

Child processes are forked from a multiprocessing fork server that has
imported vitcraft and torch once: a fresh `python -m vitcraft` spends seconds
on imports (more on a busy machine), which would dominate these tests. Each
child is still a process of its own, with its own environment, that SIGKILL
ends at once. Nothing ran in the server before forking, so torch's thread
pools start fresh in each child.
"""

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

from vitcraft.cli import main
from vitcraft.files import load_tensors

# a small model on the 8x8 generated images; one thread so sums are added in one order
SMALL_RUN = ["--model-arg", "hidden_size=16", "--model-arg", "intermediate_size=32",
             "--model-arg", "num_hidden_layers=2", "--threads", "1", "--device", "cpu",
             "--no-figures", "--no-tensorboard"]
NO_DROPOUT = ["--model-arg", "hidden_dropout_prob=0", "--model-arg", "attention_probs_dropout_prob=0"]
RESUME = ["--no-figures", "--no-tensorboard"]  # with `train --resume RUN_DIR`
# what differs between two equal runs: wall-clock figures
TIMING_KEYS = ("epoch_seconds", "train_seconds", "images_per_second", "elapsed_seconds")
TIMEOUT = 300  # seconds; a hung child fails the test instead of stalling the suite

FORKS = multiprocessing.get_context("forkserver")
# torch._dynamo: the first optimizer imports it, seconds on a busy machine
FORKS.set_forkserver_preload(["vitcraft.cli", "vitcraft.train", "torch._dynamo", "run_helpers"])


def run_here(*args: str) -> None:
    """`vitcraft ARGS` in this process, which must succeed; the thread count is restored after."""
    threads = torch.get_num_threads()
    try:
        assert main(list(args)) == 0
    finally:
        torch.set_num_threads(threads)  # --threads 1 sets it for the whole process


def run_cli(args: list[str], log_path: str, env: dict[str, str]) -> None:
    """The body of a forked child: `vitcraft ARGS` with ``env`` added, output line by line into ``log_path``."""
    os.environ.update(env)
    sys.stdout = sys.stderr = open(log_path, "w", buffering=1)
    sys.exit(main(args))


def start(args: list[str], log_path: Path, env: dict[str, str] | None = None,
          target=run_cli) -> multiprocessing.Process:
    """Start `vitcraft ARGS` in a forked child (``target`` may wrap run_cli)."""
    log_path.unlink(missing_ok=True)  # an earlier run's lines must not count as this one's
    process = FORKS.Process(target=target, args=(args, str(log_path), env or {}))
    process.start()
    return process


def wait_for_line(process: multiprocessing.Process, log_path: Path, prefix: str) -> bool:
    """Wait until a line of the child's log starts with ``prefix``; False if the child ended first."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        alive = process.is_alive()
        if log_path.exists() and any(line.startswith(prefix) for line in log_path.read_text().splitlines()):
            return True
        if not alive:
            return False
        time.sleep(0.005)
    raise AssertionError(f"no line {prefix!r} in {TIMEOUT} s: {log_path.read_text()[-2000:]}")


def finish(process: multiprocessing.Process, kill: bool = False) -> int:
    """The child's exit code, after SIGKILL if ``kill``; a child running past TIMEOUT is killed and fails."""
    if kill:
        process.kill()
    process.join(TIMEOUT)
    if process.exitcode is None:
        process.kill()
        raise AssertionError(f"a child still ran after {TIMEOUT} s")
    return process.exitcode


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run without the wall-clock figures."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in records]


def assert_same_run(run_dir: Path, reference_dir: Path, atol: float = 1e-5) -> None:
    """Equal metrics (to float tolerance) and equal final weights."""
    got, expected = metrics(run_dir), metrics(reference_dir)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected]
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == b[key] if isinstance(a[key], (int, str)) else abs(a[key] - b[key]) <= atol, \
                (a["epoch"], key, a[key], b[key])
    weights, _ = load_tensors(Path(run_dir) / "model.safetensors")
    reference, _ = load_tensors(Path(reference_dir) / "model.safetensors")
    assert weights.keys() == reference.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], reference[key], atol=atol, rtol=0, msg=key)


def temporaries(run_dir: Path) -> list[str]:
    """Names of atomic-write temporary files in a run directory."""
    return sorted(p.name for p in Path(run_dir).iterdir() if p.name.endswith(".tmp"))
