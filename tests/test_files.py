import os
import stat

import pytest
import torch

from vitcraft.errors import VitcraftError
from vitcraft.files import atomic_write, atomic_write_json, load_tensors, read_json, save_tensors_atomic


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_written_files_get_the_usual_permissions(tmp_path):
    # safetensors alone creates 0600 files; shared model folders must be readable as any other file
    save_tensors_atomic(tmp_path / "w.safetensors", {"a": torch.ones(2)})
    atomic_write_json(tmp_path / "c.json", {"x": 1})
    for name in ("w.safetensors", "c.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~current_umask()


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"epoch": 1})

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write('{"epoch": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert read_json(target) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = save_tensors_atomic(tmp_path / "m.safetensors", {"a": torch.arange(1000.0)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VitcraftError, match="not a readable safetensors file"):
        load_tensors(path)
