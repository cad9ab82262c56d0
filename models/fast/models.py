"""The models of models/ on this package's paths, holding the very modules of the model they speed up.

`FastEncoder` and `FastDecoder` hold an Encoder's or Decoder's own `layers`; `FastVQVAE` and
`FastVAE` are a VQVAE or VAE with those in place of its encoder and decoder, and its quantiser,
Linear layers and attributes themselves. Parameters, buffers and state_dict keys are the model's.
"""
import torch
from torch import Tensor, nn

from ..decoder import Decoder
from ..encoder import Encoder
from ..quantizer import QuantizerOutput
from ..vae import VAE
from ..vqvae import VQVAE, VQVAEOutput
from .codes import decode_by_code
from .distinct import assemble, distinct_blocks, run_layers
from .pointwise import fused_pointwise, is_pointwise_stack
from .quantizer import quantize

# The adapter's width from which its stack with a 2x2 layer runs fused: faster for the 16x16
# Pixel VQ-VAE's 128-wide adapter, no faster for the VAE's 32 (bench/README.md).
PATCH_FUSION_MIN_WIDTH = 128


class FastEncoder(nn.Module):
    """`encoder`'s forward. On the CPU its first four layers (adapter, BatchNorm, ReLU and a 1x1 or,
    from PATCH_FUSION_MIN_WIDTH wide, a 2x2 layer) run as one fused stack (models/fast/pointwise.py)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.layers, self.out_channels = encoder.layers, encoder.out_channels
        front = self.layers[:4]
        self.pointwise = is_pointwise_stack(front) or (
            is_pointwise_stack(front, patches=True) and front[0].out_channels >= PATCH_FUSION_MIN_WIDTH)

    def forward(self, x: Tensor, counts: Tensor | None = None) -> Tensor:
        """`counts`: x holds distinct blocks standing for counts[u] copies each (models/fast/distinct.py)."""
        if self.pointwise and x.device.type == "cpu":
            conv1, bn, _, conv2 = self.layers[:4]
            return run_layers(self.layers[4:], fused_pointwise(x, conv1, bn, conv2, counts=counts), counts)
        return run_layers(self.layers, x, counts)


class FastDecoder(nn.Module):
    """`decoder`'s forward; the all-1x1 decoder runs as one fused stack on the CPU, as the encoder."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.layers = decoder.layers
        self.pointwise = len(self.layers) == 5 and is_pointwise_stack(self.layers[:4])

    def forward(self, z: Tensor, counts: Tensor | None = None, trace: list | None = None) -> Tensor:
        """`counts`: as FastEncoder's; `trace` then receives each layer's input and output (`run_layers`)."""
        if self.pointwise and z.device.type == "cpu" and trace is None:
            conv1, bn, _, conv2, output = self.layers
            return output(fused_pointwise(z, conv1, bn, conv2, counts=counts))
        hidden = run_layers(self.layers[:-2], z, counts, trace)
        # As Decoder: the last layer in float32 even under a bfloat16 autocast.
        with torch.autocast(z.device.type, enabled=False):
            return run_layers(self.layers[-2:], hidden.to(torch.promote_types(hidden.dtype, torch.float32)),
                              counts, trace)


def _sharing(cls, model: nn.Module, **children: nn.Module) -> nn.Module:
    """A `cls` (a subclass of model's class) holding model's attributes and modules themselves,
    with `children` in place of those of their names."""
    shared = cls.__new__(cls)
    nn.Module.__init__(shared)
    for name, value in vars(model).items():
        if not name.startswith("_") and name != "training":
            setattr(shared, name, value)
    for name, child in model.named_children():
        setattr(shared, name, children.get(name, child))
    return shared.train(model.training)


class FastVQVAE(VQVAE):
    """A VQVAE's forward that, where it pays, runs each distinct 2^n x 2^n block of a batch once
    (models/fast/distinct.py) and decodes once per code in use (models/fast/codes.py)."""

    @classmethod
    def of(cls, model: VQVAE) -> "FastVQVAE":
        fast = _sharing(cls, model, encoder=FastEncoder(model.encoder), decoder=FastDecoder(model.decoder))
        # None leaves distinct blocks to the measured rule of `_worth_running_distinct_blocks`; True
        # runs them always, False never. The bench and the policy tests set these.
        fast.run_distinct_blocks: bool | None = None
        fast.decode_by_code = True
        return fast

    def _worth_running_distinct_blocks(self, x: Tensor) -> bool:
        # Measured on the CPU (bench/README.md): the all-1x1 model trains twice as fast on its
        # distinct pixels at either precision, the 16x16 Pixel VQ-VAE faster on distinct blocks
        # with its decoder run per code. The plain VQ-VAE's narrow layers cost less than finding
        # its blocks does in training; in evaluation, with no backward pass to save and the test
        # split's plain backgrounds, blocks pay for it too.
        if self.run_distinct_blocks is not None:
            return self.run_distinct_blocks
        bfloat16 = (torch.is_autocast_enabled(x.device.type)
                    and torch.get_autocast_dtype(x.device.type) == torch.bfloat16)
        wide = self.pixelsight_filters > 0 and (not bfloat16 or self.decode_by_code)
        return self.num_layers == 0 or wide or not self.training

    def quantize(self, z_e: Tensor) -> QuantizerOutput:
        return quantize(self.quantizer, z_e)

    def forward(self, x: Tensor) -> VQVAEOutput:
        side = 2 ** self.num_layers
        found = distinct_blocks(x, side) if self._worth_running_distinct_blocks(x) else None
        if found is None:
            quantized = self.quantize(self.encoder(x))
            return VQVAEOutput(self.decoder(quantized.quantized), quantized.loss, quantized.indices)
        blocks, repeats = found
        quantized = quantize(self.quantizer, self.encoder(blocks, repeats.counts), repeats)
        if self.decode_by_code:
            reconstructed = decode_by_code(self.decoder, quantized.quantized,
                                           quantized.indices.flatten(), repeats.counts)
        else:
            reconstructed = self.decoder(quantized.quantized, repeats.counts)
        grid = (len(x), x.shape[2] // side, x.shape[3] // side)
        indices = quantized.indices.flatten()[repeats.inverse].reshape(grid)
        return VQVAEOutput(assemble(reconstructed, repeats.inverse, *grid), quantized.loss, indices)


class FastVAE(VAE):
    """A VAE's own forward, on the fast encoder and decoder."""

    @classmethod
    def of(cls, model: VAE) -> "FastVAE":
        return _sharing(cls, model, encoder=FastEncoder(model.encoder), decoder=FastDecoder(model.decoder))
