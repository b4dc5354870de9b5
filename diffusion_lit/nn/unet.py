"""The denoising UNet: eps/v/x0 = UNet(x_t, t). It knows nothing of the noise schedule."""

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lit.errors import UserError, check_range
from diffusion_lit.nn.blocks import Downsample, ResBlock, SelfAttention, Upsample, group_norm, zero_init
from diffusion_lit.nn.embeddings import TimestepEmbedding


class UNet(nn.Module):
    """DDPM-style UNet (Ho et al. 2020, appendix B) with a 7x7 stem and attention at chosen levels.

    Level i works at resolution H / 2**i with `base_channels * channel_mults[i]` channels. For a 32x32
    input the default `attention_levels=(1, 2)` puts attention at 16x16 and 8x8. Inputs whose size is
    not a multiple of 2**(levels - 1) (MNIST's 28x28) are padded inside and cropped back. With
    `num_classes`, a learned class embedding is added to the timestep embedding; label `num_classes`
    (or no labels) is the "no class" used for classifier-free guidance (Ho & Salimans 2022). With
    `augment_dim`, a linear map of the augmentation labels (B, augment_dim) is added too, for non-leaky
    augmentation (Karras et al. 2022; `diffusion.augment`); no labels is the same as zeros, "not augmented".
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int = 1,
        attention_levels: Sequence[int] = (1, 2),
        num_heads: int = 8,
        dropout: float = 0.1,
        num_classes: int | None = None,
        augment_dim: int = 0,
    ) -> None:
        arguments = dict(locals())  # before anything else is defined: exactly the constructor's arguments
        super().__init__()
        self.config = _config(arguments)
        check_range("UNet", 1, base_channels=base_channels, num_res_blocks=num_res_blocks, num_heads=num_heads)
        check_range("UNet", 0, 1, dropout=dropout)
        if not all(0 <= level < len(channel_mults) for level in attention_levels):
            raise UserError(f"UNet.attention_levels {list(attention_levels)} must lie in [0, {len(channel_mults) - 1}]")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.size_multiple = 2 ** (len(channel_mults) - 1)
        embedding_dim = 4 * base_channels
        self.time_embedding = TimestepEmbedding(base_channels, embedding_dim)
        self.class_embedding = nn.Embedding(num_classes + 1, embedding_dim) if num_classes else None
        self.augment_dim = augment_dim
        self.augment_embedding = nn.Linear(augment_dim, embedding_dim, bias=False) if augment_dim else None
        self.stem = nn.Conv2d(in_channels, base_channels, 7, padding=3)

        def attention_or_identity(level: int, channels: int) -> nn.Module:
            return SelfAttention(channels, num_heads) if level in attention_levels else nn.Identity()

        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        channels = base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                block = ResBlock(channels, base_channels * mult, embedding_dim, dropout)
                channels = base_channels * mult
                self.down.append(nn.ModuleList([block, attention_or_identity(level, channels)]))
                skip_channels.append(channels)
            if level < len(channel_mults) - 1:
                self.down.append(Downsample(channels))
                skip_channels.append(channels)

        middle = [ResBlock(channels, channels, embedding_dim, dropout), SelfAttention(channels, num_heads)]
        self.middle = nn.ModuleList([*middle, ResBlock(channels, channels, embedding_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                block = ResBlock(channels + skip_channels.pop(), base_channels * mult, embedding_dim, dropout)
                channels = base_channels * mult
                self.up.append(nn.ModuleList([block, attention_or_identity(level, channels)]))
            if level > 0:
                self.up.append(Upsample(channels))

        self.out = nn.Sequential(
            group_norm(channels), nn.SiLU(), zero_init(nn.Conv2d(channels, in_channels, 3, padding=1))
        )

    def check_image_shape(self, image_shape: Sequence[int]) -> None:
        """One clear line, with the fix, when images of `image_shape` (C, H, W) do not fit this network."""
        channels, height, width = image_shape
        if channels != self.in_channels:
            raise UserError(
                f"the data has {channels}-channel images but the UNet takes {self.in_channels}; "
                f"set UNet.in_channels to {channels}"
            )
        if min(height, width) < 2 * self.size_multiple:
            raise UserError(
                f"{height}x{width} images are too small for this UNet's {len(self.config['channel_mults'])} levels: "
                f"the sides must be at least {2 * self.size_multiple}"
            )

    def _pad(self, x: Tensor) -> tuple[Tensor, tuple[slice, slice]]:
        """Pad H and W up to a multiple of 2**(levels - 1); return the padded x and the crop back."""
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.size_multiple, -width % self.size_multiple
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return x, (slice(pad_h // 2, pad_h // 2 + height), slice(pad_w // 2, pad_w // 2 + width))

    def _encode(self, x: Tensor, embedding: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Stem, down path and middle block: (middle output, skip activations, one activation per level)."""
        h = self.stem(x)
        skips, levels = [h], []
        for layer in self.down:
            if isinstance(layer, Downsample):
                levels.append(h)
                h = layer(h)
            else:
                block, attention = layer
                h = attention(block(h, embedding))
            skips.append(h)
        levels.append(h)
        h = self.middle[0](h, embedding)
        h = self.middle[1](h)
        h = self.middle[2](h, embedding)
        return h, skips, levels

    def _embed(self, t: Tensor, y: Tensor | None, augment: Tensor | None) -> Tensor:
        """Timestep embedding (B, 4 * base), plus the class embedding of labels y (B,) for a conditional UNet and
        the augmentation embedding of `augment` (B, augment_dim) where given."""
        embedding = self.time_embedding(t)
        if augment is not None:
            if self.augment_embedding is None:
                raise UserError("this UNet takes no augmentation labels; set UNet.augment_dim to train with them")
            embedding = embedding + self.augment_embedding(augment.to(embedding.dtype))
        if self.class_embedding is None:
            if y is not None:
                raise UserError("this UNet is unconditional (UNet.num_classes is None) but was given labels")
            return embedding
        y = torch.full_like(t, self.num_classes) if y is None else y
        return embedding + self.class_embedding(y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, augment: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) noisy images, t: (B,) timesteps, y: (B,) labels or None, augment: (B, augment_dim)
        augmentation labels or None -> (B, C, H, W) output."""
        x, crop = self._pad(x)
        embedding = self._embed(t, y, augment)  # (B, 4 * base)
        h, skips, _ = self._encode(x, embedding)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                block, attention = layer
                h = attention(block(torch.cat([h, skips.pop()], dim=1), embedding))
        return self.out(h)[..., crop[0], crop[1]]

    def features(self, x: Tensor, t: Tensor, y: Tensor | None = None, augment: Tensor | None = None) -> list[Tensor]:
        """The feature tap: the last activation of every down level, then the middle block's output.

        Runs only the stem, the down path and the middle block (no up path), for feature matching.
        """
        x, _ = self._pad(x)
        h, _, levels = self._encode(x, self._embed(t, y, augment))
        return [*levels, h]


def _config(arguments: dict) -> dict:
    """UNet's constructor arguments, read off its signature (sequences as lists), so that a checkpoint rebuilds
    the network and no argument can be left out."""
    return {
        name: list(arguments[name]) if isinstance(arguments[name], tuple | list) else arguments[name]
        for name in inspect.signature(UNet).parameters
    }
