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
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitcraft import ops
from vitcraft.config import ViTConfig
from vitcraft.hub import MODEL_TYPE, HubMixin
from vitcraft.resize import resample_position_embeddings


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


class ShiftedPatchEmbeddings(PatchEmbeddings):
    """Shifted patch tokenization (SPT, Lee et al. 2021): each patch vector also sees its neighbourhood.

    The image and four copies of it shifted by half a patch diagonally (up-left, up-right, down-left,
    down-right; zeros shifted in) are stacked along the channels, so each patch holds 5 x C x p x p numbers
    that reach half a patch past its borders. They are LayerNormed and projected, as the paper does: a
    small-data ViT gets some of a CNN's locality at its first layer.
    In: (B, C, H, W) images. Out: (B, num_patches, hidden_size).
    """

    def __init__(self, config: ViTConfig | Mapping[str, Any]):
        super().__init__(config)
        config = as_config(config)
        patch_numbers = 5 * config.num_channels * config.patch_size ** 2
        del self.projection  # the stacked patches go through a LayerNorm and a Linear instead of a Conv2d
        self.norm = nn.LayerNorm(patch_numbers, eps=config.layer_norm_eps)
        self.projection = nn.Linear(patch_numbers, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid_size(x)  # raises on a wrong shape
        s = self.patch_size // 2
        padded = nn.functional.pad(x, (s, s, s, s))  # (B, C, H + 2s, W + 2s)
        height, width = x.shape[-2:]
        shifted = [padded[:, :, dy:dy + height, dx:dx + width] for dy in (0, 2 * s) for dx in (0, 2 * s)]
        x = torch.cat([x, *shifted], dim=1)  # (B, 5C, H, W)
        patches = nn.functional.unfold(x, self.patch_size, stride=self.patch_size)  # (B, 5C p p, num_patches)
        return self.projection(self.norm(patches.transpose(1, 2)))  # (B, num_patches, hidden)


class PatchDropout(nn.Module):
    """In training, each image keeps a random subset of its patch tokens (FLIP, Li et al. 2023).

    ``max(1, int(L * (1 - p)))`` of the L patch tokens survive, drawn per
    image as timm's PatchDropout draws them, in random order (attention does
    not care about order: each token carries its position vector); the
    prefix tokens ([CLS], ...) always stay in front. Fewer tokens make every
    later step cheaper. The identity in eval mode and at p = 0.
    In: (B, prefix + L, hidden). Out: (B, prefix + K, hidden), K the patches kept.
    """

    def __init__(self, p: float, num_prefix_tokens: int):
        super().__init__()
        self.p = p
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        batch_size, num_patches, hidden = patches.shape
        keep = max(1, int(num_patches * (1 - self.p)))
        # a random permutation per image, its first `keep` entries: (B, keep) patch indices
        kept = torch.argsort(torch.randn(batch_size, num_patches, device=x.device), dim=-1)[:, :keep]
        patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, hidden))  # (B, keep, hidden)
        return torch.cat((prefix, patches), dim=1)


class Embeddings(nn.Module):
    """Patch vectors plus a learnable [CLS] token in front, plus position vectors.

    Attention ignores order, so each position (the [CLS] slot and every patch
    slot) gets its own learnable vector added. The [CLS] output later stands
    for the whole image.
    Images of another size than the configured one (only accepted with
    ``patch_embeddings.dynamic_img_size``) get the position table resampled
    to their patch grid on the fly (see resize.py); the parameter keeps its size.
    With ``patch_dropout`` > 0, training keeps a random subset of the patches (PatchDropout).
    In: (B, C, H, W). Out: (B, 1 + num_patches, hidden_size); in training with
    patch dropout (B, 1 + kept patches, hidden_size).
    """

    num_prefix_tokens = 1  # tokens in front of the patches: [CLS]

    def __init__(self, config: ViTConfig | Mapping[str, Any]):
        super().__init__()
        config = as_config(config)
        self.patch_embeddings = (ShiftedPatchEmbeddings if config.shifted_patches else PatchEmbeddings)(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, self.num_prefix_tokens + self.patch_embeddings.num_patches, config.hidden_size))
        self.dropout = ops.Dropout(config.hidden_dropout_prob)
        self.patch_dropout = PatchDropout(config.patch_dropout, self.num_prefix_tokens)

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
        return self.patch_dropout(self.dropout(x + position_embeddings))


class AttentionHead(nn.Module):
    """One attention head, written out for reading.

    Every token emits a query, a key and a value. A token's output is the
    average of all values, weighted by softmax(query . key / sqrt(head_size)).
    In: (B, N, hidden). Out: ((B, N, head_size) output, (B, N, N) attention
    probabilities). The probabilities returned are those before dropout, so
    each row sums to 1 even in training mode.
    """

    def __init__(self, hidden_size: int, attention_head_size: int, dropout: float, bias: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.attention_head_size = attention_head_size
        self.query = nn.Linear(hidden_size, attention_head_size, bias=bias)
        self.key = nn.Linear(hidden_size, attention_head_size, bias=bias)
        self.value = nn.Linear(hidden_size, attention_head_size, bias=bias)
        self.dropout = ops.Dropout(dropout)

    def forward(self, x: torch.Tensor, temperature: torch.Tensor | None = None,
                attention_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        query, key, value = self.query(x), self.key(x), self.value(x)
        if temperature is None:
            attention_scores = query @ key.transpose(-1, -2) / math.sqrt(self.attention_head_size)
        else:  # locality self-attention: a learned scale instead of 1 / sqrt(head_size), and a mask
            attention_scores = (query @ key.transpose(-1, -2)) * temperature + attention_bias
        attention_probs = attention_scores.softmax(dim=-1)  # (B, N, N)
        attention_output = self.dropout(attention_probs) @ value  # (B, N, head_size)
        return attention_output, attention_probs


def locality_temperature(config: ViTConfig) -> nn.Parameter | None:
    """Locality self-attention's learned per-head scale of the scores, starting at 1 / sqrt(head_size), or None
    without it. Out: (heads,)."""
    if not config.locality_attention:
        return None
    return nn.Parameter(torch.full((config.num_attention_heads,), config.attention_head_size ** -0.5))


class MultiHeadAttention(nn.Module):
    """Several AttentionHeads side by side, their outputs concatenated and projected.

    The readable version: one small module per head. It loads the same state
    dict as FasterMultiHeadAttention (the fused qkv weight is split per head).
    With ``config.locality_attention`` each head scales its scores by its entry
    of ``temperature`` and masks the diagonal (``ops.with_diagonal_mask``).
    In: (B, N, hidden). Out: ((B, N, hidden), (B, heads, N, N) or None).
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
        self.output_dropout = ops.Dropout(config.hidden_dropout_prob)
        self.temperature = locality_temperature(config)
        self._register_load_state_dict_pre_hook(self._split_fused_qkv)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        if self.temperature is None:
            head_outputs = [head(x) for head in self.heads]
        else:
            mask = ops.with_diagonal_mask(None, x.shape[1], x.shape[1], x.device)  # (N, N)
            head_outputs = [head(x, self.temperature[i], mask) for i, head in enumerate(self.heads)]
        attention_output = torch.cat([out for out, _ in head_outputs], dim=-1)  # (B, N, hidden)
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
    With ``use_sdpa`` the attention itself runs fused (``ops.attention``:
    vitcraft's C kernel on the CPU, PyTorch's scaled_dot_product_attention
    elsewhere), except when the attention probabilities are asked for, which
    only the explicit softmax (``ops.softmax_attention``) has; without it (the
    "fused" backend) the softmax is always explicit.
    ``attention_bias``, if given, is added to the scaled scores before the
    softmax (any shape broadcasting to (B, heads, Q, N)): Swin's relative
    position bias and shifted-window mask use it. ``num_queries`` asks for the
    first tokens' outputs only, all tokens still serving as keys and values
    (see ``Block.forward_first_tokens``). With ``config.locality_attention``
    the queries are scaled so that the scores come out scaled by each head's
    ``temperature``, and no token attends to itself (``ops.with_diagonal_mask``).
    In: (B, N, hidden). Out: ((B, Q, hidden), (B, heads, Q, N) or None), Q = N
    or ``num_queries``.
    """

    takes_num_queries = True  # Block.forward_first_tokens asks for the first queries only

    def __init__(self, config: ViTConfig | Mapping[str, Any], use_sdpa: bool = False):
        super().__init__()
        config = as_config(config)
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.attention_head_size
        self.use_sdpa = use_sdpa
        self.qkv_projection = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.attn_dropout = ops.Dropout(config.attention_probs_dropout_prob)
        self.output_projection = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_dropout = ops.Dropout(config.hidden_dropout_prob)
        self.temperature = locality_temperature(config)
        self._register_load_state_dict_pre_hook(self._merge_per_head_qkv)

    def forward(self, x: torch.Tensor, output_attentions: bool = False, *,
                attention_bias: torch.Tensor | None = None, num_queries: int | None = None):
        batch_size, num_tokens, hidden_size = x.shape
        locality = self.temperature is not None
        if locality:
            qkv = self._locality_qkv(x)  # (B, N, 3 * hidden)
        else:
            qkv = self.qkv_projection(x)  # (B, N, 3 * hidden)
        qkv = qkv.view(batch_size, num_tokens, 3, self.num_attention_heads, self.attention_head_size)
        dropout_p = self.attn_dropout.p if self.training else 0.0
        attention_probs = None
        if self.use_sdpa and not output_attentions:
            attention_output = ops.attention(qkv, dropout_p, num_queries, attention_bias,
                                             mask_diagonal=locality)  # (B, Q, heads, head_size)
        else:
            if locality:
                attention_bias = ops.with_diagonal_mask(attention_bias, num_queries or num_tokens, num_tokens, x.device)
            query, key, value = ops.split_heads(qkv)  # each (B, heads, N, head_size)
            attention_output, attention_probs = ops.softmax_attention(query[:, :, :num_queries], key, value,
                                                                      dropout_p, attention_bias)
            attention_output = attention_output.transpose(1, 2)  # (B, Q, heads, head_size)
        attention_output = attention_output.reshape(batch_size, -1, hidden_size)  # (B, Q, hidden), heads side by side
        attention_output = self.output_dropout(self.output_projection(attention_output))
        return attention_output, (attention_probs if output_attentions else None)

    def _locality_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The qkv projection with each head's queries scaled by temperature * sqrt(head_size): the attention
        then divides the scores by sqrt(head_size), which leaves them scaled by the temperature.

        The scale goes on the query rows of the (3 * hidden, hidden) weight and their biases, a few thousand
        numbers, rather than on the (B, N, 3, heads, head_size) output.
        In: (B, N, hidden). Out: (B, N, 3 * hidden).
        """
        projection = self.qkv_projection
        queries = self.temperature.repeat_interleave(self.attention_head_size) * self.attention_head_size ** 0.5
        rows = torch.cat((queries, queries.new_ones(2 * queries.numel())))  # (3 * hidden,): rows [q | k | v]
        bias = None if projection.bias is None else projection.bias * rows
        return nn.functional.linear(x, projection.weight * rows[:, None], bias)

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

    The seed's activation (as in GPT-2/BERT code), computed in one pass by
    ``ops.gelu_tanh`` rather than as separate tensor operations.
    In: any shape. Out: the same shape.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh(input)


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
        self.dropout = ops.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense_2(self.activation(self.dense_1(x))))


def build_attention(config: ViTConfig) -> nn.Module:
    """The attention module for ``config.attention_backend``."""
    if config.attention_backend == "per_head":
        return MultiHeadAttention(config)
    return FasterMultiHeadAttention(config, use_sdpa=config.attention_backend == "sdpa")


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for whole samples.

    Each sample's branch output is zeroed with probability p and kept ones are
    scaled by 1 / (1 - p), so the expected output is unchanged; in eval mode
    (and at p = 0) it is the identity. Deep ViTs and Swins rely on it as their
    main regulariser.
    Shape preserving, (B, ...).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x * keep.bernoulli_(1 - self.p).div_(1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """The stochastic-depth rate of each of ``depth`` blocks: rising linearly from 0 at the first to
    ``rate`` at the last, as DeiT and timm (``torch.linspace(0, rate, depth)``): early blocks, whose
    features every later one builds on, are dropped least."""
    return [rate * index / max(1, depth - 1) for index in range(depth)]


class Block(nn.Module):
    """One transformer block: attention then MLP, each pre-normalised and residual.

    x = x + attention(layernorm_1(x)); x = x + mlp(layernorm_2(x)).
    Normalising before each sub-layer (pre-LN) keeps the residual path clean,
    which trains more stably than the original post-LN transformer.
    ``drop_path``: the block's stochastic-depth rate (``DropPath`` on both
    residual branches; the identity at 0 and in eval mode).
    In: (B, N, hidden). Out: ((B, N, hidden), attention probs (B, heads, N, N)
    or None).
    """

    def __init__(self, config: ViTConfig | Mapping[str, Any], drop_path: float = 0.0):
        super().__init__()
        config = as_config(config)
        self.layernorm_1 = ops.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = build_attention(config)
        self.layernorm_2 = ops.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        attention_output, attention_probs = self.attention(self.layernorm_1(x), output_attentions=output_attentions)
        x = x + self.drop_path(attention_output)
        x = x + self.drop_path(self.mlp(self.layernorm_2(x)))
        return x, attention_probs

    def forward_first_tokens(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """The block's output for the first ``count`` tokens only; all tokens still serve as keys and values.

        The last block of a [CLS]-pooled model is only read at its prefix
        tokens, so it can skip the other tokens' queries and MLP: the same
        numbers for the tokens kept, most of the block's work saved. The fused
        attention computes just those queries; the readable per-head one
        computes all of them and the rest are dropped (no saving).
        In: (B, N, hidden). Out: (B, count, hidden).
        """
        if not getattr(self.attention, "takes_num_queries", False):
            return self(x)[0][:, :count]
        attention_output, _ = self.attention(self.layernorm_1(x), num_queries=count)
        x = x[:, :count] + self.drop_path(attention_output)  # (B, count, hidden)
        return x + self.drop_path(self.mlp(self.layernorm_2(x)))


class Encoder(nn.Module):
    """A stack of ``num_hidden_layers`` Blocks.

    With ``gradient_checkpointing`` on, each block's activations are recomputed
    in the backward pass instead of stored: less memory, one more forward
    pass of every block.
    With ``first_tokens`` k the last block computes only the first k tokens
    (``Block.forward_first_tokens``), the output is (B, k, hidden) and that
    block's entry in the attentions is None.
    In: (B, N, hidden). Out: (B, N, hidden); attentions: a list with one
    (B, heads, N, N) tensor per block, or None.
    """

    def __init__(self, config: ViTConfig | Mapping[str, Any]):
        super().__init__()
        config = as_config(config)
        rates = drop_path_rates(config.drop_path_rate, config.num_hidden_layers)
        self.blocks = nn.ModuleList([Block(config, rate) for rate in rates])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, output_attentions: bool = False, first_tokens: int | None = None):
        all_attentions = []
        for index, block in enumerate(self.blocks):
            if first_tokens and index == len(self.blocks) - 1:
                x, attention_probs = self._run(block.forward_first_tokens, x, first_tokens), None
            else:
                x, attention_probs = self._run(block, x, output_attentions)
            all_attentions.append(attention_probs)
        return x, (all_attentions if output_attentions else None)

    def _run(self, function, *args):
        """``function(*args)``, its activations recomputed in the backward pass when checkpointing."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)


class ViTForClassification(HubMixin, nn.Module):
    """The whole Vision Transformer: embeddings, encoder, classifier on the pooled token.

    ``model(images)`` returns ``(logits, None)``;
    ``model(images, output_attentions=True)`` returns ``(logits, attentions)``
    with one (B, heads, tokens, tokens) tensor per block.
    ``save_pretrained`` / ``from_pretrained`` (from hub.HubMixin) write and read
    the Hugging Face hub layout, and read timm and Hugging Face ViT folders.
    In: (B, num_channels, image_size, image_size). Out: logits (B, num_classes).
    """

    model_type = MODEL_TYPE  # what a saved folder's config.json records

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

    def pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, N, hidden) -> (B, hidden): the [CLS] output, or the mean of the patch outputs."""
        if self.config.pooling == "mean":
            return hidden_states[:, 1:].mean(dim=1)
        return hidden_states[:, 0]

    def encode(self, x: torch.Tensor, output_attentions: bool = False):
        """Images -> (encoder output, attentions or None).

        [CLS] pooling reads only the prefix tokens ([CLS], and DeiT's
        distillation token) of the last block, so unless that block's full
        attention maps are asked for it computes only theirs (see
        ``Encoder``): (B, num_prefix_tokens, hidden); otherwise (B, N, hidden).
        """
        # the one place that decides whether the last block skips tokens
        skip = self.config.pooling == "cls" and not output_attentions
        first_tokens = self.embedding.num_prefix_tokens if skip else None
        return self.encoder(self.embedding(x), output_attentions, first_tokens=first_tokens)

    def forward_features(self, x: torch.Tensor, output_attentions: bool = False):
        """Images -> (pooled, normalised representation (B, hidden), attentions or None)."""
        hidden_states, all_attentions = self.encode(x, output_attentions)
        return self.final_layernorm(self.pool(hidden_states)), all_attentions

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        features, all_attentions = self.forward_features(x, output_attentions=output_attentions)
        return self.classifier(features), all_attentions


# The tutorial's spelling, so its code runs unchanged.
ViTForClassfication = ViTForClassification


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, as the tutorial counts them."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
