"""Exact weight interop with timm and Hugging Face ViTs: their models in, vitcraft's out, and back.

``from_timm`` / ``from_hf`` build a vitcraft ``ViTForClassification`` that
computes what the timm or transformers model computes (to float rounding);
``to_timm_state_dict`` / ``to_hf_state_dict`` with ``to_timm_kwargs`` /
``to_hf_config`` go the other way. The key tables and checks live in
``convert.py``, which builds no model.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from vitcraft.convert import (
    ACT_TO_HF,
    HF_SAME_FIELDS,
    HF_STYLES,
    TIMM_DEFAULTS,
    TIMM_NAMES,
    StateDict,
    check_hf_compatible,
    check_no_small_data_options,
    from_vitcraft,
    hf_to_vitcraft,
    timm_to_vitcraft,
)
from vitcraft.errors import VitcraftError
from vitcraft.model import ViTForClassification
from vitcraft.state_dict import load_state_checked


def from_timm(model_or_state_dict: nn.Module | StateDict, **config_overrides: Any) -> ViTForClassification:
    """A vitcraft model computing exactly what a timm ``VisionTransformer`` computes.

    Accepts the timm module (every setting is read from it) or its state dict
    (shapes are read from the tensors; the rest are timm's defaults: exact GELU,
    LayerNorm eps 1e-6, and ``num_attention_heads`` must be passed, as a state
    dict does not record it). ``config_overrides`` are ViTConfig fields applied
    last (e.g. ``attention_backend="per_head"``). Returns the model in eval mode.
    Raises VitcraftError naming any timm feature vitcraft's ViT lacks.
    """
    config, state, source = timm_to_vitcraft(model_or_state_dict, **config_overrides)
    return load_state_checked(ViTForClassification(config), state, source).eval()


def from_hf(model_or_state_dict: nn.Module | StateDict, hf_config: Any = None,
            **config_overrides: Any) -> ViTForClassification:
    """A vitcraft model computing exactly what transformers' ``ViTForImageClassification`` computes.

    Accepts the HF module (its ``config`` is used) or a state dict with
    ``hf_config`` (a transformers ViTConfig or its dict, e.g. a parsed
    config.json). Both key styles are read: transformers >= 5 module names and
    the checkpoint-file names (``vit.encoder.layer.N...``), with or without the
    ``vit.`` prefix. ``config_overrides`` are ViTConfig fields applied last.
    Returns the model in eval mode.
    """
    config, state, source = hf_to_vitcraft(model_or_state_dict, hf_config, **config_overrides)
    return load_state_checked(ViTForClassification(config), state, source).eval()


def to_timm_state_dict(model: ViTForClassification) -> dict[str, torch.Tensor]:
    """The model's weights under timm VisionTransformer keys (loads with strict=True).

    Build the timm model with :func:`to_timm_kwargs`. Works for every attention backend.
    """
    check_no_small_data_options(model.config, "timm")  # the Hugging Face paths check in check_hf_compatible
    return from_vitcraft(model, TIMM_NAMES)


def to_timm_kwargs(model: ViTForClassification) -> dict[str, Any]:
    """Keyword arguments for ``timm.models.vision_transformer.VisionTransformer`` of this shape.

    Dropout rates map to timm's nearest ones (inference is identical either way).
    """
    c = model.config
    check_no_small_data_options(c, "timm")
    ratio = c.intermediate_size / c.hidden_size
    if int(c.hidden_size * ratio) != c.intermediate_size:
        # timm sizes the MLP as int(dim * mlp_ratio); nudge a ratio that rounds down
        ratio = (c.intermediate_size + 0.5) / c.hidden_size
    kwargs = dict(img_size=c.image_size, patch_size=c.patch_size, in_chans=c.num_channels,
                  num_classes=c.num_classes, global_pool="avg" if c.pooling == "mean" else "token",
                  embed_dim=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
                  mlp_ratio=ratio, qkv_bias=c.qkv_bias, final_norm=c.final_layernorm,
                  act_layer=c.hidden_act, attn_drop_rate=c.attention_probs_dropout_prob,
                  proj_drop_rate=c.hidden_dropout_prob, pos_drop_rate=c.hidden_dropout_prob,
                  drop_path_rate=c.drop_path_rate, patch_drop_rate=c.patch_dropout)
    if c.layer_norm_eps != TIMM_DEFAULTS["layer_norm_eps"]:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=c.layer_norm_eps)
    return kwargs


def to_hf_state_dict(model: ViTForClassification, style: str = "module") -> dict[str, torch.Tensor]:
    """The model's weights under transformers ``ViTForImageClassification`` keys.

    ``style="module"``: the names of transformers >= 5 modules, loadable with
    ``load_state_dict(..., strict=True)``; ``style="checkpoint"``: the names HF
    checkpoint files use (and transformers < 5 modules), which every version's
    ``from_pretrained`` reads. Build the HF model from :func:`to_hf_config`.
    """
    if style not in HF_STYLES:
        raise VitcraftError(f"style must be one of {', '.join(HF_STYLES)}; got {style!r}")
    check_hf_compatible(model)
    return from_vitcraft(model, HF_STYLES[style])


def to_hf_config(model: ViTForClassification, class_names: list[str] | None = None) -> dict[str, Any]:
    """A transformers ViTConfig dict for this model: ``transformers.ViTConfig(**to_hf_config(model))``.

    ``class_names`` (one per class) become ``id2label``; default ``LABEL_i``.
    """
    check_hf_compatible(model)
    c = model.config
    names = list(class_names) if class_names is not None else [f"LABEL_{i}" for i in range(c.num_classes)]
    if len(names) != c.num_classes:
        raise VitcraftError(f"class_names has {len(names)} names but the model has {c.num_classes} classes")
    values = {key: getattr(c, key) for key in HF_SAME_FIELDS + ("image_size", "patch_size")}
    return dict(model_type="vit", architectures=["ViTForImageClassification"], **values,
                hidden_act=ACT_TO_HF[c.hidden_act], id2label={str(i): n for i, n in enumerate(names)},
                label2id={n: i for i, n in enumerate(names)})
