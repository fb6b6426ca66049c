"""Training-step throughput of the seed model, vitcraft against the alternatives, side by side.

    python benchmarks/throughput.py [--batch-size 256] [--rounds 5] [--steps 5] [--precision auto]

Each round times every contender for a few AdamW steps on the same random
batch, round-robin, so background load hits all of them alike; the median
over rounds is printed with its ratio to the tutorial's models and to timm.
The tutorial's models are benchmarks/reference.py's (torch.nn modules only).
vitcraft runs in float32, once more with its C kernels switched off
(``ops.use_kernels(False)``: PyTorch's operations, to show what the kernels
add) and in ``--precision`` where that is not fp32: ``auto`` is bf16 autocast
on a CPU with bf16 units (``device.autocast_dtype``). Under
``../shared/tools/as-avx2-cpu`` pass ``--precision fp32``: vitcraft's own
check still sees the machine's bf16 units, which the capped libraries no
longer use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_class, describe, gemm_peak, round_robin, training_flops_per_image  # noqa: E402
from reference import timm_model, tutorial_model  # noqa: E402

from vitcraft import ViTConfig, ViTForClassification, ops  # noqa: E402
from vitcraft.device import autocast, autocast_dtype  # noqa: E402


def contenders(precision: str = "auto"):
    """(name, model builder, autocast dtype or None, C kernels on) of each contender."""
    yield "tutorial per-head (MultiHeadAttention)", lambda: tutorial_model(use_faster_attention=False), None, True
    yield "tutorial fused (FasterMultiHeadAttention)", lambda: tutorial_model(use_faster_attention=True), None, True
    yield "timm VisionTransformer, same shape", timm_model, None, True
    yield ("vitcraft seed-tiny, per_head backend, fp32",
           lambda: ViTForClassification(ViTConfig(attention_backend="per_head")), None, True)
    yield "vitcraft seed-tiny, default backend, fp32", lambda: ViTForClassification(ViTConfig()), None, True
    yield ("vitcraft seed-tiny, default, fp32, no kernels",
           lambda: ViTForClassification(ViTConfig()), None, False)
    default_dtype = autocast_dtype(torch.device("cpu"), precision)
    if default_dtype is not None:
        yield (f"vitcraft seed-tiny, --precision {precision} ({str(default_dtype).removeprefix('torch.')})",
               lambda: ViTForClassification(ViTConfig()), default_dtype, True)


def make_step(model, dtype, kernels, images, labels):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    model.train()
    device = torch.device("cpu")

    def step():
        with ops.use_kernels(kernels):  # the backward pass too: a checkpointed block recomputes in it
            with autocast(device, dtype):
                output = model(images)
                logits = output[0] if isinstance(output, tuple) else output
                loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="vitcraft's last row (none for fp32: the fp32 rows are there anyway)")
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))
    steps = {name: make_step(build(), dtype, kernels, images, labels)
             for name, build, dtype, kernels in contenders(args.precision)}
    median = round_robin(steps, args.batch_size, args.rounds, args.steps)
    per_head = median["tutorial per-head (MultiHeadAttention)"]
    fused = median["tutorial fused (FasterMultiHeadAttention)"]
    timm_rate = median["timm VisionTransformer, same shape"]
    flops = training_flops_per_image(ViTForClassification(ViTConfig()), images[:8])  # the same for every contender
    peaks = {None: gemm_peak()}
    if "bf16 units: yes" not in cpu_class():  # emulated bf16 has no peak worth the name: measure against fp32's
        peaks[torch.bfloat16] = peaks[None]
    print(describe())
    print(f"training throughput, batch {args.batch_size}; model FLOPs per training image {flops / 1e6:.1f} M "
          f"(forward and backward, counted once); '% peak': of the measured GEMM peak in the contender's precision "
          f"(fp32's where bf16 is emulated)")
    print(f"{'model':<45} {'img/s':>8} {'x per-head':>11} {'x fused':>8} {'x timm':>7} {'% peak':>7}")
    for (name, _, dtype, _), rate in zip(contenders(args.precision), median.values()):
        peak = peaks.setdefault(dtype, gemm_peak(dtype))
        print(f"{name:<45} {rate:8.0f} {rate / per_head:11.2f} {rate / fused:8.2f} {rate / timm_rate:7.2f} "
              f"{100 * rate * flops / 1e9 / peak:7.1f}")


if __name__ == "__main__":
    main()
