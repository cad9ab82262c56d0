"""The convolutional encoder shared by the VAE and the VQ-VAEs."""
from torch import Tensor, nn


def layer_widths(num_layers: int, widest_filters: int, adapter_layer: bool) -> list[int]:
    """Filters of each encoder layer, doubling up to `widest_filters` at the last one.

    The adapter layer counts as one more layer of the doubling sequence.
    """
    depth = num_layers + int(adapter_layer)
    if depth == 0:
        raise ValueError("num_layers=0 needs adapter_layer=True: otherwise the model has no layers")
    return [max(1, widest_filters // 2 ** (depth - 1 - i)) for i in range(depth)]


def conv_block(conv: nn.Module, activate: bool) -> list[nn.Module]:
    if not activate:
        return [conv]
    return [conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU(inplace=True)]


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> latents [B, out_channels, H / 2^n, W / 2^n], n = num_layers.

    Each of the `num_layers` layers is a non-overlapping 2x2, stride-2 convolution, so every latent
    sees exactly one 2^n x 2^n block of pixels and no neighbouring block bleeds into it.
    `adapter_layer` puts a 1x1 convolution first, which mixes colour channels without downsampling.
    With `pixelsight_filters` the widest layer has that many filters and a 1x1 convolution projects
    it to `out_channels`; otherwise the widest layer is `out_channels` itself.
    The last layer is linear unless `activate_output`, for when a Linear layer follows (the VAE).
    """

    def __init__(self, num_layers: int, out_channels: int, adapter_layer: bool = False,
                 pixelsight_filters: int = 0, in_channels: int = 3, activate_output: bool = False):
        super().__init__()
        widths = layer_widths(num_layers, pixelsight_filters or out_channels, adapter_layer)
        kernels = [1 if adapter_layer and i == 0 else 2 for i in range(len(widths))]
        if pixelsight_filters:
            widths, kernels = widths + [out_channels], kernels + [1]

        layers = []
        channels = in_channels
        for i, (width, kernel) in enumerate(zip(widths, kernels)):
            activate = i < len(widths) - 1 or activate_output
            # BatchNorm's shift makes a bias before it redundant.
            conv = nn.Conv2d(channels, width, kernel, stride=kernel, bias=not activate)
            layers += conv_block(conv, activate)
            channels = width
        self.layers = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
