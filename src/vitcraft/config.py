"""The model configuration: one typed dataclass, validated in one place.

The field names are the seed tutorial's config keys, so the tutorial's plain
dict works as it is (``ViTConfig.from_dict(config)``), plus the few choices the
ecosystem's ViTs (timm, Hugging Face) need for exact weight interop.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

ATTENTION_BACKENDS = ("per_head", "fused", "sdpa")
HIDDEN_ACTS = ("gelu_tanh", "gelu")
POOLINGS = ("cls", "mean")
MAX_SIZE = 2**31  # sizes must fit a 32-bit index, which some kernels use; larger is always a mistake


class DictConfig:
    """Dict I/O for a config dataclass that validates itself in ``__post_init__``.

    What the registry, the training loop and checkpoints call on every model
    config (ViTConfig and the variants' configs): ``from_dict`` (unknown keys
    are an error), ``to_dict``, ``replace`` and ``field_names``.
    """

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Build from a plain dict (the tutorial's, a checkpoint's model_config); unknown keys are an error."""
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            raise ValueError(f"a model config must be a dict, got {type(values).__name__}")
        check_keys(values, cls.field_names(), what="model config key")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated like a new config)."""
        check_keys(changes, self.field_names(), what="model config key")
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass
class ViTConfig(DictConfig):
    """Every shape and regularisation choice of a :class:`ViTForClassification`.

    Defaults are the seed tutorial's tiny CIFAR-10 model (119,098 parameters).
    """

    image_size: int = 32  # side of the (square) input image, in pixels
    patch_size: int = 4  # side of one patch; image_size must be a multiple of it
    num_channels: int = 3  # 3 for RGB, 1 for grayscale
    num_classes: int = 10  # width of the classifier output
    hidden_size: int = 48  # width of every token vector
    num_hidden_layers: int = 4  # number of encoder blocks
    num_attention_heads: int = 4  # heads per attention layer; must divide hidden_size
    intermediate_size: int = 192  # hidden width of each block's MLP
    hidden_dropout_prob: float = 0.1  # dropout on embeddings, attention output and MLP output
    attention_probs_dropout_prob: float = 0.1  # dropout on the attention probabilities
    initializer_range: float = 0.02  # std of the normal init of weights, [CLS] and positions
    qkv_bias: bool = True  # bias on the query/key/value projections
    # The seed's switch between the per-head and the fused attention modules.
    # It only picks the default of attention_backend below.
    use_faster_attention: bool = True
    # "per_head": the readable MultiHeadAttention (one AttentionHead per head);
    # "fused": FasterMultiHeadAttention, one qkv Linear, explicit softmax;
    # "sdpa": the same module through F.scaled_dot_product_attention (fastest).
    # None: "sdpa" when use_faster_attention, else "per_head".
    attention_backend: str | None = None
    hidden_act: str = "gelu_tanh"  # "gelu_tanh" as the seed (NewGELUActivation), "gelu" exact (timm, HF)
    final_layernorm: bool = False  # LayerNorm before the classifier (timm and HF have one, the seed none)
    layer_norm_eps: float = 1e-5  # torch's default; timm uses 1e-6, HF 1e-12
    pooling: str = "cls"  # "cls": classify the [CLS] output; "mean": the mean of the patch outputs
    extra: dict = field(default_factory=dict, repr=False)  # free-form metadata kept with the config

    def __post_init__(self) -> None:
        if self.attention_backend is None:
            self.attention_backend = "sdpa" if self.use_faster_attention else "per_head"
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise one ValueError naming the first bad field."""
        for name in ("image_size", "patch_size", "num_channels", "num_classes", "hidden_size",
                     "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if value >= MAX_SIZE:
                raise ValueError(f"{name} must be below 2**31, got {value!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        for name in ("initializer_range", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("hidden_act", self.hidden_act, HIDDEN_ACTS)
        _check_choice("pooling", self.pooling, POOLINGS)
        for name in ("qkv_bias", "use_faster_attention", "final_layernorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    # ------------------------------------------------------------- derived
    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def attention_head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------ dict I/O
    # from_dict (e.g. the tutorial's dict), to_dict and field_names: DictConfig's
    def replace(self, **changes: Any) -> "ViTConfig":
        """A copy with some fields changed (validated like a new config)."""
        if "use_faster_attention" in changes and "attention_backend" not in changes:
            changes["attention_backend"] = None  # re-derive it from the new switch
        return super().replace(**changes)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def short_repr(value: Any) -> str:
    """repr() cut short: an error message must not print (or take minutes over) a huge value from a file,
    such as a YAML alias bomb."""
    return _SHORT_REPR.repr(value)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80


def check_types(cls: type, values: Mapping[str, Any], what: str) -> None:
    """Raise one ValueError naming the first value that does not fit its field's annotation in ``cls``.

    Understands what JSON and YAML can hold: int (not bool), float (an int too;
    finite only), str, bool, None, ``list[X]``, dict and unions such as
    ``int | None``. Fields annotated otherwise are not checked.
    """
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not _fits(value, hints[key]):
            raise ValueError(f"{what} {key} must be {_describe(hints[key])}, got {short_repr(value)}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # NaN and inf pass every comparison check wrongly, so they stop here
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is list:
        return f"a list of {_PLURALS.get(args[0], 'values')}"
    return _NAMES.get(hint, _NAMES.get(origin, getattr(hint, "__name__", str(hint))))


_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", dict: "a mapping",
          type(None): "null"}
_PLURALS = {bool: "true/false values", int: "integers", float: "finite numbers", str: "strings"}


def check_keys(values: Mapping[str, Any], valid: list[str], what: str) -> None:
    """Refuse unknown keys, suggesting the nearest valid one (a typo is the usual cause)."""
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ValueError(f"unknown {what} {key!r}{hint}")
