"""Attention maps (vitcraft.attention_maps) checked against hand-made attentions;
plots (vitcraft.plots) checked by content, and their PNGs by size within a tolerance."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from vitcraft import ViTConfig, ViTForClassification, attention_maps, plots

GRID = 4  # hand-made attentions use a 4 x 4 patch grid
TOKENS = 1 + GRID * GRID


def uniform_attention(batch: int = 1, heads: int = 1) -> torch.Tensor:
    """(B, heads, N, N) where every token attends equally to all tokens."""
    return torch.full((batch, heads, TOKENS, TOKENS), 1.0 / TOKENS)


def cls_looks_at(patches: list[int], heads: int = 1) -> torch.Tensor:
    """Uniform attention except that [CLS] of image b attends only to patch ``patches[b]``.

    (B, heads, N, N); ``patches`` index the row-major patch grid.
    """
    attention = uniform_attention(len(patches), heads)
    attention[:, :, 0] = 0.0
    for b, patch in enumerate(patches):
        attention[b, :, 0, 1 + patch] = 1.0  # token 0 is [CLS], patch p is token 1 + p
    return attention


def random_attention(generator: torch.Generator, heads: int = 2) -> torch.Tensor:
    """(1, heads, N, N) row-stochastic attention."""
    return torch.randn(1, heads, TOKENS, TOKENS, generator=generator).softmax(dim=-1)


# --------------------------------------------------------------------------- cls_attention_map
def test_cls_map_is_hot_exactly_at_the_attended_patch():
    patches = [GRID * 1 + 2, GRID * 3 + 0]  # (row 1, col 2) and (row 3, col 0)
    attentions = [uniform_attention(2, 3), cls_looks_at(patches, heads=3)]
    maps = attention_maps.cls_attention_map(attentions)  # last layer by default
    assert maps.shape == (2, GRID, GRID)
    expected = torch.zeros(2, GRID, GRID)
    expected[0, 1, 2] = expected[1, 3, 0] = 1.0
    torch.testing.assert_close(maps, expected)
    # the first layer is uniform: every patch gets 1 / N
    torch.testing.assert_close(attention_maps.cls_attention_map(attentions, layer=0),
                               torch.full((2, GRID, GRID), 1.0 / TOKENS))


def test_cls_map_selects_or_averages_heads():
    attention = cls_looks_at([5, 5])[:1].repeat(1, 2, 1, 1)  # (1, 2, N, N)
    attention[0, 1, 0] = 0.0
    attention[0, 1, 0, 1 + 10] = 1.0  # head 1 looks at patch 10 instead of 5
    maps = {head: attention_maps.cls_attention_map([attention], head=head)[0].flatten() for head in (0, 1, -1, "mean")}
    assert maps[0].argmax() == 5 and maps[1].argmax() == 10
    torch.testing.assert_close(maps[-1], maps[1])
    assert maps["mean"][5] == maps["mean"][10] == 0.5


def test_upsampled_hot_spot_covers_the_patch_pixels():
    patch_px = 4
    maps = attention_maps.cls_attention_map([cls_looks_at([GRID * 2 + 1])])  # row 2, col 1
    heat = attention_maps.upsample_map(maps, GRID * patch_px)[0]  # (16, 16)
    assert heat.shape == (16, 16)
    rows, cols = slice(2 * patch_px, 3 * patch_px), slice(1 * patch_px, 2 * patch_px)
    row, col = divmod(int(heat.argmax()), heat.shape[1])
    assert rows.start <= row < rows.stop and cols.start <= col < cols.stop
    inside = torch.zeros_like(heat, dtype=torch.bool)
    inside[rows, cols] = True
    assert heat[inside].min() > heat[~inside].max()
    assert attention_maps.upsample_map(maps, (8, 12)).shape == (1, 8, 12)


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": 2}, "layer must be"), ({"layer": -3}, "layer must be"), ({"layer": 1.0}, "layer must be"),
    ({"head": 3}, "head must be"), ({"head": -4}, "head must be"), ({"head": "max"}, "head must be"),
])
def test_cls_map_rejects_bad_layer_and_head(kwargs, message):
    attentions = [uniform_attention(1, 3)] * 2
    with pytest.raises(ValueError, match=message):
        attention_maps.cls_attention_map(attentions, **kwargs)


def test_attention_lists_are_validated():
    with pytest.raises(ValueError, match="output_attentions=True"):
        attention_maps.cls_attention_map([None])
    with pytest.raises(ValueError, match="non-empty list"):
        attention_maps.attention_rollout([])
    with pytest.raises(ValueError, match="square grid"):
        attention_maps.attention_rollout([torch.full((1, 1, 6, 6), 1 / 6)])  # 5 patches


# --------------------------------------------------------------------------- attention_rollout
def test_rollout_of_identity_attention_is_a_uniform_zero_map():
    # every token attends only to itself: nothing ever flows from the patches into [CLS]
    identity = torch.eye(TOKENS).expand(2, 3, TOKENS, TOKENS)
    maps = attention_maps.attention_rollout([identity] * 3)
    assert maps.shape == (2, GRID, GRID)
    torch.testing.assert_close(maps, torch.zeros(2, GRID, GRID))  # documented: zeros, not NaN


def test_rollout_of_uniform_attention_is_uniform_over_patches():
    maps = attention_maps.attention_rollout([uniform_attention(2, 2)] * 4)
    torch.testing.assert_close(maps, torch.full((2, GRID, GRID), 1.0 / GRID ** 2))


def test_rollout_of_two_layers_equals_the_hand_computed_product():
    generator = torch.Generator().manual_seed(1)
    first, second = random_attention(generator), random_attention(generator)
    identity = torch.eye(TOKENS)
    # by hand: head mean rows sum to 1, so (mean + I) rows sum to 2
    a1 = (first[0].mean(0) + identity) / 2
    a2 = (second[0].mean(0) + identity) / 2
    row = (a2 @ a1)[0, 1:]  # first layer on the right
    expected = (row / row.sum()).reshape(1, GRID, GRID)
    torch.testing.assert_close(attention_maps.attention_rollout([first, second]), expected)
    # the order matters, so this test would catch a swapped product
    wrong = (a1 @ a2)[0, 1:]
    assert not torch.allclose(expected.flatten(), wrong / wrong.sum())
    # one head instead of the mean
    b1, b2 = (first[0, 1] + identity) / 2, (second[0, 1] + identity) / 2
    row = (b2 @ b1)[0, 1:]
    torch.testing.assert_close(attention_maps.attention_rollout([first, second], head=1)[0],
                               (row / row.sum()).reshape(GRID, GRID))


def test_maps_of_a_real_model_have_grid_shape_and_sane_values():
    model = ViTForClassification(ViTConfig()).eval()
    with torch.no_grad():
        _, attentions = model(torch.rand(2, 3, 32, 32), output_attentions=True)
    cls_map, rollout = attention_maps.cls_attention_map(attentions), attention_maps.attention_rollout(attentions)
    assert cls_map.shape == rollout.shape == (2, 8, 8)
    # the raw map is the [CLS] row without its own entry: between 0 and 1 in total
    totals = cls_map.sum(dim=(1, 2))
    assert (cls_map >= 0).all() and (totals > 0).all() and (totals < 1).all()
    torch.testing.assert_close(totals, 1 - attentions[-1][:, :, 0, 0].mean(1))
    assert (rollout >= 0).all()
    torch.testing.assert_close(rollout.sum(dim=(1, 2)), torch.ones(2))
    assert torch.isfinite(attention_maps.upsample_map(rollout, 32)).all()


# --------------------------------------------------------------------------- confusion matrix
def test_confusion_matrix_equals_hand_count():
    targets = torch.tensor([0, 1, 2, 2, 2, 0, 0])
    predictions = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    matrix = plots.confusion_matrix(predictions, targets, num_classes=4)
    expected = torch.tensor([[2, 0, 1, 0],   # true 0: twice right, once called 2
                             [0, 1, 0, 0],   # true 1: right
                             [0, 1, 2, 0],   # true 2: once called 1, twice right
                             [0, 0, 0, 0]])  # class 3 never seen
    assert matrix.dtype == torch.long
    assert torch.equal(matrix, expected)
    assert matrix.sum() == len(targets)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        plots.confusion_matrix(torch.tensor([4]), torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="same number"):
        plots.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 4)


# --------------------------------------------------------------------------- plots
def assert_png_of_inches(path, width: float, height: float) -> None:
    """``path`` is a whole PNG, not blank, of about ``width`` x ``height`` inches at plots.DPI.

    The figures have fixed sizes (no tight bounding box), so a PNG is its figure size
    times the dpi; how matplotlib rounds that is its business, hence the tolerance of 1 %
    (a few pixels), which still tells a missing title strip (0.4 inch) or row of panels apart.
    """
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()  # the whole file: chunks and checksums, not only the header
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    rows, columns = pixels.shape[:2]
    for got, inches in ((columns, width), (rows, height)):
        expected = inches * plots.DPI
        assert abs(got - expected) <= max(3, 0.01 * expected), (path.name, (columns, rows), (width, height))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16, f"{path.name} is (nearly) blank"


NAMES = ["cat", "dog", "ship"]


def test_overlay_png_size_and_title_colours(tmp_path):
    images = torch.rand(10, 3, 32, 32)
    maps = torch.rand(10, 8, 8)
    true_names = [NAMES[i % 3] for i in range(10)]
    pred_names = ["cat"] * 10  # right for images 0, 3, 6, 9
    path = plots.plot_attention_overlays(images, maps, true_names, pred_names, tmp_path / "new" / "a.png")
    assert path == tmp_path / "new" / "a.png"
    assert_png_of_inches(path, 5 * 3.0, 2 * 3.3)  # 2 rows of 5 panels of 3 x 3.3 inches
    titled = plots.plot_attention_overlays(images, maps, true_names, pred_names, tmp_path / "t.png", title="T")
    assert_png_of_inches(titled, 5 * 3.0, 2 * 3.3 + 0.4)  # and a strip for the title

    fig = plots._attention_overlay_figure(images, maps, true_names, pred_names)
    assert len(fig.axes) == 10
    for i, ax in enumerate(fig.axes):
        assert ax.get_title() == f"GT: {true_names[i]} | Pred: cat"
        assert ax.title.get_color() == ("green" if i % 3 == 0 else "red")
        assert not ax.axison
        picture, heat = ax.images
        assert heat.get_cmap().name == "jet" and heat.get_alpha() == 0.6
        assert heat.get_array().shape == (32, 32)  # the map resized to the image


def test_long_overlay_titles_wrap_and_shorten():
    fig = plots._attention_overlay_figure(torch.rand(2, 3, 32, 32), torch.rand(2, 8, 8),
                                        ["aircraft carrier", "x" * 50], ["aircraft carrier", "y"])
    first, second = (ax.get_title() for ax in fig.axes)
    assert first == "GT: aircraft carrier\nPred: aircraft carrier"
    assert second.startswith("GT: xxx") and second.splitlines()[0].endswith("\u2026")
    assert all(len(line) <= plots.TITLE_CHARS for title in (first, second) for line in title.splitlines())


def test_overlay_shows_grayscale_in_gray_and_caps_at_ten(tmp_path):
    images = torch.rand(12, 1, 32, 32)
    fig = plots._attention_overlay_figure(images, torch.rand(12, 8, 8), ["cat"] * 12, ["dog"] * 12)
    assert len([ax for ax in fig.axes if ax.images]) == 10
    assert fig.axes[0].images[0].get_cmap().name == "gray"
    assert_png_of_inches(plots.plot_attention_overlays(images[:3], torch.rand(3, 8, 8), NAMES, NAMES,
                                                       tmp_path / "g.png"), 3 * 3.0, 3.3)  # one row of 3


def test_samples_png_and_titles(tmp_path):
    labels = torch.tensor([0, 1, 2] * 6)
    fig = plots._samples_figure(torch.rand(18, 3, 32, 32), labels, NAMES)
    assert [ax.get_title() for ax in fig.axes] == [NAMES[i] for i in labels[:16]]
    path = plots.plot_samples(torch.rand(5, 3, 32, 32), labels[:5], NAMES, tmp_path / "s.png")
    assert_png_of_inches(path, 4 * 2.5, 4 * 2.5 + 0.4)  # always 4 x 4 panels of 2.5 inches, and the title


def test_curves_plot_percent_accuracy_and_label_every_panel(tmp_path):
    metrics = [{"epoch": e, "train_loss": 2.0 / e, "test_loss": 2.2 / e, "test_acc": 0.2 * e} for e in (1, 2, 3)]
    lrs = [1e-3 * s / 10 for s in range(10)]
    fig = plots._curves_figure(metrics, lrs)
    loss_ax, acc_ax, lr_ax = fig.axes
    assert [text.get_text() for text in loss_ax.get_legend().get_texts()] == ["train loss", "test loss"]
    assert list(acc_ax.lines[0].get_ydata()) == pytest.approx([20.0, 40.0, 60.0])
    assert list(lr_ax.lines[0].get_ydata()) == pytest.approx(lrs)
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert "%" in acc_ax.get_ylabel()
    assert_png_of_inches(plots.plot_curves(metrics, lrs, tmp_path / "c.png"), 16, 4.5)
    empty_lr_ax = plots._curves_figure(metrics[:1], []).axes[2]
    assert [t.get_text() for t in empty_lr_ax.texts] == ["no learning rates recorded"]


def test_confusion_plot_writes_counts_and_per_class_accuracy(tmp_path):
    matrix = torch.tensor([[3, 1, 0], [0, 2, 2], [0, 0, 0]])
    fig = plots._confusion_figure(matrix, NAMES)
    ax = fig.axes[0]
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(matrix.flatten().tolist())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat (75%)", "dog (50%)", "ship (n/a)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert ax.get_xticklabels()[0].get_rotation() == 45
    assert "Predicted" in ax.get_xlabel() and "True" in ax.get_ylabel()
    assert_png_of_inches(plots.plot_confusion(matrix, NAMES, tmp_path / "m.png"), 5.5 + 0.55 * 3, 4 + 0.55 * 3)
    with pytest.raises(ValueError, match="K class names"):
        plots.plot_confusion(matrix, NAMES[:2], tmp_path / "bad.png")


def test_plots_leave_no_figure_open(tmp_path):
    before = plt.get_fignums()
    plots.plot_samples(torch.rand(2, 3, 8, 8), [0, 1], NAMES, tmp_path / "s.png")
    plots.plot_confusion(torch.eye(3, dtype=torch.long), NAMES, tmp_path / "m.png")
    assert plt.get_fignums() == before
