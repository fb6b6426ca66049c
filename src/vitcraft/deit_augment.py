"""Stronger augmentation for longer runs: RandAugment / TrivialAugment, random erasing, MixUp, CutMix.

All off by default, so the seed tutorial's recipe (``augment.BatchAugment``:
flip and random resized crop) is unchanged. In the training loop:

1. ``policy``: RandAugment or TrivialAugmentWide (torchvision.transforms.v2) on
   the uint8 batch, before BatchAugment. Those transforms draw ONE random
   operation per call, so on a whole batch every image would get the same
   one; here each image (or each chunk of ``chunk_size`` images) gets its own
   call. Calling torchvision once per image is mostly Python overhead, so its
   share of the step grows where the step is faster (more threads, a GPU);
   ``chunk_size`` trades per-image randomness for speed (README gives the
   measured cost).
2. ``erase_and_mix``: on the normalised float batch, random erasing (a box of
   per-pixel normal noise, as timm's RandomErasing in "pixel" mode, boxes
   drawn like torchvision's), then MixUp or CutMix with one Beta(alpha,
   alpha) draw per batch, each image paired with its neighbour in the batch
   (``roll(1)``, as torchvision's MixUp/CutMix). The labels become soft
   targets (B, K) that sum to 1; ``F.cross_entropy`` takes them as they are,
   with label smoothing applied on top (target * (1 - s) + s / K, timm's
   smoothed mixup targets).

Randomness comes from the generator the loop passes (torchvision's transforms
and Beta sampling use the global generator, so they run on a copy of it
seeded from ours): a run is repeatable and resumable.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitcraft.augment import Policy, sample_crop_boxes
from vitcraft.config import AUTO_AUGMENTS
from vitcraft.errors import VitcraftError

ERASING_SCALE = (0.02, 1 / 3)  # box area as a fraction of the image (torchvision's and timm's defaults)
ERASING_RATIO = (0.3, 3.3)  # box aspect ratio range
CUTMIX_OR_MIXUP = 0.5  # with both on, the probability that a mixed batch uses CutMix (timm's switch_prob)


@contextlib.contextmanager
def seeded_global_rng(generator: torch.Generator | None):
    """Run code that draws from torch's global CPU generator on a copy seeded from ``generator``.

    The global generator's state is restored afterwards. Without a generator: no change.
    """
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def auto_augment_transform(name: str):
    """The torchvision v2 policy of that name, with its default strength (RandAugment: 2 ops, magnitude 9)."""
    import torchvision.transforms.v2 as T

    if name == "randaugment":
        return T.RandAugment()
    if name == "trivialaugment":
        return T.TrivialAugmentWide()
    raise VitcraftError(f"auto_augment must be one of {', '.join(AUTO_AUGMENTS)}; got {name!r}")


def apply_per_chunk(transform, images: torch.Tensor, chunk_size: int = 1) -> torch.Tensor:
    """``transform`` called on each chunk of ``chunk_size`` images, so each chunk draws its own operation.

    In and out: uint8 (B, C, H, W).
    """
    return torch.cat([transform(chunk) for chunk in images.split(chunk_size)])


def random_erasing(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace a random box of each image, with probability p, by standard normal noise.

    Boxes have area U(2 %, 33 %) of the image and log aspect ratio U(log 0.3,
    log 3.3), up to 10 tries (an image where none fits stays as it is). The
    noise is in normalised units, so it looks like the data's own contrast.
    In and out: float (B, C, H, W), normalised.
    """
    batch, channels, height, width = x.shape
    erase = torch.rand(batch, generator=generator) < p
    top, left, h, w = sample_crop_boxes(batch, height, width, ERASING_SCALE, ERASING_RATIO, generator,
                                        fallback=False).unbind(1)
    rows = torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))  # (B, H, W)
    mask = (inside & erase.view(-1, 1, 1)).unsqueeze(1).to(x.device)  # (B, 1, H, W)
    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    return torch.where(mask, noise, x)


def cutmix_box(height: int, width: int, lam: float,
               generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """The CutMix box (top, left, h, w) for mixing weight ``lam`` (timm's rand_bbox).

    Its sides are sqrt(1 - lam) of the image's, around a uniformly drawn centre,
    clipped at the borders: the area is (1 - lam) * H * W before clipping.
    """
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    centre_y = int(torch.randint(0, height, (1,), generator=generator))
    centre_x = int(torch.randint(0, width, (1,), generator=generator))
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
    return top, left, bottom - top, right - left


def mixup(x: torch.Tensor, targets: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """lam * each image + (1 - lam) * its neighbour (roll by 1), targets alike.

    x: (B, C, H, W) float; targets: (B, K) distributions. Out: the same shapes.
    """
    return lam * x + (1 - lam) * x.roll(1, 0), lam * targets + (1 - lam) * targets.roll(1, 0)


def cutmix(x: torch.Tensor, targets: torch.Tensor, lam: float,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste the same box of each image's neighbour (roll by 1) into it; targets weighted by area.

    The targets use the box's true area after clipping, so their weights equal
    the pixel shares exactly. x: (B, C, H, W) float; targets: (B, K). Out: the same shapes.
    """
    height, width = x.shape[-2:]
    top, left, h, w = cutmix_box(height, width, lam, generator)
    mixed = x.clone()
    mixed[:, :, top:top + h, left:left + w] = x.roll(1, 0)[:, :, top:top + h, left:left + w]
    kept = 1 - h * w / (height * width)
    return mixed, kept * targets + (1 - kept) * targets.roll(1, 0)


def mix_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              mix_prob: float = 1.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix of a batch (timm's batch mode): one draw of lam ~ Beta(alpha, alpha) per batch.

    With probability 1 - mix_prob the batch stays unmixed; with both alphas
    above 0, CutMix is chosen with probability 1/2. x: float (B, C, H, W);
    labels: (B,) class indices. Out: (images (B, C, H, W), targets (B, K) float
    rows summing to 1).
    """
    targets = F.one_hot(labels, num_classes).to(x.dtype)
    if float(torch.rand(1, generator=generator)) >= mix_prob:
        return x, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand(1, generator=generator)) < CUTMIX_OR_MIXUP)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    with seeded_global_rng(generator):
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return cutmix(x, targets, lam, generator) if use_cutmix else mixup(x, targets, lam)


@dataclass(frozen=True)
class DeiTAugment:
    """The optional augmentations of a recipe, around BatchAugment; everything off by default.

    ``policy`` runs on the uint8 batch before BatchAugment, ``erase_and_mix``
    on its normalised output. Both return their input untouched, drawing no
    random numbers, when their parts are off.
    """

    num_classes: int
    auto_augment: str | None = None  # "randaugment", "trivialaugment" or None
    random_erasing: float = 0.0  # probability per image
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    chunk_size: int = 1  # images per auto-augment call (each call draws its own operations)

    def __post_init__(self) -> None:
        if self.auto_augment is not None:
            auto_augment_transform(self.auto_augment)  # refuses an unknown name
        for name in ("random_erasing", "mix_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise VitcraftError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, name) >= 0:
                raise VitcraftError(f"{name} must be 0 (off) or positive, got {getattr(self, name)!r}")
        if self.chunk_size < 1:
            raise VitcraftError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")

    @property
    def mixes(self) -> bool:
        """Whether targets become soft distributions (MixUp or CutMix on)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @property
    def image_policy(self) -> Policy | None:
        """``policy`` when RandAugment or TrivialAugment is on, else None (what BatchAugment takes)."""
        return self.policy if self.auto_augment is not None else None

    def policy(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """RandAugment / TrivialAugment per image (or chunk). uint8 (B, C, H, W) -> the same."""
        if self.auto_augment is None:
            return images
        with seeded_global_rng(generator):
            return apply_per_chunk(auto_augment_transform(self.auto_augment), images, self.chunk_size)

    def erase_and_mix(self, x: torch.Tensor, labels: torch.Tensor,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random erasing, then MixUp/CutMix. Out: (images (B, C, H, W), targets).

        targets: the labels (B,) as they are without mixing, else (B, K) distributions.
        """
        if self.random_erasing > 0:
            x = random_erasing(x, self.random_erasing, generator)
        if not self.mixes:
            return x, labels
        return mix_batch(x, labels, self.num_classes, self.mixup_alpha, self.cutmix_alpha, self.mix_prob, generator)
