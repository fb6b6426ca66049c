"""The data pipeline at 224 px on real JPEGs: vitcraft's decode cache and streaming against torchvision's.

    python benchmarks/pipeline.py [--source ../shared/data/cifar10-jpeg] [--work /tmp/vitcraft-pipeline]
                                  [--train-images 20000] [--memory-limit-mb 2000]

The photos: CIFAR-10 images upscaled to 320 x 256 with a Lanczos filter and
saved as JPEG (quality 90) into ``--work`` once (non-square, so that nothing
can be squashed unseen). Four pipelines read them, each in a fresh process,
one after the other, over the same epoch:

* torchvision: ``ImageFolder`` + ``RandomResizedCrop(224, scale=(0.8, 1))``,
  flip, ``ToTensor``, ``Normalize`` in a ``DataLoader`` with 2 workers (the
  usual timm and tutorial pipeline; the crop scale is vitcraft's default);
* vitcraft, cached: the split decoded once (timed on its own: the one-off
  build) with ``--crop-pct 0.875`` into the memory-mapped cache, then batches
  read by index in the prefetch thread and augmented whole in the loop's
  thread (as ``vitcraft train`` does on the CPU);
* vitcraft, cached, augmented ahead: the same, augmented in the prefetch
  thread too, while the step trains (as ``vitcraft train`` does on a GPU);
* vitcraft, streaming (``--no-cache``): DataLoader workers decode each batch.

Each is timed twice: the pipeline alone (batches produced and dropped) and a
whole training epoch of a small ViT (patch 32, 6 blocks of width 192, the
same model, optimizer and precision for all four), so the figures show what
the pipeline costs and what is left of it once a model trains.

Then memory: a training process on the cached split, in a memory cgroup
limited to ``--memory-limit-mb`` (where this machine lets us make one: root
and cgroup v1 or v2), while the decoded split is larger; its peak resident
anonymous and file-backed memory is sampled from /proc. Set the limit below
the split's decoded size, above what the process itself allocates.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

AHEAD = "vitcraft cached, augmented ahead"
PHOTO_SIZE = (320, 256)  # width, height of the made photos
IMAGE_SIZE, CROP_PCT, BATCH = 224, 0.875, 64
SMALL_VIT = {"image_size": IMAGE_SIZE, "patch_size": 32, "hidden_size": 192, "num_hidden_layers": 6,
             "num_attention_heads": 3, "intermediate_size": 768}


def make_photos(source: Path, work: Path, train_images: int, test_images: int) -> Path:
    """An ImageFolder of upscaled JPEGs in ``work`` (made once; the first images of each class of ``source``)."""
    from PIL import Image

    root = work / f"photos-{train_images}-{test_images}"
    if (root / "done").exists():
        return root
    for split, count in (("train", train_images), ("test", test_images)):
        classes = sorted(p.name for p in (source / split).iterdir() if p.is_dir())
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            files = sorted((source / split / name).iterdir())[:count // len(classes)]
            for path in files:
                with Image.open(path) as image:
                    image.convert("RGB").resize(PHOTO_SIZE, Image.LANCZOS).save(
                        root / split / name / f"{path.stem}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def small_vit():
    from vitcraft import create_model

    return create_model("seed-tiny", **SMALL_VIT, num_classes=10)


# ------------------------------------------------------------------ pipelines
def torchvision_batches(root: Path, epoch: int):
    import torchvision
    import torchvision.transforms as T

    transform = T.Compose([T.RandomResizedCrop(IMAGE_SIZE, scale=(0.8, 1.0)), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    torch.manual_seed(epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=2), len(dataset)


def vitcraft_batches(root: Path, cache: Path, stream: bool, ahead: bool, epoch: int):
    from vitcraft.augment import Normalization
    from vitcraft.config import TrainConfig
    from vitcraft.data import epoch_indices, iterate_batches, load_splits
    from vitcraft.device import available_cpus
    from vitcraft.train import build_augmentations

    train, _ = load_splits(str(root), image_size=IMAGE_SIZE, cache_dir=cache, crop_pct=CROP_PCT, stream=stream,
                           workers=available_cpus())
    augment, _ = build_augmentations(TrainConfig(), Normalization.for_channels(3), 10, output_size=IMAGE_SIZE)
    generator = torch.Generator().manual_seed(epoch)
    order = epoch_indices(len(train), 0, epoch)
    if ahead:  # the prefetch thread reads and augments the next batch while this one trains
        batches = iterate_batches(train, order, BATCH, prefetch=True, transform=lambda x: augment(x, generator))
        return batches, len(train)
    # the prefetch thread reads, the loop's thread augments
    batches = iterate_batches(train, order, BATCH, prefetch=True)
    return ((augment(images, generator), labels) for images, labels in batches), len(train)


def run_pipeline(name: str, root: str, cache: str, train_model: bool, precision: str,
                 result: multiprocessing.Queue) -> None:
    """In a fresh process: one epoch of ``name``'s pipeline, alone or feeding a training step; puts images/s."""
    from vitcraft.device import autocast, autocast_dtype, keep_freed_memory

    keep_freed_memory()
    torch.manual_seed(0)
    model = small_vit() if train_model else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3) if model else None
    dtype = autocast_dtype(torch.device("cpu"), precision)
    root_path = Path(root)
    if name == "torchvision":
        batches, count = torchvision_batches(root_path, 0)
    else:
        batches, count = vitcraft_batches(root_path, Path(cache), name == "vitcraft streaming", name == AHEAD, 0)
    started = time.perf_counter()
    seen = 0
    for images, labels in batches:
        seen += len(labels)
        if model is not None:
            with autocast(torch.device("cpu"), dtype):
                loss = F.cross_entropy(model(images)[0].float(), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    result.put((seen / (time.perf_counter() - started), count))


def in_fresh_process(*args) -> tuple[float, int]:
    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    process = context.Process(target=run_pipeline, args=(*args, result))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{args[0]} failed (exit code {process.exitcode})")
    return result.get()


# --------------------------------------------------------------------- memory
TRAIN_SCRIPT = """
import sys
from vitcraft.config import DataConfig, TrainConfig
from vitcraft.runs import RunConfig
from vitcraft.train import train
model = {model}
# evaluation's batches are the largest tensors at 224 px: 128 images keep them well below the limit
run = RunConfig(preset="seed-tiny", model=model, train=TrainConfig(epochs=1, batch_size={batch}, eval_batch_size=128,
                                                               precision="{precision}"),
                data=DataConfig(data=sys.argv[1], cache_dir=sys.argv[2], image_size={size}, crop_pct={crop_pct}))
train(run, sys.argv[3], progress=False, figures=False, tensorboard=False, log=lambda *_: None)
"""


def make_cgroup(limit_bytes: int) -> tuple[Path, str] | None:
    """A fresh memory cgroup limited to ``limit_bytes``: (its folder, the file to add a pid to); None if we may not."""
    name = f"vitcraft-bench-{os.getpid()}"
    for base, limit_file in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),  # cgroup v1
                             (Path("/sys/fs/cgroup"), "memory.max")):  # cgroup v2
        try:
            folder = base / name
            folder.mkdir()
            (folder / limit_file).write_text(str(limit_bytes))
            return folder, "cgroup.procs"
        except OSError:
            continue
    return None


def status_kb(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((line for line in text.splitlines() if line.startswith(field + ":")), None)
    return int(line.split()[1]) if line else 0


def memory_run(root: Path, cache: Path, limit_mb: int, precision: str) -> dict:
    """Train one epoch on the cached split in a cgroup of ``limit_mb``; peak RssAnon / RssFile (MB), seconds."""
    script = TRAIN_SCRIPT.format(model=SMALL_VIT, batch=BATCH, size=IMAGE_SIZE, crop_pct=CROP_PCT,
                                 precision=precision)
    cgroup = make_cgroup(limit_mb * 2**20) if limit_mb else None
    # the cache's pages, still in the page cache from the build, count against the build's cgroup: dropped,
    # the training process reads them again, into its own limit
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
        dropped = True
    except OSError:
        dropped = False
    try:
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-c", script, str(root), str(cache), out + "/run"])
            if cgroup:
                (cgroup[0] / cgroup[1]).write_text(str(process.pid))
            peaks = {"RssAnon": 0, "RssFile": 0}
            while process.poll() is None:
                for field in peaks:
                    peaks[field] = max(peaks[field], status_kb(process.pid, field))
                time.sleep(0.2)
            seconds = time.perf_counter() - started
            if process.returncode != 0:
                raise RuntimeError(f"the training process failed (exit code {process.returncode})")
    finally:
        if cgroup:
            cgroup[0].rmdir()
    return {"anon_mb": peaks["RssAnon"] / 1024, "file_mb": peaks["RssFile"] / 1024, "seconds": seconds,
            "limited": cgroup is not None, "dropped": dropped}


def print_table(names, rows, skip_training: bool) -> None:
    print()
    print("| pipeline | pipeline alone, images/s | x torchvision |"
          + ("" if skip_training else " training epoch (small ViT), images/s | x torchvision |"))
    print("| --- | ---: | ---: |" + ("" if skip_training else " ---: | ---: |"))
    for name in names:
        cells = [f"{rows[name, False]:.0f}", f"{rows[name, False] / rows['torchvision', False]:.2f}"]
        if not skip_training:
            cells += [f"{rows[name, True]:.0f}", f"{rows[name, True] / rows['torchvision', True]:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="../shared/data/cifar10-jpeg", type=Path)
    parser.add_argument("--work", default="/tmp/vitcraft-pipeline", type=Path)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--memory-limit-mb", type=int, default=2000, help="0: measure without a limit")
    parser.add_argument("--skip-training", action="store_true", help="time the pipelines alone only")
    parser.add_argument("--memory-only", action="store_true", help="only the memory run (after the cache build)")
    parser.add_argument("--skip-memory", action="store_true", help="no memory run")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="the small ViT's autocast (fp32 under ../shared/tools/as-avx2-cpu)")
    args = parser.parse_args()

    print(describe())
    started = time.perf_counter()
    root = make_photos(args.source, args.work, args.train_images, args.test_images)
    print(f"photos: {root} ({PHOTO_SIZE[0]} x {PHOTO_SIZE[1]} JPEG; made in {time.perf_counter() - started:.0f}s "
          f"or earlier)")

    from vitcraft.data import load_splits
    from vitcraft.device import available_cpus

    cache = args.work / "cache"
    for old in cache.glob("photos-*"):  # a fresh build, timed
        old.unlink()
    started = time.perf_counter()
    train, test = load_splits(str(root), image_size=IMAGE_SIZE, cache_dir=cache, crop_pct=CROP_PCT,
                              workers=available_cpus())
    build = time.perf_counter() - started
    decoded = train.nbytes + test.nbytes
    print(f"one-off cache build: {len(train) + len(test):,} images in {build:.1f}s "
          f"({(len(train) + len(test)) / build:.0f} images/s on {available_cpus()} processes), "
          f"{decoded / 1e9:.2f} GB on disk (train {tuple(train.images.shape)}, test {tuple(test.images.shape)})")
    del train, test

    names = ("torchvision", "vitcraft cached", AHEAD, "vitcraft streaming")
    rows = {}
    for train_model in () if args.memory_only else (False,) if args.skip_training else (False, True):
        for name in names:
            rows[name, train_model] = in_fresh_process(name, str(root), str(cache), train_model, args.precision)[0]
            print(f"  {name:<34} {'training epoch' if train_model else 'pipeline alone':<15} "
                  f"{rows[name, train_model]:7.0f} images/s", flush=True)
    if rows:
        print_table(names, rows, args.skip_training)
    if args.skip_memory:
        return
    memory = memory_run(root, cache, args.memory_limit_mb, args.precision)
    train_mb = (decoded - IMAGE_SIZE * IMAGE_SIZE * 3 * args.test_images) / 2**20
    where = (f"in a memory cgroup limited to {args.memory_limit_mb} MB" if memory["limited"]
             else "without a memory limit (--memory-limit-mb 0, or no cgroup could be made here)")
    print(f"\ntraining one epoch on the cached split ({train_mb:.0f} MB decoded) {where}: "
          f"peak RssAnon {memory['anon_mb']:.0f} MB, peak RssFile {memory['file_mb']:.0f} MB, "
          f"{memory['seconds']:.0f}s with start-up"
          + ("" if memory["dropped"] else " (page cache not dropped first: its pages may count elsewhere)"))


if __name__ == "__main__":
    main()
