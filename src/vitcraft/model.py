"""The Vision Transformer of the seed tutorial, one class per concept.

An image becomes a sequence of patch vectors (``PatchEmbeddings``), gets a
learnable [CLS] token and learnable position vectors (``Embeddings``), passes
through a stack of pre-LayerNorm transformer blocks (``Encoder`` of ``Block``),
and the [CLS] output is classified (``ViTForClassification``).

Every module returns what the tutorial's does, including the
``(output, attention_probs)`` pairs, so the tutorial's code runs against it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitcraft import cpu_kernels
from vitcraft.config import ViTConfig
from vitcraft.device import cpu_autocast_dtype
from vitcraft.resize import resample_position_embeddings


class Dropout(nn.Dropout):
    """nn.Dropout with a fused kernel on the CPU (``cpu_kernels.dropout``); identical elsewhere.

    PyTorch's CPU dropout draws one Bernoulli sample per element on one core
    and stores the mask for the backward pass, which took about a third of the
    seed model's training step. The fused kernel hashes (seed, position) into
    a keep/drop decision in the same pass that scales the kept values by
    1 / (1 - p), on all threads, and regenerates the mask backwards.
    Shape preserving.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training and 0 < self.p < 1 and cpu_kernels.supports(input):
            return cpu_kernels.dropout(input, self.p)
        return super().forward(input)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with a fused kernel on the CPU (``cpu_kernels.layer_norm``); identical elsewhere.

    PyTorch's CPU LayerNorm is slow on rows as short as the seed model's 48
    numbers (about 7% of its training step). A block's LayerNorm only ever
    feeds a Linear, so under bf16 autocast the kernel returns bfloat16, which
    is what that Linear would round its input to anyway: the same numbers,
    one copy fewer (autocast's own LayerNorm returns float32).
    In: (..., C). Out: (..., C).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (input.dtype == torch.float32 and len(self.normalized_shape) == 1 and self.weight is not None
                and self.bias is not None and cpu_kernels.supports(input)):
            out_dtype = torch.bfloat16 if cpu_autocast_dtype() == torch.bfloat16 else torch.float32
            return cpu_kernels.layer_norm(input, self.weight, self.bias, self.eps, out_dtype)
        return super().forward(input)


def as_config(config: ViTConfig | Mapping[str, Any]) -> ViTConfig:
    """Accept the tutorial's plain dict or a ViTConfig."""
    return config if isinstance(config, ViTConfig) else ViTConfig.from_dict(config)


class PatchEmbeddings(nn.Module):
    """Cut the image into non-overlapping patches and project each to a vector.

    A Conv2d whose kernel and stride both equal the patch size sees every patch
    exactly once, so it is a per-patch linear projection.
    In: (B, C, H, W) images. Out: (B, num_patches, hidden_size).
    """

    def __init__(self, config: ViTConfig | Mapping[str, Any]):
        super().__init__()
        config = as_config(config)
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.num_patches = config.num_patches
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size,
                                    kernel_size=config.patch_size, stride=config.patch_size)
        # off: only image_size is accepted (a clear error otherwise); on: any size that is
        # a multiple of patch_size (see ViTForClassification.set_dynamic_image_size)
        self.dynamic_img_size = False

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        """The (rows, columns) patch grid of images ``x`` (B, C, H, W), after checking their shape."""
        if self.dynamic_img_size:
            expected = f"(batch, {self.num_channels}, H, W) with H and W multiples of {self.patch_size}"
            fits = x.ndim == 4 and x.shape[-2] % self.patch_size == 0 and x.shape[-1] % self.patch_size == 0
        else:
            expected = f"(batch, {self.num_channels}, {self.image_size}, {self.image_size})"
            fits = x.ndim == 4 and x.shape[-2:] == (self.image_size,) * 2
        if not fits or x.shape[1] != self.num_channels:
            raise ValueError(f"expected images of shape {expected}, got {tuple(x.shape)}")
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid_size(x)  # raises on a wrong shape
        x = self.projection(x)  # (B, hidden, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, num_patches, hidden)


class Embeddings(nn.Module):
    """Patch vectors plus a learnable [CLS] token in front, plus position vectors.

    Attention ignores order, so each position (the [CLS] slot and every patch
    slot) gets its own learnable vector added. The [CLS] output later stands
    for the whole image.
    Images of another size than the configured one (only accepted with
    ``patch_embeddings.dynamic_img_size``) get the position table resampled
    to their patch grid on the fly (see resize.py); the parameter keeps its size.
    In: (B, C, H, W). Out: (B, 1 + num_patches, hidden_size).
    """

    num_prefix_tokens = 1  # tokens in front of the patches: [CLS]

    def __init__(self, config: ViTConfig | Mapping[str, Any]):
        super().__init__()
        config = as_config(config)
        self.patch_embeddings = PatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, self.num_prefix_tokens + self.patch_embeddings.num_patches, config.hidden_size))
        self.dropout = Dropout(config.hidden_dropout_prob)

    def prefix_tokens(self, batch_size: int) -> torch.Tensor:
        """The learned tokens put in front of the patches: (B, num_prefix_tokens, hidden)."""
        return self.cls_token.expand(batch_size, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.patch_embeddings.grid_size(x)
        trained_grid = (self.patch_embeddings.image_size // self.patch_embeddings.patch_size,) * 2
        position_embeddings = resample_position_embeddings(self.position_embeddings, self.num_prefix_tokens,
                                                           trained_grid, grid)  # itself at the trained size
        x = self.patch_embeddings(x)  # (B, num_patches, hidden)
        x = torch.cat((self.prefix_tokens(x.shape[0]), x), dim=1)  # (B, prefix + num_patches, hidden)
        return self.dropout(x + position_embeddings)


class AttentionHead(nn.Module):
    """One attention head, written out for reading.

    Every token emits a query, a key and a value. A token's output is the
    average of all values, weighted by softmax(query . key / sqrt(head_size)).
    In: (B, N, hidden). Out: ((B, Q, head_size) output, (B, Q, N) attention
    probabilities), Q = N, or ``num_queries`` when only the first tokens need
    an output. The probabilities returned are those before dropout, so each
    row sums to 1 even in training mode.
    """

    def __init__(self, hidden_size: int, attention_head_size: int, dropout: float, bias: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.attention_head_size = attention_head_size
        self.query = nn.Linear(hidden_size, attention_head_size, bias=bias)
        self.key = nn.Linear(hidden_size, attention_head_size, bias=bias)
        self.value = nn.Linear(hidden_size, attention_head_size, bias=bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        query, key, value = self.query(x[:, :num_queries]), self.key(x), self.value(x)
        attention_scores = query @ key.transpose(-1, -2) / math.sqrt(self.attention_head_size)
        attention_probs = attention_scores.softmax(dim=-1)  # (B, Q, N)
        attention_output = self.dropout(attention_probs) @ value  # (B, Q, head_size)
        return attention_output, attention_probs


class MultiHeadAttention(nn.Module):
    """Several AttentionHeads side by side, their outputs concatenated and projected.

    The readable version: one small module per head. It loads the same state
    dict as FasterMultiHeadAttention (the fused qkv weight is split per head).
    In: (B, N, hidden). Out: ((B, Q, hidden), (B, heads, Q, N) or None), Q = N
    or ``num_queries``.
    """

    def __init__(self, config: ViTConfig | Mapping[str, Any]):
        super().__init__()
        config = as_config(config)
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.attention_head_size
        self.heads = nn.ModuleList([
            AttentionHead(config.hidden_size, config.attention_head_size,
                          config.attention_probs_dropout_prob, config.qkv_bias)
            for _ in range(config.num_attention_heads)])
        self.output_projection = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_dropout = Dropout(config.hidden_dropout_prob)
        self._register_load_state_dict_pre_hook(self._split_fused_qkv)

    def forward(self, x: torch.Tensor, output_attentions: bool = False, num_queries: int | None = None):
        head_outputs = [head(x, num_queries) for head in self.heads]
        attention_output = torch.cat([out for out, _ in head_outputs], dim=-1)  # (B, Q, hidden)
        attention_output = self.output_dropout(self.output_projection(attention_output))
        if not output_attentions:
            return attention_output, None
        return attention_output, torch.stack([probs for _, probs in head_outputs], dim=1)

    def _split_fused_qkv(self, state_dict, prefix, *_):
        """Accept FasterMultiHeadAttention's ``qkv_projection`` weights."""
        for kind in ("weight", "bias"):
            fused = state_dict.pop(f"{prefix}qkv_projection.{kind}", None)
            if fused is None:
                continue
            # rows: [all queries | all keys | all values], each head_size rows per head
            for name, part in zip(("query", "key", "value"), fused.chunk(3, dim=0)):
                for i, head_part in enumerate(part.split(self.attention_head_size, dim=0)):
                    state_dict[f"{prefix}heads.{i}.{name}.{kind}"] = head_part


class FasterMultiHeadAttention(nn.Module):
    """Multi-head attention with one fused Linear producing q, k and v for all heads.

    One (hidden -> 3 * hidden) matrix product replaces 3 * heads small ones.
    With ``use_sdpa`` the attention itself runs fused: on the CPU in vitcraft's
    kernel (``cpu_kernels.attention``, float32 or bfloat16, dropout included),
    else in ``F.scaled_dot_product_attention``; except when the attention
    probabilities are asked for, which only the explicit softmax has.
    ``attention_bias``, if given, is added to the scaled scores before the
    softmax (any shape broadcasting to (B, heads, Q, N)): Swin's relative
    position bias and shifted-window mask use it.
    In: (B, N, hidden). Out: ((B, Q, hidden), (B, heads, Q, N) or None), Q = N
    or ``num_queries``.
    """

    def __init__(self, config: ViTConfig | Mapping[str, Any], use_sdpa: bool = False):
        super().__init__()
        config = as_config(config)
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.attention_head_size
        self.use_sdpa = use_sdpa
        self.qkv_projection = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.attn_dropout = Dropout(config.attention_probs_dropout_prob)
        self.output_projection = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_dropout = Dropout(config.hidden_dropout_prob)
        self._register_load_state_dict_pre_hook(self._merge_per_head_qkv)

    def forward(self, x: torch.Tensor, output_attentions: bool = False, num_queries: int | None = None,
                attention_bias: torch.Tensor | None = None):
        batch_size, num_tokens, hidden_size = x.shape
        num_queries = num_queries or num_tokens
        qkv = self.qkv_projection(x)  # (B, N, 3 * hidden)
        qkv = qkv.view(batch_size, num_tokens, 3, self.num_attention_heads, self.attention_head_size)
        dropout_p = self.attn_dropout.p if self.training else 0.0
        fast = self.use_sdpa and not output_attentions
        attention_probs = None
        if fast and attention_bias is None and cpu_kernels.supports(qkv):
            # On the CPU, SDPA with dropout falls back to an unfused path (separate
            # passes for scores, softmax, mask and product), and without dropout needs
            # q, k, v transposed; the fused kernel is faster either way.
            # (B, Q, heads, head_size) -> (B, Q, hidden)
            attention_output = cpu_kernels.attention(qkv, num_queries, dropout_p).view(batch_size, num_queries,
                                                                                        hidden_size)
        else:
            # (3, B, heads, N, head_size); one copy here spares the matmuls below a copy each
            query, key, value = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)
            query = query[:, :, :num_queries]  # (B, heads, Q, head_size)
            if fast and (dropout_p == 0 or x.device.type != "cpu"):
                if attention_bias is not None:  # SDPA wants the mask in q's dtype (bf16 under autocast)
                    attention_bias = attention_bias.to(query.dtype)
                attention_output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_bias,
                                                                  dropout_p=dropout_p)
            else:
                # scaling q (N x head_size) is cheaper than scaling the scores (N x N)
                scores = (query * self.attention_head_size ** -0.5) @ key.transpose(-1, -2)
                if attention_bias is not None:
                    scores = scores + attention_bias
                attention_probs = scores.softmax(dim=-1)  # (B, heads, Q, N)
                attention_output = self.attn_dropout(attention_probs) @ value
            # (B, heads, Q, head_size) -> (B, Q, hidden)
            attention_output = attention_output.transpose(1, 2).reshape(batch_size, num_queries, hidden_size)
        attention_output = self.output_dropout(self.output_projection(attention_output))
        return attention_output, (attention_probs if output_attentions else None)

    def _merge_per_head_qkv(self, state_dict, prefix, *_):
        """Accept MultiHeadAttention's per-head ``heads.i.query`` style weights."""
        for kind in ("weight", "bias"):
            parts = []
            for name in ("query", "key", "value"):
                for i in range(self.num_attention_heads):
                    key = f"{prefix}heads.{i}.{name}.{kind}"
                    if key in state_dict:
                        parts.append(state_dict.pop(key))
            if parts:
                state_dict[f"{prefix}qkv_projection.{kind}"] = torch.cat(parts, dim=0)


class NewGELUActivation(nn.Module):
    """GELU in its tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    The seed's activation (as in GPT-2/BERT code). PyTorch's
    ``gelu(approximate="tanh")`` computes the same formula in one kernel;
    vitcraft's CPU kernel (``cpu_kernels.gelu_tanh``, float32 or bfloat16) is
    faster. Shape preserving.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.supports(input):
            return cpu_kernels.gelu_tanh(input)
        return F.gelu(input, approximate="tanh")


class MLP(nn.Module):
    """The feed-forward half of a block: widen, GELU, project back, dropout.

    In and out: (B, N, hidden_size); inside: (B, N, intermediate_size).
    """

    def __init__(self, config: ViTConfig | Mapping[str, Any]):
        super().__init__()
        config = as_config(config)
        self.dense_1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = NewGELUActivation() if config.hidden_act == "gelu_tanh" else nn.GELU()
        self.dense_2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense_2(self.activation(self.dense_1(x))))


def build_attention(config: ViTConfig) -> nn.Module:
    """The attention module for ``config.attention_backend``."""
    if config.attention_backend == "per_head":
        return MultiHeadAttention(config)
    return FasterMultiHeadAttention(config, use_sdpa=config.attention_backend == "sdpa")


class Block(nn.Module):
    """One transformer block: attention then MLP, each pre-normalised and residual.

    x = x + attention(layernorm_1(x)); x = x + mlp(layernorm_2(x)).
    Normalising before each sub-layer (pre-LN) keeps the residual path clean,
    which trains more stably than the original post-LN transformer.
    With ``num_queries`` only the first tokens are updated (all tokens still
    serve as keys and values): the last block of a [CLS]-pooled model only
    needs the [CLS] output, which saves most of that block's work.
    In: (B, N, hidden). Out: (B, Q, hidden), Q = N or num_queries; attention
    probs (B, heads, Q, N) or None.
    """

    def __init__(self, config: ViTConfig | Mapping[str, Any]):
        super().__init__()
        config = as_config(config)
        self.layernorm_1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = build_attention(config)
        self.layernorm_2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, output_attentions: bool = False, num_queries: int | None = None):
        attention_output, attention_probs = self.attention(self.layernorm_1(x), output_attentions, num_queries)
        x = x[:, :num_queries] + attention_output
        x = x + self.mlp(self.layernorm_2(x))
        return x, attention_probs


class Encoder(nn.Module):
    """A stack of ``num_hidden_layers`` Blocks.

    With ``gradient_checkpointing`` on, each block's activations are recomputed
    in the backward pass instead of stored: less memory, about a third more
    compute.
    With ``cls_only_last`` the last block updates only the [CLS] token and the
    output is (B, 1, hidden) (see Block); an integer k instead of True keeps
    the first k tokens (DeiT: [CLS] and the distillation token), (B, k, hidden).
    In: (B, N, hidden). Out: (B, N, hidden); attentions: a list with one
    (B, heads, N, N) tensor per block, or None.
    """

    def __init__(self, config: ViTConfig | Mapping[str, Any]):
        super().__init__()
        config = as_config(config)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, output_attentions: bool = False, cls_only_last: bool | int = False):
        all_attentions = []
        for index, block in enumerate(self.blocks):
            num_queries = int(cls_only_last) if cls_only_last and index == len(self.blocks) - 1 else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, attention_probs = checkpoint(block, x, output_attentions, num_queries, use_reentrant=False)
            else:
                x, attention_probs = block(x, output_attentions, num_queries)
            all_attentions.append(attention_probs)
        return x, (all_attentions if output_attentions else None)


class ViTForClassification(nn.Module):
    """The whole Vision Transformer: embeddings, encoder, classifier on the pooled token.

    ``model(images)`` returns ``(logits, None)``;
    ``model(images, output_attentions=True)`` returns ``(logits, attentions)``
    with one (B, heads, tokens, tokens) tensor per block.
    In: (B, num_channels, image_size, image_size). Out: logits (B, num_classes).
    """

    def __init__(self, config: ViTConfig | Mapping[str, Any]):
        super().__init__()
        self.config = as_config(config)
        config = self.config
        self.embedding = Embeddings(config)
        self.encoder = Encoder(config)
        # LayerNorm is per token, so normalising the pooled vector equals timm's and
        # HF's "normalise the sequence, then take [CLS]", and timm's fc_norm for mean pooling.
        self.final_layernorm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                                if config.final_layernorm else nn.Identity())
        self.classifier = nn.Linear(config.hidden_size, config.num_classes)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """The seed's initialisation: N(0, initializer_range) for weights, [CLS] and
        positions (truncated at 2 std for the latter two), zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, Embeddings):
            nn.init.trunc_normal_(module.position_embeddings, mean=0.0, std=std, a=-2 * std, b=2 * std)
            nn.init.trunc_normal_(module.cls_token, mean=0.0, std=std, a=-2 * std, b=2 * std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass to save activation memory."""
        self.encoder.gradient_checkpointing = enable

    def set_dynamic_image_size(self, enable: bool = True) -> None:
        """Accept images of any size that is a multiple of patch_size (off: only config.image_size).

        The position embeddings are resampled to each input's patch grid in
        the forward pass (bicubic, [CLS] kept; see resize.py); the parameters
        and config stay at the trained size, so saving and the optimizer are
        unaffected. The seed model trained at 32 then runs at 48, say.
        """
        self.embedding.patch_embeddings.dynamic_img_size = enable

    # The hub layout lives in hub.py, which imports this module: import it when called.
    def save_pretrained(self, directory, extra_metadata: Mapping[str, Any] | None = None):
        """Write ``config.json`` + ``model.safetensors`` to ``directory`` (the Hugging Face hub
        layout), with ``extra_metadata`` such as class_names, mean, std. Returns the folder path."""
        from vitcraft import hub

        return hub.save_pretrained(self, directory, extra_metadata)

    @classmethod
    def from_pretrained(cls, directory, **config_overrides: Any) -> "ViTForClassification":
        """Load a hub-layout folder: vitcraft's own, or a timm or Hugging Face ViT one (converted).

        ``config_overrides`` are ViTConfig fields, e.g. ``attention_backend="per_head"``.
        Returns the model in eval mode; see :func:`vitcraft.hub.from_pretrained` for the errors.
        """
        from vitcraft import hub
        from vitcraft.errors import VitcraftError

        model = hub.from_pretrained(directory, **config_overrides)
        if not isinstance(model, cls):
            raise VitcraftError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, N, hidden) -> (B, hidden): the [CLS] output, or the mean of the patch outputs."""
        if self.config.pooling == "mean":
            return hidden_states[:, 1:].mean(dim=1)
        return hidden_states[:, 0]

    def forward_features(self, x: torch.Tensor, output_attentions: bool = False):
        """Images -> (pooled, normalised representation (B, hidden), attentions or None)."""
        # [CLS] pooling reads one token of the last block; skip the other tokens' work
        # there, unless the caller wants that block's full attention maps
        cls_only_last = self.config.pooling == "cls" and not output_attentions
        hidden_states, all_attentions = self.encoder(self.embedding(x), output_attentions, cls_only_last)
        return self.final_layernorm(self.pool(hidden_states)), all_attentions

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        features, all_attentions = self.forward_features(x, output_attentions=output_attentions)
        return self.classifier(features), all_attentions


# The tutorial's spelling, so its code runs unchanged.
ViTForClassfication = ViTForClassification


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, as the tutorial counts them."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
