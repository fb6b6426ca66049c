"""The configurations: the model's (``ViTConfig``), the recipe's (``TrainConfig``), the data's (``DataConfig``) and
self-supervised pretraining's (``PretrainConfig``).

Each is a typed dataclass whose ``validate`` is made of the ``check_*``
helpers here, which the variants' model configs use too. ViTConfig's field
names are the seed tutorial's config keys, so the tutorial's plain dict works
as it is (``ViTConfig.from_dict(config)``), plus the few choices the
ecosystem's ViTs (timm, Hugging Face) need for exact weight interop.
TrainConfig's and DataConfig's fields carry their help text (``setting``):
the ``vitcraft train`` flags are built from them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from vitcraft.errors import VitcraftError

ATTENTION_BACKENDS = ("per_head", "fused", "sdpa")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTO_AUGMENTS = ("randaugment", "trivialaugment")
DISTILLATIONS = ("hard", "soft")
HIDDEN_ACTS = ("gelu_tanh", "gelu")
POOLINGS = ("cls", "mean")
FREEZES = ("none", "backbone")
PRETRAIN_METHODS = ("mae",)
MAX_SIZE = 2**31  # sizes must fit a 32-bit index, which some kernels use; larger is always a mistake


def setting(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
            metavar: str | None = None, none_means: str | None = None) -> Any:
    """A dataclass field carrying what its ``vitcraft train`` flag needs (the CLI builds the flag from it).

    ``help``: what the setting does (the flag's help; the default is added to it);
    ``flag``: the flag's name when it is not the field's (``lr`` for learning_rate);
    ``choices``: the values a string setting takes (the CLI offers them; ``validate`` checks them);
    ``metavar``: the flag's placeholder when the type's (N, X, ...) says too little;
    ``none_means``: what the setting does when it is None (unset), for the help.
    """
    metadata = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "none_means": none_means}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (a fresh copy for a list)."""
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


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
        values = dict(values)
        if values.get("extra") == {}:  # a field of older versions that nothing read, in their model.json files
            del values["extra"]
        check_keys(values, cls.field_names(), what="model config key")
        return cls(**values)

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
    # stochastic depth of the last block (whole residual branches dropped per sample in training);
    # rises linearly from 0 at the first block (model.drop_path_rates)
    drop_path_rate: float = 0.0
    # training on a random subset of each image's patch tokens, this fraction left out (FLIP, Li et al.
    # 2023; timm's patch_drop_rate): fewer tokens, faster steps; all tokens in eval mode
    patch_dropout: float = 0.0
    # Lee et al. 2021, "Vision Transformer for Small-Size Datasets": shifted patch tokenization (each
    # patch also sees its image shifted half a patch in the four diagonal directions) and locality
    # self-attention (a learned temperature per head; no token attends to itself)
    shifted_patches: bool = False
    locality_attention: bool = False
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

    def __post_init__(self) -> None:
        if self.attention_backend is None:
            self.attention_backend = "sdpa" if self.use_faster_attention else "per_head"
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise one ValueError naming the first bad field."""
        check_positive_ints(self, ("image_size", "patch_size", "num_channels", "num_classes", "hidden_size",
                                   "num_hidden_layers", "num_attention_heads", "intermediate_size"))
        check_fractions(self, ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate",
                               "patch_dropout"))
        check_positive_numbers(self, ("initializer_range", "layer_norm_eps"))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        check_choice(self, "attention_backend", ATTENTION_BACKENDS)
        check_choice(self, "hidden_act", HIDDEN_ACTS)
        check_choice(self, "pooling", POOLINGS)
        check_bools(self, ("qkv_bias", "use_faster_attention", "final_layernorm", "shifted_patches",
                           "locality_attention"))
        if self.shifted_patches and self.patch_size < 2:
            raise ValueError("shifted_patches shifts the image by half a patch, so patch_size must be at least 2")

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


@dataclass
class TrainConfig:
    """The optimisation recipe. Defaults are the seed tutorial's.

    Each field is a ``vitcraft train`` flag (``--batch-size`` for batch_size)
    and a key of a --config file's train section; its help text is the flag's.
    """

    epochs: int = setting(15, "passes over the training set")
    batch_size: int = setting(256, "images per step, split across ranks under torchrun")
    learning_rate: float = setting(1e-3, "peak learning rate of AdamW", flag="lr")
    weight_decay: float = setting(1e-2, "AdamW's decay, on weight matrices only: not on biases, norms, [CLS] "
                                        "or positions")
    schedule: str = setting("constant", "learning rate after the warmup: constant (the tutorial's) or cosine decay "
                                        "to min_lr", choices=SCHEDULES)
    warmup_steps: int = setting(0, "linear warmup from ~0 to the learning rate over this many steps")
    warmup_fraction: float | None = setting(None, "warmup over this fraction of all the run's steps, replacing "
                                                  "warmup_steps once the steps are known (--budget's plan included)",
                                            none_means="warmup_steps")
    min_lr: float = setting(0.0, "where the cosine schedule ends")
    max_steps: int | None = setting(None, "stop after this many steps in all; the schedule ends there too",
                                    none_means="the end of the last epoch")
    budget: str | None = setting(None, "wall-clock time for the whole run, evaluations and figures included "
                                       "(90s, 30m, 2h, 1h30m): a few steps are timed, then the epochs, steps and "
                                       "schedule are planned to end within it", metavar="TIME",
                                 none_means="no limit: --epochs decides")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy loss")
    grad_clip: float | None = setting(None, "clip the global gradient norm to this", none_means="off")
    seed: int = setting(0, "seed of the initialisation, the data order and the augmentation")
    precision: str = setting("auto", "autocast precision; auto picks one per device (see device.autocast_dtype)",
                             choices=PRECISIONS)
    grad_checkpointing: bool = setting(False, "recompute each block in the backward pass, to save memory")
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    # small enough for malloc to reuse its activations (device.keep_freed_memory)
    eval_batch_size: int = setting(500, "images per forward pass when evaluating")
    flip_p: float = setting(0.5, "probability of a random horizontal flip; 0: off")
    crop_scale: list[float] | None = setting([0.8, 1.0], "area range of the random resized crop, as fractions of "
                                                         "the image; null in a --config file (or --no-augment): "
                                                         "no crop", metavar="LOW,HIGH")
    num_threads: int | None = setting(None, "CPU threads", flag="threads",
                                      none_means="all available cores, split across local ranks")
    # stronger augmentation (deit_augment.py), all off in the seed's recipe; DeiT's: randaugment,
    # random_erasing 0.25, mixup_alpha 0.8, cutmix_alpha 1.0, label_smoothing 0.1
    auto_augment: str | None = setting(None, "a random augmentation policy, one draw per image",
                                       choices=AUTO_AUGMENTS, none_means="off")
    random_erasing: float = setting(0.0, "probability of replacing a random box of each image by noise",
                                    metavar="P")
    mixup_alpha: float = setting(0.0, "MixUp of image pairs with lam ~ Beta(ALPHA, ALPHA); 0: off",
                                 metavar="ALPHA")
    cutmix_alpha: float = setting(0.0, "CutMix (a pasted box) with lam ~ Beta(ALPHA, ALPHA); 0: off",
                                  metavar="ALPHA")
    mix_prob: float = setting(1.0, "probability that a batch is mixed when MixUp or CutMix is on", metavar="P")
    # distillation (distill.py)
    teacher: str | None = setting(None, "distil from the model trained in this run directory, as DeiT; the "
                                        "student is best a deit-* preset", metavar="RUN_DIR", none_means="none")
    distillation: str = setting("hard", "hard: the teacher's top class; soft: its distribution at distill_tau",
                                choices=DISTILLATIONS)
    distill_alpha: float = setting(0.5, "weight of the teacher's loss; the labels' loss gets 1 - alpha")
    distill_tau: float = setting(1.0, "temperature of soft distillation")
    # progressive resizing (resize.py)
    progressive_sizes: list[int] | None = setting(
        None, "train at these image sizes in turn, the epochs split evenly, e.g. 16,24,32; evaluation and the "
              "saved model stay at the data's size", none_means="off")
    # fine-tuning (train.build_optimizer, ema.py); BEiT's and MAE's recipes use layer_decay 0.65-0.75,
    # drop_path 0.1 and an EMA of decay 0.9999 over long runs
    layer_decay: float | None = setting(
        None, "layer-wise learning-rate decay: the head trains at the rate, encoder block i of D at rate * "
              "R**(D - i), the embeddings at rate * R**(D + 1)", metavar="R", none_means="off")
    freeze: str = setting("none", "backbone: train only the classifier (a linear probe), every other weight "
                                  "stays as it started", choices=FREEZES)
    drop_path: float | None = setting(
        None, "stochastic depth of the last block, rising linearly from 0 at the first (ViT, DeiT and Swin "
              "presets)", metavar="P", none_means="the model config's drop_path_rate")
    ema: float | None = setting(
        None, "also keep an exponential moving average of the weights with this decay per step; both are "
              "evaluated each epoch and the better one is saved", metavar="DECAY", none_means="off")

    def __post_init__(self) -> None:
        _validate_settings(self, what="train setting")

    def validate(self) -> None:
        """Raise one ValueError naming the first bad field (a VitcraftError when built)."""
        check_positive_ints(self, ("epochs", "batch_size", "eval_batch_size"))
        if self.budget is not None:
            duration_seconds(self.budget)  # raises a ValueError naming what a budget looks like
        check_fractions(self, ("warmup_fraction",), optional=True)
        check_positive_ints(self, ("max_steps", "num_threads"), optional=True)
        check_positive_numbers(self, ("learning_rate", "distill_tau"))
        check_positive_numbers(self, ("grad_clip",), optional=True)
        check_non_negative(self, ("weight_decay", "warmup_steps", "min_lr"))
        check_non_negative(self, ("mixup_alpha", "cutmix_alpha"), zero_means="off")
        check_fractions(self, ("label_smoothing",))
        check_fractions(self, ("drop_path",), optional=True)
        check_decay_factors(self, ("layer_decay",), one_allowed=True)
        check_decay_factors(self, ("ema",))
        check_probabilities(self, ("flip_p", "random_erasing", "mix_prob", "distill_alpha"))
        check_bools(self, ("grad_checkpointing",))
        check_choice(self, "schedule", SCHEDULES)
        check_choice(self, "precision", PRECISIONS)
        check_choice(self, "auto_augment", AUTO_AUGMENTS, optional=True)
        check_choice(self, "distillation", DISTILLATIONS)
        check_choice(self, "freeze", FREEZES)
        if self.crop_scale is not None:
            if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
                raise ValueError(f"crop_scale must be two numbers 0 < low <= high <= 1, got {self.crop_scale!r}")
        if not 0 <= self.seed < 2**32:  # the per-epoch seeds derived from it must fit torch's 64 bits
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed!r}")
        if self.progressive_sizes is not None and (
                not self.progressive_sizes
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in self.progressive_sizes)):
            raise ValueError(f"progressive_sizes must be a list of positive integers (image sizes), "
                             f"got {self.progressive_sizes!r}")


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared.

    Each field is a ``vitcraft train`` flag and a key of a --config file's data section.
    """

    data: str = setting("cifar10", "a torchvision dataset name (cifar10, cifar100, mnist, fashion-mnist, svhn), "
                                   "an ImageFolder-layout folder with train/ and test/, a Hugging Face dataset "
                                   "hf:NAME[:CONFIG], or a folder written by DatasetDict.save_to_disk")
    data_root: str | None = setting(None, "where torchvision datasets are downloaded", metavar="DIR",
                                    none_means="the cache")
    image_size: int | None = setting(None, "the model's input size: each image's shorter side is resized to it, "
                                           "training crops drawn from the whole image and evaluation taking the "
                                           "centre square (never squashed)",
                                     none_means="the data's own: its first image's shorter side")
    crop_pct: float | None = setting(
        None, "the fraction of the image a pretrained model was evaluated on (timm's crop_pct), in (0, 1]: "
              "evaluation resizes the shorter side to image_size / crop_pct, then centre-crops image_size; "
              "training crops come from the same larger image",
        none_means="the --init model's, else 1.0: the shorter side at image_size")
    cache_dir: str | None = setting(None, "where decoded image folders are cached", metavar="DIR",
                                    none_means="~/.cache/vitcraft")
    cache: bool = setting(True, "decode folder and Hugging Face images once into a memory-mapped cache on disk; "
                                "--no-cache decodes them every epoch in DataLoader workers instead (streaming, "
                                "also chosen when the cache would not fit the free disk)")
    workers: int | None = setting(None, "processes that decode images (building the cache, or streaming)",
                                  none_means="one per CPU core")
    labels_per_class: int | None = setting(
        None, "train on only this many images of each class of the train split, drawn with --seed (the same ones "
              "for every run of that seed): a label-efficiency study, such as fine-tuning after pretraining",
        metavar="N", none_means="all of them")
    skip_bad_images: bool = setting(False, "leave out images that cannot be read, naming them in the log and the "
                                           "run's run.json, instead of stopping at the first")
    mean: list[float] | None = setting(None, "per-channel normalisation mean", none_means="0.5 per channel, as the "
                                                                                           "tutorial")
    std: list[float] | None = setting(None, "per-channel normalisation standard deviation",
                                      none_means="0.5 per channel")

    def __post_init__(self) -> None:
        _validate_settings(self, what="data setting")

    def validate(self) -> None:
        """Raise one ValueError naming the first bad field (a VitcraftError when built)."""
        check_positive_ints(self, ("image_size", "workers", "labels_per_class"), optional=True)
        check_bools(self, ("cache", "skip_bad_images"))
        if self.crop_pct is not None and not (_is_number(self.crop_pct) and 0 < self.crop_pct <= 1):
            raise ValueError(f"crop_pct is the fraction of the image kept, so it must be in (0, 1]; "
                             f"got {self.crop_pct!r}")
        if self.std is not None and not all(value > 0 for value in self.std):
            raise ValueError(f"std values divide the pixels, so they must be positive; got {self.std!r}")


@dataclass
class PretrainConfig:
    """Self-supervised pretraining (``vitcraft pretrain``): masked autoencoders, after He et al. 2021 (mae.py).

    Each field is a ``vitcraft pretrain`` flag and a key of a --config file's pretrain section.
    """

    method: str = setting("mae", "the self-supervised objective: mae, masked autoencoders", choices=PRETRAIN_METHODS)
    mask_ratio: float = setting(0.75, "fraction of each image's patches hidden from the encoder", metavar="R")
    decoder_depth: int = setting(2, "transformer blocks of the decoder, which is dropped after pretraining",
                                 metavar="N")
    decoder_width: int | None = setting(None, "token width of the decoder", metavar="N",
                                        none_means="the encoder's hidden_size")
    decoder_heads: int | None = setting(None, "attention heads of the decoder", metavar="N",
                                        none_means="the encoder's num_attention_heads")
    norm_pix_loss: bool = setting(False, "reconstruct each patch's pixels normalised by the patch's own mean and "
                                         "variance, as the MAE paper's best models, rather than the pixels")
    reconstruction_every_epoch: bool = setting(False, "draw reconstruction.png after every epoch (also with "
                                                      "--no-figures), not only at the end")

    def __post_init__(self) -> None:
        _validate_settings(self, what="pretrain setting")

    def validate(self) -> None:
        """Raise one ValueError naming the first bad field (a VitcraftError when built)."""
        check_choice(self, "method", PRETRAIN_METHODS)
        if not (_is_number(self.mask_ratio) and 0 < self.mask_ratio < 1):
            raise ValueError(f"mask_ratio is the fraction of patches hidden, so it must be in (0, 1); "
                             f"got {self.mask_ratio!r}")
        check_positive_ints(self, ("decoder_depth",))
        check_positive_ints(self, ("decoder_width", "decoder_heads"), optional=True)
        check_bools(self, ("norm_pix_loss", "reconstruction_every_epoch"))


DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def duration_seconds(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``30m``, ``2h`` or ``1h30m``; a bare number is minutes."""
    value = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return 60 * float(value)
    match = DURATION.fullmatch(value)
    if not value or match is None or not any(match.groups()):
        raise ValueError(f"budget must be a duration such as 90s, 30m, 2h or 1h30m; got {text!r}")
    hours, minutes, seconds = (float(group) if group else 0.0 for group in match.groups())
    if 3600 * hours + 60 * minutes + seconds <= 0:
        raise ValueError(f"budget must be longer than nothing; got {text!r}")
    return 3600 * hours + 60 * minutes + seconds


# ------------------------------------------------------------------ checks
# What every config's validate() is made of. Each raises one ValueError naming the field
# ("<name> must be ..., got <value>"); optional=True lets None through, for a setting that is
# off or derived when unset.

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked(config: Any, names: tuple[str, ...], optional: bool):
    for name in names:
        value = getattr(config, name)
        if not (optional and value is None):
            yield name, value


def check_positive_ints(config: Any, names: tuple[str, ...], optional: bool = False) -> None:
    for name, value in _checked(config, names, optional):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value >= MAX_SIZE:
            raise ValueError(f"{name} must be below 2**31, got {value!r}")


def check_positive_numbers(config: Any, names: tuple[str, ...], optional: bool = False) -> None:
    for name, value in _checked(config, names, optional):
        if not _is_number(value) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_non_negative(config: Any, names: tuple[str, ...], zero_means: str = "") -> None:
    """Finite numbers >= 0; ``zero_means`` says in the message what 0 does (e.g. "off")."""
    zero = f"0 ({zero_means})" if zero_means else "0"
    for name, value in _checked(config, names, optional=False):
        if not _is_number(value) or not 0 <= value < math.inf:
            raise ValueError(f"{name} must be {zero} or positive, got {value!r}")


def check_fractions(config: Any, names: tuple[str, ...], optional: bool = False) -> None:
    """Rates that must leave something, such as dropout: numbers in [0, 1)."""
    for name, value in _checked(config, names, optional):
        if not _is_number(value) or not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_decay_factors(config: Any, names: tuple[str, ...], one_allowed: bool = False) -> None:
    """Factors applied again and again (per layer, per step), None when off: numbers in (0, 1).

    0 would leave nothing; ``one_allowed`` where 1 means "no decay" rather than "never changes"."""
    high = "1]" if one_allowed else "1)"
    for name, value in _checked(config, names, optional=True):
        if not _is_number(value) or not (0 < value < 1 or (one_allowed and value == 1)):
            raise ValueError(f"{name} must be in (0, {high}, got {value!r}")


def check_probabilities(config: Any, names: tuple[str, ...]) -> None:
    """Numbers in [0, 1]."""
    for name, value in _checked(config, names, optional=False):
        if not _is_number(value) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def check_bools(config: Any, names: tuple[str, ...]) -> None:
    for name, value in _checked(config, names, optional=False):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")


def check_choice(config: Any, name: str, choices: tuple[str, ...], optional: bool = False) -> None:
    value = getattr(config, name)
    if value not in choices and not (optional and value is None):
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _validate_settings(config: Any, what: str) -> None:
    """Types, then the config's own validate(); a bad train or data setting is the user's mistake (VitcraftError)."""
    try:
        check_types(type(config), vars(config), what=what)  # first: validate() compares values
        config.validate()
    except ValueError as error:
        raise VitcraftError(str(error)) from None


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
