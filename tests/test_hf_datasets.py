"""Hugging Face datasets as training data: ``--data hf:NAME[:CONFIG]`` and DatasetDict.save_to_disk folders.

No network: the hub's ``load_dataset`` is replaced by one returning an in-memory DatasetDict.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, make_image

from vitcraft import cli
from vitcraft.data import load_splits
from vitcraft.errors import VitcraftError

datasets = pytest.importorskip("datasets")

PER_CLASS = {"train": 10, "test": 3}  # 30 training and 9 test images of 8 x 8


def make_images() -> dict[str, list[tuple]]:
    """{split: [(PIL image, label), ...]}, in the order an ImageFolder of them is read: by class, then by file."""
    rng = np.random.default_rng(0)
    return {split: [(make_image(label, rng), label) for label in range(len(CLASSES)) for _ in range(count)]
            for split, count in PER_CLASS.items()}


def make_dict(images: dict[str, list[tuple]], *, image_feature=None, label_feature=None,
              split_names: dict[str, str] | None = None) -> "datasets.DatasetDict":
    """The images as a DatasetDict with columns "img" and "label"; ``split_names`` renames splits."""
    features = datasets.Features({"img": image_feature or datasets.Image(),
                                  "label": label_feature or datasets.ClassLabel(names=list(CLASSES))})
    split_names = split_names or {}
    return datasets.DatasetDict({
        split_names.get(split, split): datasets.Dataset.from_dict(
            {"img": [image for image, _ in rows], "label": [label for _, label in rows]}, features=features)
        for split, rows in images.items()})


@pytest.fixture(scope="module")
def images():
    return make_images()


@pytest.fixture(scope="module")
def saved(images, tmp_path_factory) -> Path:
    """A save_to_disk folder of the images."""
    root = tmp_path_factory.mktemp("hf") / "saved"
    make_dict(images).save_to_disk(str(root))
    return root


def write_folder(images: dict[str, list[tuple]], root: Path) -> Path:
    for split, rows in images.items():
        for i, (image, label) in enumerate(rows):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:03d}.png")
    return root


def assert_same(got, expected) -> None:
    for split_got, split_expected in zip(got, expected):
        assert split_got.images.dtype == torch.uint8
        assert torch.equal(split_got.images, split_expected.images)
        assert torch.equal(split_got.labels, split_expected.labels)
        assert split_got.class_names == split_expected.class_names


def test_saved_folder_loads_as_the_same_images_as_an_image_folder(images, saved, tmp_path):
    folder = write_folder(images, tmp_path / "folder")
    train, test = load_splits(str(saved), cache_dir=tmp_path / "cache")
    assert train.images.shape == (30, 3, 8, 8) and test.images.shape == (9, 3, 8, 8)
    assert train.class_names == list(CLASSES)
    assert_same((train, test), load_splits(str(folder), cache_dir=tmp_path / "folder-cache"))
    assert len(list((tmp_path / "cache").glob("saved-*.safetensors"))) == 2
    assert_same(load_splits(str(saved), cache_dir=tmp_path / "cache"), (train, test))  # from the cache


def test_resize_and_crop_pct_match_an_image_folder(images, saved, tmp_path):
    folder = write_folder(images, tmp_path / "folder")
    for options in ({"image_size": 12}, {"image_size": 6, "crop_pct": 0.75}):
        assert_same(load_splits(str(saved), cache_dir=tmp_path / "cache", **options),
                    load_splits(str(folder), cache_dir=tmp_path / "folder-cache", **options))


def test_validation_split_is_the_test_split(images, tmp_path):
    root = tmp_path / "val"
    make_dict(images, split_names={"test": "validation"}).save_to_disk(str(root))
    _, test = load_splits(str(root), cache_dir=tmp_path / "cache")
    assert len(test) == 9 and test.labels.tolist() == [label for _, label in images["test"]]


@pytest.mark.parametrize("change, message", [
    ({"label_feature": datasets.Value("int64")}, "exactly one datasets.ClassLabel column for the labels, it has none; "
                                                 "its columns: img (Image), label (Value)"),
    ({"image_feature": datasets.Value("string")}, "exactly one datasets.Image column for the images, it has none"),
    ({"split_names": {"test": "extra"}},
     "must have a train split and a test (or validation) split; found: train, extra"),
])
def test_unusable_saved_dataset_gives_one_clear_error(change, message, tmp_path):
    rows = make_images()
    if "image_feature" in change:  # a column of strings in place of the images
        rows = {split: [(f"image {i}", label) for i, (_, label) in enumerate(split_rows)]
                for split, split_rows in rows.items()}
    root = tmp_path / "bad"
    make_dict(rows, **change).save_to_disk(str(root))
    with pytest.raises(VitcraftError, match="^[^\n]*$") as error:
        load_splits(str(root), cache_dir=tmp_path / "cache")
    assert message in str(error.value)


def test_hub_name_and_config_go_to_load_dataset(images, saved, tmp_path, monkeypatch):
    calls = []
    in_memory = make_dict(images)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args: calls.append(args) or in_memory)
    expected = load_splits(str(saved), cache_dir=tmp_path / "saved-cache")
    assert_same(load_splits("hf:some-org/tiny-bands:plain", cache_dir=tmp_path / "cache"), expected)
    assert_same(load_splits("hf:tiny-bands", cache_dir=None), expected)
    assert calls == [("some-org/tiny-bands", "plain"), ("tiny-bands", None)]


def test_offline_without_a_cached_copy_gives_one_line(tmp_path, monkeypatch, capsys):
    def offline(*_):  # what datasets raises with HF_DATASETS_OFFLINE=1 and no cached copy
        raise ConnectionError("Couldn't reach 'no-org/no-such' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(VitcraftError) as error:
        load_splits("hf:no-org/no-such", cache_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message and "no-org/no-such" in message and "OfflineModeIsEnabled" in message
    assert "HF_DATASETS_OFFLINE" in message and "save_to_disk" in message
    assert cli.main(["train", "--data", "hf:no-org/no-such", "--out", str(tmp_path / "run"),
                     "--cache-dir", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"vitcraft: error: {message}"]


def test_without_the_datasets_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets then raises ImportError
    with pytest.raises(VitcraftError, match=r"pip install 'vitcraft\[datasets\]'"):
        load_splits("hf:cifar10", cache_dir=tmp_path)


def test_train_end_to_end_on_a_saved_folder(saved, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(saved), "--epochs", "1", "--batch-size", "8", "--threads", "1",
                     "--no-figures", "--no-tensorboard", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                     "--model-arg", "hidden_size=32", "--model-arg", "intermediate_size=64"]) == 0
    assert (out / "model.safetensors").is_file()
