"""Activation memory of one training step, with and without gradient checkpointing, per block saved.

    python benchmarks/memory.py [--presets seed-tiny vit-tiny-p4-32 cnn-small] [--batch-size 128] [--no-kernels]

What a training step keeps between forward and backward is every tensor
autograd saves for the backward pass. ``torch.autograd.graph.saved_tensors_hooks``
sees each of them as it is saved; summing their distinct storages (views of
one storage count once, parameters not at all) gives the activation memory
exactly, on any device, without a memory profiler. With checkpointing,
autograd's own hooks inside each checkpointed block replace ours (the
innermost hooks win), so what is counted is what really stays: the blocks'
inputs, which checkpointing holds to recompute from (counted through forward
pre-hooks), and whatever runs outside the blocks. During backward one block
at a time is recomputed, so the peak with checkpointing is about the figure
shown plus one block's share. The model is in training mode with the
preset's own dropout, as in ``vitcraft train``. vitcraft's C kernels save
other tensors than PyTorch's operations do (their dropout keeps no mask, for
one); ``--no-kernels`` measures PyTorch's (``ops.use_kernels(False)``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from vitcraft import create_model, ops


def checkpointed_units(model: nn.Module) -> list[nn.Module]:
    """The modules set_grad_checkpointing recomputes: a ViT's blocks, a CNN's stages."""
    if hasattr(model, "encoder"):
        return list(model.encoder.blocks)
    if hasattr(model, "stages"):
        return list(model.stages)
    raise ValueError(f"{type(model).__name__}: no encoder.blocks or stages to checkpoint")


def saved_activation_bytes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct storages kept for backward by one forward pass (parameters excluded)."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            kept[storage.data_ptr()] = storage.nbytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        keep(tensor)
        return tensor

    hooks = [unit.register_forward_pre_hook(lambda _, args: keep(args[0])) for unit in checkpointed_units(model)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = F.cross_entropy(model(images)[0], labels)
    finally:
        for hook in hooks:
            hook.remove()
    loss.backward()  # the step completes (and checks that the graph is whole)
    return sum(kept.values())


def measure(preset: str, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = create_model(preset).train()
    config = model.config
    images = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size)
    labels = torch.randint(0, config.num_classes, (batch_size,))
    plain = saved_activation_bytes(model, images, labels)
    model.set_grad_checkpointing(True)
    checkpointed = saved_activation_bytes(model, images, labels)
    blocks = len(checkpointed_units(model))
    return {"preset": preset, "batch": batch_size, "blocks": blocks, "plain": plain, "checkpointed": checkpointed,
            "per_block": (plain - checkpointed) / blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["seed-tiny", "vit-tiny-p4-32", "deit-seed-tiny", "cnn-small"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-kernels", action="store_true",
                        help="PyTorch's operations instead of vitcraft's C kernels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ops.use_kernels(not args.no_kernels)
    mib = 2 ** 20
    print(f"{'preset':<16} {'batch':>5} {'blocks':>6} {'no ckpt MiB':>12} {'ckpt MiB':>9} {'saved/block MiB':>16} "
          f"{'saved/block/image KiB':>22} {'ratio':>6}")
    for preset in args.presets:
        r = measure(preset, args.batch_size)
        print(f"{r['preset']:<16} {r['batch']:>5} {r['blocks']:>6} {r['plain'] / mib:>12.1f} "
              f"{r['checkpointed'] / mib:>9.1f} {r['per_block'] / mib:>16.2f} "
              f"{r['per_block'] / r['batch'] / 1024:>22.1f} {r['plain'] / r['checkpointed']:>5.1f}x", flush=True)


if __name__ == "__main__":
    main()
