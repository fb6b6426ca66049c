"""The seed tutorial's model and data pipeline, rebuilt as the baseline to measure against.

``tutorial_model`` is vitcraft's model with the tutorial's exact computations
put back: torch.nn.Dropout (one Bernoulli draw per element), the GELU formula
written out in Python ops, attention scores divided by sqrt(head_size), and
never scaled_dot_product_attention. ``tutorial_loaders`` is the tutorial's
per-image torchvision pipeline with DataLoader workers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitcraft import ViTConfig, ViTForClassification
from vitcraft import model as vit_model


class FormulaGELU(nn.Module):
    """The tutorial's GELU: the tanh formula as separate tensor operations."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class TutorialFusedAttention(vit_model.FasterMultiHeadAttention):
    """FasterMultiHeadAttention computed as the tutorial does (scores / sqrt(d), explicit softmax)."""

    def forward(self, x, output_attentions=False, num_queries=None):
        # the tutorial updates every token in every block, so num_queries is ignored
        batch, tokens, hidden = x.shape
        query, key, value = self.qkv_projection(x).chunk(3, dim=-1)

        def heads(t):  # (B, N, hidden) -> (B, heads, N, head_size)
            return t.view(batch, tokens, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        scores = query @ key.transpose(-1, -2) / math.sqrt(self.attention_head_size)
        probs = self.attn_dropout(scores.softmax(dim=-1))
        out = (probs @ value).transpose(1, 2).contiguous().view(batch, tokens, hidden)
        return self.output_dropout(self.output_projection(out)), None


class TutorialViT(ViTForClassification):
    """ViTForClassification that, like the tutorial, runs every token through the last block."""

    def forward_features(self, x, output_attentions=False):
        hidden_states, all_attentions = self.encoder(self.embedding(x), output_attentions)
        return self.final_layernorm(self.pool(hidden_states)), all_attentions


def tutorial_model(use_faster_attention: bool = True, **overrides) -> nn.Module:
    """The tutorial's ViTForClassfication (its config, its per-op computations)."""
    config = ViTConfig(attention_backend="fused" if use_faster_attention else "per_head", **overrides)
    model = TutorialViT(config)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, vit_model.Dropout):
                setattr(module, name, nn.Dropout(child.p))
            elif isinstance(child, vit_model.NewGELUActivation):
                setattr(module, name, FormulaGELU())
            elif isinstance(child, vit_model.FasterMultiHeadAttention):
                replacement = TutorialFusedAttention(config)
                replacement.load_state_dict(child.state_dict())
                setattr(module, name, replacement)
    return model


def tutorial_loaders(root: str, batch_size: int = 256, num_workers: int = 2, image_size: int = 32):
    """The tutorial's train/test DataLoaders over an ImageFolder copy of CIFAR-10."""
    import torchvision
    import torchvision.transforms as T

    normalize = T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    train_transform = T.Compose([T.ToTensor(), T.Resize((image_size, image_size)), T.RandomHorizontalFlip(p=0.5),
                                 T.RandomResizedCrop((image_size, image_size), scale=(0.8, 1.0)), normalize])
    test_transform = T.Compose([T.ToTensor(), T.Resize((image_size, image_size)), normalize])
    train_set = torchvision.datasets.ImageFolder(f"{root}/train", transform=train_transform)
    test_set = torchvision.datasets.ImageFolder(f"{root}/test", transform=test_transform)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, test_loader


def timm_model(**overrides) -> nn.Module:
    """timm's VisionTransformer in the seed model's shape (same dropout rates)."""
    from timm.models.vision_transformer import VisionTransformer

    c = ViTConfig(**overrides)
    return VisionTransformer(img_size=c.image_size, patch_size=c.patch_size, in_chans=c.num_channels,
                             num_classes=c.num_classes, embed_dim=c.hidden_size, depth=c.num_hidden_layers,
                             num_heads=c.num_attention_heads, mlp_ratio=c.intermediate_size / c.hidden_size,
                             qkv_bias=c.qkv_bias, drop_rate=c.hidden_dropout_prob,
                             proj_drop_rate=c.hidden_dropout_prob, attn_drop_rate=c.attention_probs_dropout_prob)
