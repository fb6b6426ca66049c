"""Shared fixtures: a tiny generated image-folder dataset that a model can learn in seconds,
and the small runs the tests train on it (``small_run``, ``train_quietly``)."""

import contextlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from PIL import Image

if TYPE_CHECKING:
    from vitcraft.runs import RunConfig

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
    """90 training and 24 test images of 8 x 8 pixels, 3 classes."""
    return write_folder_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def folder32(tmp_path_factory) -> Path:
    """48 training and 12 test images of 32 x 32 pixels, 3 classes: the variants' native size."""
    return write_folder_dataset(tmp_path_factory.mktemp("tiny32") / "data", per_class=(16, 4), size=32)


# --------------------------------------------------------------------------- small runs
SMALL_VIT = {"hidden_size": 32, "intermediate_size": 64}  # seed-tiny narrowed: 4 blocks of 4 heads
SMALL_TRAIN = dict(epochs=2, batch_size=16, eval_batch_size=32, learning_rate=3e-3, seed=1, num_threads=1)
# vitcraft is imported where it is used, so a test file that trains nothing runs even while train.py is broken


def small_run(folder: Path | str, tmp_path: Path, preset: str = "seed-tiny", model: dict[str, Any] | None = None,
              **train_settings) -> "RunConfig":
    """The run config of a small run on the image folder ``folder``, its data cache in ``tmp_path/cache``.

    ``model``: overrides of the preset's model config (default SMALL_VIT, for seed-tiny;
    pass ``{}`` for the preset as it is). ``train_settings`` override SMALL_TRAIN (TrainConfig fields).
    One thread by default, so runs are repeatable and two of them add their sums in one order.
    """
    from vitcraft.config import DataConfig, TrainConfig
    from vitcraft.runs import RunConfig

    return RunConfig(preset=preset, model=dict(SMALL_VIT if model is None else model),
                     train=TrainConfig(**{**SMALL_TRAIN, **train_settings}),
                     data=DataConfig(data=str(folder), cache_dir=str(Path(tmp_path) / "cache")))


def train_quietly(run: "RunConfig", out: Path | str, stdout: io.StringIO | None = None, **options) -> dict[str, Any]:
    """``train(run, out)`` with no progress bar, log lines, figures or TensorBoard files; its last record.

    ``options`` go to ``train`` (``resume=True``, ``figures=True``, ``tensorboard=True``, ...).
    What the run prints (the figures' notes) goes into ``stdout`` if given, else nowhere.
    The process's torch thread count, which training sets, is restored after.
    """
    from vitcraft.train import train

    options = {"progress": False, "figures": False, "tensorboard": False, "log": lambda *_: None, **options}
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO() if stdout is None else stdout):
            return train(run, out, **options)
    finally:
        torch.set_num_threads(threads)


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
