"""The figures of a run directory, drawn from a model and its data.

``viz.py`` turns tensors into pictures; this module picks the tensors: which
training images to show, which test images to overlay, which predictions go
into the confusion matrix. Used at the end of training and by ``vitcraft viz``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from vitcraft import viz
from vitcraft.augment import BatchAugment, Normalization
from vitcraft.data import ImageTensorDataset

NUM_OVERLAYS = 10


def draw_samples(path: Path, dataset: ImageTensorDataset, augment: BatchAugment,
                 class_names: Sequence[str], seed: int = 0) -> Path:
    """16 random training images after augmentation, as the model receives them (un-normalised)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[:16]
    images = augment(dataset.images[index.to(dataset.images.device)].cpu(), generator)
    return viz.plot_samples(augment.normalization.undo(images), dataset.labels[index.to(dataset.labels.device)].cpu(),
                            class_names, path)


POOLING_TITLE = "Sequence-pooling weights over the tokens (what the classifier reads)"


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
def attention_maps(model: nn.Module, images: torch.Tensor, method: str = "cls", layer: int = -1,
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
        return logits, viz.attention_rollout(attentions, head=head, num_prefix_tokens=prefix)
    if method != "cls":
        raise ValueError(f"method must be cls or rollout, got {method!r}")
    return logits, viz.cls_attention_map(attentions, layer=layer, head=head, num_prefix_tokens=prefix)


def draw_overlays(path: Path, model: nn.Module, images: torch.Tensor, normalization: Normalization,
                  class_names: Sequence[str], labels: Sequence[int | None], method: str = "cls",
                  layer: int = -1, head: int | str = "mean", title: str | None = None) -> Path:
    """Overlay the attention of ``model`` on uint8 images (B, C, H, W) and save the figure."""
    device = next(model.parameters()).device
    logits, maps = attention_maps(model, normalization(images.to(device)), method, layer, head)
    predicted = [class_names[i] for i in logits.argmax(1).tolist()]
    true = [None if label is None else class_names[label] for label in labels]
    return viz.plot_attention_overlays(images.float().cpu() / 255, maps.cpu(), true, predicted, path, title)


def overlay_examples(dataset: ImageTensorDataset, count: int = NUM_OVERLAYS) -> tuple[torch.Tensor, list[int]]:
    """``count`` fixed test images (uint8 (n, C, H, W)) and labels, drawn at random with seed 0.

    Random rather than the first ones, because folder datasets are sorted by
    class and the first ten would all be one class.
    """
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count]
    return dataset.images[index.to(dataset.images.device)].cpu(), dataset.labels[index.to(dataset.labels.device)].tolist()


@torch.no_grad()
def predict_all(model: nn.Module, dataset: ImageTensorDataset, normalization: Normalization,
                batch_size: int = 1000) -> torch.Tensor:
    """Top-1 predictions (N,) for a whole split."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(normalization(dataset.images[i:i + batch_size].to(device)))[0].argmax(1).cpu()
                      for i in range(0, len(dataset), batch_size)])


def draw_run_figures(run_dir: Path, model: nn.Module, test_set: ImageTensorDataset,
                     normalization: Normalization, history: list[dict[str, Any]], lrs: list[float],
                     device: torch.device | None = None) -> list[Path]:
    """curves.png, attention.png, rollout.png and confusion.png of a trained run.

    The attention figures follow ``attention_map_kind``: a model without [CLS]
    gets its pooling weights as attention.png (CCT) or neither figure (Swin, a
    CNN), with a printed note saying which was skipped and why.
    """
    run_dir = Path(run_dir)
    names = test_set.class_names
    paths = [viz.plot_curves(history, lrs, run_dir / "curves.png")]
    images, labels = overlay_examples(test_set)
    kind = attention_map_kind(model)
    if kind == "cls":
        paths.append(draw_overlays(run_dir / "attention.png", model, images, normalization, names, labels, "cls",
                                   title="[CLS] attention to the patches, last block, mean over heads"))
        paths.append(draw_overlays(run_dir / "rollout.png", model, images, normalization, names, labels,
                                   "rollout", title="Attention rollout through all blocks"))
    elif kind == "pooling":
        paths.append(draw_overlays(run_dir / "attention.png", model, images, normalization, names, labels, "cls",
                                   title=POOLING_TITLE))
        print(f"rollout.png skipped: {unavailable_map_reason(model, 'rollout')}")
    elif kind == "none":
        print(f"attention.png and rollout.png skipped: {unavailable_map_reason(model, 'cls')}")
    predictions = predict_all(model, test_set, normalization)
    matrix = viz.confusion_matrix(predictions, test_set.labels.cpu(), len(names))
    paths.append(viz.plot_confusion(matrix, names, run_dir / "confusion.png"))
    return paths
