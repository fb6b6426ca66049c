"""The configs as one source: the train flags are built from TrainConfig and DataConfig, every config
validates with the same helpers, and old files with dropped fields still load."""

import dataclasses
import json
import typing

import pytest

from vitcraft.cli import build_parser, flag_name, run_config_from_args
from vitcraft.config import DataConfig, DictConfig, PretrainConfig, TrainConfig, ViTConfig, default_of
from vitcraft.errors import VitcraftError
from vitcraft.registry import get_preset, list_models
from vitcraft.variants import CCTConfig, CNNConfig, SwinConfig

SETTINGS = [(cls, spec) for cls in (TrainConfig, DataConfig) for spec in dataclasses.fields(cls)]
IDS = [spec.name for _, spec in SETTINGS]
# with vitcraft pretrain's own, which only that command has
FLAGS = SETTINGS + [(PretrainConfig, spec) for spec in dataclasses.fields(PretrainConfig)]
FLAG_IDS = [spec.name for _, spec in FLAGS]


def command_of(cls: type) -> str:
    return "pretrain" if cls is PretrainConfig else "train"


def other_value(cls: type, spec: dataclasses.Field) -> tuple[str, object]:
    """(command-line text, parsed value) of a valid value that is not the field's default."""
    hint = typing.get_type_hints(cls)[spec.name]
    kind = next(arg for arg in (typing.get_args(hint) or [hint]) if arg is not type(None))
    default = default_of(cls, spec.name)
    if spec.name == "budget":
        return "90s", "90s"
    if spec.metadata["choices"]:
        choice = next((c for c in reversed(spec.metadata["choices"]) if c != default), default)  # one choice: it
        return choice, choice
    if kind is bool:
        return "", not default
    if kind is int:
        return "3", 3
    if kind is float:
        return "0.25", 0.25
    if kind == list[int]:
        return "16,24", [16, 24]
    if kind == list[float]:
        return "0.25,0.5", [0.25, 0.5]
    return "somewhere", "somewhere"


def train_args(cls, spec, text: str) -> list[str]:
    if text == "":  # a bool: --x or --no-x
        flag = flag_name(spec) if not default_of(cls, spec.name) else "--no-" + flag_name(spec)[2:]
        return [flag]
    return [flag_name(spec), text]


def section(run, cls):
    return {TrainConfig: run.train, DataConfig: run.data, PretrainConfig: run.pretrain}[cls]


def help_text(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([*command, "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width


# ------------------------------------------------------------ flags from fields
@pytest.mark.parametrize("cls, spec", FLAGS, ids=FLAG_IDS)
def test_every_setting_has_a_flag_with_its_help_and_default(cls, spec, capsys):
    text = help_text(capsys, command_of(cls))
    help_words = " ".join(spec.metadata["help"].split())
    assert flag_name(spec) in text and help_words in text
    default = default_of(cls, spec.name)
    if default is not None and not isinstance(default, bool):
        shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
        assert f"{help_words} (default: {shown})" in text
    elif default is None:
        assert f"{help_words} (default: {spec.metadata['none_means']})" in text, "say what unset means"


@pytest.mark.parametrize("cls, spec", FLAGS, ids=FLAG_IDS)
def test_a_flag_sets_its_field(cls, spec):
    text, value = other_value(cls, spec)
    args = build_parser().parse_args([command_of(cls), "--teacher", "t", *train_args(cls, spec, text)])
    assert getattr(section(run_config_from_args(args), cls), spec.name) == value


def test_lr_and_threads_keep_their_names():
    args = build_parser().parse_args(["train", "--lr", "0.01", "--threads", "2"])
    recipe = run_config_from_args(args).train
    assert (recipe.learning_rate, recipe.num_threads) == (0.01, 2)


def test_flags_left_out_keep_the_config_files_values(tmp_path):
    changed = {cls: {} for cls in (TrainConfig, DataConfig)}
    for cls, spec in SETTINGS:
        changed[cls][spec.name] = other_value(cls, spec)[1]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"preset": "deit-seed-tiny", "model": {"hidden_size": 32}, "train": changed[TrainConfig],
                                "data": changed[DataConfig]}))
    run = run_config_from_args(build_parser().parse_args(["train", "--config", str(path)]))
    assert run.preset == "deit-seed-tiny" and run.model == {"hidden_size": 32}
    assert dataclasses.asdict(run.train) == changed[TrainConfig]
    assert dataclasses.asdict(run.data) == changed[DataConfig]
    # and a flag given wins over the file, a bool in both directions
    run = run_config_from_args(build_parser().parse_args(
        ["train", "--config", str(path), "--epochs", "7", "--no-grad-checkpointing", "--preset", "seed-tiny",
         "--model-arg", "intermediate_size=64"]))
    assert (run.train.epochs, run.train.grad_checkpointing, run.train.learning_rate) == (7, False, 0.25)
    assert run.preset == "seed-tiny" and run.model == {"hidden_size": 32, "intermediate_size": 64}


def test_no_flags_give_the_defaults():
    run = run_config_from_args(build_parser().parse_args(["train"]))
    assert run.train == TrainConfig() and run.data == DataConfig() and run.preset == "seed-tiny"


def test_no_augment_turns_flip_and_crop_off_and_refuses_them_beside_it(capsys):
    run = run_config_from_args(build_parser().parse_args(["train", "--no-augment"]))
    assert (run.train.flip_p, run.train.crop_scale) == (0.0, None)
    with pytest.raises(VitcraftError, match="--no-augment turns the flip and the crop off"):
        run_config_from_args(build_parser().parse_args(["train", "--no-augment", "--flip-p", "0.5"]))


@pytest.mark.parametrize("args, message", [
    (["--schedule", "linear"], "argument --schedule: invalid choice: 'linear' (choose from"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--auto-augment", "autoaugment"], "argument --auto-augment: invalid choice: 'autoaugment'"),
    (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
    (["--progressive-sizes", "16,x"], "argument --progressive-sizes: expected integers separated by commas"),
    (["--crop-scale", "0.5;1"], "argument --crop-scale: expected numbers separated by commas"),
])
def test_bad_flag_values_get_argparses_message(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["train", *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("cls, spec", [(c, s) for c, s in SETTINGS if s.metadata["choices"]],
                         ids=[s.name for _, s in SETTINGS if s.metadata["choices"]])
def test_every_choice_setting_is_validated_in_the_config(cls, spec):
    """The choices the flag offers are the ones validate() checks (a config file skips argparse)."""
    with pytest.raises(VitcraftError, match=f"{spec.name} must be one of {', '.join(spec.metadata['choices'])}; "
                                            f"got 'nope'"):
        cls(**{spec.name: "nope"})


# ------------------------------------------------------------ validation
@pytest.mark.parametrize("build, message", [
    (lambda: TrainConfig(learning_rate=0.0), "learning_rate must be a positive finite number, got 0.0"),
    (lambda: TrainConfig(weight_decay=-1.0), "weight_decay must be 0 or positive, got -1.0"),
    (lambda: TrainConfig(max_steps=0), "max_steps must be a positive integer, got 0"),
    (lambda: TrainConfig(grad_clip=-1.0), "grad_clip must be a positive finite number, got -1.0"),
    (lambda: TrainConfig(flip_p=1.5), "flip_p must be in [0, 1], got 1.5"),
    (lambda: TrainConfig(label_smoothing=1.0), "label_smoothing must be in [0, 1), got 1.0"),
    (lambda: DataConfig(image_size=0), "image_size must be a positive integer, got 0"),
    (lambda: DataConfig(image_size=1.5), "data setting image_size must be an integer or null, got 1.5"),
])
def test_train_and_data_settings_name_the_field_in_a_vitcraft_error(build, message):
    with pytest.raises(VitcraftError) as info:
        build()
    assert str(info.value) == message


@pytest.mark.parametrize("build, message", [
    (lambda: ViTConfig(num_classes=0), "num_classes must be a positive integer, got 0"),
    (lambda: SwinConfig(embed_dim=2**31), "embed_dim must be below 2**31, got 2147483648"),
    (lambda: CCTConfig(conv_channels=True), "conv_channels must be a positive integer, got True"),
    (lambda: CNNConfig(width=0), "width must be a positive integer, got 0"),
    (lambda: CNNConfig(arch="vgg"), "arch must be one of resnet18, small; got 'vgg'"),
    (lambda: SwinConfig(qkv_bias=1), "qkv_bias must be true or false, got 1"),
])
def test_model_configs_share_the_checks_and_their_messages(build, message):
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value) == message


# ------------------------------------------------------------ dropped fields
CONFIG_CLASSES = sorted({get_preset(name).config_class for name in list_models()}, key=lambda cls: cls.__name__)


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=[cls.__name__ for cls in CONFIG_CLASSES])
def test_an_older_files_empty_extra_loads_and_anything_else_in_it_is_refused(cls):
    assert issubclass(cls, DictConfig) and "extra" not in cls.field_names()
    saved = {**cls().to_dict(), "extra": {}}  # what model.json held before the field was dropped
    assert cls.from_dict(saved) == cls()
    with pytest.raises(ValueError, match="unknown model config key 'extra'"):
        cls.from_dict({**cls().to_dict(), "extra": {"note": "x"}})
