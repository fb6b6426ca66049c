"""Augmentation and normalisation of whole batches with tensor operations.

The tutorial's per-image transforms (RandomHorizontalFlip, then
RandomResizedCrop, then Normalize) run here on a whole uint8 batch at once,
drawing the same random distributions per image: a flip with probability p,
and a crop box sampled exactly as torchvision's RandomResizedCrop samples it,
resized back (or to the model's input size) with bilinear interpolation (one
``grid_sample`` call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

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
        x = images.float()
        if images.dtype == torch.uint8:
            return self.from_pixels(x)
        mean, std = self._stats(x)
        return (x - mean) / std

    def from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Float pixel values in [0, 255] (B, C, H, W) -> normalised, the scaling to [0, 1] folded in."""
        mean, std = self.pixel_stats(x.device)
        return (x - mean) / std

    def pixel_stats(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) in pixel units, each (C, 1, 1): normalised = (pixel - mean) / std for pixels in [0, 255]."""
        return tuple(255 * torch.tensor(values, device=device).view(-1, 1, 1) for values in (self.mean, self.std))

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, C, H, W) -> float in [0, 1], for showing images."""
        mean, std = self._stats(x)
        return (x * std + mean).clamp(0, 1)


def draw_flips(batch: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which of ``batch`` images to mirror, each with probability p: bool (B,), on the CPU."""
    return torch.rand(batch, generator=generator, device="cpu") < p


def flipped(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The images of x (B, C, H, W) mirrored left-right where ``flip`` (B,) is true."""
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def random_horizontal_flip(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability p. (B, C, H, W) -> same."""
    return flipped(x, draw_flips(x.shape[0], p, generator))


def sample_crop_boxes(batch: int, height: int | torch.Tensor, width: int | torch.Tensor, scale: tuple[float, float],
                      ratio: tuple[float, float], generator: torch.Generator | None = None,
                      attempts: int = 10, fallback: bool = True) -> torch.Tensor:
    """Crop boxes (B, 4) as (top, left, h, w), drawn like torchvision's RandomResizedCrop.

    ``height`` and ``width``: the images' size, one for all, or one per image
    ((B,) tensors, for a batch of images of different shapes). Per image: up
    to 10 tries of area ~ U(scale) * H * W and log aspect ratio ~ U(log
    ratio); the first box that fits wins; if none fits, the central crop with
    the aspect ratio clamped to ``ratio``, or without ``fallback`` an empty box
    (h = w = 0), as torchvision's RandomErasing then erases nothing.
    """
    height, width = (torch.as_tensor(side, dtype=torch.float32).expand(batch) for side in (height, width))
    target_area = (height * width).unsqueeze(1) * torch.empty(batch, attempts).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target_area * aspect).round()
    h = torch.sqrt(target_area / aspect).round()
    fits = (w > 0) & (w <= width.unsqueeze(1)) & (h > 0) & (h <= height.unsqueeze(1))
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((batch,), -1))
    # fallback: the central crop, its aspect ratio clamped to ``ratio``
    # (in double precision, as torchvision's Python arithmetic)
    height64, width64 = height.double(), width.double()
    in_ratio = width64 / height64
    fallback_w = torch.where(in_ratio > ratio[1], (height64 * ratio[1]).round(), width64).float()
    fallback_h = torch.where(in_ratio < ratio[0], (width64 / ratio[0]).round(), height64).float()
    if not fallback:
        fallback_w, fallback_h = torch.zeros(batch), torch.zeros(batch)
    rows = torch.arange(batch)
    chosen_w = torch.where(first >= 0, w[rows, first.clamp(min=0)], fallback_w)
    chosen_h = torch.where(first >= 0, h[rows, first.clamp(min=0)], fallback_h)
    # torchvision draws top in [0, H - h] and left in [0, W - w] uniformly
    top = (torch.rand(batch, generator=generator) * (height - chosen_h + 1)).floor()
    left = (torch.rand(batch, generator=generator) * (width - chosen_w + 1)).floor()
    top = torch.where(first >= 0, top, ((height - chosen_h) / 2).floor())
    left = torch.where(first >= 0, left, ((width - chosen_w) / 2).floor())
    return torch.stack([top, left, chosen_h, chosen_w], dim=1)


def shorter_side_resized(height: int, width: int, shorter_side: int) -> tuple[int, int]:
    """(height, width) of an image whose shorter side is resized to ``shorter_side``, as torchvision's Resize(int).

    The aspect ratio is kept and the longer side rounded down.
    """
    if width <= height:
        return int(shorter_side * height / width), shorter_side
    return shorter_side, int(shorter_side * width / height)


def shorter_side_crop(height: int, width: int, shorter_side: int, crop: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where resizing an image's shorter side to ``shorter_side``, then centre-cropping crop x crop, leads.

    Returns ((resized_height, resized_width), (top, left)) of the crop in the
    resized image. The resize is ``shorter_side_resized``, as timm's evaluation
    transform does it. The crop is the centre crop of the centre shorter_side
    square, each corner rounded as torchvision's CenterCrop rounds it, so that
    the centre crop of a training image (that square) is exactly the test image
    of the same file. A direct CenterCrop(crop) of a non-square image can round
    its corner the other way, one pixel off. The one place this geometry lives:
    decoding files, resizing tensors and BatchAugment's centre crop agree to the
    pixel.
    """
    resized = shorter_side_resized(height, width, shorter_side)
    if not 0 < crop <= shorter_side:
        raise ValueError(f"a {crop} x {crop} crop does not fit in an image whose shorter side is {shorter_side}")

    def centre(outer: int, inner: int) -> int:
        return int(round((outer - inner) / 2))

    inset = centre(shorter_side, crop)
    return resized, (centre(resized[0], shorter_side) + inset, centre(resized[1], shorter_side) + inset)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int],
                 flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image to its box and resize it to ``size`` bilinearly, in one grid_sample.

    x: float (B, C, H, W); boxes: (B, 4) (top, left, h, w) in pixels. Out: (B, C, *size).
    With ``flip`` (bool (B,)), the images where it is true are mirrored left-right
    first, at no cost: the box is read from the mirrored image by mirroring the grid.
    """
    batch, _, height, width = x.shape
    top, left, h, w = boxes.to(x.device, x.dtype).unbind(1)
    # An affine map from output coordinates in [-1, 1] to input coordinates in
    # [-1, 1] (align_corners=False: -1 and 1 are the outer pixel edges). The
    # mirrored image at u is the image at -u, so mirroring negates the x row.
    sign = 1 - 2 * flip.to(x.device, x.dtype) if flip is not None else 1
    theta = torch.zeros(batch, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = sign * ((2 * left + w) / width - 1)
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [batch, x.shape[1], *size], align_corners=False)  # (B, *size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resized_crop_normalised(images: torch.Tensor | list[torch.Tensor], boxes: torch.Tensor, size: tuple[int, int],
                            flip: torch.Tensor | None, normalization: Normalization | None) -> torch.Tensor:
    """``resized_crop`` (flip included), then ``normalization``, of uint8 images on the CPU, one at a time.

    images: uint8 (B, C, H, W), or a list of B uint8 (C, H_i, W_i) images of
    different shapes. Out: normalised float32 (B, C, *size), or without
    ``normalization`` the uint8 crops. Bilinear at the same points as
    ``resized_crop`` (align_corners=False), rounded to uint8 as torchvision
    rounds uint8 tensors. For large images it is several times faster: no
    float copy of the whole input, PyTorch's vectorised uint8 resize, and each
    image normalised while it is in the cache.
    """
    channels = images[0].shape[0]
    out = torch.empty(len(images), channels, *size, dtype=torch.float32 if normalization else torch.uint8)
    if normalization:
        # normalised = pixel * scale + bias: one pass per image, equal to (pixel - mean) / std up to rounding
        mean, std = normalization.pixel_stats()
        scale, bias = 1 / std, -mean / std
    flips = flip.tolist() if flip is not None else [False] * len(images)
    for i, (image, (top, left, h, w), mirror) in enumerate(zip(images, boxes.long().tolist(), flips)):
        if mirror:  # the box in the mirrored image is the mirrored box in the image, read, then mirrored
            left = image.shape[-1] - left - w
        # (1, C, h, w), copied channels-last: PyTorch's vectorised uint8 resize reads that layout, and the copy
        # costs less than the resize saves
        crop = image[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
        resized = F.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=False)[0]
        resized = resized.flip(-1) if mirror else resized  # (C, *size), channels-last strides
        if normalization is None:
            out[i] = resized
        else:
            torch.addcmul(bias, resized, scale, out=out[i])  # read channels-last, written channels-first
    return out


def stacked_if_alike(images: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """A list of (C, H, W) images as one (B, C, H, W) tensor when their shapes agree; else the list itself."""
    if images and all(image.shape == images[0].shape for image in images):
        return torch.stack(images)
    return images


Policy = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]  # uint8 (B, C, H, W) -> the same


LARGE_IMAGE_PIXELS = 96 * 96  # from this size up, BatchAugment resizes uint8 crops one by one on the CPU


@dataclass(frozen=True)
class BatchAugment:
    """The tutorial's training augmentation for a whole uint8 batch.

    flip with probability ``flip_p``, then a random resized crop with area
    fraction in ``crop_scale`` resized to output_size x output_size (None: back
    to the input size), then normalisation. Without ``crop_scale`` there is no
    random crop: an output smaller than the input is its centre crop (with
    ``DataConfig.crop_pct`` the training images are the larger images the test
    images were centre-cropped from, so this is exactly the evaluation
    preprocessing); a larger one, the whole image resized.

    In: uint8 (B, C, H, W), or a list of B uint8 (C, H_i, W_i) images of
    different shapes (a training split of photos kept whole; output_size is
    then required). Out: float32 (B, C, output_size, output_size), or
    (B, C, H, W) without output_size, normalised. ``policy`` (RandAugment, see
    deit_augment.py) runs on the uint8 batch: first, on a batch tensor (the
    tutorial's order); after the crop, on a list, whose images only have one
    shape once cropped (timm's order).
    """

    normalization: Normalization
    flip_p: float = 0.5
    crop_scale: tuple[float, float] | None = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    output_size: int | None = None

    def __call__(self, images: torch.Tensor | list[torch.Tensor], generator: torch.Generator | None = None,
                 policy: Policy | None = None) -> torch.Tensor:
        if isinstance(images, list):
            images = stacked_if_alike(images)
        if isinstance(images, list):
            return self._of_list(images, generator, policy)
        if policy is not None:
            images = policy(images, generator)
        flip = draw_flips(images.shape[0], self.flip_p, generator) if self.flip_p > 0 else None
        height, width = images.shape[-2:]
        size = (self.output_size, self.output_size) if self.output_size else (height, width)
        if self.crop_scale is not None:
            boxes = sample_crop_boxes(images.shape[0], height, width, self.crop_scale, self.crop_ratio, generator)
            if images.dtype == torch.uint8 and images.device.type == "cpu" and height * width >= LARGE_IMAGE_PIXELS:
                # one grid_sample call beats many small resizes, but for large images the uint8 path
                # moves far fewer bytes (benchmarks/pipeline.py)
                return resized_crop_normalised(images, boxes, size, flip, self.normalization)
            # pixels in [0, 255]: interpolation commutes with scaling, folded into normalising
            return self.normalization.from_pixels(resized_crop(images.float(), boxes, size, flip))
        x = images.float()
        if flip is not None:  # before a centre crop, which may sit a pixel off centre
            x = flipped(x, flip)
        if size[0] <= min(height, width) and size != (height, width):
            _, (top, left) = shorter_side_crop(height, width, min(height, width), size[0])
            x = x[..., top:top + size[0], left:left + size[1]]
        elif size != (height, width):
            whole = torch.tensor([[0.0, 0.0, height, width]]).expand(x.shape[0], 4)
            x = resized_crop(x, whole, size)
        return self.normalization.from_pixels(x)

    def _of_list(self, images: list[torch.Tensor], generator: torch.Generator | None,
                 policy: Policy | None) -> torch.Tensor:
        """The augmentation of images of different shapes: each cropped from its own shape, one at a time."""
        if not self.output_size:
            raise ValueError("images of different shapes need an output_size to be batched")
        flip = draw_flips(len(images), self.flip_p, generator) if self.flip_p > 0 else None
        size = (self.output_size, self.output_size)
        heights, widths = (torch.tensor([image.shape[axis] for image in images]) for axis in (-2, -1))
        if self.crop_scale is not None:
            boxes = sample_crop_boxes(len(images), heights, widths, self.crop_scale, self.crop_ratio, generator)
        else:  # the centre crop as the tensor path takes it, or the whole image where the output is larger
            boxes = torch.tensor([
                [*shorter_side_crop(h, w, min(h, w), self.output_size)[1], *size]
                if self.output_size <= min(h, w) else [0, 0, h, w]
                for h, w in zip(heights.tolist(), widths.tolist())], dtype=torch.float32)
        if policy is None:
            return resized_crop_normalised(images, boxes, size, flip, self.normalization)
        return self.normalization(policy(resized_crop_normalised(images, boxes, size, flip, None), generator))
