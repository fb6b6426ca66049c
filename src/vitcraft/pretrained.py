"""Starting from pretrained weights: a model for your data, made from a source model.

A source (``vitcraft train --init SOURCE``, ``create_model(..., pretrained=SOURCE)``)
is a vitcraft run directory, a folder written by ``save_pretrained``, a Hugging
Face ViT folder (``ViTForImageClassification`` or ``ViTModel``), a timm folder,
or a Hugging Face hub id of one (fetched into the hub cache, see
``hub.resolve_source``).

The source decides the model's shape; the data decides what goes in and out:

- the classes: the classifier is kept when the source names the same classes in
  the same order, and newly initialised otherwise (the old one is dropped);
- the image size: the position embeddings are resampled once, at load, to the
  new patch grid (bicubic, the prefix tokens kept: ``resize.resample_position_embeddings``);
- the channels: for grayscale data the patch filters of an RGB source are
  summed over its channels (a gray image is then seen as R = G = B), for other
  counts repeated and rescaled, as timm's ``adapt_input_conv`` does.

Loading is strict and explained: every source weight lands somewhere or is
listed as dropped, every model weight not filled from the source is listed as
newly initialised (:class:`InitReport`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vitcraft import hub
from vitcraft.errors import VitcraftError
from vitcraft.files import load_tensors
from vitcraft.mae import DECODER_PREFIX
from vitcraft.registry import create_model as create_preset
from vitcraft.registry import get_preset
from vitcraft.resize import resample_position_embeddings
from vitcraft.runs import DECODER_FILE, MODEL_FILE, MODEL_META_FILE, read_model_config
from vitcraft.state_dict import load_state_listed

HEAD_PREFIXES = ("classifier.", "distillation_classifier.")  # what the data's classes decide
POSITIONS = "embedding.position_embeddings"
PATCH_FILTERS = "embedding.patch_embeddings.projection.weight"
VIT_PRESET = "seed-tiny"  # recorded as a ViT source's preset: any ViT preset names the ViTForClassification class
# the shape of a model: what create_model(name, pretrained=...) checks between the preset and the source
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")


@dataclass
class Pretrained:
    """A source model as read from disk: its config, weights and what it says about its data."""

    source: str  # as the user gave it
    weights: Path  # the file the weights came from
    config: Any  # ViTConfig, or a variant's config for a vitcraft run of another model
    preset: str  # the preset whose class builds it
    state: dict[str, torch.Tensor]
    metadata: dict[str, Any]  # class_names, mean, std, crop_pct: those the source records

    @property
    def builder(self) -> Callable[[Any], nn.Module]:
        return get_preset(self.preset).builder


@dataclass
class InitReport:
    """How a model was filled from a source; recorded in the run's run.json under "init"."""

    source: str
    weights: str
    sha256: str
    dropped: list[str] = field(default_factory=list)  # source weights with no place in the model
    new: list[str] = field(default_factory=list)  # model weights not from the source (initialised afresh)
    resampled: list[str] = field(default_factory=list)  # weights reshaped to fit: positions, patch filters

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """What a run prints about its start."""
        kept = "every weight of the source is used" if not self.dropped else \
            f"dropped from the source: {', '.join(summarised(self.dropped))}"
        out = [f"initialised from {self.source} ({self.weights}, sha256 {self.sha256[:12]}...): {kept}"]
        if self.resampled:
            out.append(f"  resampled to fit the data: {', '.join(self.resampled)}")
        out.append(f"  newly initialised: {', '.join(self.new) if self.new else 'nothing'}")
        return out


def summarised(keys: list[str]) -> list[str]:
    """Weight names for a log line, an MAE decoder's many as one entry: ``decoder.* (N weights: the MAE decoder)``."""
    decoder = [key for key in keys if key.startswith(DECODER_PREFIX)]
    rest = [key for key in keys if not key.startswith(DECODER_PREFIX)]
    return rest + ([f"{DECODER_PREFIX}* ({len(decoder)} weights: the MAE decoder)"] if decoder else [])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_source(source: str | Path) -> Pretrained:
    """Read a source (see the module's docstring) without building anything.

    Raises VitcraftError (or FileNotFoundError) naming what is missing or does not fit.
    """
    folder = hub.resolve_source(source)
    if (folder / MODEL_META_FILE).is_file():  # a vitcraft run directory, of any model
        preset, config, metadata = read_model_config(folder)
        weights = folder / MODEL_FILE
        state, _ = load_tensors(weights)
        if (folder / DECODER_FILE).is_file():  # a pretraining run's MAE decoder: read, to be listed as dropped
            state.update(load_tensors(folder / DECODER_FILE)[0])
        return Pretrained(str(source), weights, config, preset.name, state, metadata)
    config, state, weights = hub.read_pretrained(folder)
    return Pretrained(str(source), Path(weights), config, VIT_PRESET, state, hub.load_metadata(folder))


def adapt_input_channels(filters: torch.Tensor, channels: int) -> torch.Tensor:
    """Patch filters (out, C_source, p, p) -> (out, channels, p, p), as timm's ``adapt_input_conv``.

    One channel: the sum over the source's channels, so a gray image x gives
    what the source gives for the colour image (x, x, x). Other counts: the
    filters repeated over the channels and scaled by C_source / channels, so
    the response to a uniform input is unchanged.
    """
    source_channels = filters.shape[1]
    if channels == source_channels:
        return filters
    if channels == 1:
        return filters.sum(dim=1, keepdim=True)
    repeated = filters.repeat(1, math.ceil(channels / source_channels), 1, 1)[:, :channels]
    return repeated * (source_channels / channels)


def model_for_data(pretrained: Pretrained, class_names: list[str], image_size: int, num_channels: int,
                   keep_classifier: bool | None = None, **config_overrides: Any) -> tuple[nn.Module, InitReport]:
    """The source's model with the data's classes, image size and channels, and the report of how it was filled.

    The classifier is kept when the source names the same ``class_names`` in
    the same order (``keep_classifier`` True or False decides instead).
    ``config_overrides``: other model config fields (dropout, drop path, attention backend...).
    """
    source = pretrained.source
    config = pretrained.config
    changes = {"num_classes": len(class_names), "image_size": image_size, "num_channels": num_channels}
    if (image_size != config.image_size or num_channels != config.num_channels) and POSITIONS not in pretrained.state:
        raise VitcraftError(f"{source} is a {pretrained.preset} model for {config.image_size}x{config.image_size}x"
                            f"{config.num_channels} images; vitcraft adapts only ViTs to another image size or "
                            f"channel count: pass --image-size {config.image_size} with "
                            f"{config.num_channels}-channel data")
    try:
        target = config.replace(**changes, **config_overrides)
    except ValueError as error:
        raise VitcraftError(f"{source} does not fit the data: {error}") from None
    model = pretrained.builder(target)
    state, report = dict(pretrained.state), InitReport(source, str(pretrained.weights), sha256_of(pretrained.weights))
    if keep_classifier is None:  # a pretraining run's classifier was never trained
        keep_classifier = pretrained.metadata.get("class_names") == list(class_names) and \
            not pretrained.metadata.get("pretraining")
    dropped = (DECODER_PREFIX,) if keep_classifier else (DECODER_PREFIX, *HEAD_PREFIXES)
    report.dropped = [key for key in state if key.startswith(dropped)]  # an MAE's decoder; other classes' heads
    state = {key: value for key, value in state.items() if not key.startswith(dropped)}
    if POSITIONS in state:
        prefix = model.embedding.num_prefix_tokens
        old_grid = (config.image_size // config.patch_size,) * 2
        new_grid = (target.image_size // target.patch_size,) * 2
        if old_grid != new_grid:
            state[POSITIONS] = resample_position_embeddings(state[POSITIONS], prefix, old_grid, new_grid)
            report.resampled.append(f"{POSITIONS} ({old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]} grid)")
    # a Conv2d's (hidden, C, p, p) filters; shifted patches' Linear mixes the channels in one axis
    if PATCH_FILTERS in state and state[PATCH_FILTERS].ndim == 4 and state[PATCH_FILTERS].shape[1] != num_channels:
        report.resampled.append(f"{PATCH_FILTERS} ({state[PATCH_FILTERS].shape[1]} -> {num_channels} channels)")
        state[PATCH_FILTERS] = adapt_input_channels(state[PATCH_FILTERS], num_channels)
    report.new = load_state_listed(model, state, f"{source} ({pretrained.weights})", may_stay_new=HEAD_PREFIXES)
    return model, report


def source_normalization(pretrained: Pretrained, channels: int) -> tuple[list[float], list[float]] | None:
    """The source's (mean, std) for ``channels`` channels, or None if it records none.

    Grayscale data meeting an RGB source gets the mean of the source's values. With the
    filters summed this reproduces the source on the gray image exactly when its channels
    share one mean and std (as the 0.5 of the tutorial and many ViTs), and nearly for
    ImageNet's, whose channels differ by a few percent.
    """
    mean, std = pretrained.metadata.get("mean"), pretrained.metadata.get("std")
    if not mean or not std:
        return None
    if len(mean) != channels:
        mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    return list(mean), list(std)


def create_model(name: str, pretrained: str | Path | None = None, **overrides: Any) -> nn.Module:
    """``registry.create_model`` plus ``pretrained=SOURCE``: the preset filled from a source's weights.

    The source must have the preset's shape (width, depth, heads, MLP size,
    patch); ``overrides`` may change what the data decides (``num_classes``,
    ``image_size``, ``num_channels``), the classifier then being new, and other
    fields such as dropout. The load report is printed.
    """
    if pretrained is None:
        return create_preset(name, **overrides)
    preset = get_preset(name)
    source = read_source(pretrained)
    expected = preset.config_class.from_dict({**preset.config, **overrides})
    differ = [f"{key} {getattr(source.config, key, None)} (preset: {getattr(expected, key)})"
              for key in SHAPE_FIELDS
              if hasattr(expected, key) and getattr(source.config, key, None) != getattr(expected, key)]
    if differ or source.builder is not preset.builder:
        raise VitcraftError(f"{pretrained} is not a {name} model: " +
                            (", ".join(differ) if differ else f"it is a {source.preset} model"))
    num_classes = overrides.pop("num_classes", source.config.num_classes)
    class_names = source.metadata.get("class_names") or [f"class {i}" for i in range(source.config.num_classes)]
    if num_classes != source.config.num_classes:
        class_names = [f"class {i}" for i in range(num_classes)]
    model, report = model_for_data(
        source, class_names, overrides.pop("image_size", source.config.image_size),
        overrides.pop("num_channels", source.config.num_channels),
        keep_classifier=num_classes == source.config.num_classes and f"{HEAD_PREFIXES[0]}weight" in source.state
        and not source.metadata.get("pretraining"),
        **{key: value for key, value in overrides.items() if key not in SHAPE_FIELDS})
    print("\n".join(report.lines()))
    return model

