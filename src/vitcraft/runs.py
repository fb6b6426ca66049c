"""A run directory: the files ``vitcraft train`` writes, its config, and the model it trained.

A run directory holds
- ``run.json``: the :class:`RunConfig` it was started with (preset, model
  overrides, recipe, data, the --init source) and the resolved model config,
  written first;
- ``metrics.jsonl``: one JSON object per epoch;
- ``model.safetensors`` + ``model.json``: the weights and what is needed to use
  them (model config, class names, normalisation): what eval, predict, viz,
  serve and export load (:func:`load_trained_model`);
- ``config.json`` beside them for a ViT: the hub layout (hub.py), so that the
  run directory is also a model folder (``ViTForClassification.from_pretrained(RUN_DIR)``,
  ``--init RUN_DIR``). Runs written before that keep their run config in
  config.json; they still open, and a resume moves it to run.json first.
- for a pretraining run (``vitcraft pretrain``): the encoder as the model above (its classifier never
  trained: eval and the other commands refuse it), the decoder in ``decoder.safetensors``, and
  ``reconstruction.png``;
- ``checkpoint.safetensors``: what ``--resume`` needs (checkpoint.py);
- the figures and ``tensorboard/``.
Every file is written atomically (files.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vitcraft import hub
from vitcraft.checkpoint import CHECKPOINT_FILE
from vitcraft.config import (
    DataConfig,
    PretrainConfig,
    TrainConfig,
    check_keys,
    check_types,
    default_of,
    setting,
    short_repr,
)
from vitcraft.errors import VitcraftError
from vitcraft.files import (
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    read_json,
    remove_stale_temporaries,
    save_tensors_atomic,
)
from vitcraft.mae import DECODER_PREFIX, MaskedAutoencoder
from vitcraft.registry import get_preset
from vitcraft.state_dict import load_state_checked, unwrap
from vitcraft.tensorboard_log import TENSORBOARD_DIR, remove_event_files

RUN_CONFIG_FILE = "run.json"
OLD_RUN_CONFIG_FILE = hub.CONFIG_NAME  # where runs kept their config before run directories were hub folders
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"
MODEL_META_FILE = "model.json"
DECODER_FILE = "decoder.safetensors"  # a pretraining run's MAE decoder, beside the encoder's model.safetensors
RECONSTRUCTION_FIGURE = "reconstruction.png"
FIGURE_FILES = ("samples.png", "curves.png", "attention.png", "rollout.png", "confusion.png", RECONSTRUCTION_FIGURE)
# files a run writes; --overwrite removes exactly these, nothing else in the folder
RUN_FILES = (RUN_CONFIG_FILE, METRICS_FILE, MODEL_FILE, MODEL_META_FILE, DECODER_FILE, hub.CONFIG_NAME, CHECKPOINT_FILE,
             *FIGURE_FILES, "report.html", TENSORBOARD_DIR)


@dataclass
class RunConfig:
    """Everything a run needs: model preset and overrides, recipe, data; and for ``vitcraft pretrain`` the
    self-supervised objective (``pretrain``; None: supervised training)."""

    preset: str = setting("seed-tiny", "model preset, one of those `vitcraft list-models` shows", metavar="NAME")
    init: str | None = setting(None, "start from these weights (the model's shape comes from them): a run "
                                     "directory, a save_pretrained, Hugging Face or timm folder, or a Hugging Face "
                                     "hub id such as google/vit-base-patch16-224", metavar="SOURCE",
                               none_means="random initialisation")
    model: dict[str, Any] = field(default_factory=dict)  # ViTConfig overrides on top of the preset (or the source)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig | None = None

    def __post_init__(self) -> None:
        # fail on a bad preset name, model key or value type before any data is loaded
        if not isinstance(self.preset, str) or not isinstance(self.model, Mapping):
            raise VitcraftError(f"preset must be a name and model a mapping of overrides, got "
                                f"{short_repr(self.preset)} and {short_repr(self.model)}")
        if self.init is not None and (not isinstance(self.init, str) or not self.init):
            raise VitcraftError(f"init must name a model folder or hub id, got {short_repr(self.init)}")
        config_class = get_preset(self.preset).config_class
        check_keys(self.model, config_class.field_names(), what="model config key")
        check_types(config_class, self.model, what="model setting")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        check_run_sections(values, "a run config")
        train = values.get("train", {}) or {}
        data = values.get("data", {}) or {}
        check_keys(train, [f.name for f in dataclasses.fields(TrainConfig)], what="train setting")
        check_keys(data, [f.name for f in dataclasses.fields(DataConfig)], what="data setting")
        pretrain = values.get("pretrain")
        if pretrain is not None:
            check_keys(pretrain, [f.name for f in dataclasses.fields(PretrainConfig)], what="pretrain setting")
        return cls(preset=values.get("preset", default_of(cls, "preset")), init=values.get("init"),
                   model=dict(values.get("model", {}) or {}), train=TrainConfig(**train), data=DataConfig(**data),
                   pretrain=PretrainConfig(**pretrain) if pretrain is not None else None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_run_sections(values: Any, where: str) -> None:
    """Raise VitcraftError unless ``values`` maps known sections to mappings (model, train, data)
    or to a name (preset)."""
    if not isinstance(values, Mapping):
        raise VitcraftError(f"{where} must be a mapping with sections preset/model/train/data, "
                            f"got {type(values).__name__}")
    check_keys(values, ["preset", "init", "model", "train", "data", "pretrain"], what="run config section")
    for name, what in (("preset", "a model name"), ("init", "a model folder or hub id")):
        if not isinstance(values.get(name) or "", str):
            raise VitcraftError(f"{name} in {where} must be {what}, got {short_repr(values[name])}")
    for name in ("model", "train", "data", "pretrain"):
        if not isinstance(values.get(name) or {}, Mapping):
            raise VitcraftError(f"the {name} section of {where} must be a mapping of settings, "
                                f"got {short_repr(values[name])}")


def run_config_path(run_dir: Path | str) -> Path | None:
    """The file holding a run directory's run config: run.json, or an older run's config.json; None if neither."""
    run_dir = Path(run_dir)
    if (run_dir / RUN_CONFIG_FILE).is_file():
        return run_dir / RUN_CONFIG_FILE
    old = run_dir / OLD_RUN_CONFIG_FILE
    if old.is_file():
        try:
            saved = read_json(old)
        except VitcraftError:
            return old  # unreadable: load_run_config says so
        if not (isinstance(saved, dict) and "model_type" in saved):  # a hub config.json is not a run config
            return old
    return None


def read_run_file(run_dir: Path | str) -> dict[str, Any]:
    """The whole saved run file: ``{"run": RunConfig as a dict, **metadata, "init": ...}``."""
    path = run_config_path(run_dir)
    if path is None:
        raise VitcraftError(f"{run_dir} holds no run ({RUN_CONFIG_FILE} is missing)")
    saved = read_json(path)
    if not isinstance(saved, dict) or "run" not in saved:
        raise VitcraftError(f"{path} is not a vitcraft run config (it has no 'run' section)")
    return saved


def load_run_config(run_dir: Path | str) -> RunConfig:
    """The RunConfig a run directory was started with."""
    return RunConfig.from_dict(read_run_file(run_dir)["run"])


def load_run_config_file(path: Path | str) -> dict[str, Any]:
    """A YAML or JSON file holding any of the sections preset, model, train, data."""
    path = Path(path)
    if not path.is_file():
        raise VitcraftError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:  # UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError, RecursionError
        raise VitcraftError(f"cannot parse config file {path}: {error}") from None
    check_run_sections(values, f"config file {path}")  # the CLI merges the sections before from_dict
    return values


# ------------------------------------------------------------ the folder
def prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out_dir / CHECKPOINT_FILE).is_file():
            raise VitcraftError(f"cannot resume: {out_dir} holds no checkpoint ({CHECKPOINT_FILE} is missing)")
        remove_stale_temporaries(out_dir, RUN_FILES)  # left by a kill mid-write; the files themselves are whole
        if run_config_path(out_dir) == out_dir / OLD_RUN_CONFIG_FILE:  # before save_model writes a hub config.json
            atomic_write_json(out_dir / RUN_CONFIG_FILE, read_run_file(out_dir))
        return
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise VitcraftError(f"{out_dir} already holds a run ({', '.join(existing)}); use --resume {out_dir} "
                            f"to continue it, --overwrite to replace it, or another --out")
    for name in existing:
        if name == TENSORBOARD_DIR:
            remove_event_files(out_dir)  # the event files only; a user's own files there stay
        else:
            (out_dir / name).unlink()
    remove_stale_temporaries(out_dir, RUN_FILES)


def write_metrics(out_dir: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(out_dir / METRICS_FILE, "".join(json.dumps(record) + "\n" for record in history))


# ------------------------------------------------------------ the trained model
def save_model(run_dir: Path, model: nn.Module, metadata: dict[str, Any]) -> None:
    """Weights to model.safetensors and their description to model.json (each atomic).

    A ViT is saved as a hub folder (config.json + fused weights, hub.save_pretrained), so the run directory
    is a model folder too; other models keep their own state_dict layout. A masked autoencoder
    (``vitcraft pretrain``) saves its encoder so, and its decoder's weights to decoder.safetensors under
    ``decoder.`` (what ``--init`` lists as dropped).
    """
    run_dir, model = Path(run_dir), unwrap(model)
    if isinstance(model, MaskedAutoencoder):  # the encoder is the run's model; the decoder goes beside it
        save_tensors_atomic(run_dir / DECODER_FILE, {f"{DECODER_PREFIX}{key}": value
                                                     for key, value in model.decoder.state_dict().items()})
        model = model.encoder
    if getattr(model, "model_type", None) == hub.MODEL_TYPE:
        hub.save_pretrained(model, run_dir, extra_metadata=metadata)
    else:
        save_tensors_atomic(run_dir / MODEL_FILE, model.state_dict())
    atomic_write_json(run_dir / MODEL_META_FILE, metadata)


def read_model_metadata(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VitcraftError(f"run directory {run_dir} does not exist")
    if not (run_dir / MODEL_META_FILE).is_file():
        raise VitcraftError(f"{run_dir} holds no trained model ({MODEL_META_FILE} is missing); "
                            f"train one with `vitcraft train --out {run_dir}`")
    return read_json(run_dir / MODEL_META_FILE)


def load_model_weights(run_dir: Path, model: nn.Module) -> None:
    state, _ = load_tensors(Path(run_dir) / MODEL_FILE)
    load_state_checked(model, state, Path(run_dir) / MODEL_FILE)


def read_model_config(run_dir: Path | str):
    """(preset, model config, metadata) of a run directory's model.json: what builds its model."""
    run_dir = Path(run_dir)
    metadata = read_model_metadata(run_dir)
    preset = get_preset(metadata.get("preset", "seed-tiny"))
    try:
        return preset, preset.config_class.from_dict(metadata["model_config"]), metadata
    except (KeyError, ValueError) as error:
        raise VitcraftError(f"{run_dir / MODEL_META_FILE} holds no valid model_config: {error}") from None


def load_trained_model(run_dir: Path | str, device: torch.device | str = "cpu"):
    """(model in eval mode, metadata) of a run directory's model.safetensors + model.json.

    The metadata holds model_config, class_names, mean and std.
    """
    preset, config, metadata = read_model_config(run_dir)
    if metadata.get("pretraining"):
        raise VitcraftError(f"{run_dir} is a {metadata['pretraining']['method'].upper()} pretraining run: its encoder "
                            f"has no trained classifier. Fine-tune it first: vitcraft train --init {run_dir}")
    model = preset.builder(config)
    load_model_weights(run_dir, model)
    return model.to(device).eval(), metadata
