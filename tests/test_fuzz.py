"""Hundreds of malformed configs and image files, seeded: each ends in one clear error or loads, in bounded time.

Configs go through ViTConfig.from_dict, RunConfig.from_dict, load_run_config_file
and the CLI's merge of a --config file: the only exception allowed is
ValueError (VitcraftError is one) with a message. Image files go through
data.read_image and load_splits: either a VitcraftError naming the file, or
a correct uint8 array. Odd but valid files (palette, CMYK, RGBA, 16-bit,
1x1) load, as read_image documents; nothing is skipped silently.

Each case runs under a SIGALRM time limit, which stops a Python-level hang
(a loop or a huge repr) with a failure instead of stalling the suite.
"""

import contextlib
import dataclasses
import io
import json
import math
import random
import signal
import struct
import zlib

import numpy as np
import pytest
import yaml
from conftest import write_folder_dataset
from PIL import Image

from vitcraft.cli import build_parser, run_config_from_args
from vitcraft.config import DataConfig, TrainConfig, ViTConfig
from vitcraft.data import load_splits, read_image
from vitcraft.errors import VitcraftError
from vitcraft.runs import RunConfig, load_run_config, load_run_config_file

SECONDS_PER_CASE = 10
# values of every JSON/YAML type, in and out of range
ODD_VALUES = [-3, 0, 1, 7, 2**31, 10**30, -1e9, 0.5, 1.5, 1e300, math.nan, math.inf, -math.inf, True, False,
              None, "", "12", "sdpa", "gelu", "cls", [], [1], [0.5, 1.0], [0.1, 0.2, 0.3], ["a", "b"], {},
              {"a": 1}, [[[[1]]]]]
INT_FIELDS = ("image_size", "patch_size", "num_channels", "num_classes", "hidden_size", "num_hidden_layers",
              "num_attention_heads", "intermediate_size")
# each refused by every int field
BAD_INTS = [-3, 0, 2**31, 10**30, 1.5, math.nan, True, None, "12", [1], {"a": 1}]


@contextlib.contextmanager
def time_limit(seconds: float = SECONDS_PER_CASE):
    def expire(signum, frame):
        raise AssertionError(f"a fuzz case took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(parse, value):
    """parse(value) under the time limit: the result, or the ValueError it raised (anything else fails)."""
    with time_limit():
        try:
            return parse(value)
        except ValueError as error:
            assert str(error).strip(), f"an empty message for {value!r}"
            return error


# ------------------------------------------------------------------ configs
def model_case(rng: random.Random) -> tuple[object, bool]:
    """(a model config dict or other value, whether it is malformed for sure)."""
    if rng.random() < 0.05:
        return rng.choice([None, [], "hidden_size: 4", 3, [("hidden_size", 8)]]), True
    values = ViTConfig().to_dict()
    malformed = False
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.15:
            values[rng.choice(["hidden_sise", "dropout", "", "1", "num_layers"])] = rng.choice(ODD_VALUES)
            malformed = True
        elif roll < 0.5:
            values[rng.choice(INT_FIELDS)] = rng.choice(BAD_INTS)
            malformed = True
        else:  # any field, any value: valid or not, depending
            values[rng.choice(list(values))] = rng.choice(ODD_VALUES)
    return values, malformed


def train_case(rng: random.Random) -> dict:
    names = [f.name for f in dataclasses.fields(TrainConfig)] + ["epoch", "lr"]
    return {rng.choice(names): rng.choice(ODD_VALUES) for _ in range(rng.randint(1, 3))}


def data_case(rng: random.Random) -> dict:
    names = [f.name for f in dataclasses.fields(DataConfig)] + ["path"]
    return {rng.choice(names): rng.choice(ODD_VALUES) for _ in range(rng.randint(1, 2))}


def run_case(rng: random.Random) -> object:
    """A run config dict with one to three garbled sections (or not a dict at all)."""
    if rng.random() < 0.05:
        return rng.choice([None, [], "train: {}", 5])
    values = {"preset": "seed-tiny", "model": {"hidden_size": 32}, "train": {"epochs": 1}, "data": {"data": "x"}}
    for _ in range(rng.randint(1, 3)):
        section = rng.choice(["preset", "model", "train", "data", "extra", "garbage"])
        if section == "model":
            values["model"] = model_case(rng)[0]
        elif section == "train":
            values["train"] = train_case(rng)
        elif section == "data":
            values["data"] = data_case(rng)
        else:
            values[section if section != "garbage" else rng.choice(["preset", "model", "train", "data"])] = \
                rng.choice(ODD_VALUES)
    return values


@pytest.mark.parametrize("seed", range(150))
def test_malformed_model_configs_raise_value_error(seed):
    rng = random.Random(seed)
    for _ in range(2):
        values, malformed = model_case(rng)
        result = outcome(ViTConfig.from_dict, values)
        assert isinstance(result, (ViTConfig, ValueError))
        if malformed:
            assert isinstance(result, ValueError), values


@pytest.mark.parametrize("seed", range(150))
def test_malformed_run_configs_raise_value_error(seed):
    result = outcome(RunConfig.from_dict, run_case(random.Random(seed)))
    assert isinstance(result, (RunConfig, ValueError))
    if isinstance(result, RunConfig):  # accepted: then its values have the documented types
        assert all(isinstance(v, int) and not isinstance(v, bool) for v in
                   (result.train.epochs, result.train.batch_size, result.train.seed))
        assert math.isfinite(result.train.learning_rate) and isinstance(result.data.data, str)


def test_each_bad_int_is_refused_by_every_int_field():
    for name in INT_FIELDS:
        for value in BAD_INTS:
            with pytest.raises(ValueError, match=name):
                ViTConfig.from_dict({name: value})
    with pytest.raises(ValueError, match="layer_norm_eps must be a positive finite number, got inf"):
        ViTConfig(layer_norm_eps=math.inf)


# the shapes garbage in a config file takes
YAML_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + (chr(ord(n) - 1))] * 9)}]\n" for n in "bcdefghi") + "train:\n  epochs: *i\n"
FILE_TEXTS = [
    "", "   ", "null", "[]", "- 1\n- 2", "42", '"text"', "{", "{{{", "train: [", "train:\n\tepochs: 1",
    "model: 3", "train: {epochs: -1}", "train: {epochs: .nan}", "train: {learning_rate: .inf}",
    "train: {epochs: 1.5}", "train: {crop_scale: [0.5]}", "data: {std: [0, 1, 1]}", "preset: [vit]",
    "preset: no-such-model", "model: {hidden_size: '12'}", "model: {hidden_size: 1e400}", "? [a, b]\n: 1",
    "train: !!python/object/apply:os.system ['echo owned']", "train: {epochs: !!binary aGVsbG8=}",
    "train: {epochs: 2001-01-01}", "train: {seed: 99999999999999999999999}", "[" * 5000 + "]" * 5000,
    '{"train": {"epochs": NaN}}', '{"model": {"hidden_size": 1e999}}', YAML_BOMB,
]


def config_file_case(rng: random.Random, tmp_path, index: int):
    suffix = rng.choice([".yaml", ".yml", ".json"])
    path = tmp_path / f"config{index}{suffix}"
    roll = rng.random()
    if roll < 0.5:
        path.write_text(rng.choice(FILE_TEXTS))
    elif roll < 0.7:
        path.write_bytes(rng.randbytes(rng.randrange(64)))
    elif roll < 0.85:  # a valid-looking file cut short
        text = yaml.safe_dump(run_case(rng)) if suffix != ".json" else json.dumps(run_case(rng))
        path.write_text(text[:rng.randrange(len(text) + 1)])
    else:
        value = run_case(rng)
        path.write_text(yaml.safe_dump(value) if suffix != ".json" else json.dumps(value))
    return path


def test_malformed_config_files_raise_value_error(tmp_path):
    rng, parser = random.Random(99), build_parser()
    for index in range(120):
        path = config_file_case(rng, tmp_path, index)
        through_library = outcome(lambda p: RunConfig.from_dict(load_run_config_file(p)), path)
        through_cli = outcome(lambda p: run_config_from_args(parser.parse_args(["train", "--config", str(p)])),
                              path)
        for result in (through_library, through_cli):
            assert isinstance(result, (RunConfig, ValueError)), path.read_bytes()[:200]
            if isinstance(result, ValueError) and path.read_text(errors="replace") in FILE_TEXTS[:11]:
                assert str(path) in str(result)  # a file that is no config says which file


# what a user may type after a flag; commas reach the list flags
FLAG_TEXTS = ["", " ", "0", "-1", "1.5", "nan", "inf", "-inf", "1e400", "2147483648", "x", "none", "True",
              "1,2", "1,,2", ",", "0.5,x", "16,24,32"]


def test_malformed_flag_values_are_refused_by_argparse_or_the_config():
    """Every train flag built from a TrainConfig/DataConfig field, with odd text: argparse's usage error
    (exit 2), one ValueError, or a RunConfig holding the value."""
    rng, parser = random.Random(3), build_parser()
    fields = [*dataclasses.fields(TrainConfig), *dataclasses.fields(DataConfig)]
    for spec in fields:
        flag = "--" + (spec.metadata.get("flag") or spec.name.replace("_", "-"))
        for text in rng.sample(FLAG_TEXTS, 6):
            with contextlib.redirect_stderr(io.StringIO()):
                try:
                    args = parser.parse_args(["train", "--teacher", "t", f"{flag}={text}"])
                except SystemExit as stop:
                    assert stop.code == 2, (flag, text)
                    continue
            result = outcome(run_config_from_args, args)
            assert isinstance(result, (RunConfig, ValueError)), (flag, text)
            if isinstance(result, RunConfig):
                section = result.train if spec in dataclasses.fields(TrainConfig) else result.data
                assert getattr(section, spec.name) == getattr(args, spec.name), (flag, text)


def test_malformed_run_directory_configs_raise_value_error(tmp_path):
    """`--resume` and eval read RUN_DIR/run.json (config.json in older runs): garbage there is a clear error too."""
    rng = random.Random(7)
    for index in range(60):
        run_dir = tmp_path / str(index)
        run_dir.mkdir()
        value = rng.choice([run_case(rng), {"run": run_case(rng)}, {"run": run_case(rng), "preset": 1}])
        text = json.dumps(value)
        name = rng.choice(["run.json", "config.json"])
        (run_dir / name).write_text(text[:rng.randrange(len(text) + 1)] if rng.random() < 0.3 else text)
        assert isinstance(outcome(load_run_config, run_dir), (RunConfig, ValueError))


# ------------------------------------------------------------------- images
def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height RGB pixels in its header, with the pixel data of one row at most."""
    pixels = zlib.compress(bytes(1 + 3 * min(width, 1000)))
    return (PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b""))


def png_in_many_chunks(image: Image.Image, chunk_bytes: int = 300) -> list[tuple[bytes, bytes]]:
    """(type, body) of the chunks of a PNG whose pixel data is split over many IDAT chunks (as libpng
    writes large images), so that a broken chunk is met while decoding rather than when opening."""
    data, chunks, at = encode(image, "PNG"), [], len(PNG_SIGNATURE)
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        chunks.append((data[at + 4:at + 8], data[at + 8:at + 8 + length]))
        at += 12 + length
    pixels = b"".join(body for kind, body in chunks if kind == b"IDAT")
    return [chunks[0], *((b"IDAT", pixels[i:i + chunk_bytes]) for i in range(0, len(pixels), chunk_bytes)),
            (b"IEND", b"")]


def join_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(png_chunk(kind, body) for kind, body in chunks)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def valid_images() -> dict[str, bytes]:
    """Files every reader must load: the odd modes and formats included."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    sixteen = Image.fromarray(rng.integers(0, 65536, (9, 9), dtype=np.uint16))
    return {
        "rgb.png": encode(rgb, "PNG"), "rgb.jpg": encode(rgb, "JPEG"), "gray.png": encode(rgb.convert("L"), "PNG"),
        "palette.png": encode(rgb.convert("P"), "PNG"), "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "la.png": encode(rgb.convert("LA"), "PNG"), "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "bits.png": encode(rgb.convert("1"), "PNG"), "sixteen.png": encode(sixteen, "PNG"),
        "one.png": encode(rgb.resize((1, 1)), "PNG"), "rgb.gif": encode(rgb, "GIF"), "rgb.bmp": encode(rgb, "BMP"),
        "rgb.webp": encode(rgb, "WEBP"), "rgb.tif": encode(rgb, "TIFF"),
        "chunked.png": join_png(png_in_many_chunks(Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)))),
    }


VALID = valid_images()


def image_case(rng: random.Random) -> tuple[str, bytes, bool]:
    """(file name, bytes, whether it is malformed for sure)."""
    name, data = rng.choice(sorted(VALID.items()))
    roll = rng.random()
    if roll < 0.1:
        return name, b"", True
    if roll < 0.2:
        return name, rng.randbytes(rng.randrange(1, 300)), True
    if roll < 0.3:
        return "huge.png", png_header_only(rng.choice([20_000, 100_000]), rng.choice([20_000, 100_000])), True
    if roll < 0.65:
        return name, data[:rng.randrange(len(data))], False  # cut short: some formats still decode
    if roll < 0.85:
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 10)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        return name, bytes(flipped), False
    return name, data, False


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_malformed_image_files_are_named_or_load(mode, channels, tmp_path):
    rng = random.Random(mode)
    for index in range(150):
        name, data, malformed = image_case(rng)
        path = tmp_path / f"{index}-{name}"
        path.write_bytes(data)
        with time_limit():
            try:
                array = read_image(path, mode, 8)
            except VitcraftError as error:
                assert str(error).startswith(f"cannot read image {path}: ")
                continue
        assert not malformed, name
        assert array.shape == (8, 8, channels) and array.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(VALID))
def test_odd_modes_and_sizes_load(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(VALID[name])
    expected = Image.open(io.BytesIO(VALID[name]))
    array = read_image(path, "RGB", None)
    assert array.shape == (expected.height, expected.width, 3) and array.dtype == np.uint8


def test_sixteen_bit_grayscale_keeps_its_high_byte(tmp_path):
    values = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257  # 8-bit v stored as 16-bit v * 257
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    gray = read_image(tmp_path / "deep.png", "L", None)[..., 0]
    np.testing.assert_array_equal(gray, np.arange(256).reshape(16, 16))


def test_broken_chunk_met_while_decoding_is_named(tmp_path):
    """Pillow raises SyntaxError (not OSError) for this one."""
    chunks = png_in_many_chunks(Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), np.uint8)))
    chunks[3] = (b"uL#)", chunks[3][1])
    path = tmp_path / "broken.png"
    path.write_bytes(join_png(chunks))
    with pytest.raises(VitcraftError, match=r"broken.png: broken PNG file"):
        read_image(path, "RGB", 8)


def test_huge_dimensions_are_refused_from_the_header(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(10_000, 10_000))  # 100 million pixels claimed, none present
    with pytest.raises(VitcraftError, match=r"huge.png: 10000 x 10000 pixels is more than the limit"):
        read_image(path, "RGB", 8)


def test_malformed_file_in_a_folder_dataset_is_named(tmp_path):
    rng = random.Random(5)
    for index in range(16):
        root = write_folder_dataset(tmp_path / str(index), per_class=(2, 1), classes=("a", "b"), seed=index)
        name, data, malformed = image_case(rng)
        split, label = rng.choice(["train", "test"]), rng.choice(["a", "b"])
        # "000" sorts first: the file load_splits probes for the size and mode of the whole set
        path = root / split / label / f"{rng.choice(['000', 'zzz'])}-{name}"
        path.write_bytes(data)
        with time_limit():
            try:
                train, test = load_splits(str(root), image_size=8, cache_dir=tmp_path / "cache")
            except VitcraftError as error:
                assert f"cannot read image {path}: " in str(error)
                continue
        assert not malformed, name
        assert (len(train), len(test)) == ((5, 2) if split == "train" else (4, 3))
        assert train.images.shape[1:] == test.images.shape[1:] and train.images.shape[-2:] == (8, 8)
