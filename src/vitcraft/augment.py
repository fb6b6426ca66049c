"""Augmentation and normalisation of whole batches with tensor operations.

The tutorial's per-image transforms (RandomHorizontalFlip, then
RandomResizedCrop, then Normalize) run here on a whole uint8 batch at once,
drawing the same random distributions per image: a flip with probability p,
and a crop box sampled exactly as torchvision's RandomResizedCrop samples it,
resized back with bilinear interpolation (one ``grid_sample`` call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Normalization:
    """Per-channel (x - mean) / std after scaling uint8 to [0, 1].

    The tutorial's (0.5, 0.5, 0.5) mean and std map pixels to [-1, 1].
    """

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def for_channels(cls, channels: int, value: float = 0.5) -> "Normalization":
        return cls((value,) * channels, (value,) * channels)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        return (torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(shape),
                torch.tensor(self.std, device=x.device, dtype=x.dtype).view(shape))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) or float in [0, 1] -> normalised float32 (B, C, H, W)."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        mean, std = self._stats(x)
        return (x - mean) / std

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, C, H, W) -> float in [0, 1], for showing images."""
        mean, std = self._stats(x)
        return (x * std + mean).clamp(0, 1)


def random_horizontal_flip(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability p. (B, C, H, W) -> same."""
    flip = torch.rand(x.shape[0], generator=generator, device="cpu") < p
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def sample_crop_boxes(batch: int, height: int, width: int, scale: tuple[float, float],
                      ratio: tuple[float, float], generator: torch.Generator | None = None,
                      attempts: int = 10, fallback: bool = True) -> torch.Tensor:
    """Crop boxes (B, 4) as (top, left, h, w), drawn like torchvision's RandomResizedCrop.

    Per image: up to 10 tries of area ~ U(scale) * H * W and log aspect ratio
    ~ U(log ratio); the first box that fits wins; if none fits, the central
    crop with the aspect ratio clamped to ``ratio``, or without ``fallback``
    an empty box (h = w = 0), as torchvision's RandomErasing then erases nothing.
    """
    area = height * width
    target_area = area * torch.empty(batch, attempts).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target_area * aspect).round()
    h = torch.sqrt(target_area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((batch,), -1))
    # fallback: the central crop
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    if not fallback:
        fallback_w = fallback_h = 0
    rows = torch.arange(batch)
    chosen_w = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.tensor(float(fallback_w)))
    chosen_h = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.tensor(float(fallback_h)))
    # torchvision draws top in [0, H - h] and left in [0, W - w] uniformly
    top = (torch.rand(batch, generator=generator) * (height - chosen_h + 1)).floor()
    left = (torch.rand(batch, generator=generator) * (width - chosen_w + 1)).floor()
    top = torch.where(first >= 0, top, ((height - chosen_h) / 2).floor())
    left = torch.where(first >= 0, left, ((width - chosen_w) / 2).floor())
    return torch.stack([top, left, chosen_h, chosen_w], dim=1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop each image to its box and resize it to ``size`` bilinearly, in one grid_sample.

    x: float (B, C, H, W); boxes: (B, 4) (top, left, h, w) in pixels. Out: (B, C, *size).
    """
    batch, _, height, width = x.shape
    top, left, h, w = boxes.to(x.device, x.dtype).unbind(1)
    # An affine map from output coordinates in [-1, 1] to input coordinates in
    # [-1, 1] (align_corners=False: -1 and 1 are the outer pixel edges).
    theta = torch.zeros(batch, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [batch, x.shape[1], *size], align_corners=False)  # (B, *size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class BatchAugment:
    """The tutorial's training augmentation for a whole uint8 batch.

    flip with probability ``flip_p``, then a random resized crop with area
    fraction in ``crop_scale`` back to the input size, then normalisation.
    In: uint8 (B, C, H, W). Out: float32 (B, C, H, W), normalised.
    """

    normalization: Normalization
    flip_p: float = 0.5
    crop_scale: tuple[float, float] | None = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float() / 255
        if self.flip_p > 0:
            x = random_horizontal_flip(x, self.flip_p, generator)
        if self.crop_scale is not None:
            height, width = x.shape[-2:]
            boxes = sample_crop_boxes(x.shape[0], height, width, self.crop_scale, self.crop_ratio, generator)
            x = resized_crop(x, boxes, (height, width))
        return self.normalization(x)
