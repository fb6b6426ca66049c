"""Inference speed, size and accuracy of a trained model in every runtime vitcraft exports to, in one run.

    python benchmarks/inference.py RUN_DIR [--rounds 5] [--latency-calls 200]

For the run's model (say seed-tiny trained on ../shared/data/cifar10-jpeg) and
a ViT-Ti/16-shaped model at 224 px (random weights: speed and size only):
vitcraft in PyTorch (fp32, and bf16 autocast on a CPU with bf16 units), timm
with the same weights, ONNX Runtime fp32 (the plain export, and the graph with
onnxruntime's fused ops that int8 is quantised from), and ONNX Runtime
int8 (static and dynamic quantisation, ``vitcraft export --quantize int8``).
Printed per contender: images/s at batch 1 and 64 (at 64, the median of
``--rounds`` round-robin rounds, each the median call of at least a second of
calls after a warm-up), latency p50 and p99 at batch 1, size on disk, test
accuracy (the run's model only), and the ratios to ONNX Runtime fp32 (speed at
batch 64, size). The CPU class and the measured GEMM peak come first.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

from vitcraft import create_model  # noqa: E402
from vitcraft.device import autocast, autocast_dtype  # noqa: E402
from vitcraft.export import OnnxModel, calibration_images, export_int8, export_onnx  # noqa: E402
from vitcraft.files import save_tensors_atomic  # noqa: E402
from vitcraft.interop import to_timm_kwargs, to_timm_state_dict  # noqa: E402
from vitcraft.runs import load_trained_model  # noqa: E402

CPU = torch.device("cpu")


def contenders(model: torch.nn.Module, folder: Path, calibration: torch.Tensor):
    """(name, callable on a normalised float batch returning logits, file on disk) per runtime."""
    model = model.float().eval()
    weights = save_tensors_atomic(folder / "model.safetensors", model.state_dict())

    def torch_call(dtype):
        def call(x):
            with torch.inference_mode(), autocast(CPU, dtype):
                return model(x)[0].float()
        return call

    yield "vitcraft PyTorch fp32", torch_call(None), weights
    if autocast_dtype(CPU, "auto") is not None:
        yield "vitcraft PyTorch bf16", torch_call(torch.bfloat16), weights
    from timm.models.vision_transformer import VisionTransformer

    twin = VisionTransformer(**to_timm_kwargs(model)).eval()
    twin.load_state_dict(to_timm_state_dict(model))

    def timm_call(x):
        with torch.inference_mode():
            return twin(x)

    yield "timm, same weights, fp32", timm_call, weights
    fp32 = export_onnx(model, folder / "model.onnx")
    # the graph the int8 files are quantised from: onnxruntime's fused ops, in float32
    files = {"ONNX Runtime fp32": fp32,
             "ONNX Runtime fp32, fused ops": export_onnx(model, folder / "model-fused.onnx", onnxruntime_ops=True)}
    for method in ("static", "dynamic"):
        files[f"ONNX Runtime int8 ({method})"] = export_int8(model, folder / f"model-int8-{method}.onnx", method,
                                                             calibration)
    for name, path in files.items():
        session = OnnxModel(path)
        yield name, (lambda x, session=session: session(x)[0]), path


def timed(call: Callable, batch: torch.Tensor, calls: int, min_seconds: float = 0.0) -> list[float]:
    """Seconds of each call on ``batch``: at least ``calls`` calls and at least ``min_seconds`` in all.

    Warm-up calls come first, for at least a fifth of ``min_seconds``: the thread pools of the
    runtime measured before (PyTorch's, another onnxruntime session's) spin on for a while after
    their last call and would otherwise share the two cores with this one's first calls.
    """
    started = time.perf_counter()
    while True:
        call(batch)
        if time.perf_counter() - started >= min_seconds / 5:
            break
    seconds: list[float] = []
    while len(seconds) < calls or sum(seconds) < min_seconds:
        started = time.perf_counter()
        call(batch)
        seconds.append(time.perf_counter() - started)
    return seconds


def accuracy(call: Callable, images: torch.Tensor, labels: torch.Tensor, normalize: Callable) -> float:
    hits = 0
    for start in range(0, len(images), 500):
        logits = call(normalize(images[start:start + 500].float() / 255))
        hits += int((logits.argmax(1) == labels[start:start + 500]).sum())
    return hits / len(images)


def measure(title: str, model: torch.nn.Module, normalize: Callable, calibration: torch.Tensor,
            test: tuple[torch.Tensor, torch.Tensor] | None, rounds: int, latency_calls: int) -> None:
    config = model.config
    shape = (config.num_channels, config.image_size, config.image_size)
    one, many = torch.randn(1, *shape), torch.randn(64, *shape)
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = list(contenders(model, Path(tmp), calibration))
        rates = {name: [] for name, _, _ in runtimes}
        for _ in range(rounds):  # round-robin: drift in the machine's speed hits every runtime alike
            for name, call, _ in runtimes:
                rates[name].append(64 / statistics.median(timed(call, many, 3, min_seconds=1.0)))
        rows = []
        for name, call, path in runtimes:
            latency = sorted(timed(call, one, latency_calls, min_seconds=0.5))
            acc = f"{100 * accuracy(call, *test, normalize):.2f}%" if test else "-"
            rows.append((name, 1 / statistics.median(latency), statistics.median(rates[name]),
                         1000 * latency[len(latency) // 2], 1000 * latency[min(len(latency) - 1,
                                                                             int(0.99 * len(latency)))],
                         path.stat().st_size / 2**20, acc))
    reference = next(row for row in rows if row[0] == "ONNX Runtime fp32")
    print(f"\n{title}")
    print("| runtime | img/s batch 1 | img/s batch 64 | x ORT fp32 (batch 64) | p50 ms | p99 ms | MB on disk "
          "| size x ORT fp32 | test accuracy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rate1, rate64, p50, p99, size, acc in rows:
        print(f"| {name} | {rate1:.0f} | {rate64:.0f} | {rate64 / reference[2]:.2f} | {p50:.2f} | {p99:.2f} | "
              f"{size:.2f} | {size / reference[5]:.2f} | {acc} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a trained run (its test split gives the accuracy column)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-calls", type=int, default=200)
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--skip-224", action="store_true", help="leave out the ViT-Ti/16 model at 224 px")
    args = parser.parse_args()
    print(describe())
    print(f"git {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout}")

    from vitcraft.augment import Normalization
    from vitcraft.data import load_splits
    from vitcraft.runs import load_run_config

    model, metadata = load_trained_model(args.run_dir)
    normalize = Normalization(tuple(metadata["mean"]), tuple(metadata["std"]))
    data = load_run_config(args.run_dir).data
    train, test = load_splits(data.data, Path(data.data_root) if data.data_root else None,
                              metadata["model_config"]["image_size"],
                              Path(data.cache_dir) if data.cache_dir else None, crop_pct=metadata.get("crop_pct"))
    # as `vitcraft export` does
    calibration = calibration_images(train, normalize, args.calibration_images, test.image_size)
    measure(f"{metadata['preset']} from {args.run_dir} ({len(test)} test images)", model, normalize, calibration,
            (test.images, test.labels), args.rounds, args.latency_calls)
    if not args.skip_224:
        big = create_model("vit-tiny-p16-224", num_classes=10)
        measure("vit-tiny-p16-224 (ViT-Ti/16 shape, 224 px, random weights: speed and size only)", big,
                lambda x: x, torch.randn(64, 3, 224, 224), None, args.rounds, max(20, args.latency_calls // 10))


if __name__ == "__main__":
    main()
