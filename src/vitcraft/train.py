"""The training loop, readable top to bottom, and the recipe it follows.

``train(run_config, out_dir)`` loads the data (in memory, see ``data.py``),
builds the model from a preset with the data's image size, channels and
classes, then per epoch: augment each batch, forward under autocast, backward,
clip, step AdamW at ``learning_rate_at(step)``; evaluate; write the
checkpoint, the weights and the metrics atomically. Under torchrun it trains
with DistributedDataParallel; only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vitcraft import checkpoint as ckpt
from vitcraft.augment import BatchAugment, Normalization
from vitcraft.augment_extra import ExtraAugment
from vitcraft.config import check_keys, check_types, short_repr
from vitcraft.data import ImageTensorDataset, epoch_indices, iterate_batches, load_splits
from vitcraft.device import (autocast, autocast_dtype, available_cpus, distributed_backend, grad_scaler,
                             keep_freed_memory, pick_device)
from vitcraft.distill import DISTILLATIONS, Distiller, load_teacher
from vitcraft.errors import VitcraftError
from vitcraft.io import atomic_write_json, atomic_write_text, read_json, remove_stale_temporaries
from vitcraft.model import count_parameters
from vitcraft.registry import get_preset, preset_config
from vitcraft.resize import allow_image_sizes, progressive_size, resize_batch
from vitcraft.tensorboard_log import TENSORBOARD_DIR, TensorBoardLog, remove_event_files

SCHEDULES = ("constant", "cosine")
RUN_CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
# files a run writes; --overwrite removes exactly these, nothing else in the folder
RUN_FILES = (RUN_CONFIG_FILE, METRICS_FILE, ckpt.MODEL_FILE, ckpt.MODEL_META_FILE, ckpt.CHECKPOINT_FILE,
             "samples.png", "curves.png", "attention.png", "rollout.png", "confusion.png", "report.html",
             TENSORBOARD_DIR)


@dataclass
class TrainConfig:
    """The optimisation recipe. Defaults are the seed tutorial's."""

    epochs: int = 15
    batch_size: int = 256  # global batch (split across ranks under torchrun)
    learning_rate: float = 1e-3  # peak learning rate of AdamW
    weight_decay: float = 1e-2  # AdamW decay, on weight matrices only (not biases, norms, [CLS], positions)
    schedule: str = "constant"  # "constant" (the tutorial) or "cosine" decay to min_lr, both after warmup
    warmup_steps: int = 0  # linear warmup from ~0 to learning_rate over this many steps
    min_lr: float = 0.0  # where cosine ends
    max_steps: int | None = None  # stop after this many steps in all (the schedule ends there too)
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # clip the global gradient norm to this; None: off
    seed: int = 0
    precision: str = "auto"  # auto, fp32, bf16, fp16 (see device.autocast_dtype)
    grad_checkpointing: bool = False  # recompute blocks in backward to save memory
    device: str = "auto"  # auto: cuda, then mps, then cpu
    eval_batch_size: int = 500  # small enough for malloc to reuse its activations (device.keep_freed_memory)
    flip_p: float = 0.5  # random horizontal flip probability; 0: off
    crop_scale: list[float] | None = field(default_factory=lambda: [0.8, 1.0])  # RandomResizedCrop area; None: off
    num_threads: int | None = None  # CPU threads; None: all available cores (split across local ranks)
    # stronger augmentation (augment_extra.py), all off in the seed's recipe; DeiT's: randaugment,
    # random_erasing 0.25, mixup_alpha 0.8, cutmix_alpha 1.0, label_smoothing 0.1
    auto_augment: str | None = None  # "randaugment" or "trivialaugment", one draw per image; None: off
    random_erasing: float = 0.0  # probability of replacing a random box of each image by noise
    mixup_alpha: float = 0.0  # MixUp of image pairs with lam ~ Beta(alpha, alpha); 0: off
    cutmix_alpha: float = 0.0  # CutMix (a pasted box) with lam ~ Beta(alpha, alpha); 0: off
    mix_prob: float = 1.0  # probability that a batch is mixed when MixUp or CutMix is on
    # distillation (distill.py): a trained run directory whose model teaches this one
    teacher: str | None = None
    distillation: str = "hard"  # "hard": the teacher's top class; "soft": its distribution at distill_tau
    distill_alpha: float = 0.5  # weight of the teacher's loss; the labels' loss gets 1 - alpha
    distill_tau: float = 1.0  # temperature of soft distillation
    # progressive resizing (resize.py): train at these image sizes in turn, the epochs split evenly
    # (e.g. [16, 24, 32]); evaluation and the saved model stay at the data's size. None: off
    progressive_sizes: list[int] | None = None

    def __post_init__(self) -> None:
        check_types(TrainConfig, vars(self), what="train setting")  # first: the checks below compare values
        positive = ("epochs", "batch_size", "eval_batch_size")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise VitcraftError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise VitcraftError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.min_lr < 0:
            raise VitcraftError("weight_decay, warmup_steps and min_lr must not be negative")
        if self.schedule not in SCHEDULES:
            raise VitcraftError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if not 0 <= self.label_smoothing < 1:
            raise VitcraftError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not 0 <= self.flip_p <= 1:
            raise VitcraftError(f"flip_p must be in [0, 1], got {self.flip_p!r}")
        if self.crop_scale is not None:
            if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
                raise VitcraftError(f"crop_scale must be two numbers 0 < low <= high <= 1, got {self.crop_scale!r}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise VitcraftError(f"max_steps must be positive, got {self.max_steps!r}")
        for name in ("grad_clip", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise VitcraftError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.seed < 2**32:  # the per-epoch seeds derived from it must fit torch's 64 bits
            raise VitcraftError(f"seed must be in [0, 2**32), got {self.seed!r}")
        extra_augment(self, num_classes=1)  # checks auto_augment, random_erasing, mixup/cutmix_alpha, mix_prob
        if self.distillation not in DISTILLATIONS:
            raise VitcraftError(f"distillation must be one of {', '.join(DISTILLATIONS)}; got {self.distillation!r}")
        if not 0 <= self.distill_alpha <= 1 or not self.distill_tau > 0:
            raise VitcraftError(f"distill_alpha must be in [0, 1] and distill_tau positive, got "
                                f"{self.distill_alpha!r} and {self.distill_tau!r}")
        if self.progressive_sizes is not None and (
                not self.progressive_sizes
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in self.progressive_sizes)):
            raise VitcraftError(f"progressive_sizes must be a list of positive integers (image sizes), "
                                f"got {self.progressive_sizes!r}")


def extra_augment(train: TrainConfig, num_classes: int) -> ExtraAugment:
    """The recipe's RandAugment/TrivialAugment, random erasing and MixUp/CutMix settings (validated)."""
    return ExtraAugment(num_classes, train.auto_augment, train.random_erasing, train.mixup_alpha,
                        train.cutmix_alpha, train.mix_prob)


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    data: str = "cifar10"  # a torchvision dataset name or an ImageFolder-layout folder
    data_root: str | None = None  # where torchvision datasets are downloaded (default: the cache)
    image_size: int | None = None  # resize every image to this square size; None: the data's own
    cache_dir: str | None = None  # where decoded folders are cached (default ~/.cache/vitcraft)
    mean: list[float] | None = None  # normalisation; None: 0.5 per channel, as the tutorial
    std: list[float] | None = None

    def __post_init__(self) -> None:
        check_types(DataConfig, vars(self), what="data setting")
        if self.image_size is not None and self.image_size <= 0:
            raise VitcraftError(f"image_size must be positive, got {self.image_size!r}")
        if self.std is not None and not all(value > 0 for value in self.std):
            raise VitcraftError(f"std values divide the pixels, so they must be positive; got {self.std!r}")


@dataclass
class RunConfig:
    """Everything a run needs: model preset and overrides, recipe, data."""

    preset: str = "seed-tiny"
    model: dict[str, Any] = field(default_factory=dict)  # ViTConfig overrides on top of the preset
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        # fail on a bad preset name, model key or value type before any data is loaded
        if not isinstance(self.preset, str) or not isinstance(self.model, Mapping):
            raise VitcraftError(f"preset must be a name and model a mapping of overrides, got "
                                f"{short_repr(self.preset)} and {short_repr(self.model)}")
        config_class = get_preset(self.preset).config_class
        check_keys(self.model, config_class.field_names(), what="model config key")
        check_types(config_class, self.model, what="model setting")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        check_run_sections(values, "a run config")
        train = values.get("train", {}) or {}
        data = values.get("data", {}) or {}
        check_keys(train, [f.name for f in dataclasses.fields(TrainConfig)], what="train setting")
        check_keys(data, [f.name for f in dataclasses.fields(DataConfig)], what="data setting")
        return cls(preset=values.get("preset", "seed-tiny"), model=dict(values.get("model", {}) or {}),
                   train=TrainConfig(**train), data=DataConfig(**data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_run_sections(values: Any, where: str) -> None:
    """Raise VitcraftError unless ``values`` maps known sections to mappings (model, train, data)
    or to a name (preset)."""
    if not isinstance(values, Mapping):
        raise VitcraftError(f"{where} must be a mapping with sections preset/model/train/data, "
                            f"got {type(values).__name__}")
    check_keys(values, ["preset", "model", "train", "data"], what="run config section")
    if not isinstance(values.get("preset", ""), str):
        raise VitcraftError(f"preset in {where} must be a model name, got {short_repr(values['preset'])}")
    for name in ("model", "train", "data"):
        if not isinstance(values.get(name) or {}, Mapping):
            raise VitcraftError(f"the {name} section of {where} must be a mapping of settings, "
                                f"got {short_repr(values[name])}")


def load_run_config(run_dir: Path | str) -> RunConfig:
    """The RunConfig a run directory was started with."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        raise VitcraftError(f"{run_dir} holds no run ({RUN_CONFIG_FILE} is missing)")
    saved = read_json(path)
    if not isinstance(saved, dict) or "run" not in saved:
        raise VitcraftError(f"{path} is not a vitcraft run config (it has no 'run' section)")
    return RunConfig.from_dict(saved["run"])


def load_run_config_file(path: Path | str) -> dict[str, Any]:
    """A YAML or JSON file holding any of the sections preset, model, train, data."""
    path = Path(path)
    if not path.is_file():
        raise VitcraftError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:  # UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError, RecursionError
        raise VitcraftError(f"cannot parse config file {path}: {error}") from None
    check_run_sections(values, f"config file {path}")  # the CLI merges the sections before from_dict
    return values


# ------------------------------------------------------------------ recipe
def learning_rate_at(step: int, train: TrainConfig, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): a pure function.

    Linear warmup to the peak over ``warmup_steps``, then constant or cosine
    decay to ``min_lr`` at ``total_steps``.
    """
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return train.learning_rate
    progress = min(1.0, (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps))
    return train.min_lr + 0.5 * (train.learning_rate - train.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only.

    Decaying biases, LayerNorm gains, the [CLS] (and DeiT's distillation) token, position
    embeddings or Swin's relative position bias tables pulls them towards 0 for no benefit
    (timm and nanoGPT exclude them too).
    """
    no_decay_names = {"cls_token", "distillation_token", "position_embeddings", "relative_position_bias_table"}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.ndim >= 2 and name.rsplit(".", 1)[-1] not in no_decay_names
        (decay if is_matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(0.9, 0.999))


def resolve_model_config(run: RunConfig, train_set: ImageTensorDataset):
    """The preset's config with the data's image size, channels and classes, then the user's overrides."""
    from_data = {"image_size": train_set.image_size, "num_channels": train_set.num_channels,
                 "num_classes": len(train_set.class_names)}
    try:
        return preset_config(run.preset, **{**from_data, **run.model})
    except ValueError as error:
        raise VitcraftError(
            f"model preset {run.preset!r} does not fit the data ({train_set.image_size}x{train_set.image_size}, "
            f"{train_set.num_channels} channels): {error}. Set --image-size or a model override") from None


def normalization_for(run: RunConfig, channels: int) -> Normalization:
    if run.data.mean is None and run.data.std is None:
        return Normalization.for_channels(channels)
    mean, std = run.data.mean or [0.5] * channels, run.data.std or [0.5] * channels
    if len(mean) != channels or len(std) != channels:
        raise VitcraftError(f"mean and std need {channels} values (one per channel), got {mean} and {std}")
    return Normalization(tuple(mean), tuple(std))


# -------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Distributed:
    """This process's place among the torchrun ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "Distributed":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                   int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))))

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def run_on_main(self, action: Callable[[], None]) -> None:
        """Call ``action`` on rank 0 only; a VitcraftError it raises is raised on every rank.

        Without this the other ranks would wait for rank 0 in the next collective
        (DDP's first broadcast) until the backend's timeout.
        """
        message = None
        if self.is_main:
            try:
                action()
            except VitcraftError as error:
                message = str(error)
        if self.world_size > 1:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if message is not None:
            raise VitcraftError(message)


def _setup_distributed(train: TrainConfig) -> tuple[Distributed, torch.device]:
    ddp = Distributed.from_environment()
    device = pick_device(train.device)
    if ddp.world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", ddp.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend=distributed_backend(device))
        if train.batch_size % ddp.world_size:
            raise VitcraftError(f"batch_size {train.batch_size} must be divisible by the "
                                f"{ddp.world_size} ranks")
    if device.type == "cpu":
        torch.set_num_threads(train.num_threads or max(1, available_cpus() // ddp.local_world_size))
        keep_freed_memory()
    return ddp, device


# ---------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageTensorDataset, normalization: Normalization,
             device: torch.device, dtype: torch.dtype | None, batch_size: int = 1000,
             ddp: Distributed = Distributed(), progress: bool = False) -> dict[str, Any]:
    """Loss, top-1, top-5 and per-class accuracy on a whole split (sharded across ranks).

    Returns fractions in [0, 1]; ``predictions`` holds this rank's top-1 guesses
    in dataset order (rank 0 of 1: all of them).
    """
    model.eval()
    num_classes = len(dataset.class_names)
    order = torch.arange(len(dataset))[ddp.rank::ddp.world_size]
    loss_sum, correct, correct5 = 0.0, 0.0, 0.0
    class_correct = torch.zeros(num_classes, dtype=torch.float64)
    class_total = torch.zeros(num_classes, dtype=torch.float64)
    predictions = []
    batches = iterate_batches(dataset, order, batch_size)
    for images, labels in tqdm(batches, total=math.ceil(len(order) / batch_size), desc="evaluate",
                               leave=False, disable=not (progress and ddp.is_main and sys.stderr.isatty())):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits, _ = model(normalization(images))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, num_classes), dim=1).indices
        hit1 = top[:, 0] == labels
        correct += hit1.sum().item()
        correct5 += (top == labels[:, None]).any(1).sum().item()
        class_total += torch.bincount(labels.cpu(), minlength=num_classes).double()
        class_correct += torch.bincount(labels[hit1].cpu(), minlength=num_classes).double()
        predictions.append(top[:, 0].cpu())
    totals = ddp.all_reduce_sum([loss_sum, correct, correct5, *class_correct.tolist(), *class_total.tolist()], device)
    count = sum(totals[3 + num_classes:])
    per_class_correct = torch.tensor(totals[3:3 + num_classes])
    per_class_total = torch.tensor(totals[3 + num_classes:])
    return {
        "loss": totals[0] / count, "acc": totals[1] / count, "top5": totals[2] / count,
        "per_class_acc": (per_class_correct / per_class_total.clamp(min=1)).tolist(),
        "predictions": torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long),
    }


# ------------------------------------------------------------------- train
def _prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out_dir / ckpt.CHECKPOINT_FILE).is_file():
            raise VitcraftError(f"cannot resume: {out_dir} holds no checkpoint ({ckpt.CHECKPOINT_FILE} is missing)")
        remove_stale_temporaries(out_dir, RUN_FILES)  # left by a kill mid-write; the files themselves are whole
        return
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise VitcraftError(f"{out_dir} already holds a run ({', '.join(existing)}); use --resume {out_dir} "
                            f"to continue it, --overwrite to replace it, or another --out")
    for name in existing:
        if name == TENSORBOARD_DIR:
            remove_event_files(out_dir)  # the event files only; a user's own files there stay
        else:
            (out_dir / name).unlink()
    remove_stale_temporaries(out_dir, RUN_FILES)


def _write_metrics(out_dir: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(out_dir / METRICS_FILE, "".join(json.dumps(record) + "\n" for record in history))


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    return (f"epoch {record['epoch']}/{epochs}  train_loss {record['train_loss']:.4f}  "
            f"test_loss {record['test_loss']:.4f}  test_acc {100 * record['test_acc']:.2f}%  "
            f"lr {record['lr']:.2e}  {record['images_per_second']:.0f} img/s  {record['epoch_seconds']:.1f}s")


def train(run: RunConfig, out_dir: Path | str, resume: bool = False, overwrite: bool = False,
          progress: bool = True, figures: bool = True, log=print, tensorboard: bool = True) -> dict[str, Any]:
    """Train (or resume) a run into ``out_dir``; return its last metrics record.

    To resume, pass the run's own config (``load_run_config(out_dir)``), with
    more epochs if it should train longer. With ``tensorboard`` (and the
    tensorboard package installed) scalars also go to ``out_dir/tensorboard``.
    """
    out_dir = Path(out_dir)
    cfg = run.train
    ddp, device = _setup_distributed(cfg)
    ddp.run_on_main(lambda: _prepare_run_dir(out_dir, resume, overwrite))
    torch.manual_seed(cfg.seed)

    cache_dir = Path(run.data.cache_dir) if run.data.cache_dir else None
    train_set, test_set = load_splits(run.data.data, Path(run.data.data_root) if run.data.data_root else None,
                                      run.data.image_size, cache_dir)
    normalization = normalization_for(run, train_set.num_channels)
    if device.type != "cpu":  # keep the uint8 data on the accelerator: no copies per batch
        train_set, test_set = train_set.to(device), test_set.to(device)
    distiller = None
    if cfg.teacher:  # loaded before the student is seeded, and checked before anything is trained
        teacher = load_teacher(cfg.teacher, train_set.class_names, train_set.num_channels, normalization, device)
        teacher.dtype = autocast_dtype(device, load_run_config(cfg.teacher).train.precision)  # its own precision
        distiller = Distiller(teacher, cfg.distillation, cfg.distill_alpha, cfg.distill_tau, cfg.label_smoothing)

    model_config = resolve_model_config(run, train_set)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = get_preset(run.preset).builder(model_config).to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.progressive_sizes:
        allow_image_sizes(model, cfg.progressive_sizes, run.preset)
    optimizer = build_optimizer(model, cfg)
    dtype = autocast_dtype(device, cfg.precision)
    scaler = grad_scaler(device, dtype)
    augment = BatchAugment(normalization, cfg.flip_p, tuple(cfg.crop_scale) if cfg.crop_scale else None)
    extra = extra_augment(cfg, len(train_set.class_names))

    local_batch = cfg.batch_size // ddp.world_size
    steps_per_epoch = math.ceil(len(epoch_indices(len(train_set), cfg.seed, 0, True, ddp.rank, ddp.world_size))
                                / local_batch)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    metadata = {
        "model_config": model_config.to_dict(), "preset": run.preset,
        "class_names": train_set.class_names, "mean": list(normalization.mean), "std": list(normalization.std),
        "num_parameters": count_parameters(model),
    }
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    if resume:
        state = ckpt.load_checkpoint(out_dir, model, optimizer, scaler)
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        if ddp.is_main:
            # a kill between the checkpoint and the files after it leaves those a step behind:
            # bring them back in line with the checkpoint (also when no epoch is left to run)
            _write_metrics(out_dir, history)
            ckpt.save_model(out_dir, model, metadata)
            log(f"resuming {out_dir} after epoch {start_epoch} (step {step})")
    elif ddp.is_main:
        atomic_write_json(out_dir / RUN_CONFIG_FILE, {"run": run.to_dict(), **metadata})
    if ddp.is_main:
        log(f"training {run.preset} ({metadata['num_parameters']:,} parameters) on {run.data.data}: "
            f"{len(train_set):,} train / {len(test_set):,} test images, {train_set.image_size}x"
            f"{train_set.image_size}x{train_set.num_channels}, {len(train_set.class_names)} classes; "
            f"device {device}, precision {dtype or torch.float32}, {torch.get_num_threads()} threads, "
            f"{ddp.world_size} rank(s)")
        if figures and not resume:
            from vitcraft.figures import draw_samples

            draw_samples(out_dir / "samples.png", train_set, augment, train_set.class_names, cfg.seed)

    ddp_model = model
    if ddp.world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    board = TensorBoardLog(out_dir, enabled=tensorboard and ddp.is_main, resume_step=step)
    show_bar = progress and ddp.is_main and sys.stderr.isatty()
    for epoch in range(start_epoch, cfg.epochs):
        if step >= total_steps:
            break
        ddp_model.train()
        started = time.perf_counter()
        order = epoch_indices(len(train_set), cfg.seed, epoch, True, ddp.rank, ddp.world_size)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101 + ddp.rank)
        if ddp.world_size > 1:
            # Every rank starts from the same seed (for equal initial weights), so without this
            # all ranks would draw the same dropout masks. Seeded per epoch, so a resume redraws them.
            torch.manual_seed(cfg.seed * 1_000_003 + epoch * 101 + ddp.rank + 0x9E3779B9)
        loss_sum, correct, seen = 0.0, 0.0, 0
        image_size = progressive_size(cfg.progressive_sizes, epoch, cfg.epochs, train_set.image_size)
        bar = tqdm(total=min(steps_per_epoch, total_steps - step), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not show_bar, dynamic_ncols=True)
        for images, labels in iterate_batches(train_set, order, local_batch):
            if step >= total_steps:
                break
            lr = learning_rate_at(step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = augment(extra.policy(images, generator), generator).to(device, non_blocking=True)
            images = resize_batch(images, image_size)  # progressive resizing; a no-op at the data's size
            labels = labels.to(device, non_blocking=True)
            images, targets = extra.erase_and_mix(images, labels, generator)  # targets: labels or (B, K)
            with autocast(device, dtype):
                if distiller is not None:
                    loss, logits = distiller(ddp_model, images, targets)
                else:
                    logits, _ = ddp_model(images)
                    loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise VitcraftError(
                    f"the loss became {loss_value} at epoch {epoch + 1}, step {step}: training diverged. "
                    f"Try a lower --lr, --grad-clip 1.0 or --precision fp32; the last good checkpoint in "
                    f"{out_dir} is kept (--resume continues from it)")
            loss_sum += loss_value * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            board.log_step(step, loss_value, lr)
            bar.update(1)
            if show_bar and bar.n % 10 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}",
                                img_s=f"{seen * ddp.world_size / (time.perf_counter() - started):.0f}")
        bar.close()
        train_seconds = time.perf_counter() - started
        loss_sum, correct, seen = ddp.all_reduce_sum([loss_sum, correct, float(seen)], device)
        result = evaluate(model, test_set, normalization, device, dtype, cfg.eval_batch_size, ddp, progress)
        record = {
            "epoch": epoch + 1, "step": step, "train_loss": loss_sum / seen, "train_acc": correct / seen,
            "test_loss": result["loss"], "test_acc": result["acc"], "test_top5": result["top5"], "lr": lr,
            "epoch_seconds": time.perf_counter() - started, "train_seconds": train_seconds,
            "images_per_second": seen / train_seconds,
        }
        if cfg.progressive_sizes:
            record["image_size"] = image_size  # of the training images this epoch
        history.append(record)
        if ddp.is_main:
            ckpt.save_checkpoint(out_dir, model, optimizer, scaler,
                                 {"epoch": epoch + 1, "step": step, "history": history})
            ckpt.save_model(out_dir, model, metadata)
            _write_metrics(out_dir, history)
            log(_epoch_line(record, cfg.epochs))
            board.log_epoch(record)
    board.close()
    if ddp.is_main and figures:
        from vitcraft.figures import draw_run_figures

        draw_run_figures(out_dir, model, test_set, normalization, history,
                         [learning_rate_at(s, cfg, total_steps) for s in range(total_steps)], device)
    if ddp.world_size > 1:
        dist.barrier()
    return history[-1] if history else {}
