"""VQ-VAE and Pixel VQ-VAE: encoder, vector quantiser (EMA, residual or finite scalar), decoder, and
their objective."""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decoder import Decoder
from .discriminator import AdversarialLoss
from .encoder import Encoder
from .factorized import FactorizedQuantizer
from .losses import reconstruction_loss, ssim
from .palette import BITS_PER_COLOUR, PaletteChoice, PaletteHead, Palettes, snap_to_palette, sprite_palettes
from .fsq import FiniteScalarQuantizer, parse_levels
from .quantizer import QuantizerOutput, VectorQuantizerEMA
from .residual import ResidualVectorQuantizer
from .resnet import ResidualDecoder, ResidualEncoder

QUANTIZERS = ("ema", "residual", "fsq", "factorized")
# 'paper': non-overlapping 2x2 layers, each code its own block; 'residual': models/resnet.py, codes that see their neighbours.
ARCHITECTURES = ("paper", "residual")


class VQVAEOutput(NamedTuple):
    reconstruction: Tensor  # [B, C, H, W] in [0, 1]
    vq_loss: Tensor  # weighted commitment loss, to add to the reconstruction loss
    indices: Tensor  # [B, h, w] codes; [B, residual_depth, h, w] for the residual quantiser
    palette: PaletteChoice | None = None  # with palette_output: the choice among the input's own colours


class VQVAE(nn.Module):
    """Image -> grid of codebook indices -> image.

    The plain VQ-VAE has neither `adapter_layer` nor `pixelsight_filters`; Pixel VQ-VAE has both.
    With `palette_output` the decoder ends in `palette_features` features per pixel, from which
    models/palette.py chooses one colour of the input's own palette; decoding then needs a palette.
    `palette_context` > 0 also gives the encoder that many channels describing each pixel's place in
    its sprite's palette, so that codes can name palette entries rather than colours.
    `quantizer` is 'ema' (the paper's), 'residual' (`residual_depth` EMA quantisers in turn), 'fsq'
    (`fsq_levels` per channel, whose product is `num_embeddings`) or 'factorized' (l2-normalised
    codes of `codebook_dim` channels, models/factorized.py, optionally with the `rotation_trick`).
    `architecture` 'residual' builds models/resnet.py's encoder and decoder, `residual_channels` wide
    at full size with `residual_blocks` blocks at each resolution, in place of the paper's stack. `kmeans_init` and
    `dead_code_threshold` act on the EMA, residual and factorised codebooks alike (not FSQ's, which has
    no codebook to place); `dead_code_sampling` says how they draw the latents that dead codes
    restart on: 'uniform' or by quantisation 'error'.
    The objective (`loss_terms`) is the reconstruction's MSE, or with palette_output the palette
    choice's cross-entropy, plus the commitment loss and, with `use_ssim_loss` (the paper's switch),
    `ssim_weight` times 1 - SSIM.
    Keyword names are the config keys, so `VQVAE(**model_config)` builds either.
    """

    # Keys that weigh the objective and shape no tensor: a run may resume under other values.
    objective_keys = ("commitment_cost", "use_ssim_loss", "ssim_weight", "l1_weight", "adversarial_start")

    def __init__(self, num_layers: int, num_embeddings: int, embedding_dim: int,
                 commitment_cost: float = 0.25, ema_decay: float = 0.99,
                 adapter_layer: bool = False, pixelsight_filters: int = 0, in_channels: int = 3,
                 kmeans_init: bool = False, dead_code_threshold: float = 0.0,
                 palette_output: bool = False, palette_features: int = 16, quantizer: str = "ema",
                 residual_depth: int = 4, fsq_levels: str = "8,8,4", palette_context: int = 0,
                 dead_code_sampling: str = "uniform", architecture: str = "paper", residual_channels: int = 32,
                 residual_blocks: int = 1, codebook_dim: int = 8, rotation_trick: bool = False,
                 palette_snap: bool = False, l1_weight: float = 0.0, adversarial_weight: float = 0.0,
                 adversarial_start: int = 0, discriminator_channels: int = 64, discriminator_layers: int = 2,
                 use_ssim_loss: bool = False, ssim_weight: float = 1.0):
        super().__init__()
        if palette_snap and palette_output:
            raise ValueError("palette_snap snaps decoded colours to the palette; palette_output already chooses among it")
        if adversarial_weight and palette_output:
            raise ValueError("adversarial_weight needs decoded colours with a gradient; palette_output chooses them without")
        if palette_context and not palette_output:
            raise ValueError("palette_context describes palette entries: it needs palette_output=True")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        self.num_layers, self.pixelsight_filters = num_layers, pixelsight_filters
        self.use_ssim_loss, self.ssim_weight = use_ssim_loss, ssim_weight
        if architecture == "paper":
            self.encoder = Encoder(num_layers, embedding_dim, adapter_layer, pixelsight_filters,
                                   in_channels + palette_context)
        else:
            self.encoder = ResidualEncoder(num_layers, embedding_dim, residual_channels, residual_blocks,
                                           adapter_layer, pixelsight_filters, in_channels + palette_context)
        if quantizer == "ema":
            self.quantizer = VectorQuantizerEMA(num_embeddings, embedding_dim, commitment_cost,
                                                ema_decay, kmeans_init=kmeans_init,
                                                dead_code_threshold=dead_code_threshold,
                                                dead_code_sampling=dead_code_sampling)
        elif quantizer == "residual":
            self.quantizer = ResidualVectorQuantizer(num_embeddings, embedding_dim, residual_depth,
                                                     commitment_cost, ema_decay, kmeans_init=kmeans_init,
                                                     dead_code_threshold=dead_code_threshold,
                                                     dead_code_sampling=dead_code_sampling)
        elif quantizer == "fsq":
            self.quantizer = FiniteScalarQuantizer(embedding_dim, parse_levels(fsq_levels))
            if self.quantizer.num_embeddings != num_embeddings:
                raise ValueError(f"fsq_levels {fsq_levels!r} make {self.quantizer.num_embeddings} codes, "
                                 f"not num_embeddings = {num_embeddings}")
        elif quantizer == "factorized":
            self.quantizer = FactorizedQuantizer(num_embeddings, embedding_dim, codebook_dim, commitment_cost,
                                                 rotation_trick, kmeans_init, dead_code_threshold,
                                                 dead_code_sampling, ema_decay)
        else:
            raise ValueError(f"quantizer {quantizer!r} is not one of {', '.join(QUANTIZERS)}")
        out_channels = palette_features if palette_output else in_channels
        if architecture == "paper":
            self.decoder = Decoder(num_layers, embedding_dim, adapter_layer, pixelsight_filters,
                                   out_channels, output_activation=not palette_output)
        else:
            self.decoder = ResidualDecoder(num_layers, embedding_dim, residual_channels, residual_blocks, adapter_layer,
                                           pixelsight_filters, out_channels, output_activation=not palette_output)
        self.palette_head = PaletteHead(palette_features, context_features=palette_context) if palette_output else None
        self.palette_snap, self.l1_weight = palette_snap, l1_weight
        self.adversarial = (AdversarialLoss(adversarial_weight, adversarial_start, in_channels, discriminator_channels,
                                            discriminator_layers) if adversarial_weight > 0 else None)

    @property
    def draws_with_palette(self) -> bool:
        """Whether decoding needs the palette of the sprite drawn, side information beside the codes."""
        return self.palette_head is not None or self.palette_snap

    def code_grid_size(self, image_size: int) -> int:
        """Side of the code grid for a square image of side `image_size`."""
        scale = 2 ** self.num_layers
        if image_size % scale:
            raise ValueError(f"image size {image_size} is not a multiple of 2^num_layers = {scale}")
        return image_size // scale

    @property
    def codes_per_cell(self) -> int:
        """Codes that name one cell of the grid: one from each level of the residual quantiser."""
        return self.quantizer.depth if isinstance(self.quantizer, ResidualVectorQuantizer) else 1

    @property
    def code_histogram_size(self) -> int:
        """Bins of the code histogram: num_embeddings codes for each of the codes_per_cell codebooks."""
        return self.codes_per_cell * self.quantizer.num_embeddings

    def bits_per_sprite(self, image_size: int, palette_colours: float | None = None) -> float:
        """Bits that rebuild one image: grid cells x codes per cell x log2(codebook size) for the
        codes, plus, for a palette-output model, its palette of `palette_colours` colours
        (BITS_PER_COLOUR each), the side information its decoder draws with. FSQ's levels multiply
        to num_embeddings, so its sum of log2(level) per cell is log2(num_embeddings) too."""
        bits = self.code_grid_size(image_size) ** 2 * self.codes_per_cell * math.log2(self.quantizer.num_embeddings)
        if not self.draws_with_palette:
            return bits
        if palette_colours is None:
            raise ValueError("a palette-output model's bits per sprite count its palettes: pass palette_colours")
        return bits + BITS_PER_COLOUR * palette_colours

    def encode_latents(self, x: Tensor, palettes: Palettes | None = None) -> Tensor:
        """Image -> latents before quantisation, z_e. With palette_context the encoder also sees each
        pixel's entry of `palettes`, the input's own (computed from x when not given)."""
        if self.palette_head is not None and self.palette_head.context_features:
            palettes = palettes if palettes is not None else sprite_palettes(x)
            x = torch.cat([x, self.palette_head.pixel_context(palettes, x.dtype)], 1)
        return self.encoder(x)

    def quantize(self, z_e: Tensor) -> QuantizerOutput:
        return self.quantizer(z_e)

    def encode(self, x: Tensor) -> Tensor:
        """Image [B, C, H, W] -> code indices [B, h, w] ([B, residual_depth, h, w] for 'residual')."""
        return self.quantize(self.encode_latents(x)).indices

    def decode(self, z_q: Tensor, palettes: Palettes | None = None) -> Tensor:
        """Quantised latents [B, D, h, w] -> image [B, C, H, W]; a palette-output model draws with
        `palettes` (one per image, or one for all)."""
        if self.palette_head is None and not self.palette_snap:
            return self.decoder(z_q)
        if palettes is None:
            raise ValueError("a palette_output model decodes with a palette: pass palettes, e.g. "
                             "models.palette.sprite_palettes(images) of the sprites to draw with")
        if self.palette_head is None:
            return snap_to_palette(self.decoder(z_q), palettes)
        return PaletteChoice(self.palette_head, self.decoder(z_q), palettes).chosen_colours()

    def decode_indices(self, indices: Tensor, palettes: Palettes | None = None) -> Tensor:
        """Code indices, as `encode` gives them, -> image [B, C, H, W]."""
        return self.decode(self.quantizer.embed_indices(indices), palettes)

    def forward(self, x: Tensor) -> VQVAEOutput:
        if self.palette_head is None:
            quantized = self.quantize(self.encode_latents(x))
            reconstruction = self.decoder(quantized.quantized)
            if self.palette_snap and not self.training:
                # Snapped in evaluation alone: training needs the decoder's colours and their gradient.
                reconstruction = snap_to_palette(reconstruction, sprite_palettes(x, with_index=False))
            return VQVAEOutput(reconstruction, quantized.loss, quantized.indices)
        palettes = sprite_palettes(x)
        quantized = self.quantize(self.encode_latents(x, palettes))
        choice = PaletteChoice(self.palette_head, self.decoder(quantized.quantized), palettes)
        return VQVAEOutput(choice.chosen_colours(), quantized.loss, quantized.indices, choice)

    def loss_terms(self, x: Tensor, output: VQVAEOutput) -> dict[str, Tensor]:
        """Each named term of the objective for input x and the model's `output` of it; 'loss' is
        their weighted sum, what training minimises. Kept on the device: reading them back every
        step would stall the pipeline."""
        recon = reconstruction_loss(output.reconstruction, x)
        terms = {"recon": recon, "vq": output.vq_loss}
        if output.palette is None:
            loss = recon + output.vq_loss
        else:
            # The chosen colours carry no gradient: the choice is trained by its cross-entropy, and
            # "recon" stays the MSE of what the model outputs, comparable with the other models'.
            terms["palette"] = output.palette.cross_entropy()
            loss = terms["palette"] + output.vq_loss
        if self.l1_weight:
            terms["l1"] = F.l1_loss(output.reconstruction.float(), x.float())
            loss = loss + self.l1_weight * terms["l1"]
        if self.use_ssim_loss:
            image = output.reconstruction if output.palette is None else output.palette.expected_colours()
            terms["ssim"] = 1 - ssim(image, x)
            loss = loss + self.ssim_weight * terms["ssim"]
        if self.adversarial is not None:
            # Balanced against the terms before it, by their gradients at the decoder's last layer.
            terms["adversarial"] = self.adversarial.generator_term(output.reconstruction, loss, self.decoder.last_layer)
            loss = loss + terms["adversarial"]
        terms["loss"] = loss
        return terms
