"""The model configuration: one typed dataclass, validated in one place.

The field names are the seed tutorial's config keys, so the tutorial's plain
dict works as it is (``ViTConfig.from_dict(config)``), plus the few choices the
ecosystem's ViTs (timm, Hugging Face) need for exact weight interop.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

ATTENTION_BACKENDS = ("per_head", "fused", "sdpa")
HIDDEN_ACTS = ("gelu_tanh", "gelu")
POOLINGS = ("cls", "mean")


@dataclass
class ViTConfig:
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
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        for name in ("initializer_range", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
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
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ViTConfig":
        """Build from a dict such as the tutorial's; unknown keys are an error."""
        if isinstance(values, ViTConfig):
            return values
        if not isinstance(values, Mapping):
            raise ValueError(f"a model config must be a dict, got {type(values).__name__}")
        check_keys(values, cls.field_names(), what="model config key")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ViTConfig":
        """A copy with some fields changed (validated like a new config)."""
        check_keys(changes, self.field_names(), what="model config key")
        if "use_faster_attention" in changes and "attention_backend" not in changes:
            changes["attention_backend"] = None  # re-derive it from the new switch
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_keys(values: Mapping[str, Any], valid: list[str], what: str) -> None:
    """Refuse unknown keys, suggesting the nearest valid one (a typo is the usual cause)."""
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ValueError(f"unknown {what} {key!r}{hint}")
