"""A trained model applied to image files and uploads: what ``vitcraft predict`` and ``vitcraft serve`` share.

:func:`load_predictor` reads a run directory (``model.json`` +
``model.safetensors``, as ``vitcraft train`` writes it) or a model folder
(``config.json`` + weights, as :func:`vitcraft.hub.save_pretrained` writes it)
into a :class:`Predictor`, which turns image files or uploaded bytes into the
model's input, top-k class probabilities and attention maps. Images are
decoded and resized exactly as training decoded its folder datasets
(:func:`vitcraft.data.read_image`), so a file gets the same answer from every
front end. :meth:`Predictor.predict_files` runs many files through the same
read and top-k in batches, as ``vitcraft predict`` does.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from vitcraft.attention_maps import attention_map_kind, maps_for_images, unavailable_map_reason
from vitcraft.augment import Normalization
from vitcraft.data import crop_pct_geometry, read_image
from vitcraft.errors import VitcraftError
from vitcraft.files import read_json
from vitcraft.hub import load_metadata
from vitcraft.model import ViTForClassification
from vitcraft.runs import MODEL_META_FILE, load_trained_model


class _NamedBytes(io.BytesIO):
    """Bytes that PIL reads as a file and error messages call by the upload's name."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __repr__(self) -> str:  # PIL puts repr(file) into "cannot identify image file ..."
        return self.label

    __str__ = __repr__


def colour_mode(num_channels: int) -> str:
    """The PIL mode a model with ``num_channels`` input channels reads: "L" (gray) or "RGB"."""
    return "L" if num_channels == 1 else "RGB"


def read_image_tensor(source: str | Path | bytes, metadata: dict, name: str | None = None,
                      max_pixels: int | None = None) -> torch.Tensor:
    """An image file's path or its bytes -> uint8 (C, H, W) as the model of ``metadata`` evaluates images:
    at its model_config's size and channel count, centre-cropped as its crop_pct says (if it has one).

    ``name`` labels bytes in error messages; ``max_pixels`` rejects larger
    images before they are decoded. Raises VitcraftError for anything unreadable.
    """
    if isinstance(source, bytes):
        source = _NamedBytes(source, name or "upload")
    model_config = metadata["model_config"]
    mode, size = colour_mode(model_config["num_channels"]), model_config["image_size"]
    if metadata.get("crop_pct"):  # the shorter side to size / crop_pct, then the centre size x size
        shorter_side, crop = crop_pct_geometry(size, metadata["crop_pct"])
        array = read_image(source, mode, shorter_side, max_pixels, crop=crop)  # (H, W, C)
    else:
        array = read_image(source, mode, size, max_pixels)
    return torch.from_numpy(array).permute(2, 0, 1)  # (C, H, W)


def read_images(paths: list[str | Path], metadata: dict) -> torch.Tensor:
    """Image files -> uint8 (B, C, H, W) for the model of ``metadata`` (see :func:`read_image_tensor`)."""
    return torch.stack([read_image_tensor(path, metadata) for path in paths])


def find_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files that ``paths`` name: a file as it is, a folder as every file in its tree, in sorted order.

    Nothing is opened, so non-image files are listed too. A path that does not
    exist raises VitcraftError naming it.
    """
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(item for item in path.rglob("*") if item.is_file()))
        elif path.exists():
            files.append(path)
        else:
            raise VitcraftError(f"{path} does not exist; give image files or folders of them")
    return files


@dataclass
class Predictor:
    """A model in eval mode with its metadata (model_config, class_names, mean, std) and device.

    Safe to share between threads: each model call holds ``lock`` and runs
    under ``torch.inference_mode``.
    """

    model: nn.Module
    metadata: dict
    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.class_names = list(self.metadata["class_names"])
        self.normalization = Normalization(tuple(self.metadata["mean"]), tuple(self.metadata["std"]))

    @property
    def image_size(self) -> int:
        """Side of the square input image, in pixels."""
        return self.metadata["model_config"]["image_size"]

    @property
    def num_channels(self) -> int:
        """Input channels: 1 (gray) or 3 (RGB)."""
        return self.metadata["model_config"]["num_channels"]

    @property
    def map_kind(self) -> str:
        """Which attention maps the model has: "cls", "pooling" or "none" (attention_maps.attention_map_kind)."""
        return attention_map_kind(self.model)

    @property
    def num_layers(self) -> int | None:
        """Blocks whose [CLS] attention can be drawn; None when the model has no [CLS] attention maps."""
        return self.metadata["model_config"].get("num_hidden_layers") if self.map_kind == "cls" else None

    @property
    def num_heads(self) -> int | None:
        """Heads per block; None when the model has no [CLS] attention maps."""
        return self.metadata["model_config"].get("num_attention_heads") if self.map_kind == "cls" else None

    def read(self, source: str | Path | bytes, name: str | None = None,
             max_pixels: int | None = None) -> torch.Tensor:
        """An image file's path or bytes -> uint8 (C, H, W) for this model (see :func:`read_image_tensor`)."""
        return read_image_tensor(source, self.metadata, name, max_pixels)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> class probabilities, float (B, K) on the CPU."""
        with self.lock, torch.inference_mode():
            logits = self.model(self.normalization(images.to(self.device)))[0]
        return logits.float().softmax(-1).cpu()

    def top_k(self, images: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """uint8 images (B, C, H, W) -> per image the ``k`` likeliest (class name, probability), best first.

        ``k`` is clipped to [1, number of classes].
        """
        k = max(1, min(k, len(self.class_names)))
        values, indices = self.probabilities(images).topk(k, dim=-1)  # (B, k) each
        return [[(self.class_names[i], p) for p, i in zip(row_p, row_i)]
                for row_p, row_i in zip(values.tolist(), indices.tolist())]

    def predict_files(self, paths: Iterable[str | Path], k: int = 5, batch_size: int = 64,
                      on_skip: Callable[[Path, VitcraftError], None] | None = None,
                      ) -> Iterator[tuple[Path, list[tuple[str, float]]]]:
        """Image files -> (path, :meth:`top_k` of its image) per readable file, in the order of ``paths``.

        Files are read with :meth:`read` and predicted ``batch_size`` images at a
        time, so only one batch of images is in memory. A file that cannot be
        read as an image goes to ``on_skip(path, error)``, or raises its
        VitcraftError if there is no ``on_skip``.
        """
        if batch_size < 1:
            raise VitcraftError(f"the batch size must be at least 1, got {batch_size}")
        batch: list[tuple[Path, torch.Tensor]] = []
        for path in map(Path, paths):
            try:
                batch.append((path, self.read(path)))
            except VitcraftError as error:
                if on_skip is None:
                    raise
                on_skip(path, error)
            if len(batch) == batch_size:
                yield from self._predict_batch(batch, k)
                batch = []
        if batch:
            yield from self._predict_batch(batch, k)

    def _predict_batch(self, batch: list[tuple[Path, torch.Tensor]], k: int,
                       ) -> Iterator[tuple[Path, list[tuple[str, float]]]]:
        """(path, uint8 image (C, H, W)) pairs -> (path, top-k) pairs."""
        paths, images = zip(*batch)
        yield from zip(paths, self.top_k(torch.stack(images), k))  # (B, C, H, W)

    def attention(self, images: torch.Tensor, method: str = "cls", layer: int = -1,
                  head: int | str = "mean") -> torch.Tensor | str:
        """uint8 images (B, C, H, W) -> float maps (B, g, g) of ``method`` ("cls" or "rollout"),
        as :func:`vitcraft.attention_maps.maps_for_images` computes them.

        For a model that has no such maps, the sentence saying why instead. A
        layer or head out of range raises VitcraftError.
        """
        reason = unavailable_map_reason(self.model, method)
        if reason:
            return reason
        with self.lock, torch.inference_mode():
            try:
                _, maps = maps_for_images(self.model, self.normalization(images.to(self.device)), method, layer, head)
            except ValueError as error:
                raise VitcraftError(str(error)) from None
        return maps.float().cpu()


def _is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a hub-style model folder rather than a run directory (which has model.json)."""
    if not path.is_dir() or (path / MODEL_META_FILE).is_file() or not (path / "config.json").is_file():
        return False
    config = read_json(path / "config.json")  # an old run directory's config.json holds the run, not a model type
    return isinstance(config, dict) and ("model_type" in config or "architecture" in config)


def _load_model_folder(directory: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """(model, metadata) of a save_pretrained folder, with what a run directory's metadata holds filled in."""
    model = ViTForClassification.from_pretrained(directory).to(device)
    metadata = load_metadata(directory)
    config = model.config
    metadata["model_config"] = config.to_dict()
    metadata.setdefault("class_names", [f"class {i}" for i in range(config.num_classes)])
    if len(metadata["class_names"]) != config.num_classes:
        raise VitcraftError(f"{directory} names {len(metadata['class_names'])} classes but the model has "
                            f"{config.num_classes} outputs")
    metadata.setdefault("mean", [0.5] * config.num_channels)  # the tutorial's normalisation
    metadata.setdefault("std", [0.5] * config.num_channels)
    return model, metadata


def load_predictor(path: str | Path, device: torch.device | str = "cpu") -> Predictor:
    """A :class:`Predictor` for a run directory, or a model folder with config.json + weights.

    A folder whose config.json names a model type is read with
    :meth:`ViTForClassification.from_pretrained`; anything else as a run directory.
    Raises VitcraftError or FileNotFoundError naming what is missing.
    """
    path, device = Path(path), torch.device(device)
    if _is_model_folder(path):
        model, metadata = _load_model_folder(path, device)
    else:  # a run directory, or an error saying what a run directory lacks
        model, metadata = load_trained_model(path, device)
    return Predictor(model.eval(), metadata, device)
