"""Hub-style model folders: ``config.json`` + ``model.safetensors``.

:func:`save_pretrained` writes a vitcraft folder; :func:`read_pretrained` reads
one (a vitcraft run directory is one too), and also a Hugging Face ViT folder
(``model_type: "vit"``) or a timm folder (``"architecture"`` in config.json),
converting through :mod:`vitcraft.convert`. Wherever a folder is taken, a
Hugging Face hub id (``google/vit-base-patch16-224``) is too:
:func:`resolve_source` fetches it with huggingface_hub into its standard cache
(so ``HF_HOME``, ``HF_HUB_OFFLINE=1`` and a copy already downloaded behave as
they do for transformers). :class:`HubMixin` gives a model class the two
methods ``model.save_pretrained(folder)`` and ``Class.from_pretrained(folder)``
(as huggingface_hub's ModelHubMixin does), so this module needs no model class.
Weights are read from safetensors or, failing that, from a PyTorch ``.bin``
through ``torch.load(weights_only=True)``, which refuses anything but tensors:
nothing in a folder can run code when loaded.

Layout of a vitcraft folder's config.json::

    {"model_type": "vitcraft-vit", <every ViTConfig field>,
     "metadata": {"class_names": [...], "mean": [...], "std": [...], ...}}
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch

from vitcraft.config import ViTConfig
from vitcraft.convert import fused_state_dict, hf_to_vitcraft, timm_to_vitcraft
from vitcraft.errors import VitcraftError
from vitcraft.files import atomic_write_json, load_tensors, read_json, save_tensors_atomic
from vitcraft.state_dict import load_state_listed

MODEL_TYPE = "vitcraft-vit"
MODEL_CLASS = "ViTForClassification"  # the one class whose model_type is MODEL_TYPE (model.py)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Searched in this order: safetensors first (no pickle at all), then timm's
# open_clip-style names, then PyTorch pickles (read with weights_only=True).
WEIGHTS_NAMES = ("model.safetensors", "open_clip_model.safetensors",
                 "pytorch_model.bin", "open_clip_pytorch_model.bin")
METADATA_KEY = "metadata"
OLD_RUN_MODEL_FILE = "model.json"  # a run directory written before runs were hub folders: its model config
PREPROCESSOR_NAME = "preprocessor_config.json"  # a Hugging Face folder's mean and std
# a hub id: "org/name", or timm's "hf-hub:org/name"
HUB_ID = re.compile(r"(?:hf-hub:)?[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

TIMM_POOLING = {"token": "cls", "avg": "mean"}  # timm global_pool -> vitcraft pooling
# timm architecture size -> heads, for timm folders whose config.json has no model_args.
TIMM_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16}


# ------------------------------------------------------------------ saving
def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike,
                    extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` to a folder: ``config.json`` and ``model.safetensors``.

    config.json holds every ViTConfig field, ``"model_type": "vitcraft-vit"`` and
    ``extra_metadata`` (e.g. class_names, mean, std; JSON values) under
    ``"metadata"``. Weights are saved in the fused attention layout whatever the
    backend. Both files are written atomically. Returns the folder path.
    """
    if getattr(model, "model_type", None) != MODEL_TYPE:  # DeiT's extra token and head have no place here
        raise VitcraftError(f"save_pretrained writes {MODEL_CLASS} models, not a {type(model).__name__}")
    directory = Path(directory)
    config = {"model_type": MODEL_TYPE, **model.config.to_dict(), METADATA_KEY: dict(extra_metadata or {})}
    for key, value in config[METADATA_KEY].items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            raise VitcraftError(f"extra_metadata {key!r} is not JSON-serialisable ({err})") from None
    state = {key: tensor.cpu() for key, tensor in fused_state_dict(model).items()}
    # transformers reads only safetensors files whose metadata says format "pt"
    save_tensors_atomic(directory / WEIGHTS_NAME, state, metadata={"format": "pt"})
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


# ----------------------------------------------------------------- finding
def resolve_source(source: str | os.PathLike) -> Path:
    """The local folder of a model source: the folder itself, or a hub id's snapshot in the Hugging Face cache.

    A hub id (``org/name``, or ``hf-hub:org/name``) that is not also a local path
    is fetched with huggingface_hub (config.json, preprocessor_config.json and the
    weights: safetensors, else a PyTorch .bin). Raises FileNotFoundError for a
    missing folder, VitcraftError when the hub cannot give the model (offline
    without a cached copy, no such repository).
    """
    path = Path(source)
    if path.exists() or not HUB_ID.fullmatch(str(source)):
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {source} does not exist"
                                    if not path.exists() else f"{source} is a file, not a model folder")
        return path
    repo_id = str(source).removeprefix("hf-hub:")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError  # where every version since 0.23 has it
    except ImportError:
        raise VitcraftError(f"{source} is not a local folder; to fetch it from the Hugging Face hub, "
                            f"pip install huggingface_hub") from None
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, PREPROCESSOR_NAME, "*.safetensors"]))
        if not any((folder / name).is_file() for name in WEIGHTS_NAMES if name.endswith(".safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, PREPROCESSOR_NAME, "*.bin"]))
    except (OSError, ValueError, HfHubHTTPError) as error:  # offline, not cached, no such repo, a bad id
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VitcraftError(
            f"{source} is neither a local folder nor a Hugging Face hub model vitcraft could fetch or find in the "
            f"cache ({reason}). Download it where there is internet (hf download {repo_id}) and use it here "
            f"with HF_HUB_OFFLINE=1, or pass a local folder") from None
    return folder


# ----------------------------------------------------------------- reading
def _read_config(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(folder, parsed config.json) of a model source (folder or hub id), with FileNotFoundError/VitcraftError
    naming the path."""
    directory = resolve_source(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"model folder {directory} has no {CONFIG_NAME}")
    config = read_json(path)
    if not isinstance(config, dict):
        raise VitcraftError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return directory, config


def _folder_kind(config: Mapping[str, Any], path: Path) -> str:
    """'vitcraft', 'hf' or 'timm', from what config.json says."""
    model_type = config.get("model_type")
    if model_type == MODEL_TYPE:
        return "vitcraft"
    if model_type is None and "run" in config and (path / OLD_RUN_MODEL_FILE).is_file():
        return "old-run"
    if model_type == "vit":
        return "hf"
    if model_type is None and "architecture" in config:
        return "timm"
    found = f"model_type {model_type!r}" if model_type else "neither a model_type nor a timm architecture"
    raise VitcraftError(f"{path / CONFIG_NAME} has {found}; vitcraft reads {MODEL_TYPE!r} folders, "
                         f"Hugging Face 'vit' folders and timm folders")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a PyTorch pickle (tensors only), with clear errors."""
    if path.suffix == ".safetensors":
        return load_tensors(path)[0]
    try:
        # weights_only: the unpickler accepts tensors and plain containers, nothing
        # that could import or call code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        raise VitcraftError(f"{path} is not a plain PyTorch weights file (vitcraft loads tensors only and "
                             f"never unpickles other objects): {_load_failure(err)}") from None
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        state = state.get("state_dict", state.get("model", state))  # a training checkpoint's weights
    if not isinstance(state, dict):
        raise VitcraftError(f"{path} holds a {type(state).__name__}, not a state dict")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise VitcraftError(f"{path} entry {key!r} is a {type(value).__name__}, not a tensor")
    return state


def _load_failure(err: Exception) -> str:
    """The informative sentence of a torch.load error (e.g. "unsupported GLOBAL posix.system"), without
    torch's advice to retry with weights_only=False, which is what must not be done with an unknown file."""
    lines = [line.strip() for line in str(err).splitlines()
             if line.strip() and "weights_only" not in line and "Check the documentation" not in line]
    return lines[0].split(". ")[0] if lines else type(err).__name__


def _read_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(weights path, state dict) from the first weights file the folder has."""
    for name in WEIGHTS_NAMES:
        if (directory / name).is_file():
            return directory / name, _load_tensors(directory / name)
    sharded = [name for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
               if (directory / name).is_file()]
    if sharded:
        raise VitcraftError(f"{directory / sharded[0]} is a sharded checkpoint, "
                            f"which vitcraft does not read")
    raise FileNotFoundError(f"model folder {directory} has no weights file "
                            f"(looked for {', '.join(WEIGHTS_NAMES)})")


def _timm_overrides(config: Mapping[str, Any], path: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """ViTConfig values a timm config.json tells us beyond the state dict (heads, activation)."""
    model_args = config.get("model_args") or {}
    values: dict[str, Any] = {}
    if "act_layer" in model_args:
        values["hidden_act"] = model_args["act_layer"]
    # A state dict shows mean pooling only by its fc_norm weights; the config says it outright.
    pool = model_args.get("global_pool", config.get("global_pool"))
    if pool is not None:
        if pool not in TIMM_POOLING:
            raise VitcraftError(f"{path / CONFIG_NAME} has global_pool {pool!r}; vitcraft supports "
                                 f"{', '.join(map(repr, TIMM_POOLING))}")
        values["pooling"] = TIMM_POOLING[pool]
    heads = model_args.get("num_heads")
    size = re.match(r"(?:vit|deit)_([a-z]+)_patch", str(config["architecture"]))
    if heads is None and size is not None:
        heads = TIMM_HEADS.get(size.group(1))
    if heads is not None:
        values["num_attention_heads"] = heads
    elif "num_attention_heads" not in overrides:
        raise VitcraftError(f"{path / CONFIG_NAME} does not say how many attention heads "
                             f"{config['architecture']!r} has; "
                             f"pass from_pretrained(..., num_attention_heads=N)")
    return {**values, **overrides}


def model_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """A vitcraft folder's config.json without what is not a model config field (model_type, metadata)."""
    return {key: value for key, value in config.items() if key not in ("model_type", METADATA_KEY)}


def read_pretrained(source: str | os.PathLike,
                    **config_overrides: Any) -> tuple[ViTConfig, dict[str, torch.Tensor], str]:
    """(config, state dict in vitcraft's keys, weights path) of a model source: a vitcraft folder or run
    directory, a Hugging Face ViT folder or a timm one (converted), or a hub id of one (see resolve_source).

    ``config_overrides`` are ViTConfig fields applied on top of the folder's
    (e.g. ``attention_backend="per_head"``). A Hugging Face ``ViTModel`` has
    no classifier: its state dict then has no ``classifier.*`` keys. Raises
    FileNotFoundError for a missing folder, config or weights file, and
    VitcraftError (a ValueError) naming the file for anything unreadable or
    not matching.
    """
    directory, config = _read_config(source)
    kind = _folder_kind(config, directory)
    weights_path, state = _read_weights(directory)
    if kind in ("vitcraft", "old-run"):
        if kind == "old-run":  # its model config is in model.json, beside the run's recipe in config.json
            config = read_json(directory / OLD_RUN_MODEL_FILE).get("model_config") or {}
        values = model_fields(config)
        try:
            return ViTConfig.from_dict({**values, **config_overrides}), state, str(weights_path)
        except ValueError as err:
            raise VitcraftError(f"{directory}: {err} (is it a ViT? other models' runs open with "
                                f"vitcraft.runs.load_trained_model)") from None
    if kind == "hf":
        convert = partial(hf_to_vitcraft, hf_config=config, headless_ok=True, **config_overrides)
    else:
        convert = partial(timm_to_vitcraft, **_timm_overrides(config, directory, config_overrides))
    try:
        model_config, state, _ = convert(state)
    except ValueError as err:
        raise VitcraftError(f"cannot load {weights_path}: {err}") from None
    return model_config, state, str(weights_path)


class HubMixin:
    """``save_pretrained`` and ``from_pretrained`` for a model class whose instances have a ``config``.

    The class sets ``model_type`` (what config.json records); ``from_pretrained``
    builds ``cls(config)``, so this module never imports the model it loads.
    """

    model_type: str | None = None

    def save_pretrained(self, directory: str | os.PathLike, extra_metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` to ``directory`` (the Hugging Face hub
        layout), with ``extra_metadata`` such as class_names, mean, std. Returns the folder path."""
        return save_pretrained(self, directory, extra_metadata)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **config_overrides: Any):
        """Load a hub-layout folder: vitcraft's own, or a timm or Hugging Face ViT one (converted).

        ``config_overrides`` are ViTConfig fields, e.g. ``attention_backend="per_head"``.
        Returns the model in eval mode; see :func:`read_pretrained` for the errors.
        """
        if cls.model_type != MODEL_TYPE:  # a subclass with more weights (DeiT) would load half of them
            raise VitcraftError(f"{directory} holds a {MODEL_CLASS}, not a {cls.__name__}")
        config, state, source = read_pretrained(directory, **config_overrides)
        model = cls(config)
        new = load_state_listed(model, state, source, may_stay_new=("classifier.",))
        if new:  # a Hugging Face ViTModel: a backbone without a head, as transformers warns too
            warnings.warn(f"{source} has no classifier: {', '.join(new)} newly initialised; train it before use",
                          stacklevel=2)
        return model.eval()


def load_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """What a model source says beyond the model: class_names, mean, std, crop_pct (those it has).

    vitcraft folders and run directories: the ``metadata`` saved with the
    model. Hugging Face: class names from ``id2label``, mean/std (and crop_pct)
    from preprocessor_config.json. timm: class names, mean, std and crop_pct
    from ``pretrained_cfg``.
    """
    directory, config = _read_config(directory)
    kind = _folder_kind(config, directory)
    if kind == "vitcraft":
        return dict(config.get(METADATA_KEY) or {})
    if kind == "old-run":
        return read_json(directory / OLD_RUN_MODEL_FILE)
    metadata: dict[str, Any] = {}
    if kind == "hf":
        if config.get("id2label"):
            labels = config["id2label"]
            metadata["class_names"] = [labels[key] for key in sorted(labels, key=int)]
        preprocessor = directory / PREPROCESSOR_NAME
        source = read_json(preprocessor) if preprocessor.is_file() else {}
        names = {"mean": "image_mean", "std": "image_std", "crop_pct": "crop_pct"}
    else:
        source = {**config, **(config.get("pretrained_cfg") or {})}
        names = {"mean": "mean", "std": "std", "class_names": "label_names", "crop_pct": "crop_pct"}
    metadata.update({ours: source[theirs] for ours, theirs in names.items() if theirs in source})
    return metadata
