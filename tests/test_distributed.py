"""DistributedDataParallel for real: two gloo ranks on the CPU, launched by torchrun.

With augmentation and dropout off, a global batch B split over 2 ranks takes
the same optimizer steps as one rank with batch B: each rank averages the
loss over its B/2 images and DDP averages the two gradients. So the weights
and metrics must match a one-rank run to float tolerance, and a checkpoint
must resume on the other number of ranks as if nothing had changed.
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import write_folder_dataset
from run_helpers import (
    NO_DROPOUT,
    RESUME,
    SMALL_RUN,
    TIMEOUT,
    assert_same_run,
    finish,
    metrics,
    run_here,
    start,
    temporaries,
)

pytestmark = pytest.mark.slow  # starts torchrun process groups: not in `pytest -m "not slow"`

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# 48 training images: 3 global batches of 16 per epoch, on each of 2 ranks 3 batches of 8.
# fp32, because bf16 (the default on CPUs with bf16 instructions) rounds a half batch's
# matrix products differently from the whole batch's.
RUN = ["--batch-size", "16", "--no-augment", "--seed", "3", "--precision", "fp32", *SMALL_RUN, *NO_DROPOUT]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("ddp") / "data", per_class=(16, 4))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One-rank runs (in this process) after 2 and after 3 epochs."""
    root = tmp_path_factory.mktemp("reference")
    run_here("train", "--data", str(data), "--out", str(root / "2"), "--epochs", "2", *RUN)
    shutil.copytree(root / "2", root / "3")
    run_here("train", "--resume", str(root / "3"), "--epochs", "3", *RESUME)
    return {2: root / "2", 3: root / "3"}


@pytest.fixture(scope="module")
def two_rank_run(data, tmp_path_factory):
    """A 2-epoch run on 2 ranks, launched as a user would: torchrun, a fresh interpreter per rank."""
    out = tmp_path_factory.mktemp("ddp-run") / "run"
    result = subprocess.run([*TORCHRUN, "-m", "vitcraft", "train", "--data", str(data), "--out", str(out),
                             "--epochs", "2", *RUN], capture_output=True, text=True, timeout=TIMEOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_two_ranks_equal_one_rank_with_the_same_global_batch(two_rank_run, reference):
    out, stdout = two_rank_run
    assert "2 rank(s)" in stdout
    # only rank 0 logs and writes
    assert stdout.count("run saved in") == 1 and stdout.count("epoch 2/2") == 1
    assert len(metrics(out)) == 2 and temporaries(out) == []
    assert metrics(out)[-1]["step"] == 2 * 3  # global steps: 48 images / global batch 16, twice
    assert_same_run(out, reference[2])


def test_two_rank_checkpoint_resumes_on_one_rank(two_rank_run, reference, tmp_path):
    run = shutil.copytree(two_rank_run[0], tmp_path / "run")
    run_here("train", "--resume", str(run), "--epochs", "3", *RESUME)
    assert_same_run(run, reference[3])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(args: list[str], logs, world_size: int = 2) -> list[int]:
    """Exit codes of the ranks of `vitcraft ARGS`, each a forked process given torchrun's variables.

    No torchrun agent: it would stop the other ranks itself when one fails,
    hiding what the last test checks.
    """
    env = {"WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    ranks = [start(args, logs / f"rank{r}.txt", {**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(world_size)]
    return [finish(rank) for rank in ranks]


def test_one_rank_checkpoint_resumes_on_two_ranks(reference, tmp_path):
    run = shutil.copytree(reference[2], tmp_path / "run")
    assert launch_ranks(["train", "--resume", str(run), "--epochs", "3", *RESUME], tmp_path) == [0, 0], \
        (tmp_path / "rank0.txt").read_text()[-3000:]
    assert_same_run(run, reference[3])


def test_rank_zero_refusal_stops_every_rank(reference, data, tmp_path):
    """Only rank 0 checks the run directory; the other rank must stop with the same message.

    Without that it waits for rank 0 in DDP's first collective and fails with a
    traceback when rank 0 disconnects (gloo), or waits until the timeout (NCCL).
    """
    statuses = launch_ranks(["train", "--data", str(data), "--out", str(reference[2]), *RUN], tmp_path)
    for rank, status in enumerate(statuses):
        log = (tmp_path / f"rank{rank}.txt").read_text()
        assert status == 2, log[-3000:]
        assert "already holds a run" in log and "Traceback" not in log


def _local_main_first_worker(rank: int, port: int, folder: str) -> None:
    """One of two gloo ranks on this machine: record when its action starts and ends."""
    import time as clock
    from pathlib import Path

    import torch.distributed as dist

    from vitcraft.errors import VitcraftError
    from vitcraft.train import Distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ddp = Distributed(rank=rank, world_size=2, local_rank=rank, local_world_size=2)

    def action() -> int:
        start = clock.time()
        clock.sleep(0.5)
        Path(folder, f"rank{rank}").write_text(f"{start} {clock.time()}")
        return rank

    assert ddp.local_main_first(action) == rank

    def failing() -> None:
        raise VitcraftError(f"no data on rank {rank}")

    try:
        ddp.local_main_first(failing)
    except VitcraftError as error:  # rank 0's failure, raised on both ranks
        Path(folder, f"error{rank}").write_text(str(error))
    dist.destroy_process_group()


def test_local_rank_zero_goes_first_and_its_error_reaches_every_rank(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_local_main_first_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    (start0, end0), (start1, _) = [map(float, (tmp_path / f"rank{r}").read_text().split()) for r in (0, 1)]
    assert end0 <= start1  # rank 1 began only after rank 0 had finished (it would build the cache)
    assert [(tmp_path / f"error{r}").read_text() for r in (0, 1)] == ["no data on rank 0"] * 2


def test_two_ranks_plan_one_budget_alike_and_end_within_it(data, tmp_path):
    """Each rank calibrates; the averaged figures give every rank the same plan (a different one would hang)."""
    import json

    out = tmp_path / "run"
    result = subprocess.run([*TORCHRUN, "-m", "vitcraft", "train", "--data", str(data), "--out", str(out),
                             "--budget", "20s", *RUN], capture_output=True, text=True, timeout=TIMEOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("budget plan: ") == 1  # rank 0 says it
    planned = json.loads((out / "run.json").read_text())["run"]["train"]["max_steps"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # with timings
    assert planned > 3 and records[-1]["step"] <= planned and records[-1]["elapsed_seconds"] <= 20.0
    assert [record["epoch"] for record in records] == list(range(1, len(records) + 1))


def test_two_ranks_pretrain_and_evaluate_the_same_masks_as_one(data, tmp_path):
    """MAE under DDP: the unused classifier must not stall DDP, and the sharded evaluation must hide the same
    patches of each test image as a one-rank evaluation (its loss equal to float tolerance)."""
    import json

    import torch

    from vitcraft.augment import Normalization
    from vitcraft.config import PretrainConfig
    from vitcraft.data import load_splits
    from vitcraft.files import load_tensors
    from vitcraft.mae import MaskedAutoencoder
    from vitcraft.runs import read_model_config
    from vitcraft.train import evaluate_reconstruction

    out = tmp_path / "run"
    result = subprocess.run([*TORCHRUN, "-m", "vitcraft", "pretrain", "--data", str(data), "--out", str(out),
                             "--epochs", "1", "--decoder-depth", "1", *RUN], capture_output=True, text=True,
                            timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    preset, config, metadata = read_model_config(out)
    model = MaskedAutoencoder(preset.builder(config), PretrainConfig(**metadata["pretraining"]))
    state, _ = load_tensors(out / "checkpoint.safetensors")
    model.load_state_dict({key[len("model."):]: value for key, value in state.items() if key.startswith("model.")})
    _, test_set = load_splits(str(data), cache_dir=tmp_path / "cache", crop_pct=1.0)
    one_rank = evaluate_reconstruction(model, test_set, Normalization(tuple(metadata["mean"]), tuple(metadata["std"])),
                                       torch.device("cpu"), None)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(record["test_loss"] - one_rank["loss"]) < 1e-5 * max(1.0, one_rank["loss"])
