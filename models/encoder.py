"""The convolutional encoder shared by the VAE and the VQ-VAEs."""
from torch import Tensor, nn

from .distinct import run_layers
from .pointwise import fused_pointwise, is_pointwise_stack


# The adapter's width from which its stack with a 2x2 layer runs fused: alternating training
# steps on a 2-core Zen 3 gave 1,305 against 1,476 ms for the 16x16 Pixel VQ-VAE (adapter 128
# wide), and 547 against 545 for the VAE (32 wide), whose layers are as fast one by one.
PATCH_FUSION_MIN_WIDTH = 128


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
        # The adapter, its BatchNorm and ReLU, and the next layer (the Pixel VQ-VAE's all-1x1
        # encoder, or the first downsampling layer, where the adapter is wide): fused on the CPU,
        # where they are memory-bound. On a GPU the layer-by-layer path is faster.
        front = self.layers[:4]
        self.pointwise = is_pointwise_stack(front) or (
            is_pointwise_stack(front, patches=True) and front[0].out_channels >= PATCH_FUSION_MIN_WIDTH)

    def forward(self, x: Tensor, counts: Tensor | None = None) -> Tensor:
        """`counts`: x holds distinct blocks standing for counts[u] copies each (models/distinct.py)."""
        if self.pointwise and x.device.type == "cpu":
            conv1, bn, _, conv2 = self.layers[:4]
            return run_layers(self.layers[4:], fused_pointwise(x, conv1, bn, conv2, counts=counts), counts)
        return run_layers(self.layers, x, counts)
