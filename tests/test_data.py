import urllib.error

import numpy as np
import pytest
import torch
from conftest import CLASSES, write_folder_dataset
from PIL import Image

from vitcraft import data as data_module
from vitcraft.data import derive_seed, epoch_indices, iterate_batches, load_splits, read_image
from vitcraft.errors import VitcraftError


def test_folder_dataset_loads_as_uint8_with_classes_and_labels(tiny_folder, tmp_path):
    train, test = load_splits(str(tiny_folder), cache_dir=tmp_path)
    assert train.images.shape == (90, 3, 8, 8) and train.images.dtype == torch.uint8
    assert test.images.shape == (24, 3, 8, 8)
    assert train.class_names == list(sorted(CLASSES))  # sorted folder names, as ImageFolder
    assert torch.bincount(train.labels).tolist() == [30, 30, 30]
    # pixels equal a direct decode of the file
    first = sorted((tiny_folder / "train" / train.class_names[0]).iterdir())[0]
    expected = torch.from_numpy(np.array(Image.open(first).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(train.images[0], expected)


def test_folder_cache_is_used_and_invalidated(tmp_path):
    root = write_folder_dataset(tmp_path / "d", per_class=(3, 2))
    cache = tmp_path / "cache"
    load_splits(str(root), cache_dir=cache)
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2
    train, _ = load_splits(str(root), cache_dir=cache)  # from the cache
    assert len(train) == 9
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "train" / "top" / "new.png")
    train, _ = load_splits(str(root), cache_dir=cache)
    assert len(train) == 10 and len(sorted(cache.glob("*.safetensors"))) == 3


MEMORY_SCRIPT = """
import sys
from pathlib import Path
from vitcraft.data import iterate_batches, load_splits
import torch

def anonymous_kb():  # the process's own memory; a memory-mapped file's pages are the page cache's
    return int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon")).split()[1])

before = anonymous_kb()
train, _ = load_splits(sys.argv[1], cache_dir=Path(sys.argv[2]))
total = 0
for images, labels in iterate_batches(train, torch.arange(len(train)), 64):
    total += int(images[:, 0, 0, 0].sum())  # touch every batch
print(anonymous_kb() - before, train.images.numel() // 1024)
"""


@pytest.mark.slow
def test_a_cached_split_is_memory_mapped_not_held_in_the_process(tmp_path):
    import subprocess
    import sys

    # 3,600 images: 43 MB decoded, well above what loading and batching themselves allocate
    root = write_folder_dataset(tmp_path / "big", per_class=(1200, 1), size=64)
    cache = tmp_path / "cache"
    load_splits(str(root), cache_dir=cache)  # builds the cache
    assert len(sorted(cache.glob("*.u8"))) == 2 and len(sorted(cache.glob("*.safetensors"))) == 2
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(root), str(cache)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grown_kb, dataset_kb = map(int, done.stdout.split())
    assert grown_kb < dataset_kb / 4, (grown_kb, dataset_kb)  # batches come and go; the split stays on disk


def test_a_cache_left_half_built_is_built_again(tmp_path):
    root = write_folder_dataset(tmp_path / "d", per_class=(3, 2))
    cache = tmp_path / "cache"
    expected, _ = load_splits(str(root), cache_dir=cache)
    labels_files = sorted(cache.glob("*.safetensors"))
    for path in labels_files:  # a kill after the images were written, before the labels were
        path.unlink()
    images_file = sorted(cache.glob("*.u8"))[0]
    images_file.write_bytes(images_file.read_bytes()[:100])  # and one images file cut short
    train, _ = load_splits(str(root), cache_dir=cache)
    assert torch.equal(train.images, expected.images) and torch.equal(train.labels, expected.labels)
    again, _ = load_splits(str(root), cache_dir=cache)  # now from the rebuilt cache
    assert torch.equal(again.images, expected.images)


def test_grayscale_folder_gives_one_channel_and_resize(tmp_path):
    root = write_folder_dataset(tmp_path / "g", per_class=(2, 1), size=28, mode="L")
    train, test = load_splits(str(root), cache_dir=tmp_path / "c")
    assert train.images.shape == (6, 1, 28, 28)
    train, _ = load_splits(str(root), image_size=32, cache_dir=tmp_path / "c")
    assert train.images.shape == (6, 1, 32, 32)


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("no_splits", "must hold a train/ and a test/ (or val/) subfolder"),
    ("no_classes", "has no class subfolders"),
    ("no_images", "holds no image files"),
])
def test_bad_folders_have_clear_messages(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no_splits":
        (root / "images").mkdir()
    if layout in ("no_classes", "no_images"):
        (root / "train").mkdir()
        (root / "test").mkdir()
    if layout == "no_images":
        (root / "train" / "cat").mkdir()
        (root / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(VitcraftError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_splits(str(root), cache_dir=tmp_path / "c")


def test_val_folder_is_accepted_as_test_split(tmp_path):
    root = write_folder_dataset(tmp_path / "v", per_class=(2, 1))
    (root / "test").rename(root / "val")
    _, test = load_splits(str(root), cache_dir=tmp_path / "c")
    assert len(test) == 3


def test_corrupt_image_is_named(tmp_path):
    root = write_folder_dataset(tmp_path / "c", per_class=(2, 1))
    bad = root / "train" / "middle" / "001.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(VitcraftError, match=f"cannot read image {bad}"):
        load_splits(str(root), cache_dir=tmp_path / "cache")
    with pytest.raises(VitcraftError, match="cannot read image"):
        read_image(tmp_path / "nothing.png", "RGB", 8)


def test_download_failure_says_how_to_use_a_local_copy(monkeypatch, tmp_path):
    class Unreachable:
        def __init__(self, **kwargs):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data_module, "_torchvision_sets", lambda: {"cifar10": (Unreachable, "train_flag")})
    with pytest.raises(VitcraftError) as info:
        load_splits("cifar10", data_root=tmp_path)
    message = str(info.value)
    assert "could not download or read the cifar10 dataset" in message and "--data" in message


def test_torchvision_arrays_become_nchw(monkeypatch, tmp_path):
    seen = {}

    class FakeCifar:  # the attributes torchvision's CIFAR10 has
        classes = ["a", "b"]

        def __init__(self, root, train, download):
            seen[train] = download
            self.data = np.zeros((5 if train else 3, 32, 32, 3), dtype=np.uint8)
            self.data[..., 1] = 7
            self.targets = [0, 1, 0, 1, 1][: len(self.data)]

    class FakeMnist:
        classes = [str(i) for i in range(10)]

        def __init__(self, root, train, download):
            self.data = torch.zeros((4, 28, 28), dtype=torch.uint8)
            self.targets = torch.tensor([1, 2, 3, 4])

    monkeypatch.setattr(data_module, "_torchvision_sets",
                        lambda: {"cifar10": (FakeCifar, "train_flag"), "mnist": (FakeMnist, "train_flag")})
    train, test = load_splits("cifar10", data_root=tmp_path)
    assert train.images.shape == (5, 3, 32, 32) and (train.images[:, 1] == 7).all()
    assert test.images.shape == (3, 3, 32, 32) and train.class_names == ["a", "b"]
    assert seen == {True: True, False: True}
    train, _ = load_splits("mnist", data_root=tmp_path)
    assert train.images.shape == (4, 1, 28, 28) and train.labels.tolist() == [1, 2, 3, 4]


def test_epoch_order_is_reproducible_and_sharded_like_distributed_sampler():
    a = epoch_indices(10, seed=3, epoch=1, shuffle=True)
    assert torch.equal(a, epoch_indices(10, seed=3, epoch=1, shuffle=True))
    assert not torch.equal(a, epoch_indices(10, seed=3, epoch=2, shuffle=True))
    assert sorted(a.tolist()) == list(range(10))
    shards = [epoch_indices(10, 3, 1, shuffle=True, rank=r, world_size=3) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # padded to 12
    assert set(torch.cat(shards).tolist()) == set(range(10))
    # the union of each step's per-rank batches is the single-process batch
    batch = 2
    one = list(iterate_batches_indices(a, 2 * batch))
    two = [list(iterate_batches_indices(epoch_indices(10, 3, 1, shuffle=True, rank=r, world_size=2), batch))
           for r in range(2)]
    for step, joint in enumerate(one):
        assert sorted(joint) == sorted(two[0][step] + two[1][step])


def test_epoch_order_options_are_keywords():
    with pytest.raises(TypeError):
        epoch_indices(10, 3, 1, True)  # what would True mean here?
    assert torch.equal(epoch_indices(10, 3, 1, shuffle=False), torch.arange(10))
    assert torch.equal(epoch_indices(10, 3, 1), epoch_indices(10, 3, 1, shuffle=True))


def test_derived_seeds_are_distinct_per_stream_epoch_and_rank_and_stable():
    seeds = [derive_seed(3, stream, epoch, rank)
             for stream in ("augment", "dropout") for epoch in range(5) for rank in range(4)]
    assert len(set(seeds)) == len(seeds)  # ranks draw different dropout masks and augmentations
    assert all(0 <= seed < 2**63 for seed in seeds)  # valid for torch, numpy and random
    assert derive_seed(1, "order", 0) != derive_seed(0, "order", 100_003)  # where seed * K + epoch collides
    assert derive_seed(3, "order", 1) != derive_seed(4, "order", 1)
    # a stored checkpoint resumes onto the same streams only if they never change (here or in
    # another process: no salted hash)
    assert derive_seed(0, "order", 0) == 907303049817992436
    assert derive_seed(7, "dropout", 2, 1) == 1289057122496839031


def iterate_batches_indices(order, batch_size):
    fake = data_module.ImageTensorDataset(torch.zeros(10, 1, 1, 1, dtype=torch.uint8), torch.arange(10), ["x"])
    for _, labels in iterate_batches(fake, order, batch_size):
        yield labels.tolist()


def test_exif_orientation_is_honoured(tmp_path):
    """A photo saved sideways with an EXIF orientation tag (6: turn 90 degrees clockwise) decodes upright."""
    pixels = np.zeros((4, 8, 3), dtype=np.uint8)  # 4 rows, 8 columns as stored
    pixels[:, :2] = 255  # a white band at the left edge of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "turned.png", exif=exif)
    array = read_image(tmp_path / "turned.png", "RGB", None)
    assert array.shape == (8, 4, 3)  # upright: 8 rows, 4 columns
    expected = np.asarray(Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270))
    assert np.array_equal(array, expected) and array[:2].min() == 255  # the band now runs along the top
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    assert read_image(tmp_path / "plain.png", "RGB", None).shape == (4, 8, 3)  # no tag: as stored
