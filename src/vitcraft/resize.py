"""Running a ViT at another image size: position embeddings resampled to a new patch grid.

A ViT learns one position vector per patch slot of its training grid
(``image_size / patch_size`` squared). At another image size the grid has
another number of slots, so the learned table is treated as a small image of
``hidden_size`` channels and resized bicubically to the new grid (as timm's
``resample_abs_pos_embed`` does). The prefix tokens ([CLS], and DeiT's
distillation token) have no grid position: their vectors are kept as they are.

vitcraft resamples on the fly, in the forward pass, and never changes the
stored parameter (see ``Embeddings`` in model.py and
``ViTForClassification.set_dynamic_image_size``): the saved model keeps its
training-size table, the optimizer state of that parameter stays valid when
progressive resizing changes the size between epochs, and gradients flow
through the (differentiable) resampling into the full-size table.

This module also holds the progressive-resizing schedule of the training loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitcraft.errors import VitcraftError


def resample_position_embeddings(position_embeddings: torch.Tensor, num_prefix_tokens: int,
                                 old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a position table to another patch grid, bicubically; the prefix tokens' rows kept.

    In: (1, num_prefix_tokens + old_h * old_w, hidden). Out: (1, num_prefix_tokens
    + new_h * new_w, hidden). At the same grid the input itself is returned
    (exact, and free). Patches are in row-major grid order, as PatchEmbeddings
    flattens them. Antialiased, as timm resamples (equal to its
    ``resample_abs_pos_embed``): a coarser grid averages the vectors it covers
    instead of picking some of them.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return position_embeddings
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if position_embeddings.shape[1] != expected:
        raise ValueError(f"position embeddings have {position_embeddings.shape[1]} rows, but {num_prefix_tokens} "
                         f"prefix tokens and a {old_grid[0]}x{old_grid[1]} grid need {expected}")
    prefix, patches = position_embeddings[:, :num_prefix_tokens], position_embeddings[:, num_prefix_tokens:]
    hidden = patches.shape[-1]
    grid = patches.reshape(1, *old_grid, hidden).permute(0, 3, 1, 2)  # (1, hidden, old_h, old_w)
    # bicubic in float32: half-precision interpolation is not implemented everywhere
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], hidden)  # (1, new_h * new_w, hidden)
    return torch.cat([prefix, patches.to(prefix.dtype)], dim=1)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (B, C, H, W) -> (B, C, size, size), bilinear (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < images.shape[-1])


def progressive_size(sizes: list[int] | None, epoch: int, epochs: int, default: int) -> int:
    """The image size of ``epoch`` (0-based) under progressive resizing.

    The epochs are split evenly between the entries of ``sizes`` in order
    (``[16, 24, 32]`` over 9 epochs: 3 epochs each); repeating a size gives it
    more epochs (``[16, 16, 32]``: two thirds at 16). None: ``default`` always.
    """
    if not sizes:
        return default
    return sizes[min(len(sizes) - 1, math.floor(epoch * len(sizes) / epochs))]


def check_progressive_sizes(sizes: list[int], image_size: int) -> None:
    """Refuse progressive sizes that do not end at ``image_size``, the size the model is evaluated at.

    A list written for other images (a recipe's 16, 24, 32 on 224-pixel scans)
    would otherwise train every epoch at sizes the model is never tested at.
    """
    if sizes[-1] != image_size:
        raise VitcraftError(f"progressive_sizes must end at the images' size, {image_size} px (the size the model "
                            f"is evaluated at), got {sizes}; pass --progressive-sizes with sizes for these images")


def allow_image_sizes(model: nn.Module, sizes: list[int], name: str) -> None:
    """Let ``model`` take every image size in ``sizes`` (progressive resizing), or say why it cannot.

    ViTs need sizes that are multiples of their patch size; their position
    embeddings are then resampled per size (``set_dynamic_image_size``).
    """
    if not hasattr(model, "set_dynamic_image_size"):
        raise VitcraftError(f"model {name!r} cannot change its image size, so progressive_sizes cannot be used")
    patch_size = getattr(model.config, "patch_size", 1)
    bad = [size for size in sizes if size % patch_size]
    if bad:
        raise VitcraftError(f"progressive_sizes must be multiples of the patch size {patch_size} of {name!r}, "
                            f"got {bad}")
    model.set_dynamic_image_size(True)
