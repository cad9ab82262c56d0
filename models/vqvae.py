"""VQ-VAE and Pixel VQ-VAE: encoder, EMA vector quantiser, decoder."""
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .codes import decode_by_code, decodes_by_code
from .decoder import Decoder
from .distinct import assemble, distinct_blocks
from .encoder import Encoder
from .quantizer import QuantizerOutput, VectorQuantizerEMA


class VQVAEOutput(NamedTuple):
    reconstruction: Tensor  # [B, C, H, W] in [0, 1]
    vq_loss: Tensor  # weighted commitment loss, to add to the reconstruction loss
    indices: Tensor  # [B, h, w] codes


class VQVAE(nn.Module):
    """Image -> grid of codebook indices -> image.

    The plain VQ-VAE has neither `adapter_layer` nor `pixelsight_filters`; Pixel VQ-VAE has both.
    Keyword names are the config keys, so `VQVAE(**model_config)` builds either.
    """

    def __init__(self, num_layers: int, num_embeddings: int, embedding_dim: int,
                 commitment_cost: float = 0.25, ema_decay: float = 0.99,
                 adapter_layer: bool = False, pixelsight_filters: int = 0, in_channels: int = 3,
                 kmeans_init: bool = False, dead_code_threshold: float = 0.0):
        super().__init__()
        self.num_layers, self.pixelsight_filters = num_layers, pixelsight_filters
        self.encoder = Encoder(num_layers, embedding_dim, adapter_layer, pixelsight_filters,
                               in_channels)
        self.quantizer = VectorQuantizerEMA(num_embeddings, embedding_dim, commitment_cost,
                                            ema_decay, kmeans_init=kmeans_init,
                                            dead_code_threshold=dead_code_threshold)
        self.decoder = Decoder(num_layers, embedding_dim, adapter_layer, pixelsight_filters,
                               in_channels)
        # forward() runs each distinct 2^n x 2^n block of a batch once (models/distinct.py): the
        # same results as the whole batch, up to float summation order. None leaves it to the
        # measured rule of `_worth_running_distinct_blocks`; True runs distinct blocks always,
        # False every block.
        self.run_distinct_blocks: bool | None = None
        # On distinct blocks, the decoder runs once per code in use (models/codes.py).
        self.decode_by_code = True

    def code_grid_size(self, image_size: int) -> int:
        """Side of the code grid for a square image of side `image_size`."""
        scale = 2 ** self.num_layers
        if image_size % scale:
            raise ValueError(f"image size {image_size} is not a multiple of 2^num_layers = {scale}")
        return image_size // scale

    def encode_latents(self, x: Tensor) -> Tensor:
        """Image -> latents before quantisation, z_e."""
        return self.encoder(x)

    def quantize(self, z_e: Tensor) -> QuantizerOutput:
        return self.quantizer(z_e)

    def encode(self, x: Tensor) -> Tensor:
        """Image [B, C, H, W] -> code indices [B, h, w]."""
        return self.quantize(self.encode_latents(x)).indices

    def decode(self, z_q: Tensor) -> Tensor:
        """Quantised latents [B, D, h, w] -> image [B, C, H, W]."""
        return self.decoder(z_q)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Code indices [B, h, w] -> image [B, C, H, W]."""
        return self.decode(self.quantizer.embed_indices(indices))

    def _worth_running_distinct_blocks(self, x: Tensor) -> bool:
        # Measured on the CPU (bench/distinct.py): the all-1x1 model trains twice as fast on its
        # distinct pixels at either precision, and the 16x16 Pixel VQ-VAE 1.4x faster on distinct
        # blocks with its decoder run per code. The plain VQ-VAE's narrow layers cost less than
        # finding its blocks does: 1-8% slower on blocks in float32 and 1,156 against 1,457
        # images/s in bfloat16 on a Zen 4, 1,366 against 1,478 in float32 on a Zen 3. Evaluation
        # has no backward pass to save and the test split's plain backgrounds repeat more: there
        # the plain VQ-VAE ran 4,038 test images/s on blocks, 2,765 whole (Zen 3).
        if self.run_distinct_blocks is not None:
            return self.run_distinct_blocks
        bfloat16 = (torch.is_autocast_enabled(x.device.type)
                    and torch.get_autocast_dtype(x.device.type) == torch.bfloat16)
        wide = self.pixelsight_filters > 0 and (not bfloat16 or self._worth_decoding_by_code())
        return self.num_layers == 0 or wide or not self.training

    def _worth_decoding_by_code(self) -> bool:
        return self.decode_by_code and decodes_by_code(self.decoder)

    def forward(self, x: Tensor) -> VQVAEOutput:
        side = 2 ** self.num_layers
        found = distinct_blocks(x, side) if self._worth_running_distinct_blocks(x) else None
        if found is None:
            quantized = self.quantize(self.encode_latents(x))
            return VQVAEOutput(self.decode(quantized.quantized), quantized.loss, quantized.indices)
        blocks, repeats = found
        quantized = self.quantizer(self.encoder(blocks, repeats.counts), repeats)
        if self._worth_decoding_by_code():
            reconstructed = decode_by_code(self.decoder, quantized.quantized,
                                           quantized.indices.flatten(), repeats.counts)
        else:
            reconstructed = self.decoder(quantized.quantized, repeats.counts)
        grid = (len(x), x.shape[2] // side, x.shape[3] // side)
        indices = quantized.indices.flatten()[repeats.inverse].reshape(grid)
        return VQVAEOutput(assemble(reconstructed, repeats.inverse, *grid), quantized.loss, indices)
