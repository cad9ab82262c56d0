"""Factorised, l2-normalised code lookup (ViT-VQGAN, Yu et al. 2022; LlamaGen, Sun et al. 2024).

A latent is projected to `codebook_dim` (8) channels, both it and every code are scaled to unit
length, and the nearest code is the one of largest cosine. In a low-dimensional unit sphere every
code lies near some latents, so few die: the cure both papers give for a codebook of which a few
codes take every latent. The codebook is learnt by gradient (its loss pulls codes to their
latents, the commitment loss latents to their codes) and the chosen code is projected back to
`embedding_dim` for the decoder.

Gradients pass to the encoder straight through, or with `rotation_trick` by the rotation trick
(Fifty et al. 2024): the latent is rotated and scaled onto its code by a transform treated as
constant, so the gradient reaching it keeps the angle between latent and code.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import commitment_loss
from .quantizer import QuantizerOutput


def unit(x: Tensor, dim: int = 1) -> Tensor:
    return F.normalize(x, dim=dim, eps=1e-6)


def rotate_onto(z: Tensor, code: Tensor) -> Tensor:
    """Rows z [N, D] mapped onto `code` [N, D] by the rotation and scaling that take each z to its
    code, both held constant: equal to `code` forwards, a rotated gradient backwards."""
    with torch.no_grad():
        u, v = unit(z), unit(code)
        w = unit(u + v)
        scale = code.norm(dim=1, keepdim=True) / z.norm(dim=1, keepdim=True).clamp(min=1e-6)
    # R z = z - 2 w (w.z) + 2 v (u.z): the Householder pair that turns u into v.
    rotated = z - 2 * w * (w * z).sum(1, keepdim=True) + 2 * v * (u * z).sum(1, keepdim=True)
    return scale * rotated


class FactorizedQuantizer(nn.Module):
    """Latents [B, embedding_dim, H, W] -> the nearest of `num_embeddings` unit codes of
    `codebook_dim` channels, by cosine, projected back to embedding_dim."""

    def __init__(self, num_embeddings: int, embedding_dim: int, codebook_dim: int = 8,
                 commitment_cost: float = 0.25, rotation_trick: bool = False):
        super().__init__()
        self.num_embeddings, self.codebook_dim = num_embeddings, codebook_dim
        self.commitment_cost, self.rotation_trick = commitment_cost, rotation_trick
        self.project_in = nn.Conv2d(embedding_dim, codebook_dim, 1)
        self.project_out = nn.Conv2d(codebook_dim, embedding_dim, 1)
        self.codebook = nn.Parameter(unit(torch.randn(num_embeddings, codebook_dim)))

    def nearest(self, flat: Tensor) -> Tensor:
        """Unit rows [N, codebook_dim] -> index of the code of largest cosine (the first of equals)."""
        return (flat @ unit(self.codebook).t()).argmax(1)

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        # The lookup in float32: bfloat16 cosines of 8 bits tie codes that float32 tells apart.
        with torch.autocast(z_e.device.type, enabled=False):
            z = self.project_in(z_e.float())
            b, d, h, w = z.shape
            flat = unit(z.permute(0, 2, 3, 1).reshape(-1, d))
            indices = self.nearest(flat.detach())
            codes = unit(self.codebook)[indices]
            # The codebook's term pulls codes to their latents; the commitment loss, latents to their codes.
            loss = F.mse_loss(codes, flat.detach()) + commitment_loss(flat, codes.detach(), self.commitment_cost)
            chosen = rotate_onto(flat, codes.detach()) if self.rotation_trick else flat + (codes - flat).detach()
            grid = chosen.reshape(b, h, w, d).permute(0, 3, 1, 2)
            quantized = self.project_out(grid)
        return QuantizerOutput(quantized.to(z_e.dtype), loss, indices.reshape(b, h, w))

    def embed_indices(self, indices: Tensor) -> Tensor:
        """Code indices [B, H, W] -> the projected unit codes [B, embedding_dim, H, W]."""
        return self.project_out(F.embedding(indices, unit(self.codebook)).permute(0, 3, 1, 2))
