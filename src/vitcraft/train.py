"""The training loop, readable top to bottom, and the recipe it follows.

``train(run_config, out_dir)`` is the outline:

1. ``set_up``: ranks and device; the data (in memory, see ``data.py``); the
   teacher, if distilling; the model, built from a preset with the data's image
   size, channels and classes; AdamW, the grad scaler (fp16 only) and the
   augmentations; the schedule's length. A resumed run loads its checkpoint, a
   new one writes run.json.
2. per epoch, ``train_one_epoch``: augment each batch, forward under autocast,
   backward, clip, step AdamW at ``learning_rate_at(step)`` (times each group's
   ``lr_scale``: ``--layer-decay``), update the weights' average (``--ema``). Loss and accuracy
   sums stay on the device and are read every ``TensorBoardLog.step_every`` steps
   (progress bar, TensorBoard, the divergence check) and at the epoch's end;
3. ``end_of_epoch``: evaluate (the EMA too: the better one is saved), append the
   metrics record, write the checkpoint, the weights and metrics.jsonl atomically, log;
4. at the end, the figures.

Under torchrun it trains with DistributedDataParallel, each rank on its shard of
every epoch; only rank 0 writes files and logs.

``vitcraft pretrain`` runs the same loop with ``run.pretrain`` set: the model is
a masked autoencoder around the ViT (mae.py), the loss its masked-patch error,
the test metric that loss on the test split (``evaluate_reconstruction``) and the
last figure ``reconstruction.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vitcraft import checkpoint as ckpt
from vitcraft import runs
from vitcraft.augment import BatchAugment, Normalization
from vitcraft.budget import FIGURE_SECONDS, Deadline, plan
from vitcraft.config import TrainConfig, duration_seconds
from vitcraft.data import (
    ImageTensorDataset,
    StreamingImages,
    derive_seed,
    epoch_indices,
    iterate_batches,
    load_splits,
    per_class_subset,
)
from vitcraft.deit_augment import DeiTAugment
from vitcraft.device import (
    autocast,
    autocast_dtype,
    available_cpus,
    distributed_backend,
    grad_scaler,
    keep_freed_memory,
    pick_device,
    pinned,
    rng_devices,
    synchronize,
)
from vitcraft.distill import Distiller, load_teacher
from vitcraft.ema import ModelEma
from vitcraft.errors import VitcraftError
from vitcraft.files import atomic_write_json
from vitcraft.mae import MaskedAutoencoder
from vitcraft.model import Encoder, count_parameters
from vitcraft.pretrained import Pretrained, model_for_data, read_source, source_normalization
from vitcraft.registry import get_preset, preset_config
from vitcraft.resize import allow_image_sizes, check_progressive_sizes, progressive_size, resize_batch
from vitcraft.runs import RunConfig
from vitcraft.tensorboard_log import TensorBoardLog


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


def build_augmentations(train: TrainConfig, normalization: Normalization, num_classes: int,
                        output_size: int | None = None) -> tuple[BatchAugment, DeiTAugment]:
    """The recipe's augmentations: crop, flip and normalise (BatchAugment); RandAugment/TrivialAugment,
    random erasing and MixUp/CutMix (DeiTAugment, validated, all off by default).

    ``output_size``: the size the crops are resized to, when the training images are larger than the
    model's input (``DataConfig.crop_pct``); None: the training images' own size."""
    crop_and_flip = BatchAugment(normalization, flip_p=train.flip_p,
                                 crop_scale=tuple(train.crop_scale) if train.crop_scale else None,
                                 output_size=output_size)
    stronger = DeiTAugment(num_classes, auto_augment=train.auto_augment, random_erasing=train.random_erasing,
                           mixup_alpha=train.mixup_alpha, cutmix_alpha=train.cutmix_alpha, mix_prob=train.mix_prob)
    return crop_and_flip, stronger


HEAD_NAMES = ("classifier", "distillation_classifier")  # the linear heads: all that --freeze backbone trains
# what comes before the encoder blocks: ViT's and DeiT's embedding module, CCT's tokenizer and positions
EMBEDDING_PREFIXES = ("embedding.", "tokenizer.", "position_embeddings")


def freeze_backbone(model: nn.Module) -> None:
    """A linear probe (``--freeze backbone``): only the classifier heads keep ``requires_grad``.

    Everything else, the final LayerNorm included, keeps its weights and is left out of the
    optimizer. The model still trains in train mode, so its dropout stays on.
    """
    heads = [getattr(model, name) for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Linear)]
    if not heads:
        raise VitcraftError(f"--freeze backbone trains only the classifier, and a {type(model).__name__} has "
                            f"no linear `classifier`")
    model.requires_grad_(False)
    for head in heads:
        head.requires_grad_(True)


def encoder_depth(model: nn.Module) -> int:
    """The number of encoder blocks ``--layer-decay`` counts; a VitcraftError for a model without them."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, Encoder):
        raise VitcraftError(f"--layer-decay scales the learning rate per encoder block (encoder.blocks), and a "
                            f"{type(model).__name__} has none; the ViT, DeiT and CCT presets have them")
    return len(encoder.blocks)


def layer_id(name: str, depth: int) -> int:
    """The layer of parameter ``name`` in a model of ``depth`` encoder blocks, for layer-wise decay.

    0: the embeddings (patch projection, [CLS], distillation token, positions; CCT's tokenizer);
    i + 1: ``encoder.blocks.{i}.*``; depth + 1: the rest, the head (final LayerNorm, pooling, classifiers).
    """
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return 0 if name.startswith(EMBEDDING_PREFIXES) else depth + 1


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only; with ``layer_decay``, a learning rate per layer.

    Decaying biases, LayerNorm gains, the [CLS] (and DeiT's distillation) token, position
    embeddings or Swin's relative position bias tables pulls them towards 0 for no benefit
    (timm and nanoGPT exclude them too).
    With ``layer_decay`` R (BEiT, MAE, timm), the groups are split by layer too (``layer_id``):
    layer l of depth + 2 gets ``lr_scale`` R**(depth + 1 - l), so the head trains at the full rate
    and the layers nearer the input, whose pretrained features are the most general, change least.
    The training loop sets each group's lr to ``learning_rate_at(step) * lr_scale``.
    Parameters that do not require grad (``freeze_backbone``) are left out.
    """
    no_decay_names = {"cls_token", "distillation_token", "position_embeddings", "relative_position_bias_table"}
    depth = encoder_depth(model) if train.layer_decay is not None else 0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}  # (layer, not decayed) -> group
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.ndim >= 2 and name.rsplit(".", 1)[-1] not in no_decay_names
        layer = layer_id(name, depth) if train.layer_decay is not None else 0
        scale = train.layer_decay ** (depth + 1 - layer) if train.layer_decay is not None else 1.0
        group = groups.setdefault((layer, not is_matrix), {
            "params": [], "weight_decay": train.weight_decay if is_matrix else 0.0,
            "lr_scale": scale, "lr": train.learning_rate * scale})
        group["params"].append(param)
    return torch.optim.AdamW([groups[key] for key in sorted(groups)], lr=train.learning_rate, betas=(0.9, 0.999))


def drop_path_override(train: TrainConfig, config_class: type, model_name: str) -> dict[str, float]:
    """The model config change ``--drop-path P`` asks for: ``{"drop_path_rate": P}``, or {} when unset.

    A VitcraftError naming ``model_name`` when ``config_class`` has no stochastic depth (CCT, the CNNs).
    """
    if train.drop_path is None:
        return {}
    if "drop_path_rate" not in config_class.field_names():
        raise VitcraftError(f"--drop-path sets the model's drop_path_rate, and {model_name} ({config_class.__name__}) "
                            f"has no stochastic depth; the ViT, DeiT and Swin presets have it")
    return {"drop_path_rate": train.drop_path}


# what `vitcraft pretrain` does not take, with the value that means "off": each needs labels or a classifier
PRETRAINING_OFF = {"teacher": None, "freeze": "none", "label_smoothing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
                   "layer_decay": None, "ema": None, "progressive_sizes": None}


def check_pretraining(run: RunConfig) -> None:
    """A VitcraftError naming the settings a pretraining run (``run.pretrain``) was given and cannot use."""
    given = [name for name, off in PRETRAINING_OFF.items() if getattr(run.train, name) != off]
    given += ["labels_per_class"] if run.data.labels_per_class is not None else []
    if given:
        raise VitcraftError(f"vitcraft pretrain learns from the images alone, without labels or a classifier, so it "
                            f"does not take {', '.join(given)}; fine-tune with them afterwards "
                            f"(vitcraft train --init RUN_DIR)")


def masked_autoencoder(model: nn.Module, run: RunConfig, preset: str) -> MaskedAutoencoder:
    """The ViT ``model`` inside a masked autoencoder for ``vitcraft pretrain``. Its classifier, which pretraining
    does not use, is frozen: left out of the optimizer, and not waited for by DistributedDataParallel."""
    try:
        autoencoder = MaskedAutoencoder(model, run.pretrain)
    except ValueError as error:
        raise VitcraftError(f"model preset {preset!r}: {error}") from None
    autoencoder.encoder.classifier.requires_grad_(False)
    return autoencoder


def resolve_model_config(run: RunConfig, train_set: ImageTensorDataset, image_size: int | None = None):
    """The preset's config with the data's image size, channels and classes, then the user's overrides.

    ``image_size``: the model's input size, the test split's (with ``crop_pct`` the training
    images are larger, and cropped to it); None: the training split's.
    ``--drop-path`` (``run.train.drop_path``) sets the config's ``drop_path_rate`` last.
    """
    image_size = image_size or train_set.image_size
    from_data = {"image_size": image_size, "num_channels": train_set.num_channels,
                 "num_classes": len(train_set.class_names)}
    recipe = drop_path_override(run.train, get_preset(run.preset).config_class, f"model preset {run.preset!r}")
    try:
        return preset_config(run.preset, **{**from_data, **run.model, **recipe})
    except ValueError as error:
        raise VitcraftError(
            f"model preset {run.preset!r} does not fit the data ({image_size}x{image_size}, "
            f"{train_set.num_channels} channels): {error}. Set --image-size or a model override") from None


def normalization_for(run: RunConfig, channels: int, source: Pretrained | None = None) -> Normalization:
    """The user's mean and std, else the source model's (ImageNet's for timm and Hugging Face models),
    else the tutorial's 0.5 per channel."""
    from_source = source_normalization(source, channels) if source else None
    if run.data.mean is None and run.data.std is None and from_source:
        return Normalization(tuple(from_source[0]), tuple(from_source[1]))
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

    def all_reduce_sum(self, values: torch.Tensor) -> list[float]:
        """``values`` (1-D, on this rank's device) summed over the ranks, read to the host."""
        if self.world_size > 1:
            dist.all_reduce(values)
        return values.tolist()

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

    def local_main_first(self, action: Callable[[], Any]) -> Any:
        """``action()`` on every rank, local rank 0 of each machine first and the others after it.

        For the decode cache: one rank per machine builds it while the others
        wait, then they read what it wrote. A VitcraftError on a local rank 0 is
        raised on every rank, as in ``run_on_main``.
        """
        if self.world_size == 1:
            return action()
        result, message = None, None
        if self.local_rank == 0:
            try:
                result = action()
            except VitcraftError as error:
                message = str(error)
        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, message)  # also what the other ranks wait at
        failed = next((text for text in messages if text is not None), None)
        if failed is not None:
            raise VitcraftError(failed)
        return result if self.local_rank == 0 else action()


ON_DEVICE_BYTES = 2 * 1024**3  # splits up to this size (decoded) are copied to an accelerator whole


def fits_on_device(*splits: ImageTensorDataset) -> bool:
    """Whether the splits are copied to an accelerator whole: small ones, in memory or cached, not streamed."""
    return all(isinstance(split.images, torch.Tensor) for split in splits) and \
        sum(split.nbytes for split in splits) <= ON_DEVICE_BYTES


def log_skipped(log: Callable[[str], None], where: str, errors: list[str], shown: int = 3) -> None:
    """Say how many unreadable images ``--skip-bad-images`` left out of ``where``, naming the first ``shown``."""
    more = f" and {len(errors) - shown} more" if len(errors) > shown else ""
    log(f"skipped {len(errors)} unreadable image(s) of {where} (--skip-bad-images): "
        f"{'; '.join(errors[:shown])}{more}")


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
def _sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the sums kept on the device: float64, so counts stay exact; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def flip_averaged(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Test-time flip averaging: log of the mean of the class probabilities of each image and of its mirror image.

    Logs of probabilities are logits (softmax gives the probabilities back), so losses and top-k work unchanged.
    In: (B, C, H, W) normalised images. Out: (B, num_classes) float32.
    """
    logits, _ = model(images)
    mirrored, _ = model(images.flip(-1))  # left-right, as training's random flips
    log_probs = torch.stack((logits.float().log_softmax(-1), mirrored.float().log_softmax(-1)))  # (2, B, classes)
    return torch.logsumexp(log_probs, dim=0) - math.log(2)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageTensorDataset, normalization: Normalization,
             device: torch.device, dtype: torch.dtype | None, batch_size: int = TrainConfig.eval_batch_size, *,
             ddp: Distributed = Distributed(), progress: bool = False, flip: bool = False) -> dict[str, Any]:
    """Loss, top-1, top-5 and per-class accuracy on a whole split (sharded across ranks).

    Returns fractions in [0, 1]; ``predictions`` holds this rank's top-1 guesses
    in dataset order (rank 0 of 1: all of them). ``flip``: each image's
    prediction averages it with its mirror image's (``flip_averaged``).
    """
    model.eval()
    num_classes = len(dataset.class_names)
    order = torch.arange(len(dataset))[ddp.rank::ddp.world_size]
    # summed on the device and read once: reading per batch would wait for every batch to finish
    totals = torch.zeros(3, dtype=_sum_dtype(device), device=device)  # loss, top-1 hits, top-5 hits
    class_correct = torch.zeros(num_classes, dtype=totals.dtype, device=device)
    class_total = torch.zeros_like(class_correct)
    predictions = []
    batches = iterate_batches(dataset, order, batch_size, prefetch=True, transform=lambda x: pinned(x, device))
    for images, labels in tqdm(batches, total=math.ceil(len(order) / batch_size), desc="evaluate",
                               leave=False, disable=not (progress and ddp.is_main and sys.stderr.isatty())):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = flip_averaged(model, normalization(images)) if flip else model(normalization(images))[0]
        logits = logits.float()
        top = logits.topk(min(5, num_classes), dim=1).indices
        hit1 = top[:, 0] == labels
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += hit1.sum()
        totals[2] += (top == labels[:, None]).any(1).sum()
        # index_add_ rather than bincount, which reads the largest label back to size its output
        class_total.index_add_(0, labels, torch.ones(len(labels), dtype=totals.dtype, device=device))
        class_correct.index_add_(0, labels, hit1.to(totals.dtype))
        predictions.append(top[:, 0])
    sums = ddp.all_reduce_sum(torch.cat([totals, class_correct, class_total]))
    per_class_correct, per_class_total = sums[3:3 + num_classes], sums[3 + num_classes:]
    count = sum(per_class_total)
    return {
        "loss": sums[0] / count, "acc": sums[1] / count, "top5": sums[2] / count,
        "per_class_acc": [hits / max(total, 1) for hits, total in zip(per_class_correct, per_class_total)],
        "predictions": torch.cat(predictions).cpu() if predictions else torch.empty(0, dtype=torch.long),
    }


EVAL_MASK_SEED = 0  # evaluation hides the same patches of each test image every epoch: comparable losses


@torch.no_grad()
def evaluate_reconstruction(model: MaskedAutoencoder, dataset: ImageTensorDataset, normalization: Normalization,
                            device: torch.device, dtype: torch.dtype | None,
                            batch_size: int = TrainConfig.eval_batch_size, *, ddp: Distributed = Distributed(),
                            progress: bool = False) -> dict[str, Any]:
    """A masked autoencoder's masked-patch loss on a whole split (sharded across ranks): ``{"loss": mean}``.

    Each image's mask is drawn from a generator seeded with ``EVAL_MASK_SEED``, by its index in the split, so
    every epoch (and rank count) hides the same patches.
    """
    model.eval()
    order = torch.arange(len(dataset))[ddp.rank::ddp.world_size]
    noise = torch.rand(len(dataset), model.encoder.config.num_patches,
                       generator=torch.Generator().manual_seed(EVAL_MASK_SEED))  # (N, L)
    totals = torch.zeros(2, dtype=_sum_dtype(device), device=device)  # loss * images, images
    batches = iterate_batches(dataset, order, batch_size, prefetch=True, transform=lambda x: pinned(x, device))
    for start, (images, _) in zip(range(0, len(order), batch_size),
                                  tqdm(batches, total=math.ceil(len(order) / batch_size), desc="evaluate", leave=False,
                                       disable=not (progress and ddp.is_main and sys.stderr.isatty()))):
        images = images.to(device, non_blocking=True)
        with autocast(device, dtype):
            loss, _, _ = model(normalization(images), noise[order[start:start + batch_size]].to(device))
        totals[0] += loss.float() * len(images)
        totals[1] += len(images)
    loss_sum, count = ddp.all_reduce_sum(totals)
    return {"loss": loss_sum / count}


def evaluate_run(t: "Training", model: nn.Module, dataset: ImageTensorDataset | None = None,
                 progress: bool = False, ddp: Distributed | None = None) -> dict[str, Any]:
    """``evaluate`` (a classifier) or ``evaluate_reconstruction`` (pretraining) of ``model`` on the run's test
    split, or on ``dataset``, sharded across the run's ranks (or ``ddp``'s)."""
    measure = evaluate_reconstruction if t.run.pretrain is not None else evaluate
    return measure(model, dataset or t.test_set, t.normalization, t.device, t.dtype, t.cfg.eval_batch_size,
                   ddp=ddp or t.ddp, progress=progress)


# ------------------------------------------------------------------- train
@dataclass
class Training:
    """What ``set_up`` built for a run, and how far the run has got (``step``, ``history``)."""

    run: RunConfig
    out_dir: Path
    ddp: Distributed
    device: torch.device
    dtype: torch.dtype | None  # autocast's; None: fp32
    train_set: ImageTensorDataset
    test_set: ImageTensorDataset
    normalization: Normalization
    model: nn.Module
    ddp_model: nn.Module  # what the loop calls: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # a no-op unless fp16
    augment: BatchAugment
    extra: DeiTAugment  # RandAugment, random erasing, MixUp/CutMix
    distiller: Distiller | None  # with a teacher: the loss
    local_batch: int  # this rank's share of the global batch
    steps_per_epoch: int
    total_steps: int  # where the schedule ends: all epochs' steps, or max_steps if fewer
    metadata: dict[str, Any]  # saved with the weights: model config, classes, normalisation
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl records so far
    start_epoch: int = 0
    step: int = 0  # optimizer steps taken
    ema: ModelEma | None = None  # the weights' moving average (--ema)
    started: float = 0.0  # time.perf_counter() when this process began the run
    elapsed_before: float = 0.0  # seconds the run took before this process resumed it
    deadline: Deadline | None = None  # --budget: when the run must have ended
    stopped_early: bool = False  # the deadline came before the planned steps had run

    @property
    def cfg(self) -> TrainConfig:
        return self.run.train


def saved_model(t: Training) -> nn.Module:
    """The model whose weights model.safetensors holds: the EMA if the last epoch's record chose it, else the
    raw one."""
    chose_ema = t.history and t.history[-1].get("saved") == "ema"
    return t.ema.module if t.ema is not None and chose_ema else t.model


@dataclass
class EpochSums:
    """One epoch's training totals over all ranks, and what the epoch's record needs besides."""

    loss_sum: float  # sum over images of the batch-mean loss
    correct: float  # top-1 hits on the un-mixed labels
    seen: float  # images
    lr: float  # of the epoch's last step
    image_size: int  # of the training images (progressive resizing)
    started: float  # time.perf_counter() at the epoch's start
    train_seconds: float


# ------------------------------------------------------------------ budget
CALIBRATION_STEPS = 4  # timed after one more that warms up (allocations, the libraries' choice of kernels)


def calibrate(t: Training) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluation of the test split) of this run, measured on copies.

    The steps train a copy of the model with its own optimizer on the run's
    first batches, under forked random generators, so the run itself starts
    exactly as it would without a budget; the evaluation runs on a part of the
    test split, scaled up. Under torchrun the ranks' figures are averaged, so
    that every rank plans alike. With progressive resizing each size is timed
    and the step's seconds are their mean: the epochs, and so the steps, are
    split evenly between the sizes (``progressive_size``).
    """
    model = copy.deepcopy(t.model)
    trial = dataclasses.replace(t, model=model, ddp_model=model, optimizer=build_optimizer(model, t.cfg), ema=None,
                                scaler=grad_scaler(t.device, t.dtype))
    order = epoch_indices(len(t.train_set), t.cfg.seed, 0, rank=t.ddp.rank, world_size=t.ddp.world_size)
    generator = torch.Generator().manual_seed(0)
    sizes = t.cfg.progressive_sizes or [t.test_set.image_size]
    size_seconds = {}  # image size -> seconds per step
    with torch.random.fork_rng(devices=rng_devices(t.device)):
        model.train()
        for size in dict.fromkeys(sizes):
            seconds = []
            for images, labels in iterate_batches(t.train_set, order[:(CALIBRATION_STEPS + 1) * t.local_batch],
                                                  t.local_batch):
                started = time.perf_counter()
                images = t.augment(images, generator, t.extra.image_policy)
                train_step(trial, images, labels, t.cfg.learning_rate, generator, size)
                synchronize(t.device)
                seconds.append(time.perf_counter() - started)
            size_seconds[size] = statistics.median(seconds[1:] or seconds)  # the first warmed up
        part = min(len(t.test_set), 2 * t.cfg.eval_batch_size)
        subset = ImageTensorDataset(t.test_set.images[:part], t.test_set.labels[:part], t.test_set.class_names)
        started = time.perf_counter()
        evaluate_run(t, model, subset, ddp=Distributed())  # this rank's part alone
        synchronize(t.device)
        # each rank evaluates its share of the split
        eval_seconds = (time.perf_counter() - started) * len(t.test_set) / part / t.ddp.world_size
    step_seconds = statistics.fmean(size_seconds[size] for size in sizes)  # a repeated size counts each time
    figures = t.ddp.all_reduce_sum(torch.tensor([step_seconds, eval_seconds], dtype=torch.float64, device=t.device))
    return figures[0] / t.ddp.world_size, figures[1] / t.ddp.world_size


def _after_last_epoch(eval_seconds: float, figures: bool) -> float:
    """What a run does after its last epoch's evaluation: the figures, which evaluate the test split once more."""
    return eval_seconds + FIGURE_SECONDS if figures else 0.0


def plan_budget(t: Training, started: float, figures: bool, log: Callable[[str], None]) -> None:
    """Fit a new run to its ``--budget``, counted from ``started``: plan its steps, set its epochs, max_steps and
    deadline (``budget.plan``), and log the plan."""
    step_seconds, eval_seconds = calibrate(t)
    final = _after_last_epoch(eval_seconds, figures)
    available = duration_seconds(t.cfg.budget) - (time.perf_counter() - started)
    planned = plan(available, step_seconds, eval_seconds, t.steps_per_epoch, final)
    steps = min(planned.steps, t.cfg.max_steps or planned.steps)
    t.run = dataclasses.replace(t.run, train=dataclasses.replace(
        t.cfg, epochs=math.ceil(steps / t.steps_per_epoch), max_steps=steps))  # run.json records the plan
    t.total_steps = steps
    t.deadline = Deadline(available, step_seconds, eval_seconds + final)
    log(planned.line() + (f"; capped at --max-steps {steps:,}" if steps < planned.steps else ""))


def resume_budget(t: Training, figures: bool) -> None:
    """The deadline of a resumed run: its budget less the time it took until its last epoch ended, from now.

    Its plan (epochs, max_steps) is in its run.json; the seconds per step and per evaluation come from its last
    epoch's record.
    """
    last = t.history[-1] if t.history else None
    step_seconds = last["train_seconds"] / max(1, min(t.steps_per_epoch, last["step"])) if last else 0.0
    eval_seconds = last["epoch_seconds"] - last["train_seconds"] if last else 0.0
    left = duration_seconds(t.cfg.budget) - t.elapsed_before - (time.perf_counter() - t.started)
    t.deadline = Deadline(left, step_seconds, eval_seconds + _after_last_epoch(eval_seconds, figures))


def set_up(run: RunConfig, out_dir: Path, *, resume: bool, overwrite: bool, figures: bool,
           log: Callable[[str], None], started: float | None = None) -> Training:
    """Everything a run trains with; a resumed run's state from its checkpoint, a new run's run.json.

    ``started``: when the run began (``time.perf_counter()``), where its ``--budget`` counts from (default: now).
    """
    started = time.perf_counter() if started is None else started
    cfg = run.train
    if run.pretrain is not None:
        check_pretraining(run)
    ddp, device = _setup_distributed(cfg)
    ddp.run_on_main(lambda: runs.prepare_run_dir(out_dir, resume=resume, overwrite=overwrite))
    torch.manual_seed(cfg.seed)

    source = None
    if run.init:  # first: a missing source fails before any data loads
        # resumed, the run starts from its own saved model (the checkpoint then restores the weights), so its
        # shape, classes and normalisation are those it started with, even if the source has changed or gone
        own = resume and (out_dir / runs.MODEL_META_FILE).is_file()
        source = read_source(out_dir if own else run.init)
    # the source's model decides the input size unless --image-size does: the data is resized to it
    image_size = run.data.image_size or (source.config.image_size if source else None)
    # evaluation's crop; by default 1.0, the shorter side at the model's size: no image is squashed
    crop_pct = run.data.crop_pct or (source.metadata.get("crop_pct") if source else None) or 1.0
    cache_dir = Path(run.data.cache_dir) if run.data.cache_dir else None
    train_set, test_set = ddp.local_main_first(lambda: load_splits(  # one decode per machine
        run.data.data, Path(run.data.data_root) if run.data.data_root else None, image_size, cache_dir,
        crop_pct=crop_pct, stream=not run.data.cache, skip_bad_images=run.data.skip_bad_images,
        workers=run.data.workers or available_cpus(), log=log if ddp.is_main else lambda _: None))
    if run.data.labels_per_class is not None:
        train_set = per_class_subset(train_set, run.data.labels_per_class, cfg.seed)
    normalization = normalization_for(run, train_set.num_channels, source)
    if device.type != "cpu" and fits_on_device(train_set, test_set):  # no copies per batch
        train_set, test_set = train_set.to(device), test_set.to(device)
    distiller = None
    if cfg.teacher:  # loaded before the student is seeded, and checked before anything is trained
        teacher = load_teacher(cfg.teacher, train_set.class_names, train_set.num_channels, normalization, device)
        teacher.dtype = autocast_dtype(device, runs.load_run_config(cfg.teacher).train.precision)  # its own precision
        distiller = Distiller(teacher, cfg.distillation, cfg.distill_alpha, cfg.distill_tau, cfg.label_smoothing)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    init_report, preset = None, source.preset if source else run.preset  # with --init, the source's model class
    if source is not None:
        overrides = {**run.model, **drop_path_override(cfg, type(source.config), source.preset)}
        model, init_report = model_for_data(source, train_set.class_names, test_set.image_size,
                                            train_set.num_channels, **overrides)
        model_config = model.config
        model = model.to(device)
    else:
        model_config = resolve_model_config(run, train_set, image_size=test_set.image_size)
        model = get_preset(preset).builder(model_config).to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if cfg.progressive_sizes:
        check_progressive_sizes(cfg.progressive_sizes, test_set.image_size)
        allow_image_sizes(model, cfg.progressive_sizes, preset)
    num_parameters = count_parameters(model)  # all of them: before freezing, which leaves the head's trainable
    if run.pretrain is not None:
        model = masked_autoencoder(model, run, preset).to(device)
    if cfg.freeze == "backbone":  # before the optimizer, which leaves frozen weights out
        freeze_backbone(model)
    optimizer = build_optimizer(model, cfg)
    ema = ModelEma(model, cfg.ema) if cfg.ema is not None else None  # resumed: the checkpoint's
    dtype = autocast_dtype(device, cfg.precision)
    augment, extra = build_augmentations(cfg, normalization, len(train_set.class_names),
                                         output_size=test_set.image_size)

    local_batch = cfg.batch_size // ddp.world_size
    shard = epoch_indices(len(train_set), cfg.seed, 0, shuffle=False, rank=ddp.rank, world_size=ddp.world_size)
    steps_per_epoch = math.ceil(len(shard) / local_batch)  # every epoch's shard has this length, padded alike
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    metadata = {
        "model_config": model_config.to_dict(), "preset": preset,
        "class_names": train_set.class_names, "mean": list(normalization.mean), "std": list(normalization.std),
        "crop_pct": crop_pct,
        "num_parameters": num_parameters,
        **({"pretraining": dataclasses.asdict(run.pretrain)} if run.pretrain is not None else {}),
    }
    skipped = {"train": train_set.skipped, "test": test_set.skipped}
    skipped = {"skipped_images": skipped} if any(skipped.values()) else {}  # --skip-bad-images left these out
    t = Training(run=run, out_dir=out_dir, ddp=ddp, device=device, dtype=dtype, train_set=train_set,
                 test_set=test_set, normalization=normalization, model=model, ddp_model=model,
                 optimizer=optimizer, scaler=grad_scaler(device, dtype), augment=augment, extra=extra,
                 distiller=distiller, local_batch=local_batch, steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps, metadata=metadata, ema=ema, started=started)
    if cfg.budget is not None and not resume:  # before run.json, which records the plan
        plan_budget(t, started, figures, log if ddp.is_main else lambda _: None)
    if t.cfg.warmup_fraction is not None:  # now that the steps are known
        t.run = dataclasses.replace(t.run, train=dataclasses.replace(
            t.cfg, warmup_fraction=None, warmup_steps=math.ceil(t.cfg.warmup_fraction * t.total_steps)))
    if resume:
        state = ckpt.load_checkpoint(out_dir, model, optimizer, t.scaler, ema)
        t.start_epoch, t.step, t.history = state["epoch"], state["step"], state["history"]
        # older records have no elapsed_seconds: their epochs' own time
        t.elapsed_before = t.history[-1].get("elapsed_seconds", sum(r["epoch_seconds"] for r in t.history)) \
            if t.history else 0.0
        if cfg.budget is not None:
            resume_budget(t, figures)
        if ddp.is_main:
            # a kill between the checkpoint and the files after it leaves those a step behind:
            # bring them back in line with the checkpoint (also when no epoch is left to run)
            runs.write_metrics(out_dir, t.history)
            runs.save_model(out_dir, saved_model(t), metadata)
            log(f"resuming {out_dir} after epoch {t.start_epoch} (step {t.step})")
    elif ddp.is_main:
        init = {"init": init_report.to_dict()} if init_report else {}
        atomic_write_json(out_dir / runs.RUN_CONFIG_FILE, {"run": t.run.to_dict(), **metadata, **skipped, **init})
    if ddp.is_main:
        for split, errors in skipped.get("skipped_images", {}).items():
            log_skipped(log, f"the {split} split", errors)
        for line in init_report.lines() if init_report and not resume else []:
            log(line)
        model_name = f"{metadata['preset']} from {run.init}" if run.init else run.preset
        model_name += f" ({metadata['num_parameters']:,} parameters)"
        if run.pretrain is not None:
            model_name += (f" as a masked autoencoder (mask ratio {run.pretrain.mask_ratio}, decoder of "
                           f"{count_parameters(model.decoder):,} parameters)")
        log(f"{'pre' if run.pretrain else ''}training {model_name} on {run.data.data}: "
            f"{len(train_set):,} train / {len(test_set):,} test images, {test_set.image_size}x"
            f"{test_set.image_size}x{train_set.num_channels}, {len(train_set.class_names)} classes; "
            f"device {device}, precision {dtype or torch.float32}, {torch.get_num_threads()} threads, "
            f"{ddp.world_size} rank(s)")
        if figures and not resume:
            from vitcraft.plots import draw_samples

            draw_samples(out_dir / "samples.png", train_set, augment, train_set.class_names, cfg.seed)
    if ddp.world_size > 1:
        t.ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return t


def _raise_if_diverged(loss_sum: float, first_step: int, last_step: int, epoch: int, out_dir: Path) -> None:
    """Stop with advice if the summed loss of steps ``first_step``..``last_step`` (1-based) is not finite.

    The loss is read only every few steps, so the step that diverged is known to lie in that range.
    """
    if math.isfinite(loss_sum):
        return
    first_step = min(first_step, last_step)  # another rank's loss may have turned first
    where = f"at step {last_step}" if first_step == last_step else f"between steps {first_step} and {last_step}"
    raise VitcraftError(
        f"the loss became {loss_sum} {where} (epoch {epoch + 1}): training diverged. "
        f"Try a lower --lr, --grad-clip 1.0 or --precision fp32; the last good checkpoint in "
        f"{out_dir} is kept (--resume continues from it)")


def train_step(t: Training, images: torch.Tensor, labels: torch.Tensor, lr: float, mixer: torch.Generator,
               image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step at learning rate ``lr`` on a batch augmented on the CPU; (loss, logits, labels on the device).
    A pretraining run (a masked autoencoder) has no logits: None.

    images: normalised float (B, C, H, W), resized to ``image_size`` (progressive resizing) on the device, then
    erased and mixed (drawing from ``mixer``); labels: (B,) int64.
    """
    cfg, device = t.cfg, t.device
    for group in t.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # --layer-decay's scale; a checkpoint's groups may lack it
    images = resize_batch(images.to(device, non_blocking=True), image_size)  # a no-op at the data's size
    labels = labels.to(device, non_blocking=True)
    images, targets = t.extra.erase_and_mix(images, labels, mixer)  # targets: labels or (B, K)
    with autocast(device, t.dtype):
        if t.distiller is not None:
            loss, logits = t.distiller(t.ddp_model, images, targets)
        elif t.run.pretrain is not None:  # a masked autoencoder: no labels, no logits
            loss, logits = t.ddp_model(images)[0], None
        else:
            logits, _ = t.ddp_model(images)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    if cfg.grad_clip:
        t.scaler.unscale_(t.optimizer)
        nn.utils.clip_grad_norm_(t.model.parameters(), cfg.grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    if t.ema is not None:
        t.ema.update(t.model)
    return loss, logits, labels


def _out_of_time(t: Training, board: TensorBoardLog, vote: bool = True) -> bool:
    """Whether the budget's deadline says stop now. Under torchrun every rank must stop at the same step, so the
    ranks vote, and only where ``vote`` says (a vote waits for every rank: every ``board.step_every`` steps);
    each vote then asks whether the steps until the next one still fit."""
    if t.ddp.world_size == 1:
        return t.deadline.must_stop()
    if not vote:
        return False
    late = t.deadline.must_stop(steps=board.step_every)
    return t.ddp.all_reduce_sum(torch.tensor([float(late)], device=t.device))[0] > 0


def train_one_epoch(t: Training, epoch: int, board: TensorBoardLog, show_bar: bool) -> EpochSums:
    """Train epoch ``epoch`` (0-based), or until ``t.total_steps``; its sums over all ranks.

    The sums stay on the device: reading one (``.item()``) waits for every queued
    step to finish, a stall per step on a GPU. They are read every
    ``board.step_every`` steps (progress bar, TensorBoard, divergence check) and
    once at the end.
    """
    cfg, ddp, device = t.cfg, t.ddp, t.device
    t.ddp_model.train()
    started = time.perf_counter()
    order = epoch_indices(len(t.train_set), cfg.seed, epoch, shuffle=True, rank=ddp.rank, world_size=ddp.world_size)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "augment", epoch, ddp.rank))
    # erasing and mixing draw in this thread while the prefetch thread augments the next batch: a stream of their own
    mixer = torch.Generator().manual_seed(derive_seed(cfg.seed, "mix", epoch, ddp.rank))
    # every rank seeded the global RNG alike for equal initial weights; its own seed per rank
    # gives the ranks different dropout masks, and per epoch a resume the same masks
    torch.manual_seed(derive_seed(cfg.seed, "dropout", epoch, ddp.rank))
    # the model's input size: with crop_pct the training images are larger, and cropped to it
    image_size = progressive_size(cfg.progressive_sizes, epoch, cfg.epochs, t.test_set.image_size)
    sums = torch.zeros(2, dtype=_sum_dtype(device), device=device)  # loss * images, top-1 hits
    seen, checked_step, lr = 0, t.step, learning_rate_at(t.step, cfg, t.total_steps)
    steps = min(t.steps_per_epoch, t.total_steps - t.step)  # max_steps may end the run inside this epoch
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show_bar, dynamic_ncols=True)

    def augment(images: torch.Tensor) -> torch.Tensor:
        return pinned(t.augment(images, generator, t.extra.image_policy), device)

    # a background thread reads the next batch while this one trains. On an accelerator it augments it too: the
    # CPU waits for the device anyway. Not on the CPU, where its work would take cores from the step's own
    # threads (benchmarks/pipeline.py), nor with RandAugment, which seeds torch's global generator, the one
    # dropout draws from in this thread
    in_background = device.type != "cpu" and cfg.auto_augment is None
    batches = iterate_batches(t.train_set, order[:steps * t.local_batch], t.local_batch, prefetch=True,
                              transform=augment if in_background else None)
    for images, labels in batches:
        # --budget: stop, evaluate and save; the ranks vote where they read their sums anyway
        if t.deadline is not None and seen and _out_of_time(t, board, vote=t.step % board.step_every == 0):
            t.stopped_early = True
            break
        images = images if in_background else augment(images)
        lr = learning_rate_at(t.step, cfg, t.total_steps)
        loss, logits, labels = train_step(t, images, labels, lr, mixer, image_size)
        t.step += 1
        sums[0] += loss.detach() * len(labels)
        if logits is not None:
            sums[1] += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        bar.update(1)
        if t.step % board.step_every == 0:
            batch_loss, loss_sum = torch.stack([loss.detach().to(sums.dtype), sums[0]]).tolist()
            _raise_if_diverged(loss_sum, checked_step + 1, t.step, epoch, t.out_dir)
            checked_step = t.step
            board.log_step(t.step, batch_loss, lr)
            if show_bar:
                bar.set_postfix(loss=f"{batch_loss:.3f}", lr=f"{lr:.2e}",
                                img_s=f"{seen * ddp.world_size / (time.perf_counter() - started):.0f}")
    bar.close()
    train_seconds = time.perf_counter() - started
    loss_sum, correct, seen = ddp.all_reduce_sum(torch.cat([sums, sums.new_tensor([seen])]))
    _raise_if_diverged(loss_sum, checked_step + 1, t.step, epoch, t.out_dir)
    return EpochSums(loss_sum, correct, seen, lr, image_size, started, train_seconds)


def end_of_epoch(t: Training, epoch: int, sums: EpochSums, board: TensorBoardLog,
                 log: Callable[[str], None], progress: bool) -> dict[str, Any]:
    """Evaluate, append the epoch's record; on rank 0 write checkpoint, weights and metrics, and log it.

    With ``--ema`` the average is evaluated too (``ema_test_*``) and the weights with the higher test
    accuracy are saved, the raw ones on a tie (``saved``: "ema" or "raw").
    """
    cfg = t.cfg
    result = evaluate_run(t, t.model, progress=progress)
    averaged = evaluate_run(t, t.ema.module, progress=progress) if t.ema is not None else None
    accuracy = {} if t.run.pretrain is not None else {  # a pretraining run has its loss alone
        "train_acc": sums.correct / sums.seen, "test_acc": result["acc"], "test_top5": result["top5"]}
    record = {
        "epoch": epoch + 1, "step": t.step, "train_loss": sums.loss_sum / sums.seen, "test_loss": result["loss"],
        **accuracy, "lr": sums.lr, "epoch_seconds": time.perf_counter() - sums.started,
        "train_seconds": sums.train_seconds, "images_per_second": sums.seen / sums.train_seconds,
        # since the run began, set-up included, over all its processes (a resumed run adds to it): what --budget spends
        "elapsed_seconds": t.elapsed_before + time.perf_counter() - t.started,
    }
    if cfg.progressive_sizes:
        record["image_size"] = sums.image_size
    if averaged is not None:
        record.update(ema_test_loss=averaged["loss"], ema_test_acc=averaged["acc"], ema_test_top5=averaged["top5"],
                      saved="ema" if averaged["acc"] > result["acc"] else "raw")
    t.history.append(record)
    if t.ddp.is_main:
        # the checkpoint first: a resume repairs the files after it (see set_up)
        ckpt.save_checkpoint(t.out_dir, t.model, t.optimizer, t.scaler,
                             {"epoch": epoch + 1, "step": t.step, "history": t.history}, t.ema)
        runs.save_model(t.out_dir, saved_model(t), t.metadata)
        runs.write_metrics(t.out_dir, t.history)
        log(_epoch_line(record, cfg.epochs))
        board.log_epoch(record)
        if t.run.pretrain is not None and t.run.pretrain.reconstruction_every_epoch:
            draw_reconstruction(t)
    return record


def draw_reconstruction(t: Training) -> None:
    """reconstruction.png of a pretraining run: its masked autoencoder on fixed test images."""
    from vitcraft.plots import draw_reconstructions

    draw_reconstructions(t.out_dir / runs.RECONSTRUCTION_FIGURE, t.model, t.test_set, t.normalization)


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    ema = (f"ema_test_acc {100 * record['ema_test_acc']:.2f}%  saved {record['saved']}  "
           if "saved" in record else "")
    accuracy = f"test_acc {100 * record['test_acc']:.2f}%  " if "test_acc" in record else ""
    return (f"epoch {record['epoch']}/{epochs}  train_loss {record['train_loss']:.4f}  "
            f"test_loss {record['test_loss']:.4f}  {accuracy}{ema}"
            f"lr {record['lr']:.2e}  {record['images_per_second']:.0f} img/s  {record['epoch_seconds']:.1f}s")


def train(run: RunConfig, out_dir: Path | str, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, figures: bool = True, log=print, tensorboard: bool = True) -> dict[str, Any]:
    """Train (or resume) a run into ``out_dir``; return its last metrics record.

    To resume, pass the run's own config (``runs.load_run_config(out_dir)``), with
    more epochs if it should train longer. With ``tensorboard`` (and the
    tensorboard package installed) scalars also go to ``out_dir/tensorboard``.
    Progress bars show only on a terminal.
    """
    t = set_up(run, Path(out_dir), resume=resume, overwrite=overwrite, figures=figures, log=log,
               started=time.perf_counter())
    board = TensorBoardLog(t.out_dir, enabled=tensorboard and t.ddp.is_main, resume_step=t.step)
    show_bar = progress and t.ddp.is_main and sys.stderr.isatty()
    try:
        for epoch in range(t.start_epoch, t.cfg.epochs):
            if t.step >= t.total_steps:  # max_steps
                break
            if t.deadline is not None and _out_of_time(t, board):  # --budget: no time for another epoch
                t.stopped_early = True
                break
            sums = train_one_epoch(t, epoch, board, show_bar)
            streamed = t.train_set.images
            if t.ddp.is_main and isinstance(streamed, StreamingImages) and streamed.skipped:
                log_skipped(log, f"the train split in epoch {epoch + 1}", sorted(streamed.skipped))
                streamed.skipped.clear()
            end_of_epoch(t, epoch, sums, board, log, progress)
            if t.stopped_early:
                break
    finally:
        board.close()  # keeps the steps logged before a divergence
    if t.stopped_early and t.ddp.is_main:
        log(f"the budget ran out after step {t.step:,} of the {t.total_steps:,} planned (the machine ran slower "
            f"than calibrated): stopped early, evaluated and saved")
    if t.ddp.is_main and figures:
        from vitcraft.plots import draw_run_figures, plot_curves

        lrs = [learning_rate_at(s, t.cfg, t.total_steps) for s in range(t.total_steps)]
        if t.run.pretrain is not None:
            plot_curves(t.history, lrs, t.out_dir / "curves.png")
            draw_reconstruction(t)
        else:
            draw_run_figures(t.out_dir, saved_model(t), t.test_set, t.normalization, t.history, lrs, t.device)
    if t.ddp.world_size > 1:
        dist.barrier()  # no rank tears the process group down while rank 0 still draws
    return t.history[-1] if t.history else {}
