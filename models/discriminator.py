"""A patch discriminator and its hinge loss: the adversarial term that punishes blur (VQGAN).

Pixel loss alone rewards the mean of the sprites a code could stand for, a blur; a discriminator
that judges each patch real or reconstructed rewards a sharp choice instead. The design follows
pix2pix's PatchGAN as taming-transformers uses it (Isola et al. 2017; Esser et al. 2021): 4x4
convolutions, each output logit judging one overlapping patch, a hinge loss, and a weight for the
generator's term set by gradient norms at the decoder's last layer.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import group_norm

# VQGAN's bounds on the adaptive weight: the floor under the adversarial gradient's norm, the ceiling.
ADAPTIVE_EPSILON, ADAPTIVE_MAX = 1e-4, 1e4


class PatchDiscriminator(nn.Module):
    """Image [B, C, H, W] -> logits [B, 1, h, w], one per overlapping patch: `layers` 4x4 stride-2
    convolutions doubling from `channels`, then two 4x4 stride-1 ones."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        stack = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            wider = channels * 2 ** min(i, 3)
            stack += [nn.Conv2d(width, wider, 4, stride=2 if i < layers else 1, padding=1, bias=False),
                      group_norm(wider), nn.LeakyReLU(0.2)]
            width = wider
        stack.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*stack)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The discriminator's hinge loss: real patches pushed above +1, reconstructed ones below -1."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def generator_loss(fake_logits: Tensor) -> Tensor:
    """The autoencoder's adversarial term: reconstructions judged real."""
    return -fake_logits.mean()


def adaptive_weight(reconstruction_loss: Tensor, adversarial_loss: Tensor, last_layer: Tensor) -> Tensor:
    """VQGAN's balance: ||grad of the reconstruction loss|| / ||grad of the adversarial one||, both at
    the decoder's last layer, so that neither term swamps the other whatever their scales. Detached:
    a weight, not a term to train."""
    recon_grad, = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    adversarial_grad, = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)
    weight = recon_grad.norm() / (adversarial_grad.norm() + ADAPTIVE_EPSILON)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach()
