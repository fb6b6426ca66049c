"""The seed tutorial's model and data pipeline, rebuilt as the baseline to measure against.

The model classes below follow the tutorial's structure and computations with
torch.nn building blocks only, nothing of vitcraft's: nn.Dropout (a Bernoulli
draw per element), nn.LayerNorm, the tanh GELU as separate tensor operations,
attention as matmul / sqrt(head_size) -> softmax -> dropout -> matmul, and
every token through every block. The config is the tutorial's plain dict.
Parameter names are the tutorial's, which vitcraft kept, so vitcraft's state
dict of the same attention layout loads here and back (vitcraft's modules also
convert between the per-head and fused layouts; this file does not).
``tutorial_loaders`` is the tutorial's per-image torchvision pipeline with
DataLoader workers; ``timm_model`` is timm's ViT in the same shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitcraft import ViTConfig

# The tutorial's CIFAR-10 configuration, key for key.
TUTORIAL_CONFIG = {
    "patch_size": 4, "hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4,
    "intermediate_size": 4 * 48, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02, "image_size": 32, "num_classes": 10, "num_channels": 3, "qkv_bias": True,
    "use_faster_attention": True,
}


class PatchEmbeddings(nn.Module):
    """(B, C, H, W) images -> (B, num_patches, hidden): a Conv2d with kernel = stride = patch size."""

    def __init__(self, config):
        super().__init__()
        self.num_patches = (config["image_size"] // config["patch_size"]) ** 2
        self.projection = nn.Conv2d(config["num_channels"], config["hidden_size"],
                                    kernel_size=config["patch_size"], stride=config["patch_size"])

    def forward(self, x):
        return self.projection(x).flatten(2).transpose(1, 2)  # (B, hidden, g, g) -> (B, g*g, hidden)


class Embeddings(nn.Module):
    """Patches -> [CLS] + patches, plus learned positions, then dropout: (B, C, H, W) -> (B, 1 + N, hidden)."""

    def __init__(self, config):
        super().__init__()
        self.patch_embeddings = PatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.randn(1, 1, config["hidden_size"]))
        self.position_embeddings = nn.Parameter(
            torch.randn(1, self.patch_embeddings.num_patches + 1, config["hidden_size"]))
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])

    def forward(self, x):
        x = self.patch_embeddings(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, hidden)
        return self.dropout(x + self.position_embeddings)


class AttentionHead(nn.Module):
    """One head: (B, N, hidden) -> ((B, N, head_size) output, (B, N, N) probabilities)."""

    def __init__(self, hidden_size, attention_head_size, dropout, bias=True):
        super().__init__()
        self.attention_head_size = attention_head_size
        self.query = nn.Linear(hidden_size, attention_head_size, bias=bias)
        self.key = nn.Linear(hidden_size, attention_head_size, bias=bias)
        self.value = nn.Linear(hidden_size, attention_head_size, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        query, key, value = self.query(x), self.key(x), self.value(x)
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        probs = nn.functional.softmax(scores, dim=-1)
        return torch.matmul(self.dropout(probs), value), probs


class MultiHeadAttention(nn.Module):
    """Heads side by side, concatenated, projected: (B, N, hidden) -> ((B, N, hidden), (B, heads, N, N) or None)."""

    def __init__(self, config):
        super().__init__()
        head_size = config["hidden_size"] // config["num_attention_heads"]
        self.heads = nn.ModuleList([
            AttentionHead(config["hidden_size"], head_size, config["attention_probs_dropout_prob"], config["qkv_bias"])
            for _ in range(config["num_attention_heads"])])
        self.output_projection = nn.Linear(head_size * config["num_attention_heads"], config["hidden_size"])
        self.output_dropout = nn.Dropout(config["hidden_dropout_prob"])

    def forward(self, x, output_attentions=False):
        outputs = [head(x) for head in self.heads]
        attention_output = self.output_dropout(self.output_projection(torch.cat([o for o, _ in outputs], dim=-1)))
        return attention_output, (torch.stack([p for _, p in outputs], dim=1) if output_attentions else None)


class FasterMultiHeadAttention(nn.Module):
    """All heads from one qkv Linear: (B, N, hidden) -> ((B, N, hidden), (B, heads, N, N) or None)."""

    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config["num_attention_heads"]
        self.attention_head_size = config["hidden_size"] // self.num_attention_heads
        all_head_size = self.num_attention_heads * self.attention_head_size
        self.qkv_projection = nn.Linear(config["hidden_size"], 3 * all_head_size, bias=config["qkv_bias"])
        self.attn_dropout = nn.Dropout(config["attention_probs_dropout_prob"])
        self.output_projection = nn.Linear(all_head_size, config["hidden_size"])
        self.output_dropout = nn.Dropout(config["hidden_dropout_prob"])

    def forward(self, x, output_attentions=False):
        batch_size, num_tokens, _ = x.shape
        query, key, value = (  # each (B, N, hidden) -> (B, heads, N, head_size)
            t.view(batch_size, num_tokens, self.num_attention_heads, self.attention_head_size).transpose(1, 2)
            for t in torch.chunk(self.qkv_projection(x), 3, dim=-1))
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        probs = nn.functional.softmax(scores, dim=-1)
        attention_output = torch.matmul(self.attn_dropout(probs), value)  # (B, heads, N, head_size)
        attention_output = attention_output.transpose(1, 2).contiguous().view(batch_size, num_tokens, -1)
        return self.output_dropout(self.output_projection(attention_output)), (probs if output_attentions else None)


class NewGELUActivation(nn.Module):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), one tensor operation at a time. Shape preserving."""

    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class MLP(nn.Module):
    """Linear -> GELU -> Linear -> dropout: (B, N, hidden) -> (B, N, hidden)."""

    def __init__(self, config):
        super().__init__()
        self.dense_1 = nn.Linear(config["hidden_size"], config["intermediate_size"])
        self.activation = NewGELUActivation()
        self.dense_2 = nn.Linear(config["intermediate_size"], config["hidden_size"])
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])

    def forward(self, x):
        return self.dropout(self.dense_2(self.activation(self.dense_1(x))))


class Block(nn.Module):
    """Pre-LN block, attention then MLP, each residual: (B, N, hidden) -> ((B, N, hidden), probabilities or None)."""

    def __init__(self, config):
        super().__init__()
        attention = FasterMultiHeadAttention if config.get("use_faster_attention", False) else MultiHeadAttention
        self.attention = attention(config)
        self.layernorm_1 = nn.LayerNorm(config["hidden_size"])
        self.mlp = MLP(config)
        self.layernorm_2 = nn.LayerNorm(config["hidden_size"])

    def forward(self, x, output_attentions=False):
        attention_output, probs = self.attention(self.layernorm_1(x), output_attentions=output_attentions)
        x = x + attention_output
        x = x + self.mlp(self.layernorm_2(x))
        return x, (probs if output_attentions else None)


class Encoder(nn.Module):
    """num_hidden_layers Blocks: (B, N, hidden) -> ((B, N, hidden), a list of probabilities or None)."""

    def __init__(self, config):
        super().__init__()
        self.blocks = nn.ModuleList([Block(config) for _ in range(config["num_hidden_layers"])])

    def forward(self, x, output_attentions=False):
        all_attentions = []
        for block in self.blocks:
            x, probs = block(x, output_attentions=output_attentions)
            all_attentions.append(probs)
        return x, (all_attentions if output_attentions else None)


class ViTForClassfication(nn.Module):
    """Embeddings, encoder, a Linear on the [CLS] output: (B, C, H, W) -> ((B, num_classes), attentions or None).

    The tutorial's spelling of the name, and its initialisation.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embedding = Embeddings(config)
        self.encoder = Encoder(config)
        self.classifier = nn.Linear(config["hidden_size"], config["num_classes"])
        self.apply(self._init_weights)

    def forward(self, x, output_attentions=False):
        encoder_output, all_attentions = self.encoder(self.embedding(x), output_attentions=output_attentions)
        return self.classifier(encoder_output[:, 0, :]), all_attentions

    def _init_weights(self, module):
        # The init of the tutorial's source (pytorch_implementations/vit.py). Unlike model.py's, it truncates
        # [CLS] and the positions at +-2 (trunc_normal_'s default bounds), not at +-2 std: at std 0.02, not at all.
        std = self.config["initializer_range"]
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()  # unit gain, zero shift
        elif isinstance(module, Embeddings):
            for tensor in (module.position_embeddings, module.cls_token):
                nn.init.trunc_normal_(tensor, mean=0.0, std=std)


def tutorial_model(use_faster_attention: bool = True, **overrides) -> ViTForClassfication:
    """The tutorial's model: its config (``overrides`` change keys), per-head or fused attention."""
    return ViTForClassfication({**TUTORIAL_CONFIG, "use_faster_attention": use_faster_attention, **overrides})


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
