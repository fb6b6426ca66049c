"""Attention maps: which patches a model looks at, as one (g x g) grid per image.

Tensor functions, no plotting (``plots.py`` draws them):

* ``cls_attention_map``: how much [CLS] attends to each patch in one block;
* ``attention_rollout``: the same traced through every block (Abnar & Zuidema 2020);
* ``upsample_map``: a patch-grid map stretched to image size;
* ``maps_for_images``: run a model on images and return its maps, whatever the
  model (a ViT's [CLS] attention, CCT's sequence-pooling weights), with
  ``attention_map_kind`` / ``unavailable_map_reason`` saying which apply.

Typical use::

    model.eval()
    with torch.no_grad():
        logits, attentions = model(normalised_images, output_attentions=True)
    maps = cls_attention_map(attentions)  # (B, g, g)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# the sentence that titles a CCT's maps, in the figures and on the serve page
POOLING_TITLE = "Sequence-pooling weights over the tokens (what the classifier reads)"

def _check_attentions(attentions: Sequence[torch.Tensor], num_prefix_tokens: int = 1) -> int:
    """Validate the model's attention list; return the patch-grid side g.

    ``num_prefix_tokens``: the tokens before the patches ([CLS]; 2 with DeiT's
    distillation token, as the model's ``num_prefix_tokens`` says).
    """
    if isinstance(attentions, torch.Tensor) or len(attentions) == 0:
        raise ValueError("attentions must be a non-empty list of (B, heads, tokens, tokens) tensors, "
                         "as returned by model(x, output_attentions=True)")
    for i, attention in enumerate(attentions):
        if attention is None:
            raise ValueError(f"attentions[{i}] is None: call the model with output_attentions=True")
        if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
            raise ValueError(f"attentions[{i}] must have shape (B, heads, tokens, tokens), "
                             f"got {tuple(attention.shape)}")
    num_patches = attentions[0].shape[-1] - num_prefix_tokens  # token 0 is [CLS]
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    return side


def _select_head(attention: torch.Tensor, head: int | str) -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N): the mean over heads, or one head."""
    if head == "mean":
        return attention.float().mean(dim=1)
    num_heads = attention.shape[1]
    if isinstance(head, bool) or not isinstance(head, int) or not -num_heads <= head < num_heads:
        raise ValueError(f"head must be 'mean' or an integer in [-{num_heads}, {num_heads}), got {head!r}")
    return attention[:, head].float()


def _cls_row_to_grid(matrix: torch.Tensor, side: int) -> torch.Tensor:
    """(B, N, N) token-to-token matrix -> (B, g, g): row 0 ([CLS]) over the patch columns."""
    cls_to_patches = matrix[:, 0, -side * side:]  # (B, g*g): the patches follow the prefix tokens, row-major
    return cls_to_patches.reshape(-1, side, side)  # (B, g, g)


def cls_attention_map(attentions: Sequence[torch.Tensor], layer: int = -1,
                      head: int | str = "mean", num_prefix_tokens: int = 1) -> torch.Tensor:
    """How much the [CLS] token attends to each patch in one layer.

    ``attentions`` is the list ``model(x, output_attentions=True)`` returns: one
    (B, heads, 1 + g*g, 1 + g*g) tensor per block. ``layer`` indexes that list
    (negative counts from the end); ``head`` is ``"mean"`` (average the heads)
    or one head index. The values are the raw attention probabilities, so a
    map sums to 1 minus what [CLS] gives itself (and DeiT's distillation token:
    ``num_prefix_tokens=2``).
    Out: float tensor (B, g, g), cell (r, c) is the patch in grid row r, column c.
    """
    side = _check_attentions(attentions, num_prefix_tokens)
    num_layers = len(attentions)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer < num_layers:
        raise ValueError(f"layer must be an integer in [-{num_layers}, {num_layers}), got {layer!r}")
    return _cls_row_to_grid(_select_head(attentions[layer], head), side)


def attention_rollout(attentions: Sequence[torch.Tensor], head: int | str = "mean",
                      num_prefix_tokens: int = 1) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each patch flows into [CLS] over all layers.

    A single layer's map ignores that tokens were already mixed by the layers
    before. Rollout follows the mixing through the whole stack: per layer it
    takes A = attention (head mean, or one head) + identity, the identity
    standing for the residual connection, renormalises each row to sum to 1,
    and multiplies the layers, first layer rightmost:
    rollout = A_L @ ... @ A_2 @ A_1. The [CLS] row of the product, over the
    patch columns, is the map.

    Normalisation: each map is divided by its sum, so it is a distribution
    over the patches (sums to 1; uniform attention gives 1 / g^2 everywhere).
    The raw row sums to 1 minus the share that stayed with [CLS], which varies
    with depth and would make maps of different models incomparable. If no
    attention reaches the patches at all (every layer's [CLS] attends only to
    itself, e.g. identity attention), the map stays all zeros rather than NaN.
    In: list of (B, heads, P + g*g, P + g*g), P = num_prefix_tokens. Out: float tensor (B, g, g).
    """
    side = _check_attentions(attentions, num_prefix_tokens)
    rollout = None
    for attention in attentions:
        mixed = _select_head(attention, head)  # (B, N, N)
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        # later layers multiply from the left: rollout = A_l @ (A_{l-1} @ ... @ A_1)
        rollout = mixed if rollout is None else mixed @ rollout
    maps = _cls_row_to_grid(rollout, side)  # (B, g, g)
    total = maps.sum(dim=(-2, -1), keepdim=True)  # (B, 1, 1)
    return maps / torch.where(total > 0, total, torch.ones_like(total))


def upsample_map(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize patch-grid maps to image size (align_corners=False).

    In: (B, g, g). ``size``: H (square) or (H, W). Out: float tensor (B, H, W).
    With align_corners=False each grid cell's value sits at its patch's centre,
    so the hot spot of a cell lands on that patch's pixels.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (B, g, g), got {tuple(maps.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    resized = F.interpolate(maps.float().unsqueeze(1), size=size, mode="bilinear",
                            align_corners=False)  # (B, 1, H, W)
    return resized.squeeze(1)  # (B, H, W)


def attention_map_kind(model: nn.Module) -> str:
    """Which attention figures apply to ``model``.

    "cls": a ViT's [CLS] attention and rollout. "pooling": no [CLS] token, but
    the classifier reads a weighted mean of the tokens whose weights
    ``model.pooling_map(images)`` returns (CCT); one map per image, no rollout.
    "none": no [CLS] token and no pooling map (Swin, whose attention stays
    inside local windows). A model says it has no [CLS] token with a class
    attribute ``has_cls_token = False``; without one, [CLS] is assumed.
    """
    if hasattr(model, "pooling_map"):
        return "pooling"
    return "cls" if getattr(model, "has_cls_token", True) else "none"


def unavailable_map_reason(model: nn.Module, method: str) -> str | None:
    """Why ``method``'s maps cannot be drawn for ``model`` (one sentence), or None if they can."""
    kind, name = attention_map_kind(model), type(model).__name__
    if kind == "none":
        return f"attention maps are not available for {name}: it has no [CLS] token whose attention could be drawn"
    if kind == "pooling" and method == "rollout":
        return (f"attention rollout is not available for {name}: it has no [CLS] token "
                f"(--method cls draws its sequence-pooling weights)")
    return None


@torch.no_grad()
def maps_for_images(model: nn.Module, images: torch.Tensor, method: str = "cls", layer: int = -1,
                    head: int | str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K), maps (B, g, g)) for normalised images (B, C, H, W).

    ``method`` "cls": [CLS]-to-patch attention of one layer (for a "pooling"
    model, see attention_map_kind: its pooling weights; ``layer`` and ``head``
    do not apply); "rollout": attention rollout through all layers.
    """
    model.eval()
    reason = unavailable_map_reason(model, method)
    if reason:
        raise ValueError(reason)
    if attention_map_kind(model) == "pooling":
        return model.pooling_map(images)
    logits, attentions = model(images, output_attentions=True)
    if attentions is None:
        raise ValueError(f"{type(model).__name__} has no attention maps to draw")
    prefix = getattr(model, "num_prefix_tokens", 1)  # [CLS], and DeiT's distillation token
    if method == "rollout":
        return logits, attention_rollout(attentions, head=head, num_prefix_tokens=prefix)
    if method != "cls":
        raise ValueError(f"method must be cls or rollout, got {method!r}")
    return logits, cls_attention_map(attentions, layer=layer, head=head, num_prefix_tokens=prefix)
