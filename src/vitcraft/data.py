"""Datasets as uint8 tensors, and batches drawn from them.

The tutorial decodes and transforms every image one by one in DataLoader
workers, every epoch. vitcraft decodes a split once into a cache on disk,
reads it back as one memory-mapped uint8 tensor (batches come from the page
cache by index) and augments whole batches with tensor operations (see
``augment.py``). torchvision's datasets arrive as tensors and stay in memory.

Sources: a torchvision dataset name (``cifar10``, ``cifar100``, ``mnist``,
``fashion-mnist``, ``svhn``), a folder in ImageFolder layout with ``train/``
and ``test/`` (or ``val/``) subfolders of one folder per class, or a Hugging
Face dataset: ``hf:NAME[:CONFIG]`` from the hub (through the datasets
library's own cache) or a folder written by ``DatasetDict.save_to_disk``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import multiprocessing
import os
import queue
import re
import shutil
import socket
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from vitcraft.augment import shorter_side_crop, shorter_side_resized, stacked_if_alike
from vitcraft.errors import VitcraftError
from vitcraft.files import TEMPORARY_NAME, atomic_write, load_tensors, remove_stale_temporaries, save_tensors_atomic
from vitcraft.files import cache_dir as default_cache_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DOWNLOAD_TIMEOUT_SECONDS = 30


@dataclass
class ImageTensorDataset:
    """One split of a dataset.

    images: (N, C, H, W) uint8, in memory or memory-mapped from the decode
    cache; ``RaggedImages`` (memory-mapped too), when a training split's photos
    are kept whole and their shapes differ; or ``StreamingImages`` (decoded
    when read). labels: (N,) int64;
    class_names: one per class; skipped: the errors of the unreadable images
    left out (``--skip-bad-images``), each naming its file.
    """

    images: torch.Tensor | "RaggedImages" | "StreamingImages"
    labels: torch.Tensor
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        """Every image's shorter side: the images' size when they are square."""
        return min(self.images.shape[-2:])

    @property
    def num_channels(self) -> int:
        return self.images.shape[1]

    @property
    def nbytes(self) -> int:
        return self.images.nbytes

    def batch(self, index: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The images at ``index`` (b,) on their device: uint8 (b, C, H, W), or a list of (C, H_i, W_i) whose
        shapes differ (``RaggedImages``); ``augment.BatchAugment`` takes either."""
        if isinstance(self.images, torch.Tensor):
            # index_select copies whole rows; indexing (images[index]) goes element by element, many times slower
            return self.images.index_select(0, index.to(self.images.device))
        return self.images[index]

    def to(self, device: torch.device | str) -> "ImageTensorDataset":
        """The split with its images and labels on ``device`` (a streamed split's images cannot move)."""
        return ImageTensorDataset(self.images.to(device), self.labels.to(device), self.class_names, self.skipped)


# --------------------------------------------------------------- torchvision
def _torchvision_sets():
    from torchvision import datasets

    # name -> (class, how the constructor names a split)
    return {
        "cifar10": (datasets.CIFAR10, "train_flag"),
        "cifar100": (datasets.CIFAR100, "train_flag"),
        "mnist": (datasets.MNIST, "train_flag"),
        "fashion-mnist": (datasets.FashionMNIST, "train_flag"),
        "svhn": (datasets.SVHN, "split_name"),
    }


TORCHVISION_NAMES = ("cifar10", "cifar100", "mnist", "fashion-mnist", "svhn")


def _load_torchvision(name: str, split: str, root: Path) -> ImageTensorDataset:
    cls, style = _torchvision_sets()[name]
    kwargs = {"train": split == "train"} if style == "train_flag" else {"split": split}
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_SECONDS)  # never hang on an unreachable mirror
    try:
        dataset = cls(root=str(root), download=True, **kwargs)
    except Exception as error:  # torchvision raises URLError, RuntimeError, OSError...
        raise VitcraftError(
            f"could not download or read the {name} dataset into {root} ({type(error).__name__}: {error}). "
            f"Without internet, point --data at a local copy: a folder with train/ and test/ subfolders "
            f"of one folder per class (ImageFolder layout), or put torchvision's {name} files in "
            f"{root} (--data-root)") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    images = torch.as_tensor(np.asarray(dataset.data))
    if images.ndim == 3:  # (N, H, W) grayscale -> (N, 1, H, W)
        images = images.unsqueeze(1)
    elif images.shape[-1] in (1, 3):  # (N, H, W, C) -> (N, C, H, W)
        images = images.permute(0, 3, 1, 2)
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = dataset.labels
    classes = list(getattr(dataset, "classes", [])) or [str(i) for i in range(int(max(labels)) + 1)]
    return ImageTensorDataset(images.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64), classes)


# -------------------------------------------------------------- image folder
def find_split_dirs(root: Path) -> tuple[Path, Path]:
    """The (train, test) folders of an ImageFolder-layout dataset, with clear errors."""
    if not root.exists():
        raise VitcraftError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise VitcraftError(f"--data {root} is neither a folder, a known dataset name "
                            f"({', '.join(TORCHVISION_NAMES)}) nor hf:NAME")
    train = root / "train"
    test = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if not train.is_dir() or test is None:
        raise VitcraftError(
            f"data folder {root} must hold a train/ and a test/ (or val/) subfolder, each with one folder "
            f"per class; found: {', '.join(sorted(p.name for p in root.iterdir())) or 'nothing'}")
    return train, test


def _list_images(split_dir: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    class_names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise VitcraftError(f"{split_dir} has no class subfolders (expected {split_dir}/<class>/<image>)")
    files = []
    for index, name in enumerate(class_names):
        for path in sorted((split_dir / name).iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                files.append((path, index))
    if not files:
        raise VitcraftError(f"{split_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files, class_names


def read_image(path: Path | str, mode: str, image_size: int | None, max_pixels: int | None = None, *,
               crop: int | None = None, keep_shape: bool = False) -> np.ndarray:
    """Decode one image file to a (H, W, C) uint8 array in ``mode`` ("RGB" or "L").

    With ``image_size``, it is resized to image_size x image_size (as the
    tutorial's ``Resize((size, size))``); with ``crop`` too, its shorter side
    is resized to image_size instead, keeping the aspect ratio, and the centre
    crop x crop kept (timm's evaluation ``Resize(size)``, ``CenterCrop(crop)``;
    the array is then (crop, crop, C)); with ``keep_shape``, its shorter side
    is resized to image_size and the whole image kept. ``path`` may also be a binary file
    object. Any mode converts: palette, CMYK, grayscale, 1-bit; alpha is
    dropped (not composited); 16-bit grayscale keeps its high byte (Pillow
    alone would clip it to white). Unreadable files, and images of more than
    ``max_pixels`` pixels (default: Pillow's decompression-bomb threshold, about
    89 million; checked from the header, before decoding), raise VitcraftError
    naming the file.
    """
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    with _decoding(path), Image.open(path) as image:
        if limit is not None and image.width * image.height > limit:
            raise ValueError(f"{image.width} x {image.height} pixels is more than the limit of {limit:,}")
        return prepare_image(image, mode, image_size, crop=crop, keep_shape=keep_shape)


EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how the camera was turned; 1: upright


def _exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1 when it has none, or EXIF data Pillow cannot parse, as viewers treat it)."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF blocks raise assorted errors inside Pillow
        return 1


def prepare_image(image: Image.Image, mode: str, image_size: int | None, *, crop: int | None = None,
                  keep_shape: bool = False) -> np.ndarray:
    """An opened image as a (H, W, C) uint8 array in ``mode``, resized and cropped as ``read_image`` documents.

    What ``read_image`` does after opening a file, and what a Hugging Face
    dataset's images (already opened by the datasets library) go through.
    """
    if _exif_orientation(image) != 1:  # a phone's photo as it was held (exif_transpose copies every image)
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
    image = image.convert(mode)
    if crop is not None:
        (height, width), (top, left) = shorter_side_crop(image.height, image.width, image_size, crop)
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        image = image.crop((left, top, left + crop, top + crop))
    elif keep_shape:
        height, width = shorter_side_resized(image.height, image.width, image_size)
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
    elif image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    array = np.array(image, dtype=np.uint8)  # a writable copy
    return array.reshape(array.shape[0], array.shape[1], -1)


@contextlib.contextmanager
def _decoding(path: Path | str) -> Iterator[None]:
    """Turn any failure to parse or decode the image ``path`` into a VitcraftError naming it.

    Broad on purpose: besides OSError, Pillow's format plugins raise SyntaxError,
    EOFError, struct.error and others on malformed files, and none of them is a
    bug of the caller's.
    """
    try:
        yield
    except Exception as error:
        raise VitcraftError(f"cannot read image {path}: {error}") from None


def probe_folder(root: Path) -> tuple[str, int, bool]:
    """(mode, image_size, square) of a folder dataset, from its first training image (see ``probe_image``)."""
    train, _ = find_split_dirs(root)
    files, _ = _list_images(train)
    path = files[0][0]
    with _decoding(path), Image.open(path) as image:
        return probe_image(image)


def probe_image(image: Image.Image) -> tuple[str, int, bool]:
    """(mode, image_size, square) of a dataset whose first training image is ``image``.

    mode: "L" or "RGB"; image_size: its shorter side; square: whether it is.
    """
    mode = "L" if image.mode in ("L", "1", "I") or image.mode.startswith("I;16") else "RGB"
    return mode, min(image.size), image.width == image.height


def crop_pct_geometry(image_size: int, crop_pct: float) -> tuple[int, int]:
    """(shorter side, centre crop) of an evaluation image prepared with timm's ``crop_pct``.

    Its shorter side is resized to S = floor(image_size / crop_pct) and the
    centre image_size x image_size kept, as timm's evaluation transform does.
    A training image keeps its whole shape at shorter side S, and BatchAugment's
    random crops are drawn from it (at ``output_size`` = image_size).
    """
    return math.floor(image_size / crop_pct), image_size


@dataclass(frozen=True)
class Layout:
    """How one split's images are stored: each a (channels, height, width) uint8 array.

    Made by ``prepare_image(image, mode, resize_to, crop=crop, keep_shape=keep_shape)``:
    by default every image resized to resize_to x resize_to (squashed); with a
    crop, its shorter side resized to resize_to and the centre crop x crop
    kept; with keep_shape, its shorter side resized to resize_to and the whole
    image kept, so that the images' shapes may differ.
    """

    mode: str  # "RGB" or "L"
    resize_to: int
    crop: int | None = None
    keep_shape: bool = False

    @classmethod
    def of(cls, mode: str, image_size: int, crop_pct: float | None, split: str) -> "Layout":
        """The layout of ``split`` ("train" or "test") at ``image_size``, with timm's ``crop_pct`` or without.

        With it, the test split is timm's evaluation crop and the training split keeps each image whole
        (see ``crop_pct_geometry``); without, every image is squashed to image_size x image_size.
        """
        if crop_pct is None:
            return cls(mode, image_size)
        shorter_side, crop = crop_pct_geometry(image_size, crop_pct)
        return cls(mode, shorter_side, keep_shape=True) if split == "train" else cls(mode, shorter_side, crop)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def size(self) -> int:
        """Every image's shorter side: its size, unless keep_shape lets the longer side differ."""
        return self.crop or self.resize_to

    def least_nbytes(self, count: int) -> int:
        """The bytes of ``count`` images, at least: exact unless keep_shape, where each image is S x S or larger."""
        return count * self.channels * self.size * self.size

    def key(self) -> str:
        """What a cache's fingerprint takes from the layout."""
        return f"{self.mode}|{self.resize_to}|{self.crop}|{self.keep_shape}"


class ImageSource:
    """The images of one split, decoded one at a time: what a cache is built from and what streaming reads.

    Subclasses say how to read image i (``read``). Picklable, so build
    processes and DataLoader workers get copies.
    """

    layout: Layout
    labels: torch.Tensor  # (N,) int64
    class_names: list[str]
    where: str  # the split, for messages and the progress bar

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> np.ndarray:
        """Image i as a (H, W, C) uint8 array prepared to ``layout``; VitcraftError naming it if it cannot be read."""
        raise NotImplementedError

    def decode(self, i: int) -> np.ndarray:
        """Image i as a (C, H, W) uint8 array."""
        return self.read(i).transpose(2, 0, 1)  # HWC -> CHW


class FolderSource(ImageSource):
    """The image files of one ImageFolder split folder."""

    def __init__(self, split_dir: Path, layout: Layout):
        files, self.class_names = _list_images(split_dir)
        self.paths = [path for path, _ in files]
        self.labels = torch.tensor([label for _, label in files], dtype=torch.int64)
        self.layout, self.where = layout, str(split_dir)

    def read(self, i: int) -> np.ndarray:
        return read_image(self.paths[i], self.layout.mode, self.layout.resize_to, crop=self.layout.crop,
                          keep_shape=self.layout.keep_shape)


BUILD_BLOCK = 256  # images per task of a parallel cache build: large enough to amortise the task, small to balance
CACHE_VERSION = "v4"  # in every cache's fingerprint: v4, images of any shape with their heights and widths


@dataclass
class Block:
    """What decoding images start..stop-1 of a split produced: their bytes, written to the file ``path`` one
    after another as (C, H, W) uint8, their heights and widths, and the (index, error) of those left out."""

    path: str
    heights: list[int]
    widths: list[int]
    bad: list[tuple[int, str]]


def _decode_block(source: ImageSource, file: BinaryIO, start: int, stop: int, skip_bad: bool) -> Block:
    """Decode images start..stop-1 of ``source``, writing them one after another to the open ``file``.

    An unreadable image raises (its error names it) or, with ``skip_bad``, is left out and listed.
    """
    block = Block(file.name, [], [], [])
    for i in range(start, stop):
        try:
            image = source.decode(i)  # (C, H, W)
        except VitcraftError as error:
            if not skip_bad:
                raise
            block.bad.append((i, str(error)))
            continue
        file.write(np.ascontiguousarray(image).data)
        block.heights.append(image.shape[1])
        block.widths.append(image.shape[2])
    return block


def _decode_into(path: str, source: ImageSource, skip_bad: bool, workers: int) -> Block:
    """Decode every image of ``source`` into the file ``path``, on ``workers`` processes; what was written.

    One process writes straight into ``path``. Several decode blocks of
    images into files of their own beside ``path`` (named as atomic_write's
    temporaries of it, so that a killed build's are removed by the next),
    which are appended to ``path`` in order as they are done. A progress bar
    on a terminal. The images skipped (``skip_bad``) are listed; otherwise the
    first unreadable one raises.
    """
    blocks = [(start, min(start + BUILD_BLOCK, len(source))) for start in range(0, len(source), BUILD_BLOCK)]
    written = Block(path, [], [], [])
    block_paths: list[str] = []

    def record(block: Block) -> None:
        written.heights += block.heights
        written.widths += block.widths
        written.bad += block.bad

    bar = tqdm(total=len(source), desc=f"decoding {source.where}", unit="img", leave=False,
               disable=not sys.stderr.isatty(), dynamic_ncols=True)
    try:
        with bar, open(path, "wb") as output:
            if workers <= 1 or len(blocks) == 1:
                for start, stop in blocks:
                    record(_decode_block(source, output, start, stop, skip_bad))
                    bar.update(stop - start)
                return written
            # atomic_write's temporary of NAME is .NAME.<hex>.tmp
            temporary = TEMPORARY_NAME.fullmatch(Path(path).name)
            name = temporary.group(1) if temporary else Path(path).name
            block_paths = [str(Path(path).with_name(f".{name}.{os.urandom(16).hex()}.tmp")) for _ in blocks]
            # processes, not threads: decoding small images is Python-bound, and would hold the GIL
            # the source goes to each process once, not with every block: it lists every file of the split
            with ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_set_worker_source,
                                     initargs=(source,)) as pool:
                futures = [pool.submit(_decode_worker_block, block_path, start, stop, skip_bad)
                           for (start, stop), block_path in zip(blocks, block_paths)]
                try:
                    for (start, stop), future in zip(blocks, futures):
                        block = future.result()
                        with open(block.path, "rb") as file:
                            shutil.copyfileobj(file, output, 1 << 22)
                        os.unlink(block.path)
                        record(block)
                        bar.update(stop - start)
                except BaseException:
                    pool.shutdown(cancel_futures=True)
                    raise
        return written
    finally:
        for block_path in block_paths:  # those not appended yet, when something failed
            with contextlib.suppress(FileNotFoundError):
                os.unlink(block_path)


_worker_source: ImageSource | None = None  # in a build process: the source it decodes from


def _set_worker_source(source: ImageSource) -> None:
    global _worker_source
    _worker_source = source


def _decode_worker_block(path: str, start: int, stop: int, skip_bad: bool) -> Block:
    with open(path, "wb") as file:
        return _decode_block(_worker_source, file, start, stop, skip_bad)


def _worker_context() -> multiprocessing.context.BaseContext:
    """How build processes start: forked on Linux, as DataLoader workers are there.

    Spawned processes would import the caller's main script again, and a
    script that trains without an ``if __name__ == "__main__":`` guard would
    then start its training in every one of them (waiting for the build lock
    this process holds). Elsewhere the platform's default (spawn on macOS and
    Windows, which need that guard for DataLoader workers too).
    """
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)


def _disk_full(folder: Path, nbytes: int) -> VitcraftError:
    return VitcraftError(f"the disk holding {folder} is full: the decode cache needs at least {nbytes / 1e9:.2f} GB "
                         f"there. Free some space, pass --cache-dir on a larger disk, or --no-cache to decode the "
                         f"images every epoch instead (nothing half-built was left behind)")


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if need be): one process builds a cache, the others wait."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic renames still keep every reader's cache whole
        yield
        return
    with open(path, "a") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)


CACHE_IMAGES_SUFFIX = ".u8"  # the raw uint8 images, one after another; their shapes are in the metadata file


class RaggedImages:
    """A split's images of different shapes, each (C, H_i, W_i) uint8, one after another in one flat buffer.

    What a training split of photos kept whole (``Layout.keep_shape``) reads
    as when their shapes differ: the buffer is memory-mapped from the decode
    cache. Indexing with an index tensor gives a list of copies of those
    images (``BatchAugment`` crops each from its own shape); ``index_select``
    a RaggedImages of them, in memory. ``shape`` is (N, C, S, S), S the
    shortest side of any image (every image's shorter side, as the cache makes them).
    """

    dtype = torch.uint8
    device = torch.device("cpu")
    ndim = 4

    def __init__(self, flat: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor, channels: int):
        self.flat, self.heights, self.widths, self.channels = flat, heights, widths, channels
        sizes = channels * heights.long() * widths.long()
        # a tensor, not a list: 8 bytes an image (a list of Python ints would take about 36)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])

    def __len__(self) -> int:
        return len(self.heights)

    @property
    def shape(self) -> torch.Size:
        shortest = int(torch.minimum(self.heights, self.widths).min())
        return torch.Size((len(self), self.channels, shortest, shortest))

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def image(self, i: int) -> torch.Tensor:
        """Image i, (C, H_i, W_i) uint8: a view of the buffer."""
        start, stop = self.offsets[i:i + 2].tolist()
        return self.flat[start:stop].view(self.channels, int(self.heights[i]), int(self.widths[i]))

    def __getitem__(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [self.image(i).clone() for i in index.tolist()]  # copies: the pages are read here, not later

    def index_select(self, dim: int, index: torch.Tensor) -> "RaggedImages":
        if dim != 0:
            raise ValueError("RaggedImages selects images only (dim 0)")
        # one copy: cat reads the chosen images' views of the buffer
        views = [self.image(i).reshape(-1) for i in index.tolist()]
        flat = torch.cat(views) if views else torch.empty(0, dtype=torch.uint8)
        return RaggedImages(flat, self.heights[index], self.widths[index], self.channels)


def _read_cache(cache_file: Path) -> ImageTensorDataset | None:
    """The split cached at ``cache_file``, its images memory-mapped; None if there is none, or it is damaged.

    The images are one (N, C, H, W) tensor when they all have one shape, else ``RaggedImages``.
    """
    images_file = cache_file.with_suffix(CACHE_IMAGES_SUFFIX)
    if not (cache_file.exists() and images_file.exists()):
        return None
    try:
        tensors, metadata = load_tensors(cache_file)
        heights, widths, labels = tensors["heights"], tensors["widths"], tensors["labels"]
        channels = int(metadata["channels"])
        nbytes = channels * int((heights.long() * widths.long()).sum())
        if images_file.stat().st_size != nbytes or not len(labels) == len(heights) == len(widths) > 0:
            return None
        # copy-on-write: writable for torch (no warning), the file's pages shared until written
        flat = torch.from_numpy(np.memmap(images_file, dtype=np.uint8, mode="c", shape=(nbytes,)))
        if bool((heights == heights[0]).all() and (widths == widths[0]).all()):
            images = flat.view(len(labels), channels, int(heights[0]), int(widths[0]))
        else:
            images = RaggedImages(flat, heights, widths, channels)
        return ImageTensorDataset(images, labels, json.loads(metadata["class_names"]),
                                  json.loads(metadata["skipped"]))
    except (VitcraftError, KeyError, ValueError, TypeError, OSError, RuntimeError, json.JSONDecodeError):
        return None  # a damaged cache is rebuilt, never trusted


def _build_cache(cache_file: Path, source: ImageSource, skip_bad: bool, workers: int) -> None:
    """Decode ``source`` into ``cache_file``'s raw images file, then write its labels, shapes and class names.

    The images are written as they are decoded, so a split larger than the
    memory can be cached. The metadata file is written last: a build killed at
    any moment leaves no cache that ``_read_cache`` accepts. A full disk stops
    with one message, leaving nothing.
    """
    images_file = cache_file.with_suffix(CACHE_IMAGES_SUFFIX)
    written: list[Block] = []
    try:
        atomic_write(images_file, lambda temp: written.append(_decode_into(temp, source, skip_bad, workers)))
        split = written[0]
        skipped = {i for i, _ in split.bad}
        kept = [i for i in range(len(source)) if i not in skipped]
        metadata = {"class_names": json.dumps(source.class_names), "channels": str(source.layout.channels),
                    "skipped": json.dumps([error for _, error in split.bad])}
        save_tensors_atomic(cache_file, {"labels": source.labels[kept], "heights": torch.tensor(split.heights),
                                         "widths": torch.tensor(split.widths)}, metadata)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            with contextlib.suppress(FileNotFoundError):
                images_file.unlink()  # the images of a cache whose metadata could not be written
            raise _disk_full(cache_file.parent, source.layout.least_nbytes(len(source))) from None
        raise


def _cached(cache_file: Path, source: ImageSource, skip_bad: bool, workers: int,
            found: ImageTensorDataset | None) -> ImageTensorDataset:
    """The split of ``source`` from its cache at ``cache_file`` (``found``: what ``_read_cache`` read there
    already, if anything), built first if there is none.

    The images live in a raw file beside ``cache_file`` (suffix .u8) that is
    memory-mapped: batches are read from the page cache by index, so a large
    set does not fill the process's own memory, and every process (each
    torchrun rank) shares the same pages. Two processes building the same
    cache take turns: the second finds the first's.
    """
    dataset = found
    if dataset is None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(cache_file.with_suffix(".lock")):
            dataset = _read_cache(cache_file)  # built by the process we waited for
            if dataset is None:
                # what killed builds left behind; no one else builds now: we hold the lock
                images_name = cache_file.with_suffix(CACHE_IMAGES_SUFFIX).name
                remove_stale_temporaries(cache_file.parent, [cache_file.name, images_name])
                _build_cache(cache_file, source, skip_bad, workers)
                dataset = _read_cache(cache_file)
                if dataset is None:  # what it built is whole, so it is empty
                    raise VitcraftError(f"{source.where} has no readable image: --skip-bad-images left out all "
                                        f"{len(source)}")
    if dataset.skipped and not skip_bad:
        raise VitcraftError(f"{dataset.skipped[0]} (the cache of {source.where} was built with --skip-bad-images, "
                            f"leaving out {len(dataset.skipped)} images; pass it again, or fix the files)")
    return dataset


def _folder_fingerprint(split_dir: Path, layout: Layout) -> str:
    """Changes when any file is added, removed, resized or touched, or the images are prepared otherwise."""
    key = f"{split_dir.resolve()}|{layout.key()}|{CACHE_VERSION}"
    digest = hashlib.sha1(key.encode())
    for path in sorted(split_dir.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(split_dir)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------ Hugging Face datasets
HUB_PREFIX = "hf:"
DATASET_DICT_FILE = "dataset_dict.json"  # what DatasetDict.save_to_disk writes at the top of its folder
TEST_SPLITS = ("test", "validation")  # the first one present is the test split


def is_saved_dataset_dict(path: Path) -> bool:
    """Whether ``path`` is a folder written by the datasets library's ``DatasetDict.save_to_disk``."""
    return (path / DATASET_DICT_FILE).is_file()


def _import_datasets(data: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise VitcraftError(f"--data {data} needs the datasets package: pip install 'vitcraft[datasets]'") from None
    return datasets


def _open_hf(data: str) -> tuple[Any, str, str]:
    """(DatasetDict, source, cache name) of ``hf:NAME[:CONFIG]`` or a save_to_disk folder.

    ``source`` identifies the data in cache fingerprints; ``cache name`` starts its cache files' names.
    """
    datasets = _import_datasets(data)
    if data.startswith(HUB_PREFIX):
        name, _, config = data[len(HUB_PREFIX):].partition(":")
        if not name:
            raise VitcraftError(f"--data {data} names no dataset: use hf:NAME or hf:NAME:CONFIG")
        try:
            splits = datasets.load_dataset(name, config or None)
        except Exception as error:  # offline ConnectionError, DatasetNotFoundError, ValueError for a config...
            detail = " ".join(f"{type(error).__name__}: {error}".split())  # one line, as the CLI prints it
            raise VitcraftError(
                f"could not load the Hugging Face dataset {name}{f' (config {config})' if config else ''} "
                f"({detail}). The datasets library downloads it into its cache (HF_HOME) on first use: run "
                f"once with internet and without HF_DATASETS_OFFLINE=1, or save it elsewhere with "
                f"DatasetDict.save_to_disk(DIR) and pass --data DIR") from None
        return splits, data, f"hf-{name}-{config}" if config else f"hf-{name}"
    root = Path(data).expanduser()
    try:
        splits = datasets.load_from_disk(str(root))
    except Exception as error:  # a damaged or partly copied folder: FileNotFoundError, JSON or arrow errors
        raise VitcraftError(f"could not read the saved dataset {root} ({type(error).__name__}: {error})") from None
    return splits, str(root.resolve()), root.name


def _hf_columns(features: Any, where: str) -> tuple[str, str]:
    """The (image, label) column names of a split with these features: its one Image and its one ClassLabel column."""
    import datasets

    columns = []
    for kind, role in ((datasets.Image, "the images"), (datasets.ClassLabel, "the labels")):
        names = [name for name, feature in features.items() if isinstance(feature, kind)]
        if len(names) != 1:
            found = ", ".join(f"{name} ({type(feature).__name__})" for name, feature in features.items())
            raise VitcraftError(f"{where} must have exactly one datasets.{kind.__name__} column for {role}, "
                                f"it has {len(names) or 'none'}; its columns: {found or 'none'}")
        columns.append(names[0])
    return columns[0], columns[1]


class HubSource(ImageSource):
    """One split of a Hugging Face dataset: its one Image column decoded, its one ClassLabel column the labels."""

    def __init__(self, split: Any, where: str, layout: Layout, fingerprint_of: str):
        image_column, label_column = _hf_columns(split.features, where)
        self.class_names = list(split.features[label_column].names)
        self.labels = torch.tensor(list(split[label_column]), dtype=torch.int64)
        outside = self.labels[(self.labels < 0) | (self.labels >= len(self.class_names))]
        if len(outside):
            raise VitcraftError(f"{where} has {len(outside)} labels outside 0..{len(self.class_names) - 1}, such as "
                                f"{int(outside[0])} (-1 marks an unlabelled image); train and test need labelled "
                                f"images")
        self.images = split.select_columns([image_column])  # rows read only the image column
        self.image_column, self.where, self.layout = image_column, where, layout
        # changes when the datasets library's fingerprint of the split changes, or the images are prepared otherwise
        key = json.dumps([fingerprint_of, split._fingerprint, self.layout.key(), CACHE_VERSION])
        self.fingerprint = hashlib.sha1(key.encode()).hexdigest()[:16]

    def name(self, i: int) -> str:
        return f"{i} of {self.where}"

    def read(self, i: int) -> np.ndarray:
        with _decoding(self.name(i)):
            return prepare_image(self.images[i][self.image_column], self.layout.mode, self.layout.resize_to,
                                 crop=self.layout.crop, keep_shape=self.layout.keep_shape)


def _hf_sources(data: str, image_size: int | None, crop_pct: float | None,
                log: Callable[[str], None]) -> tuple[tuple[HubSource, HubSource], str]:
    """The (train, test) sources of ``hf:NAME[:CONFIG]`` or a save_to_disk folder, and the prefix of their caches."""
    splits, source, cache_name = _open_hf(data)
    test_name = next((name for name in TEST_SPLITS if name in splits), None)
    if "train" not in splits or test_name is None:
        raise VitcraftError(f"{data} must have a train split and a test (or validation) split; "
                            f"found: {', '.join(splits) or 'none'}")
    wheres = {name: f"the {name} split of {data}" for name in ("train", test_name)}
    columns = {name: _hf_columns(splits[name].features, where) for name, where in wheres.items()}
    empty = [where for name, where in wheres.items() if len(splits[name]) == 0]
    if empty:
        raise VitcraftError(f"{empty[0]} is empty")
    train_classes, test_classes = (splits[name].features[columns[name][1]].names for name in ("train", test_name))
    if test_classes != train_classes:
        raise VitcraftError(f"{wheres[test_name]} and {wheres['train']} have different class names: "
                            f"{test_classes} vs {train_classes}")
    with _decoding(f"0 of {wheres['train']}"):
        mode, probed_size, square = probe_image(splits["train"][0][columns["train"][0]])
    _say_if_squashed(data, square, crop_pct, log)
    size = image_size or probed_size
    prefix = re.sub(r"[^\w.-]+", "-", cache_name)  # a hub name's "/" and a config's odd characters
    sources = (HubSource(splits[name], wheres[name], Layout.of(mode, size, crop_pct, role), f"{source}|{name}")
               for name, role in (("train", "train"), (test_name, "test")))
    return tuple(sources), prefix


# ---------------------------------------------------------------- streaming
class StreamingImages:
    """A split's images decoded when read, standing in for the (N, C, H, W) uint8 tensor of a cached split.

    For sets larger than the free disk (``--no-cache``): ``iterate_batches``
    decodes each batch in DataLoader worker processes, every epoch. Indexing
    (an int, a slice or an index tensor) decodes in this process, for figures.
    With ``skip_bad``, an unreadable image is left out of its batch (named in
    ``skipped``) and reads as zeros when indexed. A training split of photos
    kept whole (``Layout.keep_shape``) gives a list of images where the shapes
    in a batch differ, as ``RaggedImages`` does; ``shape`` is then (N, C, S, S)
    with S every image's shorter side.
    """

    dtype = torch.uint8
    device = torch.device("cpu")
    ndim = 4

    def __init__(self, source: ImageSource, workers: int, skip_bad: bool):
        self.source, self.workers, self.skip_bad = source, workers, skip_bad
        self.skipped: set[str] = set()

    @property
    def shape(self) -> torch.Size:
        layout = self.source.layout
        return torch.Size((len(self.source), layout.channels, layout.size, layout.size))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int | slice | torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(index, int):
            return self[torch.tensor([index])][0]
        rows = range(len(self))[index] if isinstance(index, slice) else index.tolist()
        images = []
        for i in rows:
            image, error = _decode_or_error(self.source, i)
            if error is not None and not self.skip_bad:
                raise VitcraftError(error)
            images.append(image if image is not None else torch.zeros(self.shape[1:], dtype=torch.uint8))
        stacked = stacked_if_alike(images)
        return stacked if images else torch.empty(0, *self.shape[1:], dtype=torch.uint8)

    def batches(self, batches: list[torch.Tensor], labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of each index tensor in ``batches``, decoded by DataLoader workers."""
        loader = torch.utils.data.DataLoader(
            _Decoded(self.source), batch_sampler=[batch.tolist() for batch in batches], collate_fn=_collate,
            num_workers=min(self.workers, len(batches)), multiprocessing_context=_worker_context())
        for batch, (images, keep, errors) in zip(batches, loader):
            if errors and not self.skip_bad:
                raise VitcraftError(f"{errors[0]} (--skip-bad-images leaves such images out)")
            self.skipped.update(errors)
            yield images, labels[batch[keep]]


def _decode_or_error(source: ImageSource, i: int) -> tuple[torch.Tensor | None, str | None]:
    try:
        return torch.from_numpy(source.decode(i).copy()), None
    except VitcraftError as error:  # returned, not raised: a worker's exception would reach the user as a traceback
        return None, str(error)


class _Decoded(torch.utils.data.Dataset):
    """Image i of a source as (image (C, S, S) uint8 or None, error or None), for DataLoader workers."""

    def __init__(self, source: ImageSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        return _decode_or_error(self.source, i)


def _collate(rows: list[tuple[torch.Tensor | None, str | None]]
             ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, list[str]]:
    """(images (b, C, H, W) of the readable rows, or their list if their shapes differ, which rows those are
    (bool), the others' errors)."""
    keep = torch.tensor([image is not None for image, _ in rows])
    images = [image for image, _ in rows if image is not None]
    stacked = stacked_if_alike(images) if images else torch.empty(0, dtype=torch.uint8)
    return stacked, keep, [error for _, error in rows if error is not None]


# -------------------------------------------------------------------- public
def _print_note(message: str) -> None:
    print(f"vitcraft: {message}", file=sys.stderr)


def load_splits(data: str, data_root: Path | None = None, image_size: int | None = None,
                cache_dir: Path | None = None, *, crop_pct: float | None = None, stream: bool = False,
                skip_bad_images: bool = False, workers: int = 1,
                log: Callable[[str], None] = _print_note) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """(train, test) splits of a torchvision dataset name, an ImageFolder-layout folder or a Hugging Face dataset.

    Hugging Face: ``hf:NAME[:CONFIG]`` (``datasets.load_dataset``) or a folder
    holding ``dataset_dict.json`` (``datasets.load_from_disk``); its one
    ``Image`` column holds the images, its one ``ClassLabel`` column the labels
    and class names, and its "train" and "test" (else "validation") splits are used.

    ``image_size`` resizes every image to that square size (default: the
    shorter side of the data's first image), squashing those that are not
    square (said through ``log``); ``vitcraft train`` passes a crop_pct.
    With ``crop_pct`` (timm's, in (0, 1]) nothing is squashed: image_size is the
    test split's size and each image's shorter side is resized to image_size /
    crop_pct first (see ``crop_pct_geometry``), the training split keeping each
    image whole at that size (its images differ in shape when the data's do).

    Folder and Hugging Face datasets are decoded once, on ``workers``
    processes, into a cache in ``cache_dir`` that is memory-mapped (see
    ``_cached``). With ``stream``, or when the cache would not fit the free
    disk (said through ``log``), nothing is cached: DataLoader workers decode
    every batch (``StreamingImages``). An unreadable image stops with its name,
    or with ``skip_bad_images`` is left out and named in the split's ``skipped``.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if data.startswith(HUB_PREFIX) or is_saved_dataset_dict(Path(data).expanduser()):
        sources, prefix = _hf_sources(data, image_size, crop_pct, log)
        names = [f"{prefix}-{role}-{source.fingerprint}" for role, source in zip(("train", "test"), sources)]
    elif data.lower() in TORCHVISION_NAMES and not Path(data).is_dir():
        return _load_torchvision_splits(data.lower(), data_root or cache_dir / "datasets", image_size, crop_pct)
    else:
        root = Path(data).expanduser()
        train_dir, test_dir = find_split_dirs(root)
        mode, probed_size, square = probe_folder(root)
        _say_if_squashed(data, square, crop_pct, log)
        size = image_size or probed_size
        sources = tuple(FolderSource(folder, Layout.of(mode, size, crop_pct, split))
                        for folder, split in ((train_dir, "train"), (test_dir, "test")))
        if sources[1].class_names != sources[0].class_names:
            raise VitcraftError(f"{test_dir} and {train_dir} have different class folders: "
                                f"{sources[1].class_names} vs {sources[0].class_names}")
        names = [f"{folder.parent.name}-{folder.name}-{_folder_fingerprint(folder, source.layout)}"
                 for folder, source in zip((train_dir, test_dir), sources)]
    cache_files = [cache_dir / f"{name}.safetensors" for name in names]
    found = [None if stream else _read_cache(file) for file in cache_files]
    if not stream:
        needed = sum(source.layout.least_nbytes(len(source)) for source, cached in zip(sources, found)
                     if cached is None)
        free = _free_bytes(cache_dir)
        if needed > free:
            log(f"the decode cache would take at least {needed / 1e9:.2f} GB but {cache_dir} has "
                f"{free / 1e9:.2f} GB free: streaming instead, decoding every image every epoch (--cache-dir on "
                f"a larger disk caches it)")
            stream = True
    if stream:
        return tuple(ImageTensorDataset(StreamingImages(source, workers, skip_bad_images), source.labels,
                                        source.class_names) for source in sources)
    return tuple(_cached(file, source, skip_bad_images, workers, cached)
                 for file, source, cached in zip(cache_files, sources, found))


def _say_if_squashed(data: str, square: bool, crop_pct: float | None, log: Callable[[str], None]) -> None:
    """Say that the images will be squashed, if they are not square and no crop_pct keeps their shape."""
    if square or crop_pct is not None:
        return
    log(f"the images of {data} are not square (the first is not): without crop_pct each is squashed to a square; "
        f"crop_pct=1.0 resizes the shorter side and keeps the shape (what vitcraft train does)")


def _free_bytes(folder: Path) -> int:
    """Free space on the disk that holds ``folder`` (or would, once created)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _load_torchvision_splits(name: str, root: Path, image_size: int | None,
                             crop_pct: float | None) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """torchvision's ``name`` in memory, resized as ``load_splits`` says."""
    train, test = (_load_torchvision(name, split, root) for split in ("train", "test"))
    if crop_pct is not None:
        size = image_size or train.image_size
        shorter_side, crop = crop_pct_geometry(size, crop_pct)
        # these datasets' images are square: the whole training image is its centre square
        train, test = resize_dataset(train, shorter_side, shorter_side), resize_dataset(test, shorter_side, crop)
    elif image_size is not None and image_size != train.image_size:
        train, test = resize_dataset(train, image_size), resize_dataset(test, image_size)
    return train, test


def resize_dataset(dataset: ImageTensorDataset, image_size: int, crop: int | None = None) -> ImageTensorDataset:
    """All images bilinearly resized to image_size x image_size (still uint8).

    With ``crop``, as ``read_image``: the shorter side resized to image_size,
    then the centre crop x crop kept. Out: (N, C, crop, crop).
    """
    if dataset.images.shape[-2:] == (image_size, image_size) and crop in (None, image_size):
        return dataset  # already that size
    if crop is None:
        size, (top, left), crop = (image_size, image_size), (0, 0), image_size
    else:
        size, (top, left) = shorter_side_crop(*dataset.images.shape[-2:], image_size, crop)
    resized = []
    for chunk in dataset.images.split(4096):
        chunk = torch.nn.functional.interpolate(chunk.float(), size=size, mode="bilinear", align_corners=False,
                                                antialias=True)[..., top:top + crop, left:left + crop]
        resized.append(chunk.round().clamp(0, 255).to(torch.uint8))
    return ImageTensorDataset(torch.cat(resized), dataset.labels, dataset.class_names)


def per_class_subset(dataset: ImageTensorDataset, count: int, seed: int) -> ImageTensorDataset:
    """``count`` images of each class (``--labels-per-class``), drawn with ``seed``, kept in the split's order.

    One seeded shuffle of the whole split, then each class's first ``count``:
    the same images for every run of a seed, whatever the model. The images
    chosen are read into memory (count x classes of them). A VitcraftError
    names a class with fewer images, and a streamed split (which reads no
    image ahead).
    """
    if isinstance(dataset.images, StreamingImages):
        raise VitcraftError("--labels-per-class reads the chosen images into memory, and a streamed split "
                            "(--no-cache) reads none ahead; leave out --no-cache")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    shuffled_labels = dataset.labels.cpu()[order]
    chosen = []
    for label, name in enumerate(dataset.class_names):
        rows = order[shuffled_labels == label][:count]
        if len(rows) < count:
            raise VitcraftError(f"--labels-per-class {count}: class {name!r} has only {len(rows)} training images")
        chosen.append(rows)
    keep = torch.cat(chosen).sort().values.to(dataset.labels.device)
    return ImageTensorDataset(dataset.images.index_select(0, keep.to(dataset.images.device)),
                              dataset.labels.index_select(0, keep), dataset.class_names, dataset.skipped)


def derive_seed(seed: int, *stream: int | str) -> int:
    """The seed of one random stream of a run, from the run's ``seed`` and the stream's name and coordinates.

    A run draws from several streams, and each needs a seed of its own:

    * ``("order", epoch)``: the sample order of an epoch (``epoch_indices``). The same
      on every rank, because the ranks take disjoint slices of one permutation;
    * ``("augment", epoch, rank)``: crops, flips and the stronger augmentations of the
      images this rank trains on;
    * ``("dropout", epoch, rank)``: torch's global RNG, behind dropout and stochastic
      depth. Every rank seeds it alike to build equal initial weights; without a seed
      per rank afterwards, all ranks would draw the same dropout masks.

    Each stream is seeded afresh per epoch, so what epoch e draws depends on (seed, e,
    rank) only, not on the epochs before it: a run resumed at an epoch boundary draws
    exactly what an uninterrupted one would. A hash, not a formula such as
    ``seed * K + epoch``, because such formulas collide (seed 1 at epoch 0 is seed 0
    at epoch K) and a name keeps two streams apart by construction. Stable across
    processes, platforms and Python versions (unlike ``hash``); below 2**63, so it is
    a valid seed for torch, numpy and ``random``.
    """
    key = json.dumps([seed, *stream]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def epoch_indices(num_samples: int, seed: int, epoch: int, *, shuffle: bool = True,
                  rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The sample order of one epoch for one rank (DistributedSampler semantics).

    The order depends only on (seed, epoch), so a resumed run sees the same
    batches. With several ranks the order is padded by repetition to a
    multiple of world_size and rank r takes every world_size-th index from r.
    """
    if shuffle:
        generator = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
        order = torch.randperm(num_samples, generator=generator)
    else:
        order = torch.arange(num_samples)
    if world_size > 1:
        padded = -(-num_samples // world_size) * world_size
        order = torch.cat([order, order[: padded - num_samples]])
        order = order[rank::world_size]
    return order


def iterate_batches(dataset: ImageTensorDataset, order: torch.Tensor, batch_size: int, *, drop_last: bool = False,
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    prefetch: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images (b, C, H, W), labels (b,)) in ``order``; the images through ``transform`` if given.

    Images of different shapes come as a list of (C, H_i, W_i) (see ``ImageTensorDataset.batch``).

    With ``prefetch``, a background thread reads (and transforms) the next
    batch while the caller works on this one: reading pages of a memory-mapped
    cache from disk, and the batched augmentations, leave the training step's
    critical path. A streamed split's batches are decoded by DataLoader workers.
    """
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    indices = [order[start:start + batch_size] for start in range(0, stop, batch_size)]
    if isinstance(dataset.images, StreamingImages):
        batches = dataset.images.batches(indices, dataset.labels)
    else:
        batches = ((dataset.batch(index), dataset.labels[index.to(dataset.labels.device)]) for index in indices)
    if transform is not None:
        batches = ((transform(images), labels) for images, labels in batches)
    return _in_background(batches) if prefetch else batches


def _in_background(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """``items``, produced by a thread that keeps up to ``depth`` items ahead; its exception re-raised here.

    Stopping early (break, or an exception in the loop) stops the thread at its next item.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        # one thread for torch's operations here (the setting is this thread's own): a second team of
        # OpenMP threads would spin on the cores the training step's team computes on
        torch.set_num_threads(1)
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            ready.put((done, None))
        except BaseException as error:  # handed to the consumer, raised there
            ready.put((done, error))

    thread = threading.Thread(target=produce, name="vitcraft-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting to put, then let it see the stop
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.1)
        thread.join()
