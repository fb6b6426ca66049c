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
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from vitcraft.errors import VitcraftError

# The process's umask, read once (os.umask can only be read by setting it), so that
# written files get the usual permissions whatever the writer chose.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
TEMPORARY_NAME = re.compile(r"\.(.+)\.[0-9a-f]{32}\.tmp")  # atomic_write's temporary file for the name in group 1


def cache_dir() -> Path:
    """Where vitcraft keeps files between runs (decoded datasets, compiled CPU kernels).

    ``$VITCRAFT_CACHE`` if set, else ~/.cache/vitcraft.
    """
    return Path(os.environ.get("VITCRAFT_CACHE", Path.home() / ".cache" / "vitcraft"))


def atomic_write(path: Path | str, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` then rename the result over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp"))  # see TEMPORARY_NAME
    try:
        write(tmp)
        # safetensors creates its files owner-only (0600); a model folder is meant to be shared
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temporaries(folder: Path | str, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that atomic writes of ``names`` in ``folder`` left behind.

    A process killed inside :func:`atomic_write` (SIGKILL runs no cleanup) leaves
    its ``.NAME.<hex>.tmp`` file; the target itself is intact. Call this only when
    no other process is writing those files. Returns the paths removed.
    """
    folder, names = Path(folder), set(names)
    if not folder.is_dir():
        return []
    stale = [path for path in folder.iterdir()
             if (match := TEMPORARY_NAME.fullmatch(path.name)) and match.group(1) in names and path.is_file()]
    for path in stale:
        path.unlink()
    return stale


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
        if _looks_pickled(path):
            raise VitcraftError(f"{path} is a Python pickle (a torch.save file), not safetensors; vitcraft "
                                f"never unpickles files, because unpickling can run any code the file "
                                f"carries") from None
        raise VitcraftError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def _looks_pickled(path: Path) -> bool:
    """Whether a file is shaped as a pickle (protocol 2+: PROTO opcode first, STOP last) or a
    torch.save zip archive. Only the first and last bytes are read, nothing is unpickled."""
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            return False
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    if head == b"PK\x03\x04":
        return True
    return head[0] == 0x80 and 2 <= head[1] <= 5 and last == b"."


def read_json(path: Path | str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise VitcraftError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VitcraftError(f"{path} is not valid JSON: {error}") from None
