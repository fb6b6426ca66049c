"""Swin Transformer (Liu et al. 2021): attention inside shifted windows, on a pyramid of grids.

A plain ViT lets every patch attend to every other: the cost grows with the
square of the number of patches, and every layer sees one fixed grid. Swin
changes both:

* **Window attention (W-MSA).** The patch grid is cut into non-overlapping
  windows of ``window_size x window_size`` tokens and attention runs inside
  each window only, so the cost grows linearly with the image area.
* **Shifted windows (SW-MSA).** Every second block first rolls the grid by
  half a window (``torch.roll``), so its windows straddle the borders of the
  previous block's windows and information flows between them. Rolling wraps
  the bottom and right edges round to the top and left; a mask stops tokens
  that were not neighbours in the image from attending to each other.
* **Relative position bias.** Instead of position vectors added to the
  tokens, each head adds a learned number to the attention score of every
  (query, key) pair, looked up by their offset inside the window: a table of
  (2W-1)^2 offsets x heads, indexed by a fixed ``relative_position_index``.
* **A pyramid.** Between stages, ``PatchMerging`` concatenates each 2x2
  neighbourhood of tokens (4C channels) and projects it to 2C: half the grid
  side, twice the width, as a CNN's stages do.

The image is classified from the mean of the last stage's tokens (there is no
[CLS] token). Tensors inside the model are channels-last grids (B, H, W, C),
H and W counted in tokens. Module names follow vitcraft's ViT (layernorm_1,
attention.qkv_projection, mlp.dense_1, ...); the attention and the MLP are
vitcraft.model's, with the bias added to the attention scores.
``tests/test_swin.py`` checks the logits against timm's SwinTransformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitcraft.config import (
    DictConfig,
    ViTConfig,
    check_bools,
    check_choice,
    check_fractions,
    check_positive_ints,
    check_positive_numbers,
)
from vitcraft.model import MLP, DropPath, FasterMultiHeadAttention, PatchEmbeddings, drop_path_rates
from vitcraft.variants.common import init_linear_and_layernorm

# Added to the scores of (query, key) pairs in different regions of a rolled grid.
# After the softmax such a pair weighs about exp(-100) = 4e-44 of an allowed one,
# nothing in float32 arithmetic; unlike -inf it can never turn a row into NaN. The
# value of the original code and timm, so the logits match theirs.
MASK_VALUE = -100.0
SWIN_ATTENTION_BACKENDS = ("fused", "sdpa")  # the per-head modules take no score bias


@dataclass
class SwinConfig(DictConfig):
    """Every shape and regularisation choice of a :class:`SwinForClassification`.

    Defaults are the ``swin-tiny-32`` preset: 32x32 images, 2x2 patches (a 16x16
    grid), windows of 4x4 tokens, three stages of two blocks at widths 48, 96,
    192 with 3, 6, 12 heads (16 channels per head throughout).
    """

    image_size: int = 32  # side of the (square) input image, in pixels
    patch_size: int = 2  # side of one patch; image_size must be a multiple of it
    num_channels: int = 3  # 3 for RGB, 1 for grayscale
    num_classes: int = 10  # width of the classifier output
    embed_dim: int = 48  # width of the first stage; each later stage doubles it
    depths: tuple[int, ...] = (2, 2, 2)  # blocks per stage; blocks alternate W-MSA, SW-MSA
    num_heads: tuple[int, ...] = (3, 6, 12)  # attention heads per stage
    window_size: int = 4  # window side in tokens (a smaller last grid uses one whole-grid window)
    mlp_ratio: float = 4.0  # MLP hidden width / block width
    qkv_bias: bool = True  # bias on the query/key/value projection
    hidden_dropout_prob: float = 0.0  # dropout on the attention output and the MLP output
    attention_probs_dropout_prob: float = 0.0  # dropout on the attention probabilities
    drop_path_rate: float = 0.1  # stochastic depth of the last block; rises linearly from 0 at the first
    initializer_range: float = 0.02  # std of the truncated-normal init of Linear weights and bias tables
    layer_norm_eps: float = 1e-5
    attention_backend: str = "sdpa"  # "sdpa" (fused kernel) or "fused" (explicit softmax)

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep tuples so configs compare equal
        for name in ("depths", "num_heads"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise one ValueError naming the first bad field."""
        check_positive_ints(self, ("image_size", "patch_size", "num_channels", "num_classes", "embed_dim",
                                   "window_size"))
        for name in ("depths", "num_heads"):
            value = getattr(self, name)
            if (not isinstance(value, tuple) or not value
                    or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)):
                raise ValueError(f"{name} must be a non-empty list of positive integers, got {value!r}")
        if len(self.num_heads) != len(self.depths):
            raise ValueError(f"num_heads must have one entry per stage ({len(self.depths)}, as depths), "
                             f"got {len(self.num_heads)}")
        check_positive_numbers(self, ("mlp_ratio", "initializer_range", "layer_norm_eps"))
        check_fractions(self, ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"))
        check_bools(self, ("qkv_bias",))
        check_choice(self, "attention_backend", SWIN_ATTENTION_BACKENDS)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        halvings = 2 ** (self.num_stages - 1)
        if self.grid_size % halvings:
            raise ValueError(f"the patch grid side (image_size / patch_size = {self.grid_size}) must be divisible "
                             f"by {halvings} to be halved between each of the {self.num_stages} stages")
        for index in range(self.num_stages):
            width, heads, grid = self.stage_width(index), self.num_heads[index], self.stage_grid(index)
            if width % heads:
                raise ValueError(f"num_heads[{index}] ({heads}) must divide stage {index + 1}'s width "
                                 f"(embed_dim * 2**{index} = {width})")
            if grid > self.window_size and grid % self.window_size:
                raise ValueError(f"window_size ({self.window_size}) must divide stage {index + 1}'s grid "
                                 f"side ({grid} tokens)")

    # ------------------------------------------------------------- derived
    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def grid_size(self) -> int:
        """Side of the first stage's token grid."""
        return self.image_size // self.patch_size

    @property
    def num_features(self) -> int:
        """Width of the last stage: what the classifier reads."""
        return self.stage_width(self.num_stages - 1)

    def stage_width(self, index: int) -> int:
        return self.embed_dim * 2 ** index

    def stage_grid(self, index: int) -> int:
        return self.grid_size // 2 ** index

    def stage_window(self, index: int) -> tuple[int, int]:
        """(window side, shift of the SW-MSA blocks) of a stage.

        A grid no larger than the window is one whole-grid window, and then
        there is nothing to shift: rolling would only wrap the image round.
        """
        grid = self.stage_grid(index)
        window = min(self.window_size, grid)
        return window, (0 if grid <= self.window_size else window // 2)

    def stage_config(self, index: int) -> ViTConfig:
        """The ViTConfig that sizes stage ``index``'s attention and MLP modules (vitcraft.model's).

        One token of stage ``index`` covers ``patch_size * 2**index`` pixels,
        which is the "patch size" of that config (stage 0's sizes the patch embedding).
        """
        width = self.stage_width(index)
        return ViTConfig(
            image_size=self.image_size, patch_size=self.patch_size * 2 ** index, num_channels=self.num_channels,
            num_classes=self.num_classes, hidden_size=width, num_hidden_layers=self.depths[index],
            num_attention_heads=self.num_heads[index], intermediate_size=int(width * self.mlp_ratio),
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            initializer_range=self.initializer_range, qkv_bias=self.qkv_bias,
            attention_backend=self.attention_backend, hidden_act="gelu", layer_norm_eps=self.layer_norm_eps)


def as_swin_config(config: SwinConfig | Mapping[str, Any]) -> SwinConfig:
    return config if isinstance(config, SwinConfig) else SwinConfig.from_dict(config)


# --------------------------------------------------------------------------- windows
def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """Cut a grid into windows: (B, H, W, C) -> (B * num_windows, window * window, C).

    Windows are ordered image by image, row-major within an image; tokens
    row-major within a window.
    """
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)  # (B, H/w, w, W/w, w, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, H/w, W/w, w, w, C): window row, window column, then inside
    return x.reshape(-1, window * window, channels)  # (B * nW, w*w, C)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Undo window_partition: (B * num_windows, window * window, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)  # (B, H/w, W/w, w, w, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, H/w, w, W/w, w, C)
    return x.reshape(-1, height, width, channels)  # (B, H, W, C)


def relative_position_index(window: int) -> torch.Tensor:
    """Row of the bias table for every (query, key) pair of a window: LongTensor (w*w, w*w).

    Tokens i and j sit at (row, col) positions in the window; their offset
    (dr, dc) = pos_i - pos_j has each part in [-(w-1), w-1], 2w-1 values. Shifted
    to [0, 2w-2] and read as a two-digit number in base 2w-1, the offset
    becomes one index in [0, (2w-1)^2): equal offsets share one table row.
    """
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    positions = torch.stack((rows.flatten(), cols.flatten()))  # (2, w*w): (row, col) of each token
    offsets = positions[:, :, None] - positions[:, None, :] + (window - 1)  # (2, w*w, w*w), in [0, 2w-2]
    return offsets[0] * (2 * window - 1) + offsets[1]  # (w*w, w*w)


def shifted_window_mask(grid: int, window: int, shift: int) -> torch.Tensor:
    """The additive mask of SW-MSA on a ``grid x grid`` grid rolled up and left by ``shift``.

    After the roll, the last window row and column hold tokens from two or
    three places of the image: the rolled grid's last ``shift`` rows are the
    image's first rows, wrapped round. Each cell is labelled by one of up to
    3 x 3 regions (rows: [0, grid - window), [grid - window, grid - shift),
    [grid - shift, grid); columns alike); two tokens of a window may attend to
    each other only if they have the same label.
    Out: float (num_windows, w*w, w*w); [n, i, j] is 0 if query i may attend to
    key j in window n, else MASK_VALUE. Windows in window_partition's order.
    """
    labels = torch.zeros(grid, grid)
    bounds = (slice(0, grid - window), slice(grid - window, grid - shift), slice(grid - shift, grid))
    for row, rows in enumerate(bounds):
        for col, cols in enumerate(bounds):
            labels[rows, cols] = 3 * row + col
    window_labels = window_partition(labels.view(1, grid, grid, 1), window).squeeze(-1)  # (nW, w*w)
    different = window_labels[:, :, None] != window_labels[:, None, :]  # (nW, w*w, w*w): query i, key j
    return torch.zeros(different.shape).masked_fill(different, MASK_VALUE)


# --------------------------------------------------------------------------- modules
class WindowAttention(FasterMultiHeadAttention):
    """Multi-head attention inside each window, plus a learned relative position bias.

    vitcraft's fused attention with one extra (heads, w*w, w*w) term added to
    the scores: ``relative_position_bias_table`` ((2w-1)^2, heads) gathered by
    ``relative_position_index``. Shifted blocks also add their region mask.
    In: windows (B * nW, w*w, C) and mask (nW, w*w, w*w) or None. Out: ((B * nW,
    w*w, C), attention probabilities (B * nW, heads, w*w, w*w) or None).
    """

    def __init__(self, config: ViTConfig, window: int):
        super().__init__(config, use_sdpa=config.attention_backend == "sdpa")
        self.window = window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, config.num_attention_heads))
        # fixed by the window size: a buffer, recomputed on construction, not saved
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, w*w, w*w): the table row of each (query, key) offset, per head."""
        tokens = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (w*w * w*w, heads)
        return bias.view(tokens, tokens, -1).permute(2, 0, 1)  # (heads, w*w, w*w)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None = None, output_attentions: bool = False):
        bias = self.relative_position_bias()  # (heads, n, n), the same in every window
        if mask is not None:
            num_windows = mask.shape[0]
            bias = bias + mask[:, None]  # (nW, heads, n, n): each window position has its own mask
            # windows come image by image, so the nW masks repeat once per image
            bias = bias.repeat(windows.shape[0] // num_windows, 1, 1, 1)  # (B * nW, heads, n, n)
        return super().forward(windows, output_attentions, attention_bias=bias)


class SwinBlock(nn.Module):
    """One Swin block: (shifted-)window attention then MLP, each pre-normalised and residual.

    x = x + drop_path(roll back(windows back(attention(windows(roll(layernorm_1(x)))))))
    x = x + drop_path(mlp(layernorm_2(x)))
    With ``shift`` 0 this is W-MSA; otherwise the grid is rolled up and left by
    ``shift`` before the windows are cut (SW-MSA) and the region mask applies.
    In: (B, H, W, C). Out: (B, H, W, C); attention probabilities
    (B * num_windows, heads, w*w, w*w) or None.
    """

    def __init__(self, config: ViTConfig, grid: int, window: int, shift: int, drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.layernorm_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = WindowAttention(config, window)
        self.layernorm_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.drop_path = DropPath(drop_path)
        mask = shifted_window_mask(grid, window, shift) if shift else None
        self.register_buffer("attention_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        _, height, width, _ = x.shape
        shortcut = x
        x = self.layernorm_1(x)
        if self.shift:  # the window borders move by half a window; the wrapped edges are masked
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(x, self.window)  # (B * nW, w*w, C)
        windows, attention_probs = self.attention(windows, self.attention_mask, output_attentions)
        x = window_reverse(windows, self.window, height, width)  # (B, H, W, C)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.layernorm_2(x)))
        return x, attention_probs


class PatchMerging(nn.Module):
    """Halve the grid, double the width: concatenate each 2x2 neighbourhood, LayerNorm, Linear 4C -> 2C.

    The four neighbours are concatenated in the order of the original Swin code
    and timm: x0 (even row, even column), x1 (odd row, even column), x2 (even
    row, odd column), x3 (odd row, odd column).
    In: (B, H, W, C). Out: (B, H/2, W/2, 2C).
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.layernorm = nn.LayerNorm(4 * channels, eps=eps)
        self.reduction = nn.Linear(4 * channels, 2 * channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        x = x.view(batch, height // 2, 2, width // 2, 2, channels)  # (B, H/2, dr, W/2, dc, C)
        # (B, H/2, W/2, dc, dr, C): column offset outer, so dr varies fastest: x0, x1, x2, x3
        x = x.permute(0, 1, 3, 4, 2, 5)
        x = x.reshape(batch, height // 2, width // 2, 4 * channels)  # (B, H/2, W/2, 4C)
        return self.reduction(self.layernorm(x))  # (B, H/2, W/2, 2C)


class SwinStage(nn.Module):
    """One stage of the pyramid: PatchMerging (all but the first stage), then its blocks.

    Blocks alternate W-MSA (even index) and SW-MSA (odd index).
    In: (B, H, W, C_in). Out: (B, H', W', C), H' = H / 2 and C = 2 C_in after a
    merge; attentions: one (B * nW, heads, w*w, w*w) tensor per block, or Nones.
    """

    def __init__(self, config: SwinConfig, index: int, drop_paths: list[float]):
        super().__init__()
        stage = config.stage_config(index)
        self.downsample = (PatchMerging(stage.hidden_size // 2, config.layer_norm_eps) if index > 0
                           else nn.Identity())
        window, shift = config.stage_window(index)
        self.blocks = nn.ModuleList([
            SwinBlock(stage, config.stage_grid(index), window, shift if number % 2 else 0, drop_paths[number])
            for number in range(config.depths[index])])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        x = self.downsample(x)
        all_attentions = []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, attention_probs = checkpoint(block, x, output_attentions, use_reentrant=False)
            else:
                x, attention_probs = block(x, output_attentions)
            all_attentions.append(attention_probs)
        return x, all_attentions


class SwinForClassification(nn.Module):
    """The whole Swin: patch embedding + LayerNorm, stages, final LayerNorm, mean of the tokens, classifier.

    ``model(images)`` returns ``(logits, None)``;
    ``model(images, output_attentions=True)`` returns ``(logits, attentions)``:
    a list with one tensor per block, stages in order, each of shape
    (B * num_windows, heads, w*w, w*w): the window-attention probabilities of
    that block, windows image by image and row-major (see window_partition),
    for shifted blocks over the rolled grid. There is no [CLS] token, so the
    [CLS]-attention figures do not apply (``has_cls_token`` is False).
    In: (B, num_channels, image_size, image_size). Out: logits (B, num_classes).
    """

    has_cls_token = False

    def __init__(self, config: SwinConfig | Mapping[str, Any]):
        super().__init__()
        self.config = as_swin_config(config)
        config = self.config
        self.patch_embeddings = PatchEmbeddings(config.stage_config(0))
        self.patch_norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        # stochastic depth rises linearly over all blocks of all stages
        rates = drop_path_rates(config.drop_path_rate, sum(config.depths))
        starts = [sum(config.depths[:index]) for index in range(config.num_stages)]
        self.stages = nn.ModuleList([
            SwinStage(config, index, rates[start:start + depth])
            for index, (start, depth) in enumerate(zip(starts, config.depths))])
        self.final_layernorm = nn.LayerNorm(config.num_features, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.num_features, config.num_classes)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """timm's Swin initialisation: truncated N(0, initializer_range) for Linear weights and
        bias tables, zero biases, unit LayerNorms; the patch Conv2d keeps PyTorch's default."""
        std = self.config.initializer_range
        if not init_linear_and_layernorm(module, std) and isinstance(module, WindowAttention):
            nn.init.trunc_normal_(module.relative_position_bias_table, std=std, a=-2.0, b=2.0)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass to save activation memory."""
        for stage in self.stages:
            stage.gradient_checkpointing = enable

    def forward_tokens(self, x: torch.Tensor, output_attentions: bool = False):
        """Images -> (the last stage's normalised token grid (B, g', g', num_features), attentions or None).

        g' = grid_size / 2**(num_stages - 1); timm's ``forward_features``.
        """
        grid = self.config.grid_size
        x = self.patch_embeddings(x)  # (B, g*g, C), patches row-major
        x = self.patch_norm(x).view(x.shape[0], grid, grid, -1)  # (B, g, g, C): windows need the 2-D grid
        all_attentions = []
        for stage in self.stages:
            x, stage_attentions = stage(x, output_attentions)
            all_attentions.extend(stage_attentions)
        return self.final_layernorm(x), (all_attentions if output_attentions else None)

    def forward_features(self, x: torch.Tensor, output_attentions: bool = False):
        """Images -> (mean of the last stage's normalised tokens (B, num_features), attentions or None)."""
        tokens, all_attentions = self.forward_tokens(x, output_attentions)  # (B, g', g', C_last)
        return tokens.mean(dim=(1, 2)), all_attentions  # (B, C_last)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        features, all_attentions = self.forward_features(x, output_attentions=output_attentions)
        return self.classifier(features), all_attentions
