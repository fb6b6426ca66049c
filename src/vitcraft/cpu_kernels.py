"""Fused CPU kernels for the training step (``cpu_kernels.c``), loaded with ctypes.

On a CPU the seed model's training step is dominated not by its matrix
products but by the passes around them: dropout's random masks and the
(B, heads, N, N) attention scores going through matmul, softmax, mask and
matmul as separate full-tensor passes, forwards and backwards. The C file
does dropout as one pass with a hashed (stored nowhere) mask, attention
with dropout one (batch, head) pair at a time inside the cache, and the tanh
GELU and LayerNorm (slow in PyTorch on rows as short as a small ViT's) in one
pass each way. Each takes float32, or the bfloat16 of bf16 autocast.
``vitcraft.ops`` decides when they run; this module only builds and calls them.

The C file is compiled on first use with the system C compiler (``$CC``, else
cc/gcc/clang), plus any flags in ``$VITCRAFT_CFLAGS`` (split as a shell would),
into the vitcraft cache (``$VITCRAFT_CACHE/kernels``, keyed by source,
compiler, flags and processor) and loaded with ctypes.
``VITCRAFT_CPU_KERNELS`` says what happens then:

- ``0``: the kernels are off, nothing is compiled;
- ``require``: a failed build raises :class:`KernelBuildError`, with the
  compiler's full output (CI sets this, so a broken C file fails the tests);
- anything else, or unset: a failed build (or no compiler) warns once and
  ``available()`` is False, so vitcraft uses PyTorch's own operations; results
  agree in distribution, not bit for bit (the masks come from another generator).

Each C function's argument list is written once on this side, in
``SIGNATURES``: the ctypes declarations and every call are made from it, by
argument name. Sizes the two sides must agree on (vector width, dropout row,
LayerNorm block) are read from the library, not copied.

Randomness: each call draws one 64-bit seed from torch's global generator,
so ``torch.manual_seed`` and a restored RNG state repeat a run exactly.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from vitcraft.files import cache_dir

SOURCE = Path(__file__).with_name("cpu_kernels.c")


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded; the message carries the compiler's output."""


# ---- the C functions' signatures, each written once --------------------------------------

_C_TYPES = {"ptr": ctypes.c_void_p, "i64": ctypes.c_int64, "u64": ctypes.c_uint64, "u32": ctypes.c_uint32,
            "f32": ctypes.c_float, "int": ctypes.c_int, "void": None}

# name: (return type, "argument:type ..." in the C function's order, with its parameter names).
# start, end and threads are filled in by _parallel.
SIGNATURES = {
    "kernels_use_openmp": ("int", ""),
    "kernels_vector_width": ("int", ""),
    "kernels_dropout_row": ("int", ""),
    "kernels_layernorm_block": ("int", ""),
    "dropout_float": ("void", "x:ptr y:ptr start:i64 end:i64 seed:u64 threshold:u32 scale:f32 threads:int"),
    "dropout_bfloat16": ("void", "x:ptr y:ptr start:i64 end:i64 seed:u64 threshold:u32 scale:f32 threads:int"),
    "gelu_forward": ("void", "x:ptr y:ptr start:i64 end:i64 bf16:int threads:int"),
    "gelu_backward": ("void", "x:ptr dy:ptr dx:ptr start:i64 end:i64 bf16:int threads:int"),
    "layernorm_forward": ("void", "x:ptr weight:ptr bias:ptr y:ptr stats:ptr start:i64 end:i64 c:i64 eps:f32 "
                                  "y_bf16:int threads:int"),
    "layernorm_backward": ("void", "x:ptr weight:ptr stats:ptr dy:ptr dx:ptr partial:ptr start:i64 end:i64 c:i64 "
                                   "dy_bf16:int threads:int"),
    "attention_forward": ("int", "qkv:ptr out:ptr probs:ptr start:i64 end:i64 heads:i64 nq:i64 n:i64 d:i64 "
                                 "bf16:int qk_scale:f32 seed:u64 threshold:u32 drop_scale:f32 mask_diagonal:int "
                                 "threads:int"),
    "attention_backward": ("int", "qkv:ptr probs:ptr dout:ptr dqkv:ptr start:i64 end:i64 heads:i64 nq:i64 n:i64 "
                                  "d:i64 bf16:int qk_scale:f32 threshold:u32 drop_scale:f32 threads:int"),
}


@functools.cache
def arguments_of(name: str) -> tuple[tuple[str, str], ...]:
    """((argument name, type name), ...) of C function ``name``, in its order."""
    return tuple(tuple(argument.split(":")) for argument in SIGNATURES[name][1].split())


def _declare(lib: ctypes.CDLL) -> None:
    """Give every function in SIGNATURES its ctypes argument and return types."""
    for name, (restype, _) in SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes = [_C_TYPES[kind] for _, kind in arguments_of(name)]
        function.restype = _C_TYPES[restype]


def _call(name: str, **arguments):
    """Call C function ``name`` with its arguments by name, put in its order here.

    A missing or unknown argument raises TypeError before anything reaches C,
    where it would have been read as garbage.
    """
    names = [argument for argument, _ in arguments_of(name)]
    if set(arguments) != set(names):
        missing, unknown = sorted(set(names) - set(arguments)), sorted(set(arguments) - set(names))
        raise TypeError(f"cpu_kernels.{name}: missing arguments {missing}, unknown arguments {unknown}")
    lib = library()
    if lib is None:
        raise RuntimeError("vitcraft's CPU kernels are not available (VITCRAFT_CPU_KERNELS=0, or the build "
                           "failed: see the warning); vitcraft.ops uses PyTorch's operations instead")
    return getattr(lib, name)(*(arguments[argument] for argument in names))


# ---- building and loading ----------------------------------------------------------------

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


def find_compiler() -> str | None:
    """``$CC``, else the first of cc, gcc, clang on the PATH; None if there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def extra_flags() -> list[str]:
    """``$VITCRAFT_CFLAGS`` split as a shell would: appended to every compiler command."""
    return shlex.split(os.environ.get("VITCRAFT_CFLAGS", ""))


def library_path(compiler: str, source: Path = SOURCE, flags: list[str] | tuple[str, ...] = ()) -> Path:
    """Where the build of ``source`` by ``compiler`` with extra ``flags`` is cached on this processor."""
    parts = [source.read_bytes(), compiler.encode(), shlex.join(flags).encode(), platform.machine().encode(),
             _processor().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return cache_dir() / "kernels" / f"cpu_kernels-{key}.so"


def _compile(compiler: str, target: Path, flag_sets=FLAG_SETS, source: Path = SOURCE,
             extra: list[str] | tuple[str, ...] = ()) -> None:
    """Build the shared library at ``target`` (atomically: parallel processes may race).

    Each of ``flag_sets`` is tried in turn, ``extra`` flags last on every
    command. Raises KernelBuildError with every command tried and all that the
    compiler printed for it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    attempts = []
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        for flags in flag_sets:
            command = [compiler, "-O3", "-shared", "-fPIC", *flags, str(source), "-o", str(built), "-lm", *extra]
            try:
                result = subprocess.run(command, capture_output=True, text=True)
            except OSError as error:  # no such program, or not executable
                raise KernelBuildError(f"could not build the fused CPU kernels: cannot run {compiler}: {error}") \
                    from error
            if result.returncode == 0:
                os.replace(built, target)
                return
            attempts.append(f"$ {shlex.join(command)}\n{(result.stdout + result.stderr).strip()}")
    raise KernelBuildError("could not build the fused CPU kernels; every command failed:\n\n" + "\n\n".join(attempts))


def build(source: Path = SOURCE) -> ctypes.CDLL:
    """Compile ``source`` (unless cached) and load it, whatever ``VITCRAFT_CPU_KERNELS`` says.

    Raises KernelBuildError when there is no compiler, the build fails (the
    message has the compiler's output) or the library will not load.
    """
    compiler = find_compiler()
    if compiler is None:
        raise KernelBuildError("no C compiler found for the fused CPU kernels: install gcc or clang, or set CC")
    flags = extra_flags()
    target = library_path(compiler, source, flags)
    if not target.exists():
        _compile(compiler, target, source=source, extra=flags)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as error:
        raise KernelBuildError(f"could not load the fused CPU kernels from {target}: {error}") from error
    _declare(lib)
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None if off or (after one warning) if the build failed.

    Under ``VITCRAFT_CPU_KERNELS=require`` a failed build raises instead;
    a failure is not remembered then, so the next call tries again.
    """
    mode = os.environ.get("VITCRAFT_CPU_KERNELS", "1")
    if mode == "0":
        return None
    try:
        return build(SOURCE)
    except KernelBuildError as error:
        if mode == "require":
            raise
        warnings.warn(f"vitcraft: {error}\nTraining on the CPU uses PyTorch's slower operations instead "
                      "(VITCRAFT_CPU_KERNELS=require makes this an error)", stacklevel=2)
        return None


def available() -> bool:
    """Whether the kernels are built and loaded (see ``library``)."""
    return library() is not None


# ---- calling the kernels -------------------------------------------------------------------

def _parallel(name: str, total: int, align: int = 1, **arguments) -> None:
    """Run C function ``name`` over [0, total) with torch's thread count; ``arguments`` by name.

    A library built with OpenMP splits the range itself, in torch's own thread
    pool; otherwise the range is split here, in multiples of ``align``, over
    Python threads (ctypes releases the GIL, so the parts run at the same time).
    """
    threads = torch.get_num_threads()

    def run(start: int, end: int, kernel_threads: int) -> None:
        if _call(name, start=start, end=end, threads=kernel_threads, **arguments) not in (None, 0):
            raise MemoryError(f"vitcraft's CPU kernel {name} could not allocate its work buffers")

    if _call("kernels_use_openmp"):
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


def _bf16(x: torch.Tensor) -> int:
    """The kernels' number-type flag: 1 for bfloat16 (computed in float32 inside), 0 for float32."""
    return int(x.dtype == torch.bfloat16)


def _dropout_apply(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    threshold, scale = _drop_threshold(p)
    _parallel("dropout_bfloat16" if _bf16(x) else "dropout_float", x.numel(), align=_call("kernels_dropout_row"),
              x=x.data_ptr(), y=y.data_ptr(), seed=seed, threshold=threshold, scale=scale)
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


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout, 0 < p < 1, of a CPU float32 or bfloat16 tensor. Shape preserving."""
    return _Dropout.apply(x, p)


class _GELU(torch.autograd.Function):
    """The tanh-form GELU, forwards and backwards in one pass each. Shape and dtype preserving."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        _parallel("gelu_forward", x.numel(), align=_call("kernels_vector_width"),
                  x=x.data_ptr(), y=y.data_ptr(), bf16=_bf16(x))
        ctx.save_for_backward(x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.to(x.dtype).contiguous()
        grad_x = torch.empty_like(x)
        _parallel("gelu_backward", x.numel(), align=_call("kernels_vector_width"),
                  x=x.data_ptr(), dy=grad.data_ptr(), dx=grad_x.data_ptr(), bf16=_bf16(x))
        return grad_x


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) of a CPU float32 or bfloat16 tensor. Shape preserving."""
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
        _parallel("layernorm_forward", rows, x=x.data_ptr(), weight=weight.data_ptr(), bias=bias.data_ptr(),
                  y=y.data_ptr(), stats=stats.data_ptr(), c=channels, eps=eps, y_bf16=_bf16(y))
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
        block = _call("kernels_layernorm_block")
        partial = x.new_empty(-(-rows // block), 2, channels)
        _parallel("layernorm_backward", rows, align=block, x=x.data_ptr(), weight=weight.data_ptr(),
                  stats=stats.data_ptr(), dy=grad.data_ptr(), dx=grad_x.data_ptr(), partial=partial.data_ptr(),
                  c=channels, dy_bf16=_bf16(grad))
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
    Keeps the softmax (B, heads, num_queries, N rounded up to whole vectors),
    float32, for the backward pass.
    """

    @staticmethod
    def forward(ctx, qkv, num_queries: int, dropout_p: float, mask_diagonal: bool):
        batch, num_tokens, _, heads, head_size = qkv.shape
        qkv = qkv.contiguous()
        output = qkv.new_empty(batch, num_queries, heads, head_size)
        # the softmax (rows padded to whole vectors, the dropout mask in its sign
        # bits) is kept for the backward pass only when there will be one
        width = _call("kernels_vector_width")
        padded_tokens = -(-num_tokens // width) * width if ctx.needs_input_grad[0] else 0
        probs = qkv.new_empty(batch, heads, num_queries, padded_tokens, dtype=torch.float32)
        seed = _new_seed() if dropout_p > 0 else 0  # no draw without dropout: eval leaves the RNG alone
        threshold, drop_scale = _drop_threshold(dropout_p)
        # the backward pass reads the mask from probs: it needs no seed
        ctx.settings = dict(heads=heads, nq=num_queries, n=num_tokens, d=head_size, bf16=_bf16(qkv),
                            qk_scale=head_size ** -0.5, threshold=threshold, drop_scale=drop_scale)
        _parallel("attention_forward", batch * heads, qkv=qkv.data_ptr(), out=output.data_ptr(),
                  probs=probs.data_ptr() if probs.numel() else None, seed=seed, mask_diagonal=int(mask_diagonal),
                  **ctx.settings)
        ctx.save_for_backward(qkv, probs)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        qkv, probs = ctx.saved_tensors
        grad_output = grad_output.to(qkv.dtype).contiguous()
        grad_qkv = torch.empty_like(qkv)
        batch, heads = qkv.shape[0], qkv.shape[3]
        _parallel("attention_backward", batch * heads, qkv=qkv.data_ptr(), probs=probs.data_ptr(),
                  dout=grad_output.data_ptr(), dqkv=grad_qkv.data_ptr(), **ctx.settings)
        return grad_qkv, None, None, None


def attention(qkv: torch.Tensor, num_queries: int, dropout_p: float, mask_diagonal: bool = False) -> torch.Tensor:
    """dropout(softmax(q k^T / sqrt(head_size))) v for the first ``num_queries`` tokens, fused.

    Takes q, k and v as the fused projection lays them out and returns the
    heads side by side, so neither end needs a transposed copy. With
    ``mask_diagonal`` no token attends to itself (locality self-attention).
    In: qkv (B, N, 3, heads, head_size), CPU float32 or bfloat16.
    Out: (B, num_queries, heads, head_size), same dtype. Differentiable in qkv.
    """
    return _Attention.apply(qkv, num_queries, dropout_p, mask_diagonal)
