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

A low dimension alone did not keep codes alive on sprites (358 of 1,024 in use on the test split
after three epochs, perplexity 13): codes start far from where the latents gather and a code no
latent picks gets no gradient. So, as the EMA quantiser does, `kmeans_init` places the codes on k-means of the first
batch's latents, and `dead_code_threshold` > 0 moves a code whose running count (an EMA, `decay`)
falls below it onto a latent of the current batch.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import commitment_loss
from .collectives import all_reduce_sum, broadcast_from_first_rank
from .quantizer import KMEANS_SAMPLES, QuantizerOutput, kmeans, restart_rows


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
                 commitment_cost: float = 0.25, rotation_trick: bool = False, kmeans_init: bool = False,
                 dead_code_threshold: float = 0.0, dead_code_sampling: str = "uniform", decay: float = 0.99):
        super().__init__()
        self.num_embeddings, self.codebook_dim = num_embeddings, codebook_dim
        self.commitment_cost, self.rotation_trick = commitment_cost, rotation_trick
        self.dead_code_threshold, self.dead_code_sampling, self.decay = dead_code_threshold, dead_code_sampling, decay
        self.project_in = nn.Conv2d(embedding_dim, codebook_dim, 1)
        self.project_out = nn.Conv2d(codebook_dim, embedding_dim, 1)
        self.codebook = nn.Parameter(unit(torch.randn(num_embeddings, codebook_dim)))
        # Each code's running count of latents a step; every code starts as if seen once.
        self.register_buffer("cluster_size", torch.ones(num_embeddings))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def nearest(self, flat: Tensor) -> Tensor:
        """Unit rows [N, codebook_dim] -> index of the code of largest cosine (the first of equals)."""
        return (flat @ unit(self.codebook).t()).argmax(1)

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        # The lookup in float32: bfloat16 cosines of 8 bits tie codes that float32 tells apart.
        with torch.autocast(z_e.device.type, enabled=False):
            z = self.project_in(z_e.float())
            b, d, h, w = z.shape
            flat = unit(z.permute(0, 2, 3, 1).reshape(-1, d))
            # Codes are moved before the lookup: backward needs the codebook as the loss saw it.
            if self.training and not self.initialized:
                self.place_codes_by_kmeans(flat.detach())
            elif self.training and self.dead_code_threshold > 0:
                self.restart_dead_codes(flat.detach())
            indices = self.nearest(flat.detach())
            codes = unit(self.codebook)[indices]
            # The codebook's term pulls codes to their latents; the commitment loss, latents to their codes.
            loss = F.mse_loss(codes, flat.detach()) + commitment_loss(flat, codes.detach(), self.commitment_cost)
            chosen = rotate_onto(flat, codes.detach()) if self.rotation_trick else flat + (codes - flat).detach()
            grid = chosen.reshape(b, h, w, d).permute(0, 3, 1, 2)
            quantized = self.project_out(grid)
            if self.training:
                self.count(indices)
        return QuantizerOutput(quantized.to(z_e.dtype), loss, indices.reshape(b, h, w))

    @torch.no_grad()
    def place_codes_by_kmeans(self, flat: Tensor) -> None:
        """The codes set to unit k-means centroids of unit latents `flat` [N, codebook_dim]."""
        sample = flat[torch.randperm(len(flat), device=flat.device)[:KMEANS_SAMPLES]]
        centroids = unit(kmeans(sample, self.num_embeddings))
        broadcast_from_first_rank(centroids)
        self.codebook.copy_(centroids)
        self.initialized.fill_(True)

    @torch.no_grad()
    def count(self, indices: Tensor) -> None:
        """One EMA step of each code's count of latents a step."""
        counts = torch.bincount(indices, minlength=self.num_embeddings).float()
        all_reduce_sum(counts)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)

    @torch.no_grad()
    def restart_dead_codes(self, flat: Tensor) -> None:
        """Codes whose count fell below `dead_code_threshold` moved onto unit latents `flat` of this
        batch, drawn uniformly or (dead_code_sampling 'error') by their distance from their codes."""
        errors = None
        if self.dead_code_sampling == "error":
            errors = 2 - 2 * (flat @ unit(self.codebook).t()).amax(1)  # squared distance on the unit sphere
        candidates = flat[restart_rows(self.num_embeddings, len(flat), errors, flat.device)]
        broadcast_from_first_rank(candidates)
        dead = self.cluster_size < self.dead_code_threshold
        self.codebook.copy_(torch.where(dead.unsqueeze(1), candidates, self.codebook))
        self.cluster_size.copy_(torch.where(dead, 1.0, self.cluster_size))

    def embed_indices(self, indices: Tensor) -> Tensor:
        """Code indices [B, H, W] -> the projected unit codes [B, embedding_dim, H, W]."""
        return self.project_out(F.embedding(indices, unit(self.codebook)).permute(0, 3, 1, 2))
