"""Distillation from a trained teacher (DeiT, Touvron et al. 2021): the losses and the frozen teacher.

The student's [CLS] head learns from the labels, its distillation head from
the teacher's predictions on the same augmented batch:

- hard: ``(1 - alpha) * CE(cls, y) + alpha * CE(dist, argmax teacher)``; with
  DeiT's alpha = 0.5 this is the paper's ``0.5 CE(cls, y) + 0.5 CE(dist, y_t)``.
- soft: ``(1 - alpha) * CE(cls, y) + alpha * tau^2 * KL(p_teacher || p_student)``
  with both distributions softmax(logits / tau) (Hinton et al.'s direction,
  as DeiT's code computes it). The KL is summed over classes and averaged
  over the batch, the paper's per-image KL; DeiT's code divides the sum by
  batch * classes instead, which is this value / K.

``y`` may be soft (MixUp/CutMix targets) and gets the run's label smoothing;
the teacher's targets get none. A student without a distillation token (a
plain ViT) distils through its one head: classic knowledge distillation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitcraft.augment import Normalization
from vitcraft.config import DISTILLATIONS
from vitcraft.errors import VitcraftError
from vitcraft.resize import resize_batch
from vitcraft.runs import load_trained_model
from vitcraft.state_dict import unwrap
from vitcraft.variants.deit import DeiTForClassification


def distillation_loss(cls_logits: torch.Tensor, distillation_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor, kind: str = "hard", alpha: float = 0.5, tau: float = 1.0,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """The DeiT loss (see the module docstring), a scalar.

    cls_logits, distillation_logits, teacher_logits: (B, K); targets: (B,)
    class indices or (B, K) distributions.
    """
    base = F.cross_entropy(cls_logits, targets, label_smoothing=label_smoothing)
    if kind == "hard":
        teacher_term = F.cross_entropy(distillation_logits, teacher_logits.argmax(dim=1))
    elif kind == "soft":
        teacher_term = tau ** 2 * F.kl_div(F.log_softmax(distillation_logits / tau, dim=1),
                                           F.log_softmax(teacher_logits / tau, dim=1),
                                           reduction="batchmean", log_target=True)
    else:
        raise VitcraftError(f"distillation must be one of {', '.join(DISTILLATIONS)}; got {kind!r}")
    return (1 - alpha) * base + alpha * teacher_term


@dataclass
class Teacher:
    """A trained model, frozen, that scores the student's batches.

    It takes the student's normalised batch and converts it to what the
    teacher was trained on: its own normalisation and image size, and runs it
    in its own precision: a CNN teacher trained in bf16 runs in bf16 under an
    fp32 student (on CPUs with bf16 units that is the faster precision), and
    an fp32 teacher stays fp32 under a bf16 student.
    """

    model: nn.Module
    normalization: Normalization  # the teacher's
    student_normalization: Normalization
    image_size: int
    dtype: torch.dtype | None = None  # the teacher's autocast dtype; None: fp32

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised student batch (B, C, H, W) -> teacher logits (B, K), float32."""
        if self.normalization != self.student_normalization:
            x = self.normalization(self.student_normalization.undo(x))
        x = resize_batch(x, self.image_size)
        # enabled=False switches off the student's autocast around an fp32 teacher
        with torch.autocast(x.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            return self.model(x)[0].float()


def load_teacher(run_dir: Path | str, class_names: list[str], num_channels: int,
                 student_normalization: Normalization, device: torch.device | str = "cpu") -> Teacher:
    """The frozen, eval-mode teacher of a run directory, checked against the student's data."""
    model, metadata = load_trained_model(run_dir, device)
    if metadata["class_names"] != list(class_names):
        raise VitcraftError(f"the teacher {run_dir} was trained on the classes {metadata['class_names']}, "
                            f"but this data has {list(class_names)}: distil from a teacher of the same classes")
    config = metadata["model_config"]
    if config["num_channels"] != num_channels:
        raise VitcraftError(f"the teacher {run_dir} takes {config['num_channels']}-channel images, "
                            f"but this data has {num_channels}")
    model.requires_grad_(False)
    return Teacher(model, Normalization(tuple(metadata["mean"]), tuple(metadata["std"])), student_normalization,
                   config["image_size"])


@dataclass
class Distiller:
    """The training loss with a teacher: ``distiller(student, images, targets)`` -> (loss, logits)."""

    teacher: Teacher
    kind: str = "hard"
    alpha: float = 0.5
    tau: float = 1.0
    label_smoothing: float = 0.0

    def __call__(self, student: nn.Module, images: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss (scalar) and the student's prediction (B, K) on normalised ``images`` (B, C, H, W).

        ``student`` may be wrapped in DistributedDataParallel: it is called, not
        its methods, so gradients still synchronise.
        """
        if isinstance(unwrap(student), DeiTForClassification):
            (cls_logits, distillation_logits), _ = student(images, return_both=True)
            cls_logits, distillation_logits = cls_logits.float(), distillation_logits.float()
            prediction = (cls_logits + distillation_logits) / 2  # what the model predicts at inference
        else:
            prediction = cls_logits = distillation_logits = student(images)[0].float()
        loss = distillation_loss(cls_logits, distillation_logits, self.teacher.logits(images), targets,
                                 self.kind, self.alpha, self.tau, self.label_smoothing)
        return loss, prediction
