"""timm's crop_pct: images resized on their shorter side and centre-cropped, never squashed.

The references are torchvision's own Resize(int) + CenterCrop, the transforms timm's
evaluation pipeline is made of.
"""

import argparse
import json

import numpy as np
import pytest
import torch
from conftest import CLASSES, write_folder_dataset
from PIL import Image
from torchvision import transforms
from torchvision.transforms.v2 import functional as TF

from vitcraft import data as data_module
from vitcraft.augment import BatchAugment, Normalization
from vitcraft.cli import _run_test_set, main
from vitcraft.config import DataConfig
from vitcraft.data import RaggedImages, load_splits
from vitcraft.errors import VitcraftError

TARGET, CROP_PCT, RESIZED = 16, 0.8, 20  # RESIZED = floor(TARGET / CROP_PCT), as timm
TINY = ["--epochs", "1", "--batch-size", "16", "--model-arg", "hidden_size=32", "--model-arg", "intermediate_size=64"]


def pattern(width: int, height: int, shade: int) -> Image.Image:
    """Ramps across and down with a checkerboard: squashing or shifting it changes many pixels."""
    y, x = np.mgrid[:height, :width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x // 3 + y // 3) % 2 * 150 + shade], -1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """Non-square images, landscape (40 x 24) and portrait (24 x 40); train/ and test/ hold the same files."""
    root = write_folder_dataset(tmp_path_factory.mktemp("crop") / "data", per_class=(2, 2))
    for path in root.rglob("*.png"):
        size = (40, 24) if int(path.stem) % 2 == 0 else (24, 40)
        pattern(*size, shade=20 * CLASSES.index(path.parent.name)).save(path)
    return root


def split_files(root, split):
    """The split's files in the order load_splits holds them: classes sorted, then files sorted."""
    return [path for name in sorted(CLASSES) for path in sorted((root / split / name).glob("*.png"))]


def torchvision_prepared(path, resize_to: int, crop: int | None) -> torch.Tensor:
    """timm's evaluation preprocessing of one file, without normalisation: (C, crop, crop) uint8;
    without ``crop``, the whole image with its shorter side resized: (C, H, W)."""
    resize = transforms.Resize(resize_to, transforms.InterpolationMode.BILINEAR)
    prepare = transforms.Compose([resize, transforms.CenterCrop(crop)]) if crop else resize
    with Image.open(path) as image:
        return torch.from_numpy(np.array(prepare(image.convert("RGB")))).permute(2, 0, 1)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


def test_non_square_images_are_cropped_not_squashed(wide_folder, tmp_path):
    train, test = load_splits(str(wide_folder), image_size=TARGET, cache_dir=tmp_path, crop_pct=CROP_PCT)
    assert test.images.shape == (6, 3, TARGET, TARGET)
    # the training images are kept whole, their shorter side resized: landscapes and portraits
    assert isinstance(train.images, RaggedImages) and train.images.shape == (6, 3, RESIZED, RESIZED)
    longer = int(RESIZED * 40 / 24)
    shapes = [tuple(train.images.image(i).shape) for i in range(len(train))]
    for image, path in zip(test.images, split_files(wide_folder, "test")):
        assert max_difference(image, torchvision_prepared(path, RESIZED, TARGET)) <= 1, path
        with Image.open(path) as file:  # the comparison tells the two apart
            squashed = torch.from_numpy(np.array(file.convert("RGB").resize((TARGET, TARGET), Image.BILINEAR)))
        assert (image.float() - squashed.permute(2, 0, 1).float()).abs().mean() > 10
    files = split_files(wide_folder, "train")
    assert shapes == [(3, RESIZED, longer) if int(path.stem) % 2 == 0 else (3, longer, RESIZED) for path in files]
    for i, path in enumerate(files):
        assert max_difference(train.images.image(i), torchvision_prepared(path, RESIZED, None)) <= 1, path
    assert train.images.nbytes == sum(3 * RESIZED * longer for _ in files)


def test_batch_augment_outputs_the_target_size_and_its_centre_crop_is_the_test_image(wide_folder, tmp_path):
    train, test = load_splits(str(wide_folder), image_size=TARGET, cache_dir=tmp_path, crop_pct=CROP_PCT)
    normalization = Normalization()
    augment = BatchAugment(normalization, crop_scale=(0.5, 1.0), output_size=TARGET)
    batch = train.batch(torch.arange(len(train)))  # a list: the shapes differ
    assert augment(batch, torch.Generator().manual_seed(0)).shape == (6, 3, TARGET, TARGET)
    centre = BatchAugment(normalization, flip_p=0.0, crop_scale=None, output_size=TARGET)
    torch.testing.assert_close(centre(batch), normalization(test.images), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="output_size"):  # no size to batch them at
        BatchAugment(normalization)(batch)
    # square training images (a torchvision dataset's) are one tensor, as before
    square = torch.randint(0, 256, (2, 3, RESIZED, RESIZED), dtype=torch.uint8)
    assert BatchAugment(normalization)(square).shape == (2, 3, RESIZED, RESIZED)


def test_torchvision_datasets_are_prepared_alike(monkeypatch, tmp_path):
    class FakeCifar:  # the attributes torchvision's CIFAR10 has
        classes = ["a", "b"]

        def __init__(self, root, train, download):
            generator = torch.Generator().manual_seed(int(train))
            self.data = torch.randint(0, 256, (4, 32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
            self.targets = [0, 1, 0, 1]

    monkeypatch.setattr(data_module, "_torchvision_sets", lambda: {"cifar10": (FakeCifar, "train_flag")})
    train, test = load_splits("cifar10", data_root=tmp_path, image_size=TARGET, crop_pct=CROP_PCT)
    assert train.images.shape == (4, 3, RESIZED, RESIZED) and test.images.shape == (4, 3, TARGET, TARGET)
    raw = torch.from_numpy(FakeCifar(None, False, False).data).permute(0, 3, 1, 2)
    expected = TF.center_crop(TF.resize(raw, [RESIZED], antialias=True), [TARGET])
    assert max_difference(test.images, expected) <= 1
    # at the data's own size (32): the test split is the centre 32 x 32 of 40 x 40
    train, test = load_splits("cifar10", data_root=tmp_path, crop_pct=CROP_PCT)
    assert train.image_size == 40 and test.image_size == 32


def test_the_cache_never_serves_another_crop(wide_folder, tmp_path):
    def sizes(crop_pct):
        train, test = load_splits(str(wide_folder), image_size=TARGET, cache_dir=tmp_path, crop_pct=crop_pct)
        return train.image_size, test.image_size

    first, _ = load_splits(str(wide_folder), image_size=TARGET, cache_dir=tmp_path, crop_pct=CROP_PCT)
    assert sizes(CROP_PCT) == (RESIZED, TARGET)
    assert sizes(0.5) == (32, TARGET)
    assert sizes(None) == (TARGET, TARGET)
    again, _ = load_splits(str(wide_folder), image_size=TARGET, cache_dir=tmp_path, crop_pct=CROP_PCT)
    assert torch.equal(first.images.flat, again.images.flat)
    assert len(list(tmp_path.glob("*.safetensors"))) == 6  # train and test for each of the three


def test_no_crop_pct_is_the_squashing_resize_as_before(wide_folder, tiny_folder, tmp_path):
    for folder, size in ((wide_folder, TARGET), (tiny_folder, None)):
        before = load_splits(str(folder), image_size=size, cache_dir=tmp_path / "before")
        now = load_splits(str(folder), image_size=size, cache_dir=tmp_path / "now", crop_pct=None)
        for old, new in zip(before, now):
            assert torch.equal(old.images, new.images) and torch.equal(old.labels, new.labels)


def test_train_with_crop_pct_end_to_end(wide_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(wide_folder), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--crop-pct", "0.875", "--image-size", "16", "--no-tensorboard", *TINY]) == 0
    metadata = json.loads((out / "model.json").read_text())
    assert metadata["model_config"]["image_size"] == 16
    assert json.loads((out / "run.json").read_text())["run"]["data"]["crop_pct"] == 0.875
    # eval and viz see what training evaluated on: the centre 16 of the shorter side resized to 18
    args = argparse.Namespace(data=None, data_root=None, cache_dir=None, image_size=None)
    _, expected = load_splits(str(wide_folder), image_size=16, cache_dir=tmp_path / "cache", crop_pct=0.875)
    assert torch.equal(_run_test_set(out, args, metadata).images, expected.images)
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    assert "top-1" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_bad_crop_pct_is_one_clear_error(value, wide_folder, capsys):
    assert main(["train", "--data", str(wide_folder), "--crop-pct", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitcraft: error: crop_pct") and "(0, 1]" in err and err.count("\n") == 1
    with pytest.raises(VitcraftError, match=r"crop_pct .* \(0, 1\]"):
        DataConfig(crop_pct=float(value))
