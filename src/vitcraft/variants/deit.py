"""DeiT (Touvron et al. 2021): a ViT with a distillation token beside [CLS].

The distillation token is a second learned token in front of the patches,
with its own position vector. It passes through the same blocks as [CLS] and
has its own classifier head; in training that head learns from a teacher's
predictions (see distill.py) while the [CLS] head learns from the labels. At
inference the two heads' logits are averaged.

``model(x)`` always returns ``(averaged logits, attentions)``, in training
and eval mode alike, so the model trains with the plain loss and evaluates
like any vitcraft model; ``model(x, return_both=True)`` returns
``((cls_logits, distillation_logits), attentions)`` for the distillation loss.
A keyword argument rather than a separate method, so that it also goes
through DistributedDataParallel's forward.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from vitcraft.config import ViTConfig
from vitcraft.model import Embeddings, ViTForClassification, as_config


class DistilledEmbeddings(Embeddings):
    """Embeddings with a distillation token after [CLS]: [CLS], [DIST], patches.

    In: (B, C, H, W). Out: (B, 2 + num_patches, hidden_size).
    """

    num_prefix_tokens = 2  # [CLS] and the distillation token

    def __init__(self, config: ViTConfig | Mapping[str, Any]):
        super().__init__(config)
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, as_config(config).hidden_size))

    def prefix_tokens(self, batch_size: int) -> torch.Tensor:
        """(B, 2, hidden): [CLS] then the distillation token."""
        return torch.cat((self.cls_token, self.distillation_token), dim=1).expand(batch_size, -1, -1)


class DeiTForClassification(ViTForClassification):
    """A ViT with [CLS] and distillation tokens, each with its own linear head.

    ``forward(x)``: ((cls + distillation logits) / 2 (B, num_classes), attentions);
    ``forward(x, return_both=True)``: ((cls logits, distillation logits), attentions).
    Attention maps are (B, heads, 2 + g*g, 2 + g*g): token 0 is [CLS], token 1
    the distillation token.
    """

    num_prefix_tokens = DistilledEmbeddings.num_prefix_tokens  # for attention maps (timm's name)
    model_type = None  # the hub layout has no place for the distillation token and head

    def __init__(self, config: ViTConfig | Mapping[str, Any]):
        config = as_config(config)
        if config.pooling != "cls":
            raise ValueError(f"DeiT classifies its [CLS] and distillation tokens: pooling must be cls, "
                             f"got {config.pooling!r}")
        super().__init__(config)
        self.embedding = DistilledEmbeddings(config)
        self.distillation_classifier = nn.Linear(config.hidden_size, config.num_classes)
        # the seed's initialisation for the new parts; the token like [CLS]
        self.embedding.apply(self._init_weights)
        self._init_weights(self.distillation_classifier)
        std = config.initializer_range
        nn.init.trunc_normal_(self.embedding.distillation_token, mean=0.0, std=std, a=-2 * std, b=2 * std)

    def forward_features(self, x: torch.Tensor, output_attentions: bool = False):
        """Images -> ((B, 2, hidden) normalised [CLS] and distillation outputs, attentions or None)."""
        hidden_states, all_attentions = self.encode(x, output_attentions)  # last block: the two prefix tokens
        return self.final_layernorm(hidden_states[:, :2]), all_attentions

    def forward(self, x: torch.Tensor, output_attentions: bool = False, return_both: bool = False):
        features, all_attentions = self.forward_features(x, output_attentions)
        cls_logits, distillation_logits = self.classifier(features[:, 0]), self.distillation_classifier(features[:, 1])
        if return_both:
            return (cls_logits, distillation_logits), all_attentions
        return (cls_logits + distillation_logits) / 2, all_attentions
