"""Masked autoencoders (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners") around a vitcraft ViT.

Pretraining without labels: each image's patches are shuffled by random noise
and only the first ``1 - mask_ratio`` of them are kept (``random_masking``).
The encoder, the ViT's own embeddings and blocks, sees those patches and
[CLS] only, which makes it cheap. A small decoder (``MAEDecoder``) puts a
learned mask token in every hidden slot, adds its own position embeddings and
predicts every patch's pixels; the loss is the mean squared error on the
hidden patches only (``masked_mse``), against the pixels or, with
``norm_pix_loss``, each patch's pixels normalised by its own mean and variance
(``pixel_targets``).

After pretraining the decoder is dropped: ``vitcraft train --init RUN`` starts
a classifier from the encoder (pretrained.py).
"""

from __future__ import annotations

import torch
from torch import nn

from vitcraft.config import PretrainConfig, ViTConfig
from vitcraft.model import Block, ViTForClassification

NORM_PIX_EPS = 1e-6  # MAE's: the variance of a flat patch is 0
DECODER_PREFIX = "decoder."  # the decoder's weights in a saved masked autoencoder


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p * p * C): the patches in the patch embedding's order (row by row), each flattened
    as (row, column, channel), as MAE's ``patchify``."""
    batch, channels, height, width = images.shape
    rows, columns = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, rows, patch_size, columns, patch_size)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, rows, columns, p, p, C)
    return x.reshape(batch, rows * columns, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, L, p * p * C) -> (B, C, H, W): ``patchify`` undone, for a square grid."""
    batch, length, _ = patches.shape
    side = int(round(length ** 0.5))
    x = patches.reshape(batch, side, side, patch_size, patch_size, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, rows, p, columns, p)
    return x.reshape(batch, channels, side * patch_size, side * patch_size)


def pixel_targets(patches: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """What the decoder is asked to predict for (B, L, D) patches: the patches, or with ``norm_pix_loss`` each
    patch normalised by the mean and (unbiased) variance of its own D values. Same shape."""
    if not norm_pix_loss:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + NORM_PIX_EPS) ** 0.5


def kept_count(num_patches: int, mask_ratio: float) -> int:
    """How many of ``num_patches`` patches the encoder sees: MAE's ``int(L * (1 - mask_ratio))``, at least one."""
    return max(1, int(num_patches * (1 - mask_ratio)))


def random_masking(batch: int, num_patches: int, mask_ratio: float, noise: torch.Tensor | None = None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which patches each image keeps: (ids_keep (B, K), mask (B, L), ids_restore (B, L)).

    Sorting uniform noise shuffles each image's patches independently; the first
    K = ``kept_count`` after the shuffle are kept. ``mask`` is 0 for a kept
    patch and 1 for a hidden one, in the original patch order;
    ``ids_restore`` undoes the shuffle: ``shuffled.gather(1, ids_restore)`` is
    back in patch order. ``noise`` (B, L): given, for fixed masks (evaluation).
    """
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)
    ids_shuffle = noise.argsort(dim=1)  # ascending: small noise is kept
    ids_restore = ids_shuffle.argsort(dim=1)
    keep = kept_count(num_patches, mask_ratio)
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], mask.gather(1, ids_restore), ids_restore


def restore_order(kept: torch.Tensor, filler: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """The kept tokens (B, K, D) back in patch order with ``filler`` (1, 1, D) in every hidden slot: (B, L, D).

    The kept tokens are the first K of the shuffled order (``random_masking``),
    so appending the fillers completes the shuffled sequence, and gathering
    with ``ids_restore`` undoes the shuffle.
    """
    batch, num_patches = ids_restore.shape
    shuffled = torch.cat((kept, filler.expand(batch, num_patches - kept.shape[1], -1)), dim=1)  # (B, L, D)
    return shuffled.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, kept.shape[-1]))


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean squared error over the hidden patches only: per patch the mean over its D values, then the mean
    over the patches where ``mask`` (B, L) is 1. prediction, target: (B, L, D). A scalar (float32)."""
    per_patch = (prediction.float() - target.float()).pow(2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


def decoder_config(encoder: ViTConfig, pretrain: PretrainConfig) -> ViTConfig:
    """The decoder blocks' config: the encoder's, at the decoder's width, heads and depth, without dropout (MAE's
    decoder has none) or stochastic depth."""
    width = pretrain.decoder_width or encoder.hidden_size
    heads = pretrain.decoder_heads or encoder.num_attention_heads
    try:
        return encoder.replace(hidden_size=width, num_attention_heads=heads, num_hidden_layers=pretrain.decoder_depth,
                               intermediate_size=4 * width, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, drop_path_rate=0.0, patch_dropout=0.0,
                               locality_attention=False)
    except ValueError as error:
        raise ValueError(f"the MAE decoder does not fit: {error} (set --decoder-width and --decoder-heads)") from None


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder: the encoded kept tokens back to every patch's pixels.

    The encoder's tokens are projected to the decoder's width, a learned mask
    token fills every hidden patch's slot, the shuffle is undone, the decoder's
    own position embeddings are added, then ``decoder_depth`` Blocks, a
    LayerNorm and a linear prediction of each patch's p * p * C values.
    In: (B, 1 + K, encoder hidden) encoded [CLS] and kept patches, ids_restore (B, L).
    Out: (B, L, p * p * C), [CLS] dropped.
    """

    def __init__(self, encoder: ViTConfig, pretrain: PretrainConfig):
        super().__init__()
        config = decoder_config(encoder, pretrain)
        self.embed = nn.Linear(encoder.hidden_size, config.hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + encoder.num_patches, config.hidden_size))
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.prediction = nn.Linear(config.hidden_size, encoder.patch_size ** 2 * encoder.num_channels)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)  # (B, 1 + K, width)
        patches = restore_order(x[:, 1:], self.mask_token, ids_restore)  # (B, L, width), mask tokens in the gaps
        x = torch.cat((x[:, :1], patches), dim=1) + self.position_embeddings  # (B, 1 + L, width)
        for block in self.blocks:
            x, _ = block(x)
        return self.prediction(self.layernorm(x))[:, 1:]  # (B, L, p * p * C)


class MaskedAutoencoder(nn.Module):
    """A ViT (``encoder``, a :class:`ViTForClassification` whose classifier is not used) and an MAE decoder.

    ``model(images)`` returns ``(loss, prediction, mask)``: the masked-patch
    mean squared error (a scalar), the predicted patches (B, L, p * p * C) in
    the target's space (pixels, or per-patch normalised pixels) and the mask
    (B, L), 1 where a patch was hidden. ``noise`` (B, L) fixes the masks.
    In: (B, C, H, W) normalised images at the encoder's image size.
    """

    def __init__(self, encoder: ViTForClassification, pretrain: PretrainConfig):
        super().__init__()
        if type(encoder) is not ViTForClassification:
            raise ValueError(f"MAE pretrains the ViT presets (ViTForClassification), not a {type(encoder).__name__}")
        if encoder.config.patch_dropout:  # encode_kept chooses the patches, not Embeddings' patch dropout
            raise ValueError("MAE hides patches itself (--mask-ratio), so the model's patch_dropout must be 0")
        self.encoder = encoder
        self.decoder = MAEDecoder(encoder.config, pretrain)
        self.pretrain = pretrain
        self.decoder.apply(encoder._init_weights)  # the encoder's initialisation, for the decoder's layers
        std = encoder.config.initializer_range
        nn.init.trunc_normal_(self.decoder.position_embeddings, std=std, a=-2 * std, b=2 * std)
        nn.init.normal_(self.decoder.mask_token, std=std)

    @property
    def patch_size(self) -> int:
        return self.encoder.config.patch_size

    def encode_kept(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The encoder on the kept patches: (B, C, H, W), ids_keep (B, K) -> (B, 1 + K, hidden), normalised.

        The ViT's own embedding weights, applied as ``Embeddings.forward`` does
        but keeping only some patches: each patch gets its position vector
        before the others are dropped, so it still knows where it sits.
        """
        embedding = self.encoder.embedding
        patches = embedding.patch_embeddings(images)  # (B, L, hidden)
        positions = embedding.position_embeddings  # (1, 1 + L, hidden)
        patches = patches + positions[:, 1:]
        index = ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        kept = patches.gather(1, index)  # (B, K, hidden)
        cls = embedding.prefix_tokens(images.shape[0]) + positions[:, :1]  # (B, 1, hidden)
        x = embedding.dropout(torch.cat((cls, kept), dim=1))  # (B, 1 + K, hidden)
        x, _ = self.encoder.encoder(x)
        # per token, so this is the classifier's final LayerNorm (when the preset has one) on every token
        return self.encoder.final_layernorm(x)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        num_patches = self.encoder.config.num_patches
        ids_keep, mask, ids_restore = random_masking(images.shape[0], num_patches, self.pretrain.mask_ratio,
                                                     noise, device=images.device)
        prediction = self.decoder(self.encode_kept(images, ids_keep), ids_restore)  # (B, L, p * p * C)
        target = pixel_targets(patchify(images, self.patch_size), self.pretrain.norm_pix_loss)
        return masked_mse(prediction, target, mask), prediction, mask

    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """(hidden, reconstruction, reconstruction with the kept patches pasted back) of (B, C, H, W) images:
        ``hidden`` (B, 1, H, W) is True on the pixels of hidden patches, the two others are (B, C, H, W) in the
        images' space. With ``norm_pix_loss`` the prediction is mapped back with each original patch's own
        mean and variance, as MAE's visualisation does."""
        _, prediction, mask = self(images, noise)
        patches = patchify(images, self.patch_size)
        prediction = prediction.float()
        if self.pretrain.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5
            prediction = prediction * std + mean
        hidden = mask.unsqueeze(-1)  # (B, L, 1)
        pasted = patches * (1 - hidden) + prediction * hidden
        hidden_pixels = unpatchify(hidden.expand(-1, -1, self.patch_size ** 2), self.patch_size, 1) > 0
        channels = images.shape[1]
        return hidden_pixels, unpatchify(prediction, self.patch_size, channels), unpatchify(pasted, self.patch_size,
                                                                                          channels)
