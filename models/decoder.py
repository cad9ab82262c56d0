"""The convolutional decoder: the encoder in reverse."""
import torch
from torch import Tensor, nn

from .encoder import conv_block, layer_widths


# A plain sigmoid reaches the 0 and 255 of black and white, the commonest colours of pixel art,
# only for pre-activations beyond +-6.2, which MSE approaches ever more slowly: outlines and
# backgrounds then never come out exact. Stretched by 5% each way, 0 and 1 lie at +-3.0, at
# finite optima of the loss; images are clamped to [0, 1] when they are rounded to uint8.
OUTPUT_MARGIN = 0.05


class StretchedSigmoid(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x) * (1 + 2 * OUTPUT_MARGIN) - OUTPUT_MARGIN


class Decoder(nn.Module):
    """Latents [B, in_channels, h, w] -> image [B, out_channels, h * 2^n, w * 2^n], n = num_layers.

    Mirrors `Encoder` with the same arguments: PixelSight becomes a 1x1 convolution from
    `in_channels` up to `pixelsight_filters` at the start, each 2x2 stride-2 convolution a 2x2
    stride-2 transposed convolution, and the adapter a 1x1 convolution to `out_channels` at the end.
    A sigmoid, stretched by `OUTPUT_MARGIN` each way, maps to the [0, 1] range of the images; without
    `output_activation` the last layer is linear (features for models/palette.py's choice).
    """

    def __init__(self, num_layers: int, in_channels: int, adapter_layer: bool = False,
                 pixelsight_filters: int = 0, out_channels: int = 3, output_activation: bool = True):
        super().__init__()
        widths = layer_widths(num_layers, pixelsight_filters or in_channels, adapter_layer)

        layers = []
        channels = in_channels
        if pixelsight_filters:
            conv = nn.Conv2d(channels, pixelsight_filters, 1, bias=False)
            layers += conv_block(conv, activate=True)
            channels = pixelsight_filters
        targets = widths[-2::-1] + [out_channels]
        for i, width in enumerate(targets):
            last = i == len(targets) - 1
            if last and adapter_layer:
                conv = nn.Conv2d(channels, width, 1)
            else:
                conv = nn.ConvTranspose2d(channels, width, 2, stride=2, bias=last)
            layers += conv_block(conv, activate=not last)
            channels = width
        if output_activation:
            layers.append(StretchedSigmoid())
        self.layers = nn.Sequential(*layers)
        self.tail = 2 if output_activation else 1

    @property
    def last_layer(self) -> Tensor:
        """The weight of the last convolution, where VQGAN's adaptive weight compares gradient norms."""
        return self.layers[-self.tail].weight

    def forward(self, z: Tensor) -> Tensor:
        hidden = self.layers[:-self.tail](z)
        # The last layer in float32 even under a bfloat16 autocast: bfloat16 resolves steps of
        # 1/256 near 1, too coarse to land on the 1/255 steps of the colours it must hit exactly.
        with torch.autocast(z.device.type, enabled=False):
            return self.layers[-self.tail:](hidden.to(torch.promote_types(hidden.dtype, torch.float32)))
