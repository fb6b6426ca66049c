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
import hashlib
import json
import math
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from vitcraft.augment import shorter_side_crop
from vitcraft.errors import VitcraftError
from vitcraft.files import atomic_write, load_tensors, save_tensors_atomic
from vitcraft.files import cache_dir as default_cache_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DOWNLOAD_TIMEOUT_SECONDS = 30


@dataclass
class ImageTensorDataset:
    """One split of a dataset in memory.

    images: (N, C, H, W) uint8; labels: (N,) int64; class_names: one per class.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def num_channels(self) -> int:
        return self.images.shape[1]

    def to(self, device: torch.device | str) -> "ImageTensorDataset":
        return ImageTensorDataset(self.images.to(device), self.labels.to(device), self.class_names)


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
               crop: int | None = None) -> np.ndarray:
    """Decode one image file to a (H, W, C) uint8 array in ``mode`` ("RGB" or "L").

    With ``image_size``, it is resized to image_size x image_size (as the
    tutorial's ``Resize((size, size))``); with ``crop`` too, its shorter side
    is resized to image_size instead, keeping the aspect ratio, and the centre
    crop x crop kept (timm's evaluation ``Resize(size)``, ``CenterCrop(crop)``;
    the array is then (crop, crop, C)). ``path`` may also be a binary file
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
        return prepare_image(image, mode, image_size, crop=crop)


EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how the camera was turned; 1: upright


def _exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1 when it has none, or EXIF data Pillow cannot parse, as viewers treat it)."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF blocks raise assorted errors inside Pillow
        return 1


def prepare_image(image: Image.Image, mode: str, image_size: int | None, *, crop: int | None = None) -> np.ndarray:
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


def probe_folder(root: Path) -> tuple[str, int]:
    """(mode, image_size) of a folder dataset, from its first training image."""
    train, _ = find_split_dirs(root)
    files, _ = _list_images(train)
    path = files[0][0]
    with _decoding(path), Image.open(path) as image:
        return probe_image(image)


def probe_image(image: Image.Image) -> tuple[str, int]:
    """(mode, image_size) of a dataset whose first training image is ``image``: "L" or "RGB"; its largest side."""
    mode = "L" if image.mode in ("L", "1", "I") or image.mode.startswith("I;16") else "RGB"
    return mode, max(image.size)


def crop_pct_geometry(image_size: int, crop_pct: float, split: str) -> tuple[int, int]:
    """(shorter side, centre crop) of the ``split`` ("train" or "test") of data prepared with timm's ``crop_pct``.

    Both splits resize each image's shorter side to S = floor(image_size /
    crop_pct), as timm's evaluation transform does. The test split keeps the centre image_size x image_size, what the
    model evaluates on; the training split the centre S x S, from which
    BatchAugment's random crops are drawn (at ``output_size`` = image_size).
    """
    shorter_side = math.floor(image_size / crop_pct)
    return shorter_side, shorter_side if split == "train" else image_size


def _decode_images(count: int, decode_one: Callable[[int, int, int | None], np.ndarray], mode: str,
                   image_size: int, crop_pct: float | None, split: str) -> torch.Tensor:
    """(count, C, S, S) uint8: image i is ``decode_one(i, resize_to, crop)``, a (S, S, C) array.

    S is image_size, or with ``crop_pct`` what ``crop_pct_geometry`` gives the
    ``split`` ("train" or "test"); decode_one gets the arguments of ``prepare_image``.
    """
    channels = 1 if mode == "L" else 3
    resize_to, crop = crop_pct_geometry(image_size, crop_pct, split) if crop_pct is not None else (image_size, None)
    size = crop or image_size
    images = torch.empty(count, channels, size, size, dtype=torch.uint8)
    for i in range(count):
        images[i] = torch.from_numpy(decode_one(i, resize_to, crop)).permute(2, 0, 1)  # HWC -> CHW
    return images


def _decode_folder(split_dir: Path, mode: str, image_size: int, crop_pct: float | None = None,
                   split: str = "train") -> ImageTensorDataset:
    files, class_names = _list_images(split_dir)
    images = _decode_images(len(files), lambda i, size, crop: read_image(files[i][0], mode, size, crop=crop),
                            mode, image_size, crop_pct, split)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageTensorDataset(images, labels, class_names)


def _folder_fingerprint(split_dir: Path, mode: str, image_size: int, crop_pct: float | None = None,
                        split: str = "train") -> str:
    """Changes when any file is added, removed, resized or touched, or the images are prepared otherwise."""
    key = f"{split_dir.resolve()}|{mode}|{image_size}|v2"  # v2: EXIF orientation applied
    if crop_pct is not None:  # appended only with a crop_pct, so the caches made without one stay valid
        key += f"|crop_pct={crop_pct!r}|{split}"
    digest = hashlib.sha1(key.encode())
    for path in sorted(split_dir.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(split_dir)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _load_folder_cached(split_dir: Path, mode: str, image_size: int, cache_dir: Path | None,
                        crop_pct: float | None = None, split: str = "train") -> ImageTensorDataset:
    cache_file = None
    if cache_dir is not None:
        key = _folder_fingerprint(split_dir, mode, image_size, crop_pct, split)
        cache_file = cache_dir / f"{split_dir.parent.name}-{split_dir.name}-{key}.safetensors"
    return _cached(cache_file, lambda: _decode_folder(split_dir, mode, image_size, crop_pct, split))


def _cached(cache_file: Path | None, decode: Callable[[], ImageTensorDataset]) -> ImageTensorDataset:
    """What ``decode()`` returns, read from ``cache_file`` if an earlier call saved it there (None: no cache).

    The images are kept in a .npy file beside it (``cache_file`` with the suffix
    .npy) and memory-mapped when read back: batches are read from the page cache
    by index, so a large set does not fill the process's own memory, and every
    process (each torchrun rank) shares the same pages. ``cache_file`` holds the
    labels and class names and is written last, so a cache whose build was
    killed half-way has none and is built again.
    """
    if cache_file is None:
        return decode()
    images_file = cache_file.with_suffix(".npy")
    if cache_file.exists() and images_file.exists():
        try:
            tensors, metadata = load_tensors(cache_file)
            # copy-on-write: writable for torch (no warning), the file's pages shared until written
            images = torch.from_numpy(np.load(images_file, mmap_mode="c"))
            if images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(tensors["labels"]):
                return ImageTensorDataset(images, tensors["labels"], json.loads(metadata["class_names"]))
        except (VitcraftError, KeyError, ValueError, OSError, json.JSONDecodeError):
            pass  # a damaged cache is rebuilt, never trusted
    dataset = decode()
    cache_file.parent.mkdir(parents=True, exist_ok=True)

    def write_images(temp: str) -> None:
        with open(temp, "wb") as file:  # a file object: np.save would add .npy to a path
            np.save(file, dataset.images.numpy())

    atomic_write(images_file, write_images)
    save_tensors_atomic(cache_file, {"labels": dataset.labels}, {"class_names": json.dumps(dataset.class_names)})
    return dataset


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


def _hf_fingerprint(source: str, split_name: str, split: Any, mode: str, image_size: int,
                    crop_pct: float | None) -> str:
    """Changes when the datasets library's fingerprint of the split changes, or the images are prepared otherwise."""
    key = json.dumps([source, split_name, split._fingerprint, mode, image_size, crop_pct, "v2"])
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _decode_hf_split(split: Any, image_column: str, label_column: str, where: str, mode: str, image_size: int,
                     crop_pct: float | None, role: str) -> ImageTensorDataset:
    class_names = list(split.features[label_column].names)
    labels = torch.tensor(list(split[label_column]), dtype=torch.int64)
    outside = labels[(labels < 0) | (labels >= len(class_names))]
    if len(outside):
        raise VitcraftError(f"{where} has {len(outside)} labels outside 0..{len(class_names) - 1}, such as "
                            f"{int(outside[0])} (-1 marks an unlabelled image); train and test need labelled images")
    images = split.select_columns([image_column])  # rows read only the image column

    def decode_one(i: int, size: int, crop: int | None) -> np.ndarray:
        with _decoding(f"{i} of {where}"):
            return prepare_image(images[i][image_column], mode, size, crop=crop)

    return ImageTensorDataset(_decode_images(len(split), decode_one, mode, image_size, crop_pct, role),
                              labels, class_names)


def _load_hf(data: str, image_size: int | None, cache_dir: Path | None,
             crop_pct: float | None) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """(train, test) of ``hf:NAME[:CONFIG]`` or a save_to_disk folder, decoded as folders are and cached alike."""
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
        mode, probed_size = probe_image(splits["train"][0][columns["train"][0]])
    size = image_size or probed_size
    prefix = re.sub(r"[^\w.-]+", "-", cache_name)  # a hub name's "/" and a config's odd characters

    def load(name: str, role: str) -> ImageTensorDataset:
        cache_file = None
        if cache_dir is not None:
            key = _hf_fingerprint(source, name, splits[name], mode, size, crop_pct)
            cache_file = cache_dir / f"{prefix}-{name}-{key}.safetensors"
        return _cached(cache_file, lambda: _decode_hf_split(splits[name], *columns[name], wheres[name], mode, size,
                                                            crop_pct, role))

    return load("train", "train"), load(test_name, "test")


# -------------------------------------------------------------------- public
def load_splits(data: str, data_root: Path | None = None, image_size: int | None = None,
                cache_dir: Path | None = None, *,
                crop_pct: float | None = None) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """(train, test) splits of a torchvision dataset name, an ImageFolder-layout folder or a Hugging Face dataset.

    Hugging Face: ``hf:NAME[:CONFIG]`` (``datasets.load_dataset``) or a folder
    holding ``dataset_dict.json`` (``datasets.load_from_disk``); its one
    ``Image`` column holds the images, its one ``ClassLabel`` column the labels
    and class names, and its "train" and "test" (else "validation") splits are used.

    ``image_size`` resizes every image to that square size (default: the data's own size).
    With ``crop_pct`` (timm's, in (0, 1]) nothing is squashed: image_size is the
    test split's size and each image's shorter side is resized to image_size /
    crop_pct first (see ``crop_pct_geometry``), the training split keeping the
    larger centre square. Folder and Hugging Face datasets are decoded once and cached as uint8 in ``cache_dir``.
    """
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    if data.startswith(HUB_PREFIX) or is_saved_dataset_dict(Path(data).expanduser()):
        return _load_hf(data, image_size, cache_dir, crop_pct)
    name = data.lower()
    if name in TORCHVISION_NAMES and not Path(data).is_dir():
        root = data_root or cache_dir / "datasets"
        train, test = (_load_torchvision(name, split, root) for split in ("train", "test"))
        if crop_pct is not None:
            size = image_size or train.image_size
            train, test = (resize_dataset(dataset, *crop_pct_geometry(size, crop_pct, split))
                           for dataset, split in ((train, "train"), (test, "test")))
        elif image_size is not None and image_size != train.image_size:
            train, test = resize_dataset(train, image_size), resize_dataset(test, image_size)
        return train, test
    root = Path(data).expanduser()
    train_dir, test_dir = find_split_dirs(root)
    mode, probed_size = probe_folder(root)
    size = image_size or probed_size
    train = _load_folder_cached(train_dir, mode, size, cache_dir, crop_pct, "train")
    test = _load_folder_cached(test_dir, mode, size, cache_dir, crop_pct, "test")
    if test.class_names != train.class_names:
        raise VitcraftError(f"{test_dir} and {train_dir} have different class folders: "
                            f"{test.class_names} vs {train.class_names}")
    return train, test


def resize_dataset(dataset: ImageTensorDataset, image_size: int, crop: int | None = None) -> ImageTensorDataset:
    """All images bilinearly resized to image_size x image_size (still uint8).

    With ``crop``, as ``read_image``: the shorter side resized to image_size,
    then the centre crop x crop kept. Out: (N, C, crop, crop).
    """
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


def iterate_batches(dataset: ImageTensorDataset, order: torch.Tensor, batch_size: int, *,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images (b, C, H, W), labels (b,)) in ``order``."""
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size].to(dataset.images.device)
        yield dataset.images[index], dataset.labels[index]
