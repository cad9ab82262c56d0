"""Convolutional VAE with a Gaussian latent vector, the paper's non-quantised baseline."""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decoder import Decoder
from .encoder import Encoder
from .losses import reconstruction_loss


class VAEOutput(NamedTuple):
    reconstruction: Tensor  # [B, C, H, W] in [0, 1]
    mu: Tensor  # [B, latent_dim]
    logvar: Tensor  # [B, latent_dim]


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dims, averaged over the batch."""
    return (-0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(1)).mean()


class VAE(nn.Module):
    """Image -> mean and log-variance of a `latent_dim` Gaussian -> image.

    The objective (`loss_terms`) is the reconstruction's MSE plus kl_weight times the KL divergence
    over C*H*W: the MSE is a mean over the C*H*W values of an image, so with kl_weight (beta) = 1
    the sum is the negative ELBO of a Gaussian likelihood of variance 1/2, divided by C*H*W and up
    to a constant. kl_weight < 1 trades a less regular latent space for sharper reconstructions.
    """

    # Keys that weigh the objective and shape no tensor: a run may resume under other values.
    objective_keys = ("kl_weight",)

    def __init__(self, num_layers: int = 4, max_filters: int = 512, latent_dim: int = 256,
                 kl_weight: float = 1.0, adapter_layer: bool = True, image_size: int = 64,
                 in_channels: int = 3):
        super().__init__()
        scale = 2 ** num_layers
        if image_size % scale:
            raise ValueError(f"image size {image_size} is not a multiple of 2^num_layers = {scale}")
        self.kl_weight = kl_weight
        self.grid_shape = (max_filters, image_size // scale, image_size // scale)
        features = max_filters * (image_size // scale) ** 2
        self.encoder = Encoder(num_layers, max_filters, adapter_layer, in_channels=in_channels,
                               activate_output=True)
        self.to_gaussian = nn.Linear(features, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, features)
        self.decoder = Decoder(num_layers, max_filters, adapter_layer, out_channels=in_channels)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image [B, C, H, W] -> (mu, logvar), each [B, latent_dim]."""
        return self.to_gaussian(self.encoder(x).flatten(1)).chunk(2, dim=1)

    def decode(self, z: Tensor) -> Tensor:
        """Latent vectors [B, latent_dim] -> image [B, C, H, W]."""
        # ReLU mirrors the activated last encoder layer that fed the Linear on the way in.
        grid = F.relu(self.from_latent(z)).unflatten(1, self.grid_shape)
        return self.decoder(grid)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> VAEOutput:
        """`noise` [B, latent_dim] is the reparameterisation's standard normal draw, made here
        when None; a data-parallel caller passes its rows of one draw for the global batch."""
        mu, logvar = self.encode(x)
        if self.training and noise is None:
            noise = torch.randn_like(mu)
        # Reparameterisation while training; the mean in eval, so evaluation is deterministic.
        z = mu + noise * (0.5 * logvar).exp() if self.training else mu
        return VAEOutput(self.decode(z), mu, logvar)

    def loss_terms(self, x: Tensor, output: VAEOutput) -> dict[str, Tensor]:
        """Each named term of the objective for input x and the model's `output` of it; 'loss' is
        their weighted sum, what training minimises."""
        recon = reconstruction_loss(output.reconstruction, x)
        kl = kl_divergence(output.mu, output.logvar)
        return {"recon": recon, "kl": kl, "loss": recon + self.kl_weight * kl / x[0].numel()}

    def bits_per_sprite(self, image_size: int, palette_colours: float | None = None) -> None:
        """None: the latent is a vector of floats, with no fixed bit count."""
        return None
