"""Shared fixtures: a tiny generated image-folder dataset that a model can learn in seconds."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ("bottom", "middle", "top")


def make_image(label: int, rng: np.random.Generator, size: int = 8, mode: str = "RGB") -> Image.Image:
    """A noisy image whose bright band of rows (bottom, middle or top) is its class.

    Horizontal bands, so that the tutorial's horizontal flip keeps the class.
    """
    pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    third = size // 3
    region = [np.s_[-third:, :], np.s_[third:-third, :], np.s_[:third, :]][label]
    pixels[region] += 150
    return Image.fromarray(pixels).convert(mode)


def write_folder_dataset(root: Path, per_class=(30, 8), size: int = 8, mode: str = "RGB",
                         classes=CLASSES, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_image(label, rng, size, mode).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return write_folder_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Never touch the user's ~/.cache from tests.

    Session-scoped (autouse fixtures run first in their scope), so module-scoped
    fixtures that train a run already see it; a function-scoped one came too late for them.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITCRAFT_CACHE", str(tmp_path_factory.getbasetemp() / "vitcraft-cache"))
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
