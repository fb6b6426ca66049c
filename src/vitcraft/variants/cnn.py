"""Convolutional networks for small images: the teachers of DeiT-style distillation.

Two architectures behind one wrapper, ``ConvNetForClassification``, which
behaves like the vitcraft ViTs where the training loop, the checkpoints and
the CLI touch it: ``model(x)`` returns ``(logits, None)`` (a CNN has no
attention maps), ``model.config`` describes it, ``set_grad_checkpointing``
recomputes each stage in the backward pass.

- ``resnet18``: torchvision's ResNet-18 adapted to 32x32 inputs as is usual for
  CIFAR: a 3x3 stride-1 stem convolution instead of 7x7 stride 2, and no max
  pooling, so the four stages see 32, 16, 8 and 4 pixel maps (11.2M parameters).
- ``small``: a plain stack, fast on a CPU: a 3x3 conv-BN-ReLU stem of ``width``
  channels, then three stages of conv-BN-ReLU doubling the channels and 2x2
  max pooling, then global average pooling and a linear classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitcraft.config import DictConfig, check_choice, check_positive_ints

ARCHITECTURES = ("resnet18", "small")
SMALL_STAGES = 3  # conv-BN-ReLU-maxpool stages of the small network, each doubling the channels


@dataclass
class CNNConfig(DictConfig):
    """The shape of a :class:`ConvNetForClassification`."""

    arch: str = "small"  # "resnet18" (CIFAR-style ResNet-18) or "small" (see the module docstring)
    image_size: int = 32  # the training image size; convolutions accept any size, eval/predict resize to this
    num_channels: int = 3  # 3 for RGB, 1 for grayscale
    num_classes: int = 10  # width of the classifier output
    width: int = 32  # channels after the stem of the small network (ResNet-18's is fixed at 64)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise one ValueError naming the first bad field."""
        check_choice(self, "arch", ARCHITECTURES)
        check_positive_ints(self, ("image_size", "num_channels", "num_classes", "width"))
        if self.arch == "resnet18" and self.width != 64:
            raise ValueError(f"resnet18 has a fixed width of 64, got width={self.width}")


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (same padding, no bias: BatchNorm has one), BatchNorm, ReLU. (B, in, H, W) -> (B, out, H, W)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _small_parts(config: CNNConfig) -> tuple[nn.Module, list[nn.Module], int]:
    stem = conv_bn_relu(config.num_channels, config.width)
    widths = [config.width * 2 ** i for i in range(SMALL_STAGES + 1)]
    stages = [nn.Sequential(conv_bn_relu(a, b), nn.MaxPool2d(2)) for a, b in zip(widths, widths[1:])]
    return stem, stages, widths[-1]


def _resnet18_parts(config: CNNConfig) -> tuple[nn.Module, list[nn.Module], int]:
    from torchvision.models import resnet18

    net = resnet18(num_classes=config.num_classes)
    # the CIFAR stem: 3x3 stride 1 and no max pooling keep the 32x32 resolution for the first stage
    conv = nn.Conv2d(config.num_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits its stem
    stem = nn.Sequential(conv, net.bn1, net.relu)
    return stem, [net.layer1, net.layer2, net.layer3, net.layer4], net.fc.in_features


class ConvNetForClassification(nn.Module):
    """A CNN classifier with the ViTs' interface.

    In: (B, num_channels, H, W), any H and W (at least 8 for the small network,
    whose three poolings halve the maps). Out: (logits (B, num_classes), None).
    """

    has_cls_token = False  # no attention maps to draw (see attention_maps.attention_map_kind)

    def __init__(self, config: CNNConfig | Mapping[str, Any]):
        super().__init__()
        self.config = CNNConfig.from_dict(config)
        build = _resnet18_parts if self.config.arch == "resnet18" else _small_parts
        stem, stages, features = build(self.config)
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(features, self.config.num_classes)
        self.gradient_checkpointing = False
        # channels-last (NHWC) weights and activations: oneDNN's and cuDNN's fast convolution layout.
        # Module.to(device) keeps it.
        self.to(memory_format=torch.channels_last)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in the backward pass instead of storing its activations.

        BatchNorm layers then see each batch twice in training mode, which
        updates their running statistics twice per step (as with timm's
        checkpointed CNNs); the gradients are unchanged.
        """
        self.gradient_checkpointing = enable

    def set_dynamic_image_size(self, enable: bool = True) -> None:
        """Nothing to do: convolutions and global pooling take any image size."""

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        if x.ndim != 4 or x.shape[1] != self.config.num_channels:
            raise ValueError(f"expected images of shape (batch, {self.config.num_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        x = self.stem(x.contiguous(memory_format=torch.channels_last))  # (B, width, H, W), stored NHWC
        for stage in self.stages:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        logits = self.classifier(x.mean(dim=(-2, -1)))  # global average pool: (B, features) -> (B, K)
        return logits, None  # no attention maps, whatever output_attentions asks
