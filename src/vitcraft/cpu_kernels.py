"""Fused CPU kernels for the training step (``cpu_kernels.c``), with PyTorch fallbacks.

On a CPU the seed model's training step is dominated not by its matrix
products but by the passes around them: dropout's random masks and the
(B, heads, N, N) attention scores going through matmul, softmax, mask and
matmul as separate full-tensor passes, forwards and backwards. The C file
does dropout as one pass with a hashed (stored nowhere) mask, attention
with dropout one (batch, head) pair at a time inside the cache, and the tanh
GELU and LayerNorm (slow in PyTorch for rows of 48 numbers) in one pass
each way. Each takes float32, or the bfloat16 of bf16 autocast.

The C file is compiled on first use with the system C compiler (``$CC``, else
cc/gcc/clang) into the vitcraft cache (``$VITCRAFT_CACHE/kernels``, keyed by
source, compiler and processor) and loaded with ctypes. Without a compiler,
or with ``VITCRAFT_CPU_KERNELS=0``, ``available()`` is False and the model
uses PyTorch's own operations; results agree in distribution, not bit for bit
(the masks come from a different generator).

Randomness: each call draws one 64-bit seed from torch's global generator,
so ``torch.manual_seed`` and a restored RNG state repeat a run exactly.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from vitcraft.io import cache_dir

SOURCE = Path(__file__).with_name("cpu_kernels.c")
DROPOUT_ROW = 1024  # as in the C file: mask rows are this long
LAYERNORM_BLOCK = 256  # as in the C file: rows summed together in a LayerNorm's backward pass


def _new_workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="vitcraft-kernels")


_WORKERS = _new_workers()


def _replace_workers_after_fork() -> None:
    # a forked child (a DataLoader worker) inherits the pool but not its threads:
    # work sent to it would never run
    global _WORKERS
    _WORKERS = _new_workers()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_replace_workers_after_fork)


def _processor() -> str:
    """What the compiled code may depend on: -march=native targets this processor."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


# -fopenmp shares torch's OpenMP threads (see the C file); -march=native lets the
# compiler use every vector unit this processor has. Compilers that refuse either
# (Apple's clang has no OpenMP) get the plainer builds, tried in this order.
FLAG_SETS = (["-fopenmp", "-march=native"], ["-fopenmp"], ["-fopenmp-simd", "-march=native"], ["-fopenmp-simd"])


def _compile(compiler: str, target: Path, flag_sets=FLAG_SETS) -> None:
    """Build the shared library at ``target`` (atomically: parallel processes may race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        for flags in flag_sets:
            command = [compiler, "-O3", "-shared", "-fPIC", *flags, str(SOURCE), "-o", str(built), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, target)
                return
        raise OSError(f"{compiler} failed: {result.stderr.strip()[:500]}")


def _declare(lib: ctypes.CDLL) -> None:
    i64, u64, u32, f32, ptr, int_ = (ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float,
                                     ctypes.c_void_p, ctypes.c_int)
    for name in ("dropout_float", "dropout_bfloat16"):
        getattr(lib, name).argtypes = [ptr, ptr, i64, i64, u64, u32, f32, int_]
        getattr(lib, name).restype = None
    lib.gelu_forward.argtypes = [ptr, ptr, i64, i64, int_, int_]
    lib.gelu_backward.argtypes = [ptr, ptr, ptr, i64, i64, int_, int_]
    lib.gelu_forward.restype = lib.gelu_backward.restype = None
    lib.attention_forward.argtypes = [ptr] * 3 + [i64] * 6 + [int_, f32, u64, u32, f32, int_]
    lib.attention_backward.argtypes = [ptr] * 4 + [i64] * 6 + [int_, f32, u32, f32, int_]
    lib.attention_forward.restype = lib.attention_backward.restype = ctypes.c_int
    lib.layernorm_forward.argtypes = [ptr] * 5 + [i64] * 3 + [f32, int_, int_]
    lib.layernorm_backward.argtypes = [ptr] * 6 + [i64] * 3 + [int_, int_]
    lib.layernorm_forward.restype = lib.layernorm_backward.restype = None
    lib.kernels_use_openmp.restype = ctypes.c_int


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them if needed; None (after one warning) if that fails."""
    if os.environ.get("VITCRAFT_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        warnings.warn("vitcraft: no C compiler found, so the fused CPU kernels are off "
                      "(training on the CPU is slower); install gcc or clang, or set CC", stacklevel=2)
        return None
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), compiler.encode(), platform.machine().encode(),
                                     _processor().encode()])).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))
    except OSError as error:
        warnings.warn(f"vitcraft: could not build the fused CPU kernels ({error}); "
                      "training on the CPU uses PyTorch's slower operations", stacklevel=2)
        return None
    _declare(lib)
    return lib


def available() -> bool:
    return library() is not None


def _parallel(kernel, total: int, pointers: tuple, settings: tuple = (), align: int = 1) -> None:
    """Run ``kernel(*pointers, start, end, *settings, threads)`` over [0, total) on torch's thread count.

    A kernel built with OpenMP splits the range itself, in torch's own thread
    pool; otherwise the range is split here over Python threads (ctypes
    releases the GIL, so the parts run at the same time).
    """
    threads = torch.get_num_threads()

    def run(start: int, end: int, kernel_threads: int) -> None:
        if kernel(*pointers, start, end, *settings, kernel_threads) not in (None, 0):
            raise MemoryError("vitcraft's CPU attention kernel could not allocate its work buffers")

    if library().kernels_use_openmp():
        return run(0, total, threads)
    parts = max(1, min(threads, total // align))
    step = -(-total // parts // align) * align  # ceil(total / parts), rounded up to a multiple of align
    bounds = [(start, min(start + step, total)) for start in range(0, total, step)]
    futures = [_WORKERS.submit(run, start, end, 1) for start, end in bounds[1:]]
    run(*bounds[0], 1)  # the calling thread takes the first part
    for future in futures:
        future.result()


def _drop_threshold(p: float) -> tuple[int, float]:
    """An element is dropped when its 32-bit hash is below the threshold; kept ones are scaled."""
    threshold = min(round(p * 2**32), 2**32 - 1)
    return threshold, 2**32 / (2**32 - threshold)


def _new_seed() -> int:
    # from torch's global generator, so that manual_seed and saved RNG states repeat runs
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _dropout_apply(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    kernel = library().dropout_float if x.dtype == torch.float32 else library().dropout_bfloat16
    _parallel(kernel, x.numel(), (x.data_ptr(), y.data_ptr()), (seed, *_drop_threshold(p)), align=DROPOUT_ROW)
    return y


class _Dropout(torch.autograd.Function):
    """Dropout whose mask is a hash of (seed, position): the backward pass regenerates it. Shape preserving."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        ctx.seed, ctx.p = _new_seed(), p
        return _dropout_apply(x, ctx.seed, p)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return _dropout_apply(grad, ctx.seed, ctx.p), None  # the same mask, regenerated


def _usable(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Eager CPU tensors of these dtypes only: tracers (ONNX export, torch.jit,
    torch.compile) cannot see into a ctypes call, so they get PyTorch's operations."""
    tracing = (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
               or getattr(torch.compiler, "is_compiling", lambda: False)())
    return x.device.type == "cpu" and x.dtype in dtypes and not tracing and available()


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels take ``x``: an eager CPU float32 or bfloat16 tensor, kernels built."""
    return _usable(x, (torch.float32, torch.bfloat16))


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of a CPU float32 or bfloat16 tensor (see ``supports``)."""
    return _Dropout.apply(x, p)


def _bf16(x: torch.Tensor) -> int:
    """The kernels' number-type flag: 1 for bfloat16 (computed in float32 inside), 0 for float32."""
    return int(x.dtype == torch.bfloat16)


class _GELU(torch.autograd.Function):
    """The tanh-form GELU, forwards and backwards in one pass each. Shape and dtype preserving."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        _parallel(library().gelu_forward, x.numel(), (x.data_ptr(), y.data_ptr()), (_bf16(x),), align=16)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.to(x.dtype).contiguous()
        grad_x = torch.empty_like(x)
        _parallel(library().gelu_backward, x.numel(), (x.data_ptr(), grad.data_ptr(), grad_x.data_ptr()),
                  (_bf16(x),), align=16)
        return grad_x


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) of a CPU float32 or bfloat16 tensor (``supports``).

    PyTorch's own ``gelu(approximate="tanh")`` took 2.5-4.5x as long as its
    exact GELU here; this kernel's forward 2.1 ms against its 5.0 ms for a
    (256, 65, 192) tensor. Shape preserving.
    """
    return _GELU.apply(x)


class _LayerNorm(torch.autograd.Function):
    """LayerNorm over the last dimension, each row normalised (backwards: differentiated) while in the cache.

    In: x (..., C) float32, weight and bias (C,). Out: (..., C) in ``out_dtype``
    (float32, or bfloat16 to hand a bf16 matrix product its input directly).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, out_dtype: torch.dtype):
        x, channels = x.contiguous(), x.shape[-1]
        rows = x.numel() // channels
        y = torch.empty(x.shape, dtype=out_dtype)
        stats = x.new_empty(rows, 2)  # (mean, 1 / std) of each row
        weight, bias = weight.contiguous(), bias.contiguous()
        _parallel(library().layernorm_forward, rows,
                  (x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), stats.data_ptr()),
                  (channels, eps, _bf16(y)))
        ctx.save_for_backward(x, weight, stats)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, stats = ctx.saved_tensors
        channels = x.shape[-1]
        rows = x.numel() // channels
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)
        # each block of rows sums its own share of the weight and bias gradients
        partial = x.new_empty(-(-rows // LAYERNORM_BLOCK), 2, channels)
        _parallel(library().layernorm_backward, rows,
                  (x.data_ptr(), weight.data_ptr(), stats.data_ptr(), grad.data_ptr(), grad_x.data_ptr(),
                   partial.data_ptr()), (channels, _bf16(grad)), align=LAYERNORM_BLOCK)
        grad_weight, grad_bias = partial.sum(0)
        return grad_x, grad_weight, grad_bias, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension of a CPU float32 tensor, with float32 weight and bias.

    ``out_dtype=torch.bfloat16`` returns the result rounded to bfloat16, which
    is what bf16 autocast's matrix product after a LayerNorm would make of it.
    In: (..., C). Out: (..., C). Differentiable in x, weight and bias.
    """
    return _LayerNorm.apply(x, weight, bias, eps, out_dtype)


class _Attention(torch.autograd.Function):
    """Softmax attention with dropout from the fused projection's layout (see ``attention``).

    In: qkv (B, N, 3, heads, head_size). Out: (B, num_queries, heads, head_size), qkv's dtype.
    Keeps the softmax (B, heads, num_queries, N rounded up to 16), float32, for the backward pass.
    """

    @staticmethod
    def forward(ctx, qkv, num_queries: int, dropout_p: float):
        batch, num_tokens, _, heads, head_size = qkv.shape
        qkv = qkv.contiguous()
        output = qkv.new_empty(batch, num_queries, heads, head_size)
        # the softmax (rows padded to whole 16-float vectors, the dropout mask in its
        # sign bits) is kept for the backward pass only when there will be one
        padded_tokens = -(-num_tokens // 16) * 16 if ctx.needs_input_grad[0] else 0
        probs = qkv.new_empty(batch, heads, num_queries, padded_tokens, dtype=torch.float32)
        seed = _new_seed() if dropout_p > 0 else 0  # no draw without dropout: eval leaves the RNG alone
        shape = (heads, num_queries, num_tokens, head_size, _bf16(qkv), head_size ** -0.5)
        threshold, drop_scale = _drop_threshold(dropout_p)
        _parallel(library().attention_forward, batch * heads,
                  (qkv.data_ptr(), output.data_ptr(), probs.data_ptr() if probs.numel() else None),
                  (*shape, seed, threshold, drop_scale))
        ctx.save_for_backward(qkv, probs)
        ctx.settings = (*shape, threshold, drop_scale)  # the backward reads the mask from probs: no seed
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        qkv, probs = ctx.saved_tensors
        grad_output = grad_output.to(qkv.dtype).contiguous()
        grad_qkv = torch.empty_like(qkv)
        batch, heads = qkv.shape[0], qkv.shape[3]
        _parallel(library().attention_backward, batch * heads,
                  (qkv.data_ptr(), probs.data_ptr(), grad_output.data_ptr(), grad_qkv.data_ptr()), ctx.settings)
        return grad_qkv, None, None


def attention(qkv: torch.Tensor, num_queries: int, dropout_p: float) -> torch.Tensor:
    """dropout(softmax(q k^T / sqrt(head_size))) v for the first ``num_queries`` tokens, fused.

    Takes q, k and v as the fused projection lays them out and returns the
    heads side by side, so neither end needs a transposed copy.
    In: qkv (B, N, 3, heads, head_size), CPU float32 or bfloat16 (see ``supports``).
    Out: (B, num_queries, heads, head_size), same dtype. Differentiable in qkv.
    """
    return _Attention.apply(qkv, num_queries, dropout_p)
