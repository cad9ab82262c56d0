"""What the fast path runs exactly: the kinds of modules it was written for, checked before it runs.

Its shortcuts rest on the layers being what the models of models/ build: each latent of a VQ-VAE
sees one 2^n x 2^n block alone (so distinct blocks can run once), the decoder is convolutions,
BatchNorm and ReLU ending in the stretched sigmoid (whose backward models/fast/codes.py writes out),
and the quantiser's output is its code (so the decoder can run once per code). And its twins
compute what the methods of models/ did when they were checked against them (mirrors.py). A model
with any other module, a subclass included, a hook or a method set on a module that the fused paths
would skip, or a mirrored method changed since, trains on its own forward instead (`accelerate`).
"""
import torch
from torch import nn

from ..batchnorm import SyncBatchNorm2d
from ..decoder import OUTPUT_MARGIN, Decoder, StretchedSigmoid
from ..encoder import Encoder
from ..quantizer import VectorQuantizerEMA
from ..vae import VAE
from ..vqvae import VQVAE
from .mirrors import mirror_problem, overridden

DEVICES = ("cpu", "cuda")
# Inputs at which the output activation must compute the stretched sigmoid bit for bit.
PROBE = torch.linspace(-8, 8, 33)


def _is_conv(layer: nn.Module, kind: type, side: int) -> bool:
    return (type(layer) is kind and layer.kernel_size == (side, side) and layer.stride == (side, side)
            and layer.padding == (0, 0) and layer.dilation == (1, 1) and layer.groups == 1
            and layer.padding_mode == "zeros" and getattr(layer, "output_padding", (0, 0)) == (0, 0))


def _squashes_as_stretched_sigmoid(layer: nn.Module) -> bool:
    expected = torch.sigmoid(PROBE) * (1 + 2 * OUTPUT_MARGIN) - OUTPUT_MARGIN
    with torch.no_grad():
        return type(layer) is StretchedSigmoid and torch.equal(layer(PROBE), expected)


def _layer_problem(name: str, layers: nn.Sequential, downsampling: type, num_layers: int) -> str | None:
    """Why `layers` (an Encoder's, or a Decoder's without its output activation) is not one the fast
    path runs exactly: (convolution, BatchNorm, ReLU) blocks, 1x1 or 2x2 stride-2, `num_layers` 2x2."""
    for i, layer in enumerate(layers):
        fits = (_is_conv(layer, nn.Conv2d, 1) or _is_conv(layer, downsampling, 2)) if i % 3 == 0 else (
            type(layer) in (nn.BatchNorm2d, SyncBatchNorm2d) if i % 3 == 1 else type(layer) is nn.ReLU)
        if not fits:
            return (f"{name}.{i} ({layer}) is not a layer the fast path runs exactly: it runs 1x1 and "
                    f"2x2 stride-2 {downsampling.__name__} layers unpadded, each followed by BatchNorm2d "
                    "and ReLU or by nothing")
    blocks = sum(_is_conv(layer, downsampling, 2) for layer in layers)
    if blocks != num_layers:
        return f"{name} has {blocks} 2x2 layers where num_layers is {num_layers}"
    return None


def problem(model: nn.Module, device: torch.device) -> str | None:
    """Why the fast path cannot run `model` on `device` exactly as the model runs itself, naming the
    module that stops it; None when it can."""
    if torch.device(device).type not in DEVICES:
        return f"device {device} is not one of {', '.join(DEVICES)}"
    if type(model) not in (VQVAE, VAE):
        return f"{type(model).__name__} is not models.VQVAE or models.VAE"
    found = mirror_problem()
    if found:
        return found
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
            return f"{name or 'the model'} has a hook, which the fused layers would not call"
        attribute = overridden(module)
        if attribute:
            return (f"{name or 'the model'} sets its own {attribute}, in place of the "
                    f"{type(module).__name__}.{attribute} that the fast path mirrors")
    if getattr(model, "palette_head", None) is not None:
        return "palette_head: the fast path decodes colours, not a choice over each sprite's palette"
    if getattr(model, "palette_snap", False):
        return "palette_snap: the fast path decodes colours without snapping them to each sprite's palette"
    children = {"encoder": Encoder, "decoder": Decoder}
    if type(model) is VQVAE:
        children["quantizer"] = VectorQuantizerEMA
    for name, kind in children.items():
        if type(getattr(model, name)) is not kind:
            return f"{name} is a {type(getattr(model, name)).__name__}, not the {kind.__name__} the fast path was written for"
    num_layers = model.num_layers if type(model) is VQVAE else sum(
        _is_conv(layer, nn.Conv2d, 2) for layer in model.encoder.layers)
    layers = model.encoder.layers
    found = _layer_problem("encoder.layers", layers, nn.Conv2d, num_layers)
    if found:
        return found
    layers = model.decoder.layers
    if len(layers) % 3 != 2:
        return f"decoder.layers has {len(layers)} layers: not (convolution, BatchNorm, ReLU) blocks, a convolution and its output activation"
    found = _layer_problem("decoder.layers", layers[:-1], nn.ConvTranspose2d, num_layers)
    if found:
        return found
    if not _squashes_as_stretched_sigmoid(layers[-1]):
        return (f"decoder.layers.{len(layers) - 1} ({layers[-1]}) is not the stretched sigmoid whose "
                "gradient the fast path computes by hand")
    return None
