"""Safe file writing and reading: atomic replace, safetensors only.

Every file vitcraft writes goes to a temporary file in the same folder and
is then renamed over the target (``os.replace`` is atomic on POSIX and
Windows), so a kill at any moment leaves either the old file or the new one,
never half of one. Tensors are read only from safetensors files, which hold
data and no code.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from vitcraft.errors import VitcraftError


def atomic_write(path: Path | str, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` then rename the result over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name rather than mkstemp, whose 0600 permissions would survive the rename
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp"))
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path | str, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def save_tensors_atomic(path: Path | str, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (tensors made contiguous, shared storage copied)."""
    tensors = {k: v.detach().contiguous().clone() if _shares_storage(v) else v.detach().contiguous()
               for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _shares_storage(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()


def load_tensors(path: Path | str, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a missing, truncated or foreign file is a VitcraftError."""
    path = Path(path)
    if not path.is_file():
        raise VitcraftError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
        return load_file(str(path), device=device), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise VitcraftError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def read_json(path: Path | str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise VitcraftError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VitcraftError(f"{path} is not valid JSON: {error}") from None
