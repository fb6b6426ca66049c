"""Everything that differs between CUDA, Apple MPS and the CPU, in one small place.

- which device: CUDA, then MPS, then the CPU, unless one is named;
- which autocast dtype a precision name means there, and whether fp16 needs
  a gradient scaler (only fp16 does: bf16 has fp32's exponent range);
- the distributed backend: NCCL for CUDA, gloo otherwise;
- on Linux CPUs, a malloc setting that spares every step its page faults.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import warnings

import torch

from vitcraft.config import PRECISIONS
from vitcraft.errors import VitcraftError


def pick_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu; or the named device, checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VitcraftError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitcraftError("--device cuda was asked for but no CUDA device is available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise VitcraftError("--device mps was asked for but MPS is not available")
    return device


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision name on a device (None: plain fp32).

    "auto" picks bf16 on CUDA where supported, else fp16; bf16 on a CPU that
    multiplies bf16 natively (``cpu_has_bf16``), else fp32; fp32 on MPS.
    """
    if precision not in PRECISIONS:
        raise VitcraftError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        _warn_emulated_bf16()
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@functools.cache  # once per process: every evaluation asks again
def _warn_emulated_bf16() -> None:
    warnings.warn("--precision bf16 on this CPU is emulated: it has no bf16 units (AVX512-BF16 or AMX), so bf16 "
                  "matrix products run many times slower than fp32; --precision auto picks fp32 here", stacklevel=3)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (x86 AVX512-BF16 or AMX).

    There bf16 matrix products beat fp32 even at the seed model's small sizes
    (``benchmarks/throughput.py`` measures it); elsewhere PyTorch emulates
    bf16 and fp32 is faster.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu helpers; absent: no
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast is on with right now, else None."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (whose small range underflows gradients)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def pinned(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``images`` in page-locked memory when they go to a CUDA device, so ``.to(device, non_blocking=True)``
    overlaps the copy with compute; as they are for every other device."""
    return images.pin_memory() if device.type == "cuda" else images


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished its queued work (timing asynchronous devices); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def rng_devices(device: torch.device) -> list:
    """The CUDA devices whose generators ``torch.random.fork_rng`` must save besides the CPU's (none elsewhere)."""
    return [device] if device.type == "cuda" else []


def distributed_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def available_cpus() -> int:
    """CPU cores this process may use (respects taskset/cgroup affinity where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def keep_freed_memory() -> None:
    """Make glibc's malloc reuse freed blocks, however large, instead of returning them to the OS.

    A training step allocates and frees the same large activations every step,
    and the augmentation a batch of the same size every batch. By default glibc
    maps each block above a threshold (32 MB at most) afresh from the OS and
    unmaps it when freed, so the next step pays a page fault for every page of
    it again (a batch of 64 normalised images at 224 px is 38.5 MB); kept, the
    freed blocks serve the next step as they are, as the jemalloc or tcmalloc
    that PyTorch's CPU tuning guides preload would do. Linux with glibc only;
    elsewhere a no-op. Older glibc versions refuse thresholds above 32 MB: then 32 MB.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    if not libc.mallopt(m_mmap_threshold, 2**30):  # mallopt returns 0 for a value it refuses
        libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # and keep the freed top of the heap
