"""An encoder and decoder whose codes see their neighbours: residual blocks and overlapping convolutions.

The paper's stack (models/encoder.py) is non-overlapping 2x2 layers, so each code of a 16x16 grid
sees its own 4x4 block alone and the decoder redraws that block from that one code: it has at most
`num_embeddings` patches to draw with, and an outline that fits none of them is averaged into blur.
Here every resolution has residual blocks of 3x3 convolutions (VQGAN's encoder, Esser et al. 2021),
downsampling is a 4x4 stride-2 convolution that overlaps its neighbours, and upsampling repeats each
latent (nearest neighbour, no smoothing) before a 3x3 convolution, so a code is drawn in the context
of the codes around it.

The paper's additions keep their meaning: `adapter_layer` makes the first and last layers 1x1
convolutions (mixing colour channels only) instead of 3x3 ones, and `pixelsight_filters` widens the
lowest resolution to that many filters before a 1x1 convolution to the embedding, mirrored in the
decoder.
"""
import math

import torch
from torch import Tensor, nn

from .decoder import StretchedSigmoid

# Channels normalised together. A group of one channel is instance normalisation, which takes away
# each channel's mean over the sprite: its overall colour, that the decoder must give back.
GROUP_CHANNELS = 8


def group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: a sprite's statistics do not depend on the other sprites of its
    # batch, which matters when a discriminator sees real and reconstructed batches apart.
    return nn.GroupNorm(math.gcd(channels, max(1, channels // GROUP_CHANNELS)), channels, eps=1e-6)


class ResidualBlock(nn.Module):
    """x + two (GroupNorm, SiLU, 3x3 convolution) layers; a 1x1 convolution on the skip where widths differ."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
                                  group_norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


def level_widths(num_layers: int, hidden_channels: int) -> list[int]:
    """Filters at each resolution, full size first: doubling at each downsampling."""
    return [hidden_channels * 2 ** i for i in range(num_layers + 1)]


def _edge_conv(in_channels: int, out_channels: int, adapter_layer: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1) if adapter_layer else nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResidualEncoder(nn.Module):
    """Image [B, in_channels, H, W] -> latents [B, out_channels, H / 2^n, W / 2^n], n = num_layers.

    `residual_blocks` blocks at each of the n + 1 resolutions, `hidden_channels` wide at full size
    and twice as wide after each 4x4 stride-2 downsampling."""

    def __init__(self, num_layers: int, out_channels: int, hidden_channels: int = 32, residual_blocks: int = 1,
                 adapter_layer: bool = False, pixelsight_filters: int = 0, in_channels: int = 3):
        super().__init__()
        widths = level_widths(num_layers, hidden_channels)
        layers = [_edge_conv(in_channels, widths[0], adapter_layer)]
        for level, width in enumerate(widths):
            layers += [ResidualBlock(width, width) for _ in range(residual_blocks)]
            if level < num_layers:
                layers.append(nn.Conv2d(width, widths[level + 1], 4, stride=2, padding=1))
        layers += [group_norm(widths[-1]), nn.SiLU()]
        if pixelsight_filters:
            layers += [nn.Conv2d(widths[-1], pixelsight_filters, 1), group_norm(pixelsight_filters), nn.SiLU()]
        layers.append(nn.Conv2d(pixelsight_filters or widths[-1], out_channels, 1))
        self.layers = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ResidualDecoder(nn.Module):
    """Latents [B, in_channels, h, w] -> image [B, out_channels, h * 2^n, w * 2^n]: `ResidualEncoder`
    in reverse, each downsampling an upsampling (nearest-neighbour repeat, then a 3x3 convolution).
    Ends in the stretched sigmoid of models/decoder.py, or linear without `output_activation`."""

    def __init__(self, num_layers: int, in_channels: int, hidden_channels: int = 32, residual_blocks: int = 1,
                 adapter_layer: bool = False, pixelsight_filters: int = 0, out_channels: int = 3,
                 output_activation: bool = True):
        super().__init__()
        widths = level_widths(num_layers, hidden_channels)[::-1]
        layers = []
        if pixelsight_filters:
            layers += [nn.Conv2d(in_channels, pixelsight_filters, 1), group_norm(pixelsight_filters), nn.SiLU()]
        layers.append(nn.Conv2d(pixelsight_filters or in_channels, widths[0], 3, padding=1))
        for level, width in enumerate(widths):
            layers += [ResidualBlock(width, width) for _ in range(residual_blocks)]
            if level < num_layers:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, widths[level + 1], 3, padding=1)]
        layers += [group_norm(widths[-1]), nn.SiLU(), _edge_conv(widths[-1], out_channels, adapter_layer)]
        self.layers = nn.Sequential(*layers)
        self.output = StretchedSigmoid() if output_activation else nn.Identity()

    @property
    def last_layer(self) -> Tensor:
        """The weight of the last convolution, where VQGAN's adaptive weight compares gradient norms."""
        return self.layers[-1].weight

    def forward(self, z: Tensor) -> Tensor:
        hidden = self.layers[:-1](z)
        # As models/decoder.py: the last layer in float32 under a bfloat16 autocast, whose steps of
        # 1/256 near 1 cannot land on the 1/255 steps of the colours it must hit exactly.
        with torch.autocast(z.device.type, enabled=False):
            return self.output(self.layers[-1](hidden.to(torch.promote_types(hidden.dtype, torch.float32))))
