"""Photos of any shape: the training split keeps each image whole, and random crops come from all of it.

References: torchvision's Resize(int) for how an image is stored, and torchvision's
functional resized_crop for each crop of a batch of images of different shapes.
"""

import numpy as np
import pytest
import torch
from conftest import CLASSES, small_run, train_quietly
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from vitcraft import data as data_module
from vitcraft.augment import BatchAugment, Normalization, resized_crop_normalised, sample_crop_boxes
from vitcraft.data import RaggedImages, iterate_batches, load_splits, read_image
from vitcraft.errors import VitcraftError
from vitcraft.export import calibration_images

SHAPES = [(48, 32), (32, 48), (40, 40), (96, 30), (36, 44)]  # (width, height): landscape, portrait, square, wide


@pytest.fixture
def photos(tmp_path):
    """Photos of five shapes in each class, JPEG and PNG; train/ and test/ hold the same files."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for label, name in enumerate(CLASSES):
        for i, (width, height) in enumerate(SHAPES):
            pixels = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
            pixels[:, :, label] = np.linspace(0, 255, width).astype(np.uint8)  # a ramp: resizing shows
            for split in ("train", "test"):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    return root


def files(root, split="train"):
    return [path for name in sorted(CLASSES) for path in sorted((root / split / name).iterdir())]


def test_the_training_split_keeps_each_image_whole(photos, tmp_path):
    train, test = load_splits(str(photos), image_size=24, cache_dir=tmp_path / "cache", crop_pct=0.75)
    assert isinstance(train.images, RaggedImages) and test.images.shape == (15, 3, 24, 24)
    assert train.image_size == 32 and train.images.shape == (15, 3, 32, 32)  # every shorter side: 24 / 0.75
    for i, path in enumerate(files(photos)):
        with Image.open(path) as image:
            expected = TF.pil_to_tensor(TF.resize(image.convert("RGB"), [32]))  # torchvision's Resize(32)
        assert torch.equal(train.images.image(i), expected), path
    assert train.images.nbytes == sum(image.numel() for image in train.images[torch.arange(15)])
    # read back from the cache: the same bytes, one file of them
    again, _ = load_splits(str(photos), image_size=24, cache_dir=tmp_path / "cache", crop_pct=0.75)
    assert torch.equal(again.images.flat, train.images.flat) and len(list((tmp_path / "cache").glob("*.u8"))) == 2


def test_an_exif_turned_photo_is_stored_upright(tmp_path):
    root = tmp_path / "turned"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        exif = Image.Exif()
        exif[0x0112] = 6  # turn 90 degrees clockwise: stored 30 wide and 20 high, upright 20 wide and 30 high
        Image.fromarray(np.full((20, 30, 3), 100, np.uint8)).save(root / split / "a" / "0.png", exif=exif)
        Image.fromarray(np.full((20, 20, 3), 50, np.uint8)).save(root / split / "a" / "1.png")
    train, _ = load_splits(str(root), image_size=10, cache_dir=tmp_path / "cache", crop_pct=1.0)
    assert [tuple(train.images.image(i).shape) for i in range(2)] == [(3, 15, 10), (3, 10, 10)]


def test_streamed_and_parallel_builds_give_the_same_images(photos, tmp_path, monkeypatch):
    serial, _ = load_splits(str(photos), image_size=24, cache_dir=tmp_path / "one", crop_pct=0.75)
    monkeypatch.setattr(data_module, "BUILD_BLOCK", 4)  # four blocks over two processes
    parallel, _ = load_splits(str(photos), image_size=24, cache_dir=tmp_path / "two", crop_pct=0.75, workers=2)
    assert torch.equal(parallel.images.flat, serial.images.flat)
    assert torch.equal(parallel.images.heights, serial.images.heights)
    streamed, _ = load_splits(str(photos), image_size=24, crop_pct=0.75, stream=True, workers=2)
    order = torch.randperm(15, generator=torch.Generator().manual_seed(0))
    for (images, labels), (expected, expected_labels) in zip(iterate_batches(streamed, order, 4),
                                                             iterate_batches(serial, order, 4)):
        assert isinstance(images, list) and [image.shape for image in images] == [e.shape for e in expected]
        assert all(torch.equal(a, b) for a, b in zip(images, expected)) and torch.equal(labels, expected_labels)


def test_a_bad_photo_is_left_out_and_the_others_keep_their_bytes(photos, tmp_path):
    expected, _ = load_splits(str(photos), image_size=24, cache_dir=tmp_path / "good", crop_pct=0.75)
    bad = files(photos)[6]  # a portrait PNG of the second class
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(VitcraftError, match=f"cannot read image {bad}"):
        load_splits(str(photos), image_size=24, cache_dir=tmp_path / "cache", crop_pct=0.75)
    train, _ = load_splits(str(photos), image_size=24, cache_dir=tmp_path / "cache", crop_pct=0.75,
                           skip_bad_images=True)
    kept = [i for i in range(15) if i != 6]
    assert len(train) == 14 and str(bad) in train.skipped[0]
    assert torch.equal(train.labels, expected.labels[kept])
    for row, i in enumerate(kept):
        assert torch.equal(train.images.image(row), expected.images.image(i))


def test_crop_boxes_fit_each_image_and_a_common_size_draws_as_before():
    heights, widths = torch.tensor([32, 48, 30, 300]), torch.tensor([48, 32, 96, 30])
    boxes = sample_crop_boxes(4, heights, widths, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (top + h <= heights) & (left + w <= widths) & (h > 0)).all())
    # a common size given per image draws exactly what the one size draws
    same = sample_crop_boxes(6, torch.full((6,), 20), torch.full((6,), 24), (0.3, 1.0), (3 / 4, 4 / 3),
                             torch.Generator().manual_seed(1))
    assert torch.equal(same, sample_crop_boxes(6, 20, 24, (0.3, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1)))
    # no box fits a 10:1 image at 90-100% of its area: torchvision's fallback, the centre crop at ratio 4/3
    (fallback,) = sample_crop_boxes(1, torch.tensor([10]), torch.tensor([100]), (0.9, 1.0), (3 / 4, 4 / 3))
    assert fallback.tolist() == [0, 43, 10, 13]


def test_each_crop_of_a_list_equals_torchvision_on_that_image():
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
              for h, w in [(32, 48), (48, 32), (30, 96)]]
    boxes = torch.tensor([[2.0, 5, 20, 30], [0, 0, 48, 32], [3, 40, 24, 50]])
    flips = torch.tensor([False, True, False])
    crops = resized_crop_normalised(images, boxes, (16, 16), flips, None)
    for crop, image, (top, left, h, w), mirror in zip(crops, images, boxes.long().tolist(), flips):
        source = TF.horizontal_flip(image) if mirror else image
        expected = TF.resized_crop(source, top, left, h, w, [16, 16], antialias=False)
        assert int((crop.int() - expected.int()).abs().max()) <= 1
    normalization = Normalization()
    normalised = resized_crop_normalised(images, boxes, (16, 16), flips, normalization)
    torch.testing.assert_close(normalised, normalization(crops), rtol=0, atol=1e-6)


def test_a_policy_sees_the_crops_of_a_list_and_a_batch_before_its_crop():
    seen = []

    def policy(images, generator):
        seen.append((images.dtype, tuple(images.shape)))
        return images

    augment = BatchAugment(Normalization(), output_size=16)
    mixed = [torch.zeros(3, 32, 48, dtype=torch.uint8), torch.zeros(3, 48, 32, dtype=torch.uint8)]
    assert augment(mixed, policy=policy).shape == (2, 3, 16, 16)
    assert augment(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), policy=policy).shape == (2, 3, 16, 16)
    assert seen == [(torch.uint8, (2, 3, 16, 16)), (torch.uint8, (2, 3, 32, 32))]


def test_calibration_takes_the_evaluation_crop_of_whole_training_images(photos, tmp_path):
    train, test = load_splits(str(photos), image_size=24, cache_dir=tmp_path / "cache", crop_pct=0.75)
    normalization = Normalization()
    calibration = calibration_images(train, normalization, 15, 24)
    order = torch.randperm(15, generator=torch.Generator().manual_seed(0))  # as calibration_images draws
    # the same files: the test crops (up to float rounding: normalised in another order of operations)
    torch.testing.assert_close(calibration, normalization(test.images[order]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("auto_augment", [None, "randaugment"])
def test_training_on_photos_of_any_shape(photos, tmp_path, auto_augment):
    run = small_run(photos, tmp_path, epochs=1, batch_size=4, model={"image_size": 24, "patch_size": 8})
    run.data.image_size, run.data.crop_pct, run.train.auto_augment = 24, 0.75, auto_augment
    record = train_quietly(run, tmp_path / "run")
    assert record["epoch"] == 1 and np.isfinite(record["train_loss"])


def test_read_image_keeps_the_shape(photos):
    path = files(photos)[3]  # 96 x 30
    assert read_image(path, "RGB", 15, keep_shape=True).shape == (15, 48, 3)


def test_the_samples_figure_draws_whole_training_images(photos, tmp_path):
    from vitcraft.plots import draw_samples

    train, _ = load_splits(str(photos), image_size=24, cache_dir=tmp_path / "cache", crop_pct=0.75)
    augment = BatchAugment(Normalization(), output_size=24)
    path = draw_samples(tmp_path / "samples.png", train, augment, train.class_names)
    with Image.open(path) as figure:
        assert figure.width > 200 and figure.height > 200


def test_a_labelled_subset_of_whole_images_keeps_their_shapes(photos, tmp_path):
    from vitcraft.data import per_class_subset

    train, _ = load_splits(str(photos), image_size=24, cache_dir=tmp_path / "cache", crop_pct=0.75)
    subset = per_class_subset(train, 2, seed=0)
    assert isinstance(subset.images, RaggedImages) and len(subset) == 6
    chosen = [i for i in range(15) if any(torch.equal(train.images.image(i), subset.images.image(row))
                                          for row in range(6))]
    assert len(chosen) == 6 and torch.equal(subset.labels, train.labels[chosen])
