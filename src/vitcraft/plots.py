"""Pictures of a model and its training, drawn with matplotlib: each function writes one PNG.

* ``plot_attention_overlays``, ``plot_samples``, ``plot_curves``, ``plot_confusion``
  draw tensors they are given (maps from ``attention_maps.py``);
* ``draw_samples``, ``draw_overlays``, ``draw_run_figures`` pick those tensors
  from a model and its data: which training images to show, which test images
  to overlay, which predictions go into the confusion matrix. Used at the end
  of training and by ``vitcraft viz``.

The plots are drawn on ``matplotlib.figure.Figure`` objects that pyplot never
sees: nothing needs a display, no global backend is switched, and no figure
stays open after a call (the Figure is freed with its last reference).
Sizes are fixed (no ``bbox_inches="tight"``), so a PNG's pixel size is its
figure size in inches times ``dpi``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from vitcraft.attention_maps import (
    POOLING_TITLE,
    attention_map_kind,
    maps_for_images,
    unavailable_map_reason,
    upsample_map,
)
from vitcraft.augment import BatchAugment, Normalization
from vitcraft.config import TrainConfig
from vitcraft.data import ImageTensorDataset

DPI = 100  # pixels per inch of every saved PNG
OVERLAY_PANEL = (3.0, 3.3)  # (width, height) in inches of one overlay subplot, title included
SAMPLE_PANEL = 2.5  # side in inches of one sample-grid subplot
CURVES_SIZE = (16.0, 4.5)  # the three-panel training-curves figure, inches
MAX_OVERLAYS = 10  # overlay figure: at most 2 rows of 5
MAX_SAMPLES = 16  # sample figure: at most 4 rows of 4
MAX_ANNOTATED_CLASSES = 30  # above this many classes the confusion cells carry no numbers
TITLE_CHARS = 30  # about what fits over one 3-inch panel at 10 pt; longer titles wrap or shorten
NUM_OVERLAYS = 10  # test images in attention.png and rollout.png


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Count how often each true class was predicted as each class.

    In: predictions and targets, integer tensors of the same shape (any), values
    in [0, num_classes). Out: LongTensor (K, K); entry [t, p] counts samples of
    true class t predicted as p, so rows are true classes, columns predictions,
    and the diagonal holds the correct ones.
    """
    predictions, targets = torch.as_tensor(predictions).flatten(), torch.as_tensor(targets).flatten()
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions ({predictions.numel()}) and targets ({targets.numel()}) "
                         "must have the same number of elements")
    for name, values in (("predictions", predictions), ("targets", targets)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values from "
                             f"{int(values.min())} to {int(values.max())}")
    # each (t, p) pair gets its own bin t * K + p
    counts = torch.bincount(targets.long() * num_classes + predictions.long(), minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes).cpu()  # (K, K)


# --------------------------------------------------------------------------- plotting helpers
def _save(fig: Figure, path: str | Path) -> Path:
    """Write the figure as PNG (creating parent folders) and release it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    fig.clear()  # drop the artists now; the Figure itself is not registered anywhere
    return path


def _to_hwc(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """(C, H, W) tensor in [0, 1] -> (array for imshow, cmap): (H, W) gray or (H, W, 3) colour."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"each image must have shape (1 or 3, H, W), got {tuple(image.shape)}")
    array = image.detach().float().clamp(0, 1).cpu()
    if array.shape[0] == 1:
        return array[0].numpy(), "gray"  # (H, W)
    return array.permute(1, 2, 0).numpy(), None  # (H, W, 3)


def _show_image(ax, image: torch.Tensor) -> None:
    """Draw one (C, H, W) image in [0, 1] on ``ax``; grayscale gets the gray colour map."""
    array, cmap = _to_hwc(image)
    ax.imshow(array, cmap=cmap, vmin=0.0, vmax=1.0)
    ax.axis("off")


def _short(name: str, limit: int = TITLE_CHARS) -> str:
    """``name`` cut to ``limit`` characters with an ellipsis, so it cannot run into the next panel."""
    name = str(name)
    return name if len(name) <= limit else name[:limit - 1] + "\u2026"


def _overlay_title(true_name: str, pred_name: str) -> str:
    """ "GT: x | Pred: y", on two lines when one line would not fit over the panel."""
    title = f"GT: {true_name} | Pred: {pred_name}"
    if len(title) <= TITLE_CHARS:
        return title
    return f"GT: {_short(true_name, TITLE_CHARS - 4)}\nPred: {_short(pred_name, TITLE_CHARS - 6)}"


def _grid(fig: Figure, count: int, columns: int) -> list:
    """A rows x columns subplot grid with enough cells for ``count``; surplus cells hidden."""
    rows = max(1, math.ceil(count / columns))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.axis("off")
    return list(axes[:count])


# --------------------------------------------------------------------------- attention overlays
def _attention_overlay_figure(images: torch.Tensor, maps: torch.Tensor, true_names: Sequence[str],
                              pred_names: Sequence[str], title: str | None = None) -> Figure:
    """Build (without saving) the figure of ``plot_attention_overlays``."""
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    count = min(len(images), MAX_OVERLAYS)
    if len(maps) < count or len(true_names) < count or len(pred_names) < count:
        raise ValueError(f"need a map, a true name and a predicted name for each of the {count} images")
    columns = min(count, 5)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(OVERLAY_PANEL[0] * columns, OVERLAY_PANEL[1] * rows + (0.4 if title else 0)),
                 layout="constrained")
    heat = upsample_map(maps[:count].detach(), tuple(images.shape[-2:])).cpu().numpy()  # (n, H, W)
    for i, ax in enumerate(_grid(fig, count, columns)):
        _show_image(ax, images[i])
        # each map is stretched to its own min..max: red is where this image's attention is highest
        ax.imshow(heat[i], cmap="jet", alpha=0.6)
        if true_names[i] is None:  # a user's own image: no ground truth to compare with
            ax.set_title(_short(f"Pred: {pred_names[i]}"), fontsize=10, color="black")
            continue
        correct = true_names[i] == pred_names[i]
        ax.set_title(_overlay_title(true_names[i], pred_names[i]), fontsize=10,
                     color="green" if correct else "red")
    if title:
        fig.suptitle(title, fontsize=13)
    return fig


def plot_attention_overlays(images: torch.Tensor, maps: torch.Tensor, true_names: Sequence[str],
                            pred_names: Sequence[str], path: str | Path, title: str | None = None) -> Path:
    """Overlay attention maps on their images, the seed tutorial's closing figure.

    ``images``: (B, C, H, W) floats in [0, 1] (un-normalised; C = 1 shown in
    gray, C = 3 in colour). ``maps``: (B, g, g) from ``cls_attention_map`` or
    ``attention_rollout`` (any (B, h, w) works), bilinearly resized to H x W
    and drawn with the "jet" colour map at alpha 0.6, each stretched to its own
    range. ``true_names`` / ``pred_names``: class name per image (a true name of
    None, for an image without a label, gives a black "Pred: y" title). The first 10
    images are drawn, 5 per row; titles read "GT: x | Pred: y", green when the
    two agree, red otherwise. Size: 300 x 330 pixels per image (+40 with a title).
    Returns ``path``.
    """
    return _save(_attention_overlay_figure(images, maps, true_names, pred_names, title), path)


# --------------------------------------------------------------------------- sample images
def _samples_figure(images: torch.Tensor, labels: Sequence[int] | torch.Tensor,
                    class_names: Sequence[str]) -> Figure:
    """Build (without saving) the figure of ``plot_samples``."""
    fig = Figure(figsize=(4 * SAMPLE_PANEL, 4 * SAMPLE_PANEL + 0.4), layout="constrained")
    count = min(len(images), MAX_SAMPLES)
    # always a 4 x 4 grid, so the PNG has the same size whatever the batch
    axes = fig.subplots(4, 4, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i >= count:
            ax.axis("off")
            continue
        _show_image(ax, images[i])
        ax.set_title(_short(class_names[int(labels[i])], 24), fontsize=11)
    fig.suptitle("Training images as the model sees them (after augmentation)", fontsize=13)
    return fig


def plot_samples(images: torch.Tensor, labels: Sequence[int] | torch.Tensor,
                 class_names: Sequence[str], path: str | Path) -> Path:
    """A 4 x 4 grid of training images titled with their class names.

    ``images``: (B, C, H, W) floats in [0, 1] (augmented, un-normalised); the
    first 16 are drawn. ``labels``: B class indices into ``class_names``.
    Size: 1000 x 1040 pixels. Returns ``path``.
    """
    return _save(_samples_figure(images, labels, class_names), path)


# --------------------------------------------------------------------------- training curves
def _curves_figure(metrics: Sequence[Mapping[str, float]], lrs: Sequence[float]) -> Figure:
    """Build (without saving) the figure of ``plot_curves``."""
    fig = Figure(figsize=CURVES_SIZE, layout="constrained")
    # a pretraining run (MAE) has a reconstruction loss and no accuracy
    supervised = any("test_acc" in m for m in metrics) or not metrics
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3) if supervised else (*fig.subplots(1, 2), None)
    if not supervised:
        acc_ax, lr_ax = None, acc_ax

    def series(key: str) -> tuple[list, list]:
        """(epochs, values) of the epochs that recorded ``key``."""
        rows = [m for m in metrics if m.get(key) is not None]
        return [m["epoch"] for m in rows], [m[key] for m in rows]

    for key, label in (("train_loss", "train loss"), ("test_loss", "test loss")):
        epochs, values = series(key)
        if values:
            loss_ax.plot(epochs, values, marker="o", markersize=3, label=label)
    loss_ax.set(xlabel="Epoch", ylabel="Cross-entropy loss" if supervised else "Masked-patch mean squared error",
                title="Training and test loss")
    if loss_ax.lines:
        loss_ax.legend()

    if acc_ax is not None:
        epochs, accuracy = series("test_acc")
        acc_ax.plot(epochs, [100 * a for a in accuracy], marker="o", markersize=3, color="tab:green")
        acc_ax.set(xlabel="Epoch", ylabel="Accuracy (%)", title="Test accuracy")

    lr_ax.plot(range(len(lrs)), list(lrs), color="tab:purple")
    lr_ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers (short runs: no 0.2)
    if not lrs:
        lr_ax.text(0.5, 0.5, "no learning rates recorded", ha="center", va="center",
                   transform=lr_ax.transAxes, color="gray")
        lr_ax.set(xticks=[], yticks=[])  # an empty panel's default ticks would suggest data
    lr_ax.set(xlabel="Optimizer step", ylabel="Learning rate", title="Learning-rate schedule")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    epoch_axes = [ax for ax in (loss_ax, acc_ax) if ax is not None]
    for ax in (*epoch_axes, lr_ax):
        ax.grid(alpha=0.3)
    epochs = sorted({m["epoch"] for m in metrics if "epoch" in m})
    for ax in epoch_axes:
        if len(epochs) <= 12:
            ax.set_xticks(epochs)  # few epochs: tick each one (the locator would pick 0.96, 0.98, ...)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
    return fig


def plot_curves(metrics: Sequence[Mapping[str, float]], lrs: Sequence[float], path: str | Path) -> Path:
    """Three panels: train/test loss per epoch, test accuracy (%) per epoch, learning rate per step; a
    pretraining run's, which records no accuracy, has the loss and learning-rate panels only.

    ``metrics``: one dict per epoch with keys ``epoch``, ``train_loss``,
    ``test_loss`` and ``test_acc`` (a fraction in [0, 1], drawn as %); epochs
    missing a key are skipped in that curve. ``lrs``: the learning rate of
    every optimizer step, in order. Size: 1600 x 450 pixels. Returns ``path``.
    """
    return _save(_curves_figure(metrics, lrs), path)


# --------------------------------------------------------------------------- confusion matrix
def _confusion_figure(matrix: torch.Tensor, class_names: Sequence[str]) -> Figure:
    """Build (without saving) the figure of ``plot_confusion``."""
    counts = torch.as_tensor(matrix).long().cpu()
    num_classes = counts.shape[0]
    if counts.shape != (num_classes, num_classes) or len(class_names) != num_classes:
        raise ValueError(f"need a square (K, K) matrix and K class names, got {tuple(counts.shape)} "
                         f"and {len(class_names)} names")
    per_class = counts.diagonal() / counts.sum(dim=1).clamp(min=1)  # recall of each true class
    total = int(counts.sum())
    overall = counts.diagonal().sum() / max(total, 1)

    side = min(4.0 + 0.55 * num_classes, 24.0)  # inches; grows with K up to a cap
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(counts.numpy(), cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="Number of test images")

    ax.set_xticks(range(num_classes), [str(name) for name in class_names], rotation=45, ha="right")
    row_labels = [f"{name} ({100 * acc:.0f}%)" if counts[i].sum() else f"{name} (n/a)"
                  for i, (name, acc) in enumerate(zip(class_names, per_class.tolist()))]
    ax.set_yticks(range(num_classes), row_labels)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class (per-class accuracy)")
    ax.set_title(f"Confusion matrix: {total:,} images, {100 * float(overall):.1f}% correct")

    if num_classes <= MAX_ANNOTATED_CLASSES:
        fontsize = 10 if num_classes <= 12 else 7
        threshold = counts.max().item() / 2  # white text on the dark half of the colour map
        for t in range(num_classes):
            for p in range(num_classes):
                value = int(counts[t, p])
                ax.text(p, t, str(value), ha="center", va="center", fontsize=fontsize,
                        color="white" if value > threshold else "black")
    return fig


def plot_confusion(matrix: torch.Tensor, class_names: Sequence[str], path: str | Path) -> Path:
    """Draw a confusion matrix: counts in the cells, per-class accuracy beside the rows.

    ``matrix``: (K, K) counts from ``confusion_matrix`` (rows true class,
    columns predicted). ``class_names``: K names, on both axes (x rotated).
    Each y label carries the accuracy of that true class (diagonal / row sum);
    the title carries the overall accuracy. Cells get numbers up to 30 classes.
    Size: (5.5 + 0.55 K) x (4 + 0.55 K) inches at 100 dpi, capped at 25.5 x 24.
    Returns ``path``.
    """
    return _save(_confusion_figure(matrix, class_names), path)


# --------------------------------------------------------------------------- a run's figures
def draw_samples(path: Path, dataset: ImageTensorDataset, augment: BatchAugment,
                 class_names: Sequence[str], seed: int = 0) -> Path:
    """16 random training images after augmentation, as the model receives them (un-normalised)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[:16]
    batch = dataset.batch(index)
    images = augment(batch.cpu() if isinstance(batch, torch.Tensor) else batch, generator)
    return plot_samples(augment.normalization.undo(images), dataset.labels[index.to(dataset.labels.device)].cpu(),
                        class_names, path)


def draw_overlays(path: Path, model: nn.Module, images: torch.Tensor, normalization: Normalization,
                  class_names: Sequence[str], labels: Sequence[int | None], method: str = "cls",
                  layer: int = -1, head: int | str = "mean", title: str | None = None) -> Path:
    """Overlay the attention of ``model`` on uint8 images (B, C, H, W) and save the figure."""
    device = next(model.parameters()).device
    logits, maps = maps_for_images(model, normalization(images.to(device)), method, layer, head)
    predicted = [class_names[i] for i in logits.argmax(1).tolist()]
    true = [None if label is None else class_names[label] for label in labels]
    return plot_attention_overlays(images.float().cpu() / 255, maps.cpu(), true, predicted, path, title)


def overlay_examples(dataset: ImageTensorDataset, count: int = NUM_OVERLAYS) -> tuple[torch.Tensor, list[int]]:
    """``count`` fixed test images (uint8 (n, C, H, W)) and labels, drawn at random with seed 0.

    Random rather than the first ones, because folder datasets are sorted by
    class and the first ten would all be one class.
    """
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count]
    images, labels = dataset.images[index.to(dataset.images.device)], dataset.labels[index.to(dataset.labels.device)]
    return images.cpu(), labels.tolist()


RECONSTRUCTION_COLUMNS = ("original", "masked input", "reconstruction", "reconstruction + visible")


@torch.no_grad()
def draw_reconstructions(path: Path, model: nn.Module, dataset: ImageTensorDataset, normalization: Normalization,
                         count: int = 8, seed: int = 0) -> Path:
    """A masked autoencoder on ``count`` fixed test images: one row each, with the original, the masked input
    (hidden patches grey), the reconstruction, and the reconstruction with the visible patches pasted back.
    The masks are drawn with ``seed``, so the figures of one run's epochs are comparable."""
    model.eval()
    device = next(model.parameters()).device
    images, _ = overlay_examples(dataset, count)
    num_patches = model.encoder.config.num_patches
    noise = torch.rand(len(images), num_patches, generator=torch.Generator().manual_seed(seed)).to(device)
    normalised = normalization(images.to(device))
    hidden, reconstruction, pasted = model.reconstruct(normalised, noise)  # hidden: (B, 1, H, W)
    original = normalization.undo(normalised)
    masked = original.masked_fill(hidden, 0.5)  # grey, as MAE's figures show the hidden patches
    panels = [x.float().cpu() for x in (original, masked, normalization.undo(reconstruction),
                                        normalization.undo(pasted))]
    fig = Figure(figsize=(2 * len(RECONSTRUCTION_COLUMNS), 2 * len(images)), layout="constrained")
    axes = fig.subplots(len(images), len(RECONSTRUCTION_COLUMNS), squeeze=False)
    for row in range(len(images)):
        for column, title in enumerate(RECONSTRUCTION_COLUMNS):
            _show_image(axes[row, column], panels[column][row])
            if row == 0:
                axes[row, column].set_title(title, fontsize=10)
    ratio = model.pretrain.mask_ratio
    fig.suptitle(f"MAE reconstructions of test images, {100 * ratio:.0f}% of the patches hidden")
    return _save(fig, path)


@torch.no_grad()
def predict_all(model: nn.Module, dataset: ImageTensorDataset, normalization: Normalization,
                batch_size: int = TrainConfig.eval_batch_size) -> torch.Tensor:
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
    paths = [plot_curves(history, lrs, run_dir / "curves.png")]
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
    matrix = confusion_matrix(predictions, test_set.labels.cpu(), len(names))
    paths.append(plot_confusion(matrix, names, run_dir / "confusion.png"))
    return paths
