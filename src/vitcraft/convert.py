"""timm and Hugging Face ViT weights as vitcraft's, and back: state dicts and configs only.

vitcraft's ViT computes what timm's ``VisionTransformer`` and transformers'
``ViTForImageClassification`` compute (pre-LN blocks, [CLS] token, learned
positions), so converting is only renaming tensors, plus splitting or joining
the attention input projection: vitcraft and timm hold q, k and v in one fused
Linear whose rows are [all queries | all keys | all values] (heads in order
inside each third); Hugging Face holds three separate Linears.

Each direction is driven by one key table (:func:`key_table`): vitcraft key ->
the other library's key, or a (query, key, value) triple to concatenate. Models
with features vitcraft's ViT lacks (register tokens, layer scale, ...) are
refused with a VitcraftError (a ValueError) naming the feature, never
converted approximately.

No model is built here (``interop.py`` builds them, ``hub.py`` reads folders
with these functions), and neither timm nor transformers is imported: the
converters read modules by attribute and state dicts by key.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import torch
from torch import nn

from vitcraft.config import ViTConfig
from vitcraft.errors import VitcraftError

StateDict = Mapping[str, torch.Tensor]

# timm's ViT defaults for what a bare state dict does not record.
TIMM_DEFAULTS = dict(hidden_act="gelu", layer_norm_eps=1e-6, final_layernorm=True,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

# transformers' ViTConfig defaults, for config.json files that leave fields out.
HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   initializer_range=0.02, layer_norm_eps=1e-12, image_size=224, patch_size=16,
                   num_channels=3, qkv_bias=True)

# Fields with the same name and meaning in both configs.
HF_SAME_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range",
                  "layer_norm_eps", "num_channels", "qkv_bias")

# Hugging Face activation name -> vitcraft hidden_act. The tanh forms are one formula.
HF_ACTS = {"gelu": "gelu", "gelu_python": "gelu",
           "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}

# The other library's name for each vitcraft module. Block entries are relative to
# the block prefix; a tuple names the query, key and value Linears of our fused qkv.
TIMM_NAMES = {
    "cls_token": "cls_token", "position_embeddings": "pos_embed", "patch_projection": "patch_embed.proj",
    "block": "blocks.{i}.", "layernorm_1": "norm1", "attention.qkv_projection": "attn.qkv",
    "attention.output_projection": "attn.proj", "layernorm_2": "norm2",
    "mlp.dense_1": "mlp.fc1", "mlp.dense_2": "mlp.fc2", "classifier": "head",
    # timm normalises the sequence before [CLS] pooling ("norm") but the pooled
    # vector after mean pooling ("fc_norm"); vitcraft always does the latter, which
    # is the same computation for [CLS] because LayerNorm works per token.
    "final_layernorm": "norm", "final_layernorm_mean": "fc_norm",
}
_HF_EMBEDDINGS = {
    "cls_token": "vit.embeddings.cls_token", "position_embeddings": "vit.embeddings.position_embeddings",
    "patch_projection": "vit.embeddings.patch_embeddings.projection",
    "final_layernorm": "vit.layernorm", "classifier": "classifier",
    "layernorm_1": "layernorm_before", "layernorm_2": "layernorm_after",
}
HF_STYLES = {
    # transformers >= 5: the module names, what ViTForImageClassification.load_state_dict wants
    "module": {**_HF_EMBEDDINGS, "block": "vit.layers.{i}.",
               "attention.qkv_projection": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
               "attention.output_projection": "attention.o_proj",
               "mlp.dense_1": "mlp.fc1", "mlp.dense_2": "mlp.fc2"},
    # the names in checkpoint files on the Hub (and transformers < 5 modules); transformers 5 reads them too
    "checkpoint": {**_HF_EMBEDDINGS, "block": "vit.encoder.layer.{i}.",
                   "attention.qkv_projection": ("attention.attention.query", "attention.attention.key",
                                                "attention.attention.value"),
                   "attention.output_projection": "attention.output.dense",
                   "mlp.dense_1": "intermediate.dense", "mlp.dense_2": "output.dense"},
}

# timm ViT features vitcraft's ViT does not have, as the refusals name them.
_TIMM_FEATURES = dict(
    no_class_token="no class token (class_token=False)",
    no_pos_embed="no position embedding (pos_embed='none')",
    no_head="no classifier head (num_classes=0)",
    reg_token="register tokens (reg_tokens > 0)",
    dist_token="a distillation token (DeiT distilled)",
    pre_norm="pre_norm=True (a LayerNorm before the blocks)",
    layer_scale="layer scale (init_values, ls1/ls2)",
    qk_norm="qk_norm=True",
    scale_attn_norm="scale_attn_norm=True",
    scale_mlp_norm="scale_mlp_norm=True",
    gate="gated attention",
    glu="a gated MLP (SwiGLU)",
    attn_pool="attention pooling (global_pool='map' or 'prr')",
    embed_norm="a LayerNorm in the patch embedding (embed_norm_layer)",
    norm_before_mean="global_pool='avg' with fc_norm=False (normalising before mean pooling)",
)
# The state-dict keys that give a feature away.
_TIMM_FEATURE_KEYS = [
    (r"reg_token", "reg_token"), (r"dist_token", "dist_token"), (r"norm_pre\.", "pre_norm"),
    (r"blocks\.\d+\.ls[12]\.", "layer_scale"), (r"blocks\.\d+\.attn\.[qk]_norm\.", "qk_norm"),
    (r"blocks\.\d+\.attn\.norm\.", "scale_attn_norm"), (r"blocks\.\d+\.mlp\.norm\.", "scale_mlp_norm"),
    (r"blocks\.\d+\.attn\.gate\.", "gate"), (r"blocks\.\d+\.mlp\.(fc1_[gx]|w12)\.", "glu"),
    (r"attn_pool\.", "attn_pool"), (r"patch_embed\.norm\.", "embed_norm"),
]


# ----------------------------------------------------------- vitcraft side
def _layout(backend: str) -> str:
    """The state-dict layout of an attention backend: sdpa shares fused's qkv_projection."""
    return "per_head" if backend == "per_head" else "fused"


def fused_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A vitcraft ViT's ``state_dict()`` with attention weights in the fused ``qkv_projection`` layout.

    The sdpa and fused backends already use it. A per_head model's weights are
    loaded into a weightless (meta device) fused twin of the same class, so the
    model's own load hook does the merging: there is one per-head -> fused
    mapping, in model.py. Tensors share memory with the model, except the merged qkv ones.
    """
    state = model.state_dict()
    if _layout(model.config.attention_backend) == "fused":
        return state
    with torch.device("meta"):
        twin = type(model)(model.config.replace(attention_backend="fused"))
    twin.load_state_dict(state, assign=True)
    return twin.state_dict()


# ------------------------------------------------------------- key tables
def _each(names: str | tuple[str, ...], change: Callable[[str], str]) -> str | tuple[str, ...]:
    """Apply ``change`` to a key name, or to each of a (query, key, value) triple."""
    return tuple(change(name) for name in names) if isinstance(names, tuple) else change(names)


def key_table(config: ViTConfig, names: Mapping[str, Any]) -> dict[str, str | tuple[str, ...]]:
    """vitcraft fused key -> the other library's key (or q, k, v keys) for this config."""
    table: dict[str, str | tuple[str, ...]] = {}

    def add(ours: str, theirs: str | tuple[str, ...], kinds: tuple[str, ...] = ("weight", "bias")) -> None:
        for kind in kinds:
            table[f"{ours}.{kind}"] = _each(theirs, lambda name, kind=kind: f"{name}.{kind}")

    table["embedding.cls_token"] = names["cls_token"]
    table["embedding.position_embeddings"] = names["position_embeddings"]
    add("embedding.patch_embeddings.projection", names["patch_projection"])
    for i in range(config.num_hidden_layers):
        prefix = names["block"].format(i=i)
        for ours in ("layernorm_1", "attention.qkv_projection", "attention.output_projection",
                     "layernorm_2", "mlp.dense_1", "mlp.dense_2"):
            no_bias = ours == "attention.qkv_projection" and not config.qkv_bias
            add(f"encoder.blocks.{i}.{ours}", _each(names[ours], lambda name, prefix=prefix: prefix + name),
                ("weight",) if no_bias else ("weight", "bias"))
    if config.final_layernorm:
        mean = config.pooling == "mean" and "final_layernorm_mean" in names
        add("final_layernorm", names["final_layernorm_mean" if mean else "final_layernorm"])
    add("classifier", names["classifier"])
    return table


def _to_vitcraft(theirs: StateDict, table: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Rename (and join q, k, v) by ``table``; a key left over is an error naming it."""
    remaining = dict(theirs)

    def take(key: str) -> torch.Tensor:
        if key not in remaining:
            raise VitcraftError(f"{source} has no weight {key!r}")
        return remaining.pop(key)

    ours = {}
    for our_key, their_key in table.items():
        if isinstance(their_key, tuple):
            ours[our_key] = torch.cat([take(k) for k in their_key], dim=0)  # (3 * hidden, ...)
        else:
            ours[our_key] = take(their_key)
    if remaining:
        raise VitcraftError(f"{source} has a weight {next(iter(remaining))!r} with no counterpart "
                             f"in vitcraft's ViT")
    return ours


def check_no_small_data_options(config: Any, library: str) -> None:
    """Refuse the options of Lee et al. 2021 (shifted patches, locality self-attention): ``library``'s ViT
    (timm's, Hugging Face's) has neither, so its weights would compute something else."""
    for option in ("shifted_patches", "locality_attention"):
        if getattr(config, option, False):
            raise VitcraftError(f"{option}=True has no {library} ViT equivalent")


def from_vitcraft(model: nn.Module, names: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model's weights under the other library's keys (q, k, v split apart)."""
    ours = fused_state_dict(model)
    theirs = {}
    for our_key, their_key in key_table(model.config, names).items():
        if isinstance(their_key, tuple):
            # rows [q | k | v] -> three (hidden, ...) parts; cloned so none shares memory
            # (safetensors refuses to save tensors that do)
            for key, part in zip(their_key, ours[our_key].chunk(3, dim=0)):
                theirs[key] = part.clone()
        else:
            theirs[their_key] = ours[our_key]
    return theirs


def _square(value: Any, name: str, source: str) -> int:
    """An int from an int or an (h, w) pair with h == w; vitcraft's ViT is square only."""
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise VitcraftError(f"{source} has a non-square {name} {tuple(value)}; "
                                f"vitcraft supports square only")
        value = value[0]
    return int(value)


# ------------------------------------------------------------------- timm
def _timm_features(vit: nn.Module):
    """Yield (used, description) for each timm ViT feature vitcraft's ViT lacks.

    Lazy and ordered, so a check only runs once the earlier ones passed (e.g.
    ``attn.q_norm`` is read only after ``attn`` proved to be timm's Attention).
    """
    def not_identity(module: Any) -> bool:
        return module is not None and not isinstance(module, nn.Identity)

    f = _TIMM_FEATURES
    pool = getattr(vit, "global_pool", None)
    yield getattr(vit, "cls_token", None) is None, f["no_class_token"]
    yield getattr(vit, "reg_token", None) is not None, f["reg_token"]
    yield getattr(vit, "dist_token", None) is not None, f["dist_token"]
    yield getattr(vit, "no_embed_class", False), "no_embed_class=True"
    yield getattr(vit, "dynamic_img_size", False), "dynamic_img_size=True"
    yield getattr(vit, "pos_embed", None) is None, f["no_pos_embed"]
    yield not_identity(getattr(vit, "norm_pre", None)), f["pre_norm"]
    yield pool not in ("token", "avg"), f"global_pool={pool!r} (only 'token' and 'avg' are supported)"
    yield getattr(vit, "attn_pool", None) is not None, f["attn_pool"]
    yield pool == "avg" and getattr(vit, "pool_include_prefix", False), "pool_include_prefix=True"
    yield pool == "avg" and not_identity(getattr(vit, "norm", None)), f["norm_before_mean"]
    yield not isinstance(getattr(vit, "head", None), nn.Linear), f["no_head"]
    embed = getattr(vit, "patch_embed", None)
    yield type(embed).__name__ != "PatchEmbed", f"patch embedding {type(embed).__name__}"
    yield not_identity(getattr(embed, "norm", None)), f["embed_norm"]
    yield embed.proj.bias is None, "a patch embedding without bias"
    yield getattr(embed, "dynamic_img_pad", False), "dynamic_img_pad=True"
    for block in vit.blocks:
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        yield type(block).__name__ != "Block", f"block type {type(block).__name__} (block_fn)"
        yield type(attn).__name__ != "Attention", f"attention type {type(attn).__name__}"
        yield type(mlp).__name__ != "Mlp", f"MLP type {type(mlp).__name__} (mlp_layer)"
        yield not_identity(getattr(block, "ls1", None)) or not_identity(getattr(block, "ls2", None)), \
            f["layer_scale"]
        yield not_identity(attn.q_norm) or not_identity(attn.k_norm), f["qk_norm"]
        yield not_identity(getattr(attn, "norm", None)), f["scale_attn_norm"]
        yield getattr(attn, "gate", None) is not None, f["gate"]
        yield not_identity(getattr(mlp, "norm", None)), f["scale_mlp_norm"]
        yield None in (attn.proj.bias, mlp.fc1.bias, mlp.fc2.bias), "proj_bias=False"
        yield attn.qkv.out_features != 3 * vit.embed_dim, "attn_head_dim differing from embed_dim / num_heads"
        for norm in (block.norm1, block.norm2):
            yield (not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None,
                   f"norm layer {type(norm).__name__} (vitcraft uses an affine LayerNorm)")
        yield _timm_act(mlp.act) is None, f"activation {type(mlp.act).__name__}"


def _timm_act(act: nn.Module) -> str | None:
    """vitcraft's hidden_act for a timm MLP activation module, or None if it has none."""
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return {"GELU": "gelu", "GELUTanh": "gelu_tanh"}.get(type(act).__name__)


def _timm_module_values(vit: nn.Module) -> dict[str, Any]:
    """Config values read off a timm VisionTransformer (what a state dict does not record)."""
    feature = next((feature for used, feature in _timm_features(vit) if used), None)
    if feature is not None:
        raise VitcraftError(f"this timm VisionTransformer uses {feature}, which vitcraft's ViT does not have")
    block = vit.blocks[0]
    final_norm = vit.fc_norm if vit.global_pool == "avg" else vit.norm
    return dict(num_attention_heads=block.attn.num_heads, hidden_act=_timm_act(block.mlp.act),
                layer_norm_eps=block.norm1.eps, final_layernorm=isinstance(final_norm, nn.LayerNorm),
                pooling="mean" if vit.global_pool == "avg" else "cls",
                image_size=_square(vit.patch_embed.img_size, "img_size", "this timm model"),
                attention_probs_dropout_prob=block.attn.attn_drop.p,
                hidden_dropout_prob=block.attn.proj_drop.p,
                # the last block's rate is the model's (timm's rise linearly, as ours); Identity when off
                drop_path_rate=getattr(vit.blocks[-1].drop_path1, "drop_prob", 0.0),
                patch_dropout=getattr(vit.patch_drop, "prob", 0.0))  # Identity when off


def _timm_state_values(state: StateDict, source: str) -> dict[str, Any]:
    """Config values inferred from the tensor shapes of a timm ViT state dict."""
    for pattern, feature in _TIMM_FEATURE_KEYS:
        key = next((k for k in state if re.match(pattern, k)), None)
        if key is not None:
            raise VitcraftError(f"{source} uses {_TIMM_FEATURES[feature]} (key {key!r}), "
                                 f"which vitcraft's ViT does not have")
    for key, feature in (("cls_token", "no_class_token"), ("pos_embed", "no_pos_embed"),
                         ("head.weight", "no_head")):
        if key not in state:
            raise VitcraftError(f"{source} has {_TIMM_FEATURES[feature]}, "
                                f"which vitcraft's ViT does not support")
    for key in ("patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise VitcraftError(f"{source} has no {key!r}; is it a timm VisionTransformer state dict?")
    if "norm.weight" in state and "fc_norm.weight" in state:
        raise VitcraftError(f"{source} has both norm and fc_norm weights, "
                            f"which vitcraft's ViT does not support")
    hidden_size, num_channels, patch_size, patch_width = state["patch_embed.proj.weight"].shape
    if patch_size != patch_width:
        raise VitcraftError(f"{source} has non-square patches ({patch_size}x{patch_width})")
    num_positions = state["pos_embed"].shape[1]
    grid = math.isqrt(num_positions - 1)
    if grid * grid != num_positions - 1:
        feature = ("no_embed_class=True (no position vector for the class token)"
                   if math.isqrt(num_positions) ** 2 == num_positions else
                   f"{num_positions} position vectors, not 1 + a square number of patches")
        raise VitcraftError(f"{source} has {feature}, which vitcraft's ViT does not support")
    return dict(hidden_size=hidden_size, num_channels=num_channels, patch_size=patch_size,
                image_size=grid * patch_size,
                num_hidden_layers=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
                intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
                qkv_bias="blocks.0.attn.qkv.bias" in state, num_classes=state["head.weight"].shape[0],
                final_layernorm="norm.weight" in state or "fc_norm.weight" in state,
                pooling="mean" if "fc_norm.weight" in state else "cls")


def timm_to_vitcraft(model_or_state_dict: nn.Module | StateDict,
                     **config_overrides: Any) -> tuple[ViTConfig, dict[str, torch.Tensor], str]:
    """(config, state dict, source name) of the vitcraft ViT that computes what a timm ``VisionTransformer`` does.

    Accepts the timm module (every setting is read from it) or its state dict
    (shapes are read from the tensors; the rest are timm's defaults: exact GELU,
    LayerNorm eps 1e-6, and ``num_attention_heads`` must be passed, as a state
    dict does not record it). ``config_overrides`` are ViTConfig fields applied
    last (e.g. ``attention_backend="per_head"``). The state dict has vitcraft's fused keys.
    Raises VitcraftError naming any timm feature vitcraft's ViT lacks.
    """
    if isinstance(model_or_state_dict, nn.Module):
        module_values = _timm_module_values(model_or_state_dict)
        state, source = model_or_state_dict.state_dict(), "the timm model"
    else:
        module_values, state, source = {}, model_or_state_dict, "the timm state dict"
    values = {**TIMM_DEFAULTS, **_timm_state_values(state, source), **module_values}
    if "num_attention_heads" not in values and "num_attention_heads" not in config_overrides:
        raise VitcraftError("a timm state dict does not record the number of attention heads; pass it as "
                             "from_timm(state_dict, num_attention_heads=...)")
    config = ViTConfig.from_dict({**values, **config_overrides})
    if config.pooling == "mean" and "norm.weight" in state:
        raise VitcraftError(f"{source} uses {_TIMM_FEATURES['norm_before_mean']}, "
                            f"which vitcraft's ViT does not do")
    return config, _to_vitcraft(state, key_table(config, TIMM_NAMES), source), source



# ------------------------------------------------------------ Hugging Face
def _hf_config_values(hf_config: Any) -> dict[str, Any]:
    """vitcraft config values from a transformers ViTConfig or its dict (config.json)."""
    if hasattr(hf_config, "to_dict"):
        hf_config = hf_config.to_dict()
    if not isinstance(hf_config, Mapping):
        raise VitcraftError(f"hf_config must be a transformers ViTConfig or a dict, "
                             f"got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type", "vit")
    if model_type != "vit":
        raise VitcraftError(f"hf_config has model_type {model_type!r}; only Hugging Face 'vit' models convert")
    hf = {**HF_DEFAULTS, **hf_config}
    if hf["hidden_act"] not in HF_ACTS:
        raise VitcraftError(f"hf_config hidden_act {hf['hidden_act']!r} has no vitcraft equivalent "
                             f"(supported: {', '.join(HF_ACTS)})")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise VitcraftError(f"hf_config head_dim {head_dim} times num_attention_heads is not hidden_size; "
                             f"vitcraft's ViT needs it to be")
    values = {key: hf[key] for key in HF_SAME_FIELDS}
    return dict(values, hidden_act=HF_ACTS[hf["hidden_act"]], final_layernorm=True, pooling="cls",
                image_size=_square(hf["image_size"], "image_size", "hf_config"),
                patch_size=_square(hf["patch_size"], "patch_size", "hf_config"))


def hf_to_vitcraft(model_or_state_dict: nn.Module | StateDict, hf_config: Any = None, headless_ok: bool = False,
                   **config_overrides: Any) -> tuple[ViTConfig, dict[str, torch.Tensor], str]:
    """(config, state dict, source name) of the vitcraft ViT computing exactly what transformers'
    ``ViTForImageClassification`` computes.

    Accepts the HF module (its ``config`` is used) or a state dict with
    ``hf_config`` (a transformers ViTConfig or its dict, e.g. a parsed
    config.json). Both key styles are read: transformers >= 5 module names and
    the checkpoint-file names (``vit.encoder.layer.N...``), with or without the
    ``vit.`` prefix. ``config_overrides`` are ViTConfig fields applied last.
    With ``headless_ok`` a ``ViTModel`` (no classifier) converts too: the state
    dict then has no ``classifier.*`` weights, and num_classes is the config's
    label count, for a new classifier to be initialised.
    """
    if isinstance(model_or_state_dict, nn.Module):
        hf_config = model_or_state_dict.config if hf_config is None else hf_config
        state, source = model_or_state_dict.state_dict(), "the Hugging Face model"
    else:
        state, source = model_or_state_dict, "the Hugging Face state dict"
    if hf_config is None:
        raise VitcraftError("a Hugging Face state dict needs hf_config (a transformers ViTConfig or config.json dict) "
                             "with a bare state dict")
    if not any(key.startswith("vit.") for key in state):  # a bare ViTModel's keys
        state = {(key if key.startswith("classifier.") else f"vit.{key}"): value
                 for key, value in state.items()}
    headless = "classifier.weight" not in state
    if headless and not headless_ok:
        raise VitcraftError(f"{source} has no classifier (a ViTModel, or num_labels=0); from_hf converts "
                            f"ViTForImageClassification only (from_pretrained and --init add a new classifier)")
    # ViTForImageClassification has no pooler, and transformers skips one found in a file
    state = {key: value for key, value in state.items() if not key.startswith("vit.pooler.")}
    style = "checkpoint" if any(".encoder.layer." in key for key in state) else "module"
    labels = (hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config).get("id2label") or {}
    num_classes = max(1, len(labels)) if headless else state["classifier.weight"].shape[0]
    config = ViTConfig.from_dict({**_hf_config_values(hf_config), "num_classes": num_classes, **config_overrides})
    table = key_table(config, HF_STYLES[style])
    if headless:
        table = {ours: theirs for ours, theirs in table.items() if not ours.startswith("classifier.")}
    return config, _to_vitcraft(state, table, source), source




def check_hf_compatible(model: nn.Module) -> None:
    """Refuse the vitcraft options ViTForImageClassification cannot express."""
    check_no_small_data_options(model.config, "Hugging Face")
    if model.config.pooling != "cls":
        raise VitcraftError("pooling='mean' has no Hugging Face ViTForImageClassification equivalent "
                             "(it classifies the [CLS] token)")
    if not model.config.final_layernorm:
        raise VitcraftError("final_layernorm=False has no Hugging Face ViTForImageClassification equivalent "
                             "(it always has a final LayerNorm)")
