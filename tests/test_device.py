"""Device and precision choices (vitcraft/device.py) on this machine's CPU."""

import platform
from pathlib import Path

import pytest
import torch

from vitcraft import device
from vitcraft.errors import VitcraftError

CPU = torch.device("cpu")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").exists(),
                    reason="reads x86 flags from /proc/cpuinfo")
def test_cpu_bf16_detection_agrees_with_the_processor_flags():
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    assert device.cpu_has_bf16() == ("avx512_bf16" in flags or "amx_tile" in flags)


@pytest.mark.parametrize("has_bf16,expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_on_the_cpu_is_bf16_only_where_the_cpu_has_bf16_instructions(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: has_bf16)
    assert device.autocast_dtype(CPU, "auto") is expected
    assert device.autocast_dtype(CPU, "fp32") is None  # named precisions are taken as they are
    assert device.autocast_dtype(CPU, "bf16") is torch.bfloat16
    assert device.autocast_dtype(torch.device("mps"), "auto") is None


def test_bf16_without_bf16_units_warns_once_and_says_what_auto_picks(monkeypatch, recwarn):
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    device._warn_emulated_bf16.cache_clear()
    for _ in range(3):
        assert device.autocast_dtype(CPU, "bf16") is torch.bfloat16  # taken as asked: a warning, not a fallback
    messages = [str(w.message) for w in recwarn.list if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "emulated" in messages[0] and "--precision auto picks fp32 here" in messages[0]
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    device._warn_emulated_bf16.cache_clear()
    device.autocast_dtype(CPU, "bf16")
    assert len([w for w in recwarn.list if "emulated" in str(w.message)]) == 1  # none where bf16 is real


def test_only_fp16_gets_a_gradient_scaler():
    assert device.grad_scaler(CPU, torch.float16).is_enabled()
    assert not device.grad_scaler(CPU, torch.bfloat16).is_enabled()
    assert not device.grad_scaler(CPU, None).is_enabled()


def test_an_unknown_precision_is_one_clear_error():
    with pytest.raises(VitcraftError, match="precision must be one of auto, fp32, bf16, fp16; got 'fp8'"):
        device.autocast_dtype(CPU, "fp8")


def test_cpu_autocast_dtype_follows_the_autocast_context():
    assert device.cpu_autocast_dtype() is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert device.cpu_autocast_dtype() is torch.bfloat16
    assert device.cpu_autocast_dtype() is None
