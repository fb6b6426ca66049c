"""vitcraft's fast paths, chosen here and nowhere else.

Each operation below picks how to compute itself from what it is handed:

- vitcraft's fused C kernel (``cpu_kernels``) for an eager CPU float32 or
  bfloat16 tensor, when the kernels are built and switched on;
- ``F.scaled_dot_product_attention`` for attention elsewhere (CUDA, MPS), or on
  the CPU when there is no dropout to apply;
- plain PyTorch otherwise, including whenever a tracer is watching (ONNX
  export, torch.jit, torch.compile cannot see into a ctypes call).

The choices give the same numbers up to float rounding; only the dropout
masks come from another generator. ``use_kernels(False)`` turns the C kernels
off for a while (tests, benchmarks against PyTorch's own operations).

The model (model.py) reads like the seed tutorial and calls these through
``ops.Dropout``, ``ops.LayerNorm``, ``ops.gelu_tanh`` and ``ops.attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitcraft import cpu_kernels
from vitcraft.device import cpu_autocast_dtype

_kernels_enabled = True


class use_kernels:
    """Switch vitcraft's C kernels on or off; PyTorch's operations replace them while off.

    ``ops.use_kernels(False)`` switches at once and stays switched;
    ``with ops.use_kernels(False): ...`` switches back on leaving the block.
    The switch is process-wide, not per thread. A gradient-checkpointed block
    recomputed in a backward pass run after the block has been left takes
    whatever the switch says then.
    """

    def __init__(self, enabled: bool = True):
        global _kernels_enabled
        self.previous, _kernels_enabled = _kernels_enabled, bool(enabled)

    def __enter__(self) -> "use_kernels":
        return self

    def __exit__(self, *exc_info) -> None:
        global _kernels_enabled
        _kernels_enabled = self.previous


def kernels_enabled() -> bool:
    """Whether ``use_kernels`` lets the C kernels run (they may still be unavailable)."""
    return _kernels_enabled


def _tracing() -> bool:
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or getattr(torch.compiler, "is_compiling", lambda: False)())


def kernels_take(x: torch.Tensor) -> bool:
    """Whether the C kernels compute ``x``: an eager CPU float32 or bfloat16 tensor, kernels built and on."""
    return (_kernels_enabled and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not _tracing() and cpu_kernels.available())


def dropout(x: torch.Tensor, p: float, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the kept ones by 1 / (1 - p); identity unless training.

    On the CPU the kernel hashes (seed, position) into the keep/drop decision
    in the same pass that scales, instead of drawing and storing a mask: the
    backward pass regenerates the mask from the seed.
    In: any shape. Out: the same shape and dtype.
    """
    if not training or p == 0:
        return x
    if p < 1 and kernels_take(x):
        return cpu_kernels.dropout(x, p)
    return F.dropout(x, p, training, inplace)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU in its tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    PyTorch's ``gelu(approximate="tanh")`` off the kernels' path.
    In: any shape. Out: the same shape and dtype.
    """
    if kernels_take(x):
        return cpu_kernels.gelu_tanh(x)
    return F.gelu(x, approximate="tanh")


def layer_norm(x: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None,
               bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.layer_norm``, for a LayerNorm whose output feeds a matrix product.

    The kernel takes a float32 input normalised over its last dimension, with
    weight and bias. Under CPU bf16 autocast it returns bfloat16: the product
    that follows would round its input to bfloat16 anyway, so handing it
    bfloat16 gives the same numbers with one copy fewer (PyTorch's own
    LayerNorm returns float32 under autocast).
    In: (..., *normalized_shape). Out: the same shape; float32, or bfloat16 as above.
    """
    if (x.dtype == torch.float32 and len(normalized_shape) == 1 and weight is not None and bias is not None
            and kernels_take(x)):
        out_dtype = torch.bfloat16 if cpu_autocast_dtype() == torch.bfloat16 else torch.float32
        return cpu_kernels.layer_norm(x, weight, bias, eps, out_dtype)
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def split_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values, one head after another.

    In: qkv (B, N, 3, heads, head_size), the fused projection's output.
    Out: query, key, value, each (B, heads, N, head_size).
    """
    # one copy here spares each matrix product below a copy of its own
    return qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # 3 x (B, heads, N, head_size)


def softmax_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0,
                      attention_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dropout(softmax(q k^T / sqrt(head_size) + bias)) v, written out, keeping the probabilities.

    The one plain-PyTorch attention: the model's explicit path (attention
    maps, the fused backend) and ``attention``'s fallback both run it.
    ``dropout_p`` applies as given (pass 0 in eval mode).
    In: query (B, heads, Q, head_size), key and value (B, heads, N, head_size),
    attention_bias broadcasting to (B, heads, Q, N) or None.
    Out: (output (B, heads, Q, head_size), probabilities before dropout (B, heads, Q, N)).
    """
    # scaling q (Q x head_size numbers) is cheaper than scaling the scores (Q x N)
    scores = (query * query.shape[-1] ** -0.5) @ key.transpose(-1, -2)  # (B, heads, Q, N)
    if attention_bias is not None:
        scores = scores + attention_bias
    attention_probs = scores.softmax(dim=-1)
    return dropout(attention_probs, dropout_p) @ value, attention_probs


def with_diagonal_mask(attention_bias: torch.Tensor | None, num_queries: int, num_tokens: int,
                       device: torch.device | str) -> torch.Tensor:
    """``attention_bias`` plus locality self-attention's diagonal mask (Lee et al. 2021): no token attends to
    itself. In: a bias broadcasting to (B, heads, Q, N), or None. Out: (Q, N) with -inf at (i, i) and 0
    elsewhere, plus the bias."""
    diagonal = torch.arange(num_queries, device=device)[:, None] == torch.arange(num_tokens, device=device)  # (Q, N)
    # masked_fill rather than fill_diagonal_, which ONNX export lacks
    mask = torch.zeros(num_queries, num_tokens, device=device).masked_fill(diagonal, float("-inf"))
    return mask if attention_bias is None else attention_bias + mask


def attention(qkv: torch.Tensor, dropout_p: float = 0.0, num_queries: int | None = None,
              attention_bias: torch.Tensor | None = None, mask_diagonal: bool = False) -> torch.Tensor:
    """Softmax attention of the first ``num_queries`` tokens over all of them, fused where possible.

    out = dropout(softmax(q k^T / sqrt(head_size) + attention_bias)) v, with
    ``dropout_p`` as given (pass 0 in eval mode); ``mask_diagonal``: no token
    attends to itself (``with_diagonal_mask``). Without a bias the C kernel
    takes q, k and v straight from the fused projection's layout and writes
    the heads side by side, so neither end needs a transposed copy. On the CPU
    SDPA runs only without dropout: with dropout it falls back to separate
    passes of its own, no faster than ``softmax_attention``.
    In: qkv (B, N, 3, heads, head_size); attention_bias broadcasting to
    (B, heads, Q, N) or None (Swin's relative position bias and window mask).
    Out: (B, Q, heads, head_size), Q = ``num_queries`` or N.
    """
    if attention_bias is None and kernels_take(qkv):
        return cpu_kernels.attention(qkv, num_queries or qkv.shape[1], dropout_p, mask_diagonal)
    if mask_diagonal:
        attention_bias = with_diagonal_mask(attention_bias, num_queries or qkv.shape[1], qkv.shape[1], qkv.device)
    query, key, value = split_heads(qkv)
    query = query[:, :, :num_queries]  # (B, heads, Q, head_size); all N for None
    if dropout_p == 0 or qkv.device.type != "cpu":
        if attention_bias is not None:  # SDPA wants the bias in q's dtype (bfloat16 under autocast)
            attention_bias = attention_bias.to(query.dtype)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_bias, dropout_p=dropout_p)
    else:
        output, _ = softmax_attention(query, key, value, dropout_p, attention_bias)
    return output.transpose(1, 2)  # (B, Q, heads, head_size)


class Dropout(nn.Dropout):
    """nn.Dropout computed by ``ops.dropout`` (the C kernel on the CPU while training).

    A subclass, so it is still an ``nn.Dropout`` to code that looks for one.
    In: any shape. Out: the same shape.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training, self.inplace)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed by ``ops.layer_norm``: for a LayerNorm that feeds a Linear.

    A subclass, so state dicts, ``isinstance(m, nn.LayerNorm)`` (weight
    initialisation, interop) and timm/Hugging Face conversion treat it as one.
    Under CPU bf16 autocast it may return bfloat16 (see ``layer_norm``).
    In: (..., C). Out: (..., C).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
