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


class AdversarialLoss(nn.Module):
    """The adversarial half of the objective, in one place: the discriminator, the weight of its term,
    and the warm-up of `start_step` training steps of reconstruction alone before either trains
    (VQGAN's: a discriminator judging early blur teaches the autoencoder nothing it needs).

    `generator_term` is the autoencoder's term, `weight` x the adaptive balance x -D(reconstruction);
    `discriminator_term` the hinge loss that trains the discriminator alone, by its own optimiser."""

    def __init__(self, weight: float, start_step: int, in_channels: int = 3, channels: int = 64, layers: int = 2):
        super().__init__()
        self.weight, self.start_step = weight, start_step
        self.discriminator = PatchDiscriminator(in_channels, channels, layers)
        # Training steps seen, a buffer so that a resumed run keeps its place in the warm-up.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def active(self) -> bool:
        return int(self.step) >= self.start_step

    def generator_term(self, reconstruction: Tensor, reconstruction_loss: Tensor, last_layer: Tensor) -> Tensor:
        """The weighted adversarial term of one training step (0 during the warm-up, and outside
        training, where no gradient is there to balance); counts the step."""
        if not torch.is_grad_enabled() or not self.training:
            return reconstruction.new_zeros((), dtype=torch.float32)
        active = self.active
        self.step += 1
        if not active:
            return reconstruction.new_zeros((), dtype=torch.float32)
        # The discriminator's own parameters take no gradient from the autoencoder's term.
        self.discriminator.requires_grad_(False)
        term = generator_loss(self.discriminator(reconstruction.float()))
        self.discriminator.requires_grad_(True)
        return self.weight * adaptive_weight(reconstruction_loss, term, last_layer) * term

    def discriminator_term(self, x: Tensor, reconstruction: Tensor) -> Tensor:
        """The hinge loss of real sprites against their detached reconstructions."""
        return hinge_discriminator_loss(self.discriminator(x.float()), self.discriminator(reconstruction.detach().float()))
