"""The training checkpoint of a run: everything ``--resume`` needs, in one safetensors file.

``checkpoint.safetensors`` holds the model, the optimizer state, the
weights' moving average (``--ema``, under ``ema.``), the RNG states, epoch,
step and metrics so far, so one atomic rename publishes a
consistent state; it is read without unpickling. (The weights that eval,
predict and viz load are ``model.safetensors`` + ``model.json``: runs.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcraft.ema import ModelEma
from vitcraft.errors import VitcraftError
from vitcraft.files import load_tensors, save_tensors_atomic
from vitcraft.state_dict import load_state_checked, unwrap

CHECKPOINT_FILE = "checkpoint.safetensors"


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
                    scaler: torch.amp.GradScaler | None, progress: dict[str, Any], ema: ModelEma | None = None) -> None:
    """One file with all that resuming needs; ``progress`` is JSON (epoch, step, history...)."""
    tensors = {f"model.{k}": v for k, v in unwrap(model).state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
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
                    scaler: torch.amp.GradScaler | None, ema: ModelEma | None = None) -> dict[str, Any]:
    """Restore model, optimizer, scaler, EMA and RNG states in place; return the progress dict.

    A checkpoint without EMA weights (a run that started without ``--ema``) starts the average at the
    resumed weights.
    """
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
    if ema is not None:
        ema_state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        load_state_checked(ema.module, ema_state or model_state, path)
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
