"""The decode cache's build (parallel, killed, concurrent, full disk), streaming, bad images, and prefetching."""

import errno
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import small_run, train_quietly, write_folder_dataset

from vitcraft import data as data_module
from vitcraft.data import StreamingImages, iterate_batches, load_splits
from vitcraft.errors import VitcraftError


def all_batches(dataset, batch_size=4):
    """(images, labels) of the whole split in order, concatenated."""
    batches = list(iterate_batches(dataset, torch.arange(len(dataset)), batch_size))
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


def corrupt(path):
    path.write_bytes(path.read_bytes()[:40])  # a truncated PNG
    return path


@pytest.fixture
def folder(tmp_path):
    return write_folder_dataset(tmp_path / "data", per_class=(4, 2))


# ------------------------------------------------------------------ streaming
@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_batches_equal_the_cached_ones(folder, tmp_path, workers):
    cached = load_splits(str(folder), cache_dir=tmp_path / "cache", crop_pct=0.75, image_size=6)
    streamed = load_splits(str(folder), cache_dir=tmp_path / "none", crop_pct=0.75, image_size=6, stream=True,
                           workers=workers)
    assert not (tmp_path / "none").exists()  # nothing written
    for a, b in zip(cached, streamed):
        assert isinstance(b.images, StreamingImages) and b.images.shape == a.images.shape
        assert b.class_names == a.class_names
        images, labels = all_batches(b)
        assert torch.equal(images, a.images) and torch.equal(labels, a.labels)
        index = torch.tensor([3, 0, 5])
        assert torch.equal(b.images[index], a.images[index]) and torch.equal(b.images[1:3], a.images[1:3])


def test_a_cache_too_large_for_the_free_disk_streams_and_says_so(folder, tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(data_module, "_free_bytes", lambda folder: 100)
    train, test = load_splits(str(folder), cache_dir=tmp_path / "cache", log=said.append)
    assert isinstance(train.images, StreamingImages) and isinstance(test.images, StreamingImages)
    assert len(said) == 1 and "streaming instead" in said[0] and "GB free" in said[0]
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing written


def test_a_streamed_bad_image_stops_with_its_name_or_is_left_out_of_its_batch(folder, tmp_path):
    bad = corrupt(folder / "train" / "middle" / "001.png")
    train, _ = load_splits(str(folder), stream=True)
    with pytest.raises(VitcraftError, match=f"cannot read image {bad}.*--skip-bad-images"):
        all_batches(train)
    train, _ = load_splits(str(folder), stream=True, skip_bad_images=True, workers=2)
    images, labels = all_batches(train)
    assert len(images) == len(labels) == len(train) - 1
    (skipped,) = train.images.skipped
    assert skipped.startswith(f"cannot read image {bad}: ")
    good = [i for i in range(len(train)) if i != 5]  # middle/001.png: the second image of the second class
    assert torch.equal(labels, train.labels[good])


# ----------------------------------------------------------------- bad images
def test_skip_bad_images_leaves_them_out_of_the_cache_and_names_them(folder, tmp_path):
    cache = tmp_path / "cache"
    bad = corrupt(folder / "train" / "middle" / "001.png")
    with pytest.raises(VitcraftError, match=f"cannot read image {bad}"):
        load_splits(str(folder), cache_dir=cache)
    assert not list(cache.glob("*.safetensors")) and not list(cache.glob("*.u8"))  # nothing half-built kept
    train, test = load_splits(str(folder), cache_dir=cache, skip_bad_images=True)
    assert len(train) == 11 and len(train.skipped) == 1 and str(bad) in train.skipped[0] and not test.skipped
    streamed, _ = load_splits(str(folder), stream=True, skip_bad_images=True)
    images, labels = all_batches(streamed)
    assert torch.equal(train.images, images) and torch.equal(train.labels, labels)  # the rows moved up in place
    again, _ = load_splits(str(folder), cache_dir=cache, skip_bad_images=True)  # from the cache: still named
    assert again.skipped == train.skipped and torch.equal(again.images, train.images)
    with pytest.raises(VitcraftError, match=f"cannot read image {bad}.*built with --skip-bad-images"):
        load_splits(str(folder), cache_dir=cache)  # the cache does not hide the file from a run that stops


class DiskFullAfter:
    """Stands in for np.ascontiguousarray in the build: the disk is full after ``images`` images were written."""

    def __init__(self, images):
        self.images, self.real = images, data_module.np.ascontiguousarray

    def __call__(self, array):
        self.images -= 1
        if self.images < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(array)


@pytest.mark.parametrize("workers, written", [(1, 0), (1, 5), (2, 3)])
def test_a_full_disk_stops_with_a_message_and_leaves_no_cache(tmp_path, monkeypatch, workers, written):
    folder = write_folder_dataset(tmp_path / "data", per_class=(100, 2))  # 300 training images: two blocks
    monkeypatch.setattr(data_module.np, "ascontiguousarray", DiskFullAfter(written))
    cache = tmp_path / "cache"
    with pytest.raises(VitcraftError, match=f"the disk holding {cache} is full.*--no-cache"):
        load_splits(str(folder), cache_dir=cache, workers=workers)
    assert sorted(path.suffix for path in cache.iterdir()) == [".lock"]  # no images, labels or temporary file
    monkeypatch.undo()
    train, _ = load_splits(str(folder), cache_dir=cache)
    assert len(train) == 300


@pytest.mark.parametrize("cache", [True, False])
def test_training_skips_bad_images_and_says_so_in_the_log_and_run_json(folder, tmp_path, cache):
    import json

    from vitcraft.runs import load_run_config

    bad = corrupt(folder / "train" / "middle" / "001.png")
    run = small_run(folder, tmp_path, epochs=2, batch_size=4)
    run.data.skip_bad_images, run.data.cache = True, cache
    said = []
    record = train_quietly(run, tmp_path / "run", log=said.append)
    assert record["epoch"] == 2
    mentions = [line for line in said if line.startswith("skipped 1 unreadable image(s)") and str(bad) in line]
    recorded = json.loads((tmp_path / "run" / "run.json").read_text()).get("skipped_images")
    if cache:  # known before training: said once, and kept in run.json
        assert len(mentions) == 1 and len(recorded["train"]) == 1 and str(bad) in recorded["train"][0]
    else:  # found while streaming: said in each epoch it was met
        assert len(mentions) == 2 and recorded is None
    assert load_run_config(tmp_path / "run").data.cache is cache


# ---------------------------------------------------------------- the build
@pytest.mark.slow
def test_a_parallel_build_equals_a_serial_one(tmp_path):
    root = write_folder_dataset(tmp_path / "d", per_class=(100, 1))  # 300 images: two blocks of the build
    serial, _ = load_splits(str(root), cache_dir=tmp_path / "one", workers=1)
    parallel, _ = load_splits(str(root), cache_dir=tmp_path / "two", workers=2)
    assert torch.equal(serial.images, parallel.images) and torch.equal(serial.labels, parallel.labels)


BUILD_SCRIPT = """
import os, signal, sys
from pathlib import Path
from vitcraft import data
if len(sys.argv) > 3:  # killed (SIGKILL: no clean-up runs) after decoding that many images
    read, count = data.FolderSource.read, [0]
    def read_then_die(self, i):
        count[0] += 1
        if count[0] > int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return read(self, i)
    data.FolderSource.read = read_then_die
train, test = data.load_splits(sys.argv[1], cache_dir=Path(sys.argv[2]), workers=1)
print(int(train.images.sum()), int(train.labels.sum()), len(train))
"""


def build_in_subprocess(root, cache, *kill_after):
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(root), str(cache), *map(str, kill_after)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_build_killed_at_any_moment_is_built_again_and_two_at_once_agree(tmp_path):
    root = write_folder_dataset(tmp_path / "d", per_class=(200, 1), size=16)
    cache = tmp_path / "cache"
    killed = build_in_subprocess(root, cache, 300)  # half-way through the training split
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert list(cache.glob(".*.tmp")) and not list(cache.glob("*.safetensors"))  # its temporary file, no cache
    first, second = build_in_subprocess(root, cache), build_in_subprocess(root, cache)  # two at once
    outputs = [process.communicate(timeout=300) for process in (first, second)]
    assert all(process.returncode == 0 for process in (first, second)), outputs
    assert outputs[0][0] == outputs[1][0]
    assert not list(cache.glob(".*.tmp"))  # the killed build's temporary file was removed
    fresh, _ = load_splits(str(root), cache_dir=tmp_path / "fresh", workers=1)
    assert outputs[0][0].split() == [str(int(fresh.images.sum())), str(int(fresh.labels.sum())), str(len(fresh))]


# ----------------------------------------------------------------- prefetch
def test_prefetched_batches_are_the_same_and_transformed_in_order(tiny_folder, tmp_path):
    train, _ = load_splits(str(tiny_folder), cache_dir=tmp_path)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    plain = list(iterate_batches(train, order, 16))
    seen = []
    fetched = list(iterate_batches(train, order, 16, prefetch=True,
                                   transform=lambda images: seen.append(threading.current_thread().name) or images + 1))
    assert len(fetched) == len(plain) == 6
    for (a, la), (b, lb) in zip(plain, fetched):
        assert torch.equal(a + 1, b) and torch.equal(la, lb)
    assert set(seen) == {"vitcraft-prefetch"}


def test_prefetch_passes_errors_on_and_stops_its_thread_when_the_loop_stops():
    def items():
        yield 1
        raise VitcraftError("cannot read image x.png")

    background = data_module._in_background(items())
    assert next(background) == 1
    with pytest.raises(VitcraftError, match="x.png"):
        next(background)
    before = threading.active_count()
    for item in data_module._in_background(iter(range(1000))):
        if item == 2:
            break
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before  # the thread ended though 997 items were never read
