"""What a speed figure depends on, printed beside it: the CPU's class, its measured GEMM peak, model FLOPs.

Every benchmark prints ``describe()`` first, so no ratio appears without the
CPU class it was measured on (``../shared/tools/as-avx2-cpu`` reproduces the
AVX2 class on an AVX-512 machine: the libraries honour its caps, so the
measured peak shows them too).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith(("flags", "Features"))),
                    "").split())


def cpu_class() -> str:
    """e.g. "x86_64 AVX-512 + AMX, bf16 units: yes", from the CPU's flags and the library caps in force."""
    flags = cpu_flags()
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2"  # as-avx2-cpu
    names = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_bf16", "AMX"),
                                     ("asimd", "NEON"), ("sve", "SVE")) if flag in flags]
    note = ""
    if capped and ("AVX-512" in names or "AMX" in names):
        names, note = [name for name in names if name not in ("AVX-512", "AMX")], " (AVX-512 and AMX capped)"
    units = not capped and bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return (f"{platform.machine()} {' + '.join(names) or 'no SIMD flags found'}{note}, "
            f"bf16 units: {'yes' if units else 'no'}")


def gemm_peak(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """The best GFLOP/s of a size x size matrix product in ``dtype`` on the CPU, at the current thread count."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up: the library picks its kernel
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def images_per_second(step, batch: int, steps: int = 5) -> float:
    """Images per second of ``steps`` calls of ``step()`` (one training step of ``batch`` images each), after one
    more that warms up (allocations, the libraries' choice of kernels)."""
    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - started)


def round_robin(steps: dict, batch: int, rounds: int, steps_per_round: int) -> dict[str, float]:
    """Median images per second of each ``steps[name]()`` (a training step of ``batch`` images).

    Each round times every contender for ``steps_per_round`` steps in turn, so
    background load and the CPU's clock changes hit all of them alike; two
    steps each first warm up (allocator, the libraries' choice of kernels).
    """
    for step in steps.values():
        for _ in range(2):
            step()
    rates = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            rates[name].append(batch * steps_per_round / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def training_flops_per_image(model: torch.nn.Module, images: torch.Tensor) -> float:
    """The FLOPs of one training step (forward and backward) per image, each counted once.

    Counted by ``torch.utils.flop_counter`` (matrix products and convolutions:
    what a GEMM peak compares with), with vitcraft's C kernels off so that the
    attention shows as the matrix products it computes.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from vitcraft import ops

    with ops.use_kernels(False), FlopCounterMode(display=False) as counter:
        output = model(images)
        logits = output[0] if isinstance(output, tuple) else output
        logits.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(images)


def describe() -> str:
    """The lines every benchmark prints before its figures."""
    cpu = cpu_class()
    lines = [f"CPU: {cpu}; {torch.get_num_threads()} threads; torch {torch.__version__}",
             f"measured GEMM peak (2048 x 2048): fp32 {gemm_peak():.0f} GFLOP/s"]
    if "bf16 units: yes" in cpu:
        lines[-1] += f", bf16 {gemm_peak(torch.bfloat16):.0f} GFLOP/s"
    return "\n".join(lines)
