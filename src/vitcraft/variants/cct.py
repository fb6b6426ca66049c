"""Compact Convolutional Transformer (Hassani et al. 2021): a CNN tokenizer and sequence pooling.

A ViT trained from scratch on a small dataset such as CIFAR-10 lags behind a
CNN: cutting the image into patches throws away the local structure that
convolutions exploit, and a large model overfits. CCT changes the two ends of
the ViT and keeps the transformer encoder in between:

* **Convolutional tokenizer.** Instead of one patch Conv2d, one or two layers
  of (Conv k x k, stride 1 -> ReLU -> MaxPool 3x3, stride 2) turn the image
  into a feature map; each position of the map becomes a token. The
  overlapping kernels give the tokens local context and the pooling halves
  the grid per layer (32x32 -> 16x16 tokens with one layer, 8x8 with two).
* **Sequence pooling instead of [CLS].** The encoder's output tokens are
  averaged with learned weights: softmax over the tokens of Linear(hidden -> 1),
  so the image vector is an attention-weighted mean. Those weights, one per
  token, show which parts of the image the classifier reads
  (``CCTForClassification.pooling_map``).

The encoder is vitcraft.model's Encoder of pre-LayerNorm Blocks, so every
attention backend works. Differences to the paper's code: its blocks apply a
LayerNorm to the residual stream between attention and MLP (ours are the plain
pre-LN blocks of vitcraft's ViT) and it uses stochastic depth 0.1 (ours have none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from vitcraft import ops
from vitcraft.config import DictConfig, ViTConfig, check_positive_ints
from vitcraft.model import Encoder
from vitcraft.variants.common import init_linear_and_layernorm

# The paper's pooling after each convolution: 3x3 windows, stride 2, padding 1, so a
# side s becomes ceil(s / 2).
POOL_KERNEL, POOL_STRIDE, POOL_PADDING = 3, 2, 1


@dataclass
class CCTConfig(DictConfig):
    """Every shape and regularisation choice of a :class:`CCTForClassification`.

    Defaults are the ``cct-7-3x1-32`` preset, the paper's CCT-7/3x1 for
    CIFAR: one 3x3 convolution (16x16 = 256 tokens from 32x32 images), 7
    blocks of width 256 with 4 heads and MLP ratio 2. The encoder fields mean
    what they mean in ViTConfig and are checked by it (``encoder_config``).
    """

    image_size: int = 32  # side of the (square) input image, in pixels
    num_channels: int = 3  # 3 for RGB, 1 for grayscale
    num_classes: int = 10  # width of the classifier output
    num_conv_layers: int = 1  # (conv, ReLU, max-pool) layers in the tokenizer; each halves the grid
    conv_kernel_size: int = 3  # kernel side of every tokenizer convolution (odd: "same" padding)
    conv_channels: int = 64  # width of the tokenizer's inner layers (the last one outputs hidden_size)
    hidden_size: int = 256  # width of every token vector
    num_hidden_layers: int = 7  # number of encoder blocks
    num_attention_heads: int = 4  # heads per attention layer; must divide hidden_size
    intermediate_size: int = 512  # hidden width of each block's MLP (ratio 2 in CCT)
    hidden_dropout_prob: float = 0.0  # dropout on embeddings, attention output and MLP output
    attention_probs_dropout_prob: float = 0.1  # dropout on the attention probabilities
    initializer_range: float = 0.02  # std of the truncated-normal init of Linear weights
    qkv_bias: bool = False  # CCT's query/key/value projection has no bias
    attention_backend: str = "sdpa"  # "sdpa", "fused" or "per_head", as in ViTConfig
    hidden_act: str = "gelu"  # exact GELU, as CCT
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise one ValueError naming the first bad field."""
        check_positive_ints(self, ("image_size", "num_channels", "num_classes", "num_conv_layers",
                                   "conv_kernel_size", "conv_channels"))
        if self.conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size must be odd (padding k // 2 then keeps the size), "
                             f"got {self.conv_kernel_size}")
        self.encoder_config()  # checks the encoder fields with ViTConfig's messages

    @property
    def grid_size(self) -> int:
        """Side of the token grid: each tokenizer layer's max-pool takes s to ceil(s / 2)."""
        side = self.image_size
        for _ in range(self.num_conv_layers):
            side = (side + 2 * POOL_PADDING - POOL_KERNEL) // POOL_STRIDE + 1
        return side

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    def encoder_config(self) -> ViTConfig:
        """The ViTConfig of the encoder: one 1x1 "patch" per token of the tokenizer's grid."""
        return ViTConfig(
            image_size=self.grid_size, patch_size=1, num_channels=self.num_channels, num_classes=self.num_classes,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            initializer_range=self.initializer_range, qkv_bias=self.qkv_bias,
            attention_backend=self.attention_backend, hidden_act=self.hidden_act, final_layernorm=True,
            layer_norm_eps=self.layer_norm_eps, pooling="mean")


def as_cct_config(config: CCTConfig | Mapping[str, Any]) -> CCTConfig:
    return config if isinstance(config, CCTConfig) else CCTConfig.from_dict(config)


class ConvTokenizer(nn.Module):
    """Images -> tokens through ``num_conv_layers`` x (Conv k x k, stride 1 -> ReLU -> MaxPool 3x3, stride 2).

    Inner layers have ``conv_channels`` channels, the last ``hidden_size``; the
    convolutions have no bias, as in CCT. Each position of the last feature map
    is one token, row-major.
    In: (B, C, H, W). Out: (B, g*g, hidden_size), g = ``config.grid_size``.
    """

    def __init__(self, config: CCTConfig):
        super().__init__()
        self.image_size, self.num_channels = config.image_size, config.num_channels
        widths = [config.num_channels] + [config.conv_channels] * (config.num_conv_layers - 1) + [config.hidden_size]
        layers = []
        for in_channels, out_channels in zip(widths, widths[1:]):
            layers += [nn.Conv2d(in_channels, out_channels, config.conv_kernel_size, stride=1,
                                 padding=config.conv_kernel_size // 2, bias=False),
                       nn.ReLU(),
                       nn.MaxPool2d(POOL_KERNEL, stride=POOL_STRIDE, padding=POOL_PADDING)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_channels or x.shape[-2:] != (self.image_size,) * 2:
            raise ValueError(f"expected images of shape (batch, {self.num_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        x = self.layers(x)  # (B, hidden, g, g)
        return x.flatten(2).transpose(1, 2)  # (B, g*g, hidden)


class SequencePooling(nn.Module):
    """Attention-weighted mean of the tokens, CCT's replacement for the [CLS] token.

    weights = softmax over tokens of Linear(hidden -> 1)(token); pooled = sum_i weights_i token_i.
    One learned scoring vector decides how much each token counts, so the
    pooled vector can favour the tokens on the object.
    In: (B, N, hidden). Out: (pooled (B, hidden), weights (B, N), each row summing to 1).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.attention = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.attention(x).squeeze(-1).softmax(dim=-1)  # (B, N)
        pooled = (weights.unsqueeze(1) @ x).squeeze(1)  # (B, 1, N) @ (B, N, hidden) -> (B, hidden)
        return pooled, weights


class CCTForClassification(nn.Module):
    """The whole CCT: conv tokenizer, position vectors, encoder, LayerNorm, sequence pooling, classifier.

    ``model(images)`` returns ``(logits, None)``;
    ``model(images, output_attentions=True)`` returns ``(logits, attentions)``
    with one (B, heads, N, N) tensor per block, N = g*g tokens (no [CLS]).
    ``pooling_map(images)`` gives the sequence-pooling weights as (B, g, g)
    maps for the attention figures.
    In: (B, num_channels, image_size, image_size). Out: logits (B, num_classes).
    """

    has_cls_token = False

    def __init__(self, config: CCTConfig | Mapping[str, Any]):
        super().__init__()
        self.config = as_cct_config(config)
        config = self.config
        self.tokenizer = ConvTokenizer(config)
        # learnable positions: the tokens are a fixed grid, as in the paper's CIFAR models
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_tokens, config.hidden_size))
        self.dropout = ops.Dropout(config.hidden_dropout_prob)
        self.encoder = Encoder(config.encoder_config())
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooling = SequencePooling(config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_classes)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """CCT's initialisation: truncated N(0, initializer_range) Linear weights, zero biases,
        unit LayerNorms, He-normal convolutions (they feed ReLUs), positions truncated N(0, 0.2)."""
        if init_linear_and_layernorm(module, self.config.initializer_range):
            return
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
        elif module is self:
            nn.init.trunc_normal_(self.position_embeddings, std=0.2)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass to save activation memory."""
        self.encoder.gradient_checkpointing = enable

    def forward_features(self, x: torch.Tensor, output_attentions: bool = False):
        """Images -> (pooled (B, hidden), pooling weights (B, N), attentions or None)."""
        tokens = self.dropout(self.tokenizer(x) + self.position_embeddings)  # (B, N, hidden)
        tokens, all_attentions = self.encoder(tokens, output_attentions)
        pooled, weights = self.pooling(self.final_layernorm(tokens))
        return pooled, weights, all_attentions

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        pooled, _, all_attentions = self.forward_features(x, output_attentions)
        return self.classifier(pooled), all_attentions

    def pooling_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, num_classes), sequence-pooling weights as maps (B, g, g)) of images x.

        Cell (r, c) is the weight of the token at grid row r, column c; each
        map sums to 1. This is what the classifier reads, the counterpart of a
        ViT's [CLS] attention.
        """
        pooled, weights, _ = self.forward_features(x)
        grid = self.config.grid_size
        return self.classifier(pooled), weights.view(-1, grid, grid)  # (B, g, g)
