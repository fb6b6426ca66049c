"""Checkpoints that describe themselves, written atomically, read without unpickling.

A run directory holds:
- ``model.safetensors`` + ``model.json``: the weights and what is needed to use
  them (model config, class names, normalisation): what eval/predict/viz load;
- ``checkpoint.safetensors``: everything to resume (model, optimizer state, RNG
  states, epoch, step, metrics so far) in one file, so one atomic rename
  publishes a consistent state.
Loading converts and checks in one place: a shape mismatch names the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcraft.errors import VitcraftError
from vitcraft.io import atomic_write_json, load_tensors, read_json, save_tensors_atomic

MODEL_FILE = "model.safetensors"
MODEL_META_FILE = "model.json"
CHECKPOINT_FILE = "checkpoint.safetensors"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or torch.compile) wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor],
                       source: Path | str = "the state dict") -> nn.Module:
    """A strict load_state_dict that fails with one clear sentence naming ``source`` and the key.

    Either attention layout loads (the attention modules' load hooks convert
    fused and per-head weights). Raises VitcraftError for the first
    mis-shaped, missing or unexpected tensor. Returns the model.
    """
    for key, own in model.state_dict().items():  # in the model's order: the first layer that differs
        if key in state and tuple(own.shape) != tuple(state[key].shape):
            raise VitcraftError(f"{source} has {key!r} of shape {tuple(state[key].shape)}, but this model's is "
                                f"{tuple(own.shape)}; the weights are from a differently shaped model")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a shape mismatch that only shows after layout conversion
        raise VitcraftError(f"{source} does not fit this model: {str(error).splitlines()[-1].strip()}") from None
    if result.missing_keys:
        raise VitcraftError(f"{source} has no weight {result.missing_keys[0]!r}, which this model needs")
    if result.unexpected_keys:
        raise VitcraftError(f"{source} has a weight {result.unexpected_keys[0]!r} that this model does not have")
    return model


# ------------------------------------------------------------------ weights
def save_model(run_dir: Path, model: nn.Module, metadata: dict[str, Any]) -> None:
    """Weights to model.safetensors and their description to model.json (both atomic)."""
    run_dir = Path(run_dir)
    save_tensors_atomic(run_dir / MODEL_FILE, unwrap(model).state_dict(), {"vitcraft": json.dumps(metadata)})
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


# ---------------------------------------------------------- training state
def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in info["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, progress: dict[str, Any]) -> None:
    """One file with all that resuming needs; ``progress`` is JSON (epoch, step, history...)."""
    tensors = {f"model.{k}": v for k, v in unwrap(model).state_dict().items()}
    optimizer_tensors, optimizer_info = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    metadata = {"progress": json.dumps(progress), "optimizer": json.dumps(optimizer_info),
                "scaler": json.dumps(scaler.state_dict() if scaler is not None and scaler.is_enabled() else {})}
    save_tensors_atomic(Path(run_dir) / CHECKPOINT_FILE, tensors, metadata)


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """Restore model, optimizer, scaler and RNG states in place; return the progress dict."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise VitcraftError(f"cannot resume: {run_dir} holds no checkpoint ({CHECKPOINT_FILE} is missing)")
    tensors, metadata = load_tensors(path)
    try:
        progress = json.loads(metadata["progress"])
        optimizer_info = json.loads(metadata["optimizer"])
        scaler_state = json.loads(metadata.get("scaler", "{}"))
    except (KeyError, json.JSONDecodeError):
        raise VitcraftError(f"{path} is not a vitcraft training checkpoint") from None
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    load_state_checked(unwrap(model), model_state, path)
    optimizer_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, optimizer_info))
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    torch.set_rng_state(tensors["rng.torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return progress


def load_trained_model(run_dir: Path | str, device: torch.device | str = "cpu"):
    """(model in eval mode, metadata) of a run directory's model.safetensors + model.json.

    The metadata holds model_config, class_names, mean and std.
    """
    from vitcraft.registry import get_preset

    run_dir = Path(run_dir)
    metadata = read_model_metadata(run_dir)
    preset = get_preset(metadata.get("preset", "seed-tiny"))
    try:
        config = preset.config_class.from_dict(metadata["model_config"])
    except (KeyError, ValueError) as error:
        raise VitcraftError(f"{run_dir / MODEL_META_FILE} holds no valid model_config: {error}") from None
    model = preset.builder(config)
    load_model_weights(run_dir, model)
    return model.to(device).eval(), metadata
