"""Vector quantiser whose codebook follows an exponential moving average (VQ-VAE, VQ-VAE-2)."""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .collectives import all_gather_rows, all_reduce_sum, broadcast_from_first_rank
from .losses import commitment_loss

KMEANS_SAMPLES = 16384  # latents k-means sees; enough to place the codes, cheap at any batch size
KMEANS_ITERATIONS = 10
DEAD_CODE_SAMPLING = ("uniform", "error")


class QuantizerOutput(NamedTuple):
    quantized: Tensor  # [B, D, H, W]; the codes (up to rounding), passing gradients straight through to z_e
    loss: Tensor  # commitment loss (models/losses.py), weighted by commitment_cost
    indices: Tensor  # [B, H, W]


def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """The index of the nearest code of each row of x [N, D]: the first of equal ones."""
    # ||x||^2 is the same for every code, so the argmin needs only ||e||^2 - 2 x.e.
    return torch.addmm(codebook.square().sum(1), x, codebook.t(), alpha=-2).argmin(1)


def kmeans(x: Tensor, k: int, iterations: int = KMEANS_ITERATIONS) -> Tensor:
    """k centroids of the rows of x: k-means++ seeding, then Lloyd's algorithm."""
    # Seeding far apart matters for pixel art: a few colours give a few distinct latents, and two
    # seeds on one of them leave another colour to share a code for good.
    centroids = x[torch.randint(len(x), (1,), device=x.device)]
    nearest = (x - centroids[0]).square().sum(1)
    for _ in range(k - 1):
        # The tiny floor lets seeding go on once every distinct latent already has a seed.
        chosen = x[torch.multinomial(nearest + 1e-12, 1)]
        centroids = torch.cat([centroids, chosen])
        nearest = torch.minimum(nearest, (x - chosen).square().sum(1))
    for _ in range(iterations):
        assigned = nearest_code(x, centroids)
        counts = torch.bincount(assigned, minlength=k).unsqueeze(1)
        sums = torch.zeros_like(centroids).index_add_(0, assigned, x)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


def restart_rows(codes: int, positions: int, errors: Tensor | None, device) -> Tensor:
    """For each of `codes` codes, one of a batch's `positions` latents that it would restart on:
    drawn uniformly when `errors` is None, else in proportion to `errors` [positions] (each
    latent's squared distance from its code; dead_code_sampling 'error')."""
    if errors is None:
        return torch.randint(positions, (codes,), device=device)
    # Per pixel, most latents are background that a code already serves; drawing by error sends
    # dead codes to the colours that share a code. Inverse-CDF sampling, since torch.multinomial
    # takes at most 2^24 categories (a large batch of per-pixel latents); the floor keeps it
    # defined when every latent sits on its code.
    cumulative = (errors.double() + 1e-12).cumsum(0)
    draws = torch.rand(codes, dtype=torch.float64, device=device) * cumulative[-1]
    return torch.searchsorted(cumulative, draws, right=True).clamp_(max=positions - 1)


class VectorQuantizerEMA(nn.Module):
    """Maps each latent vector to its nearest of `num_embeddings` codes of size `embedding_dim`.

    The codebook is learnt by EMA of the latents assigned to each code (with Laplace-smoothed
    counts), not by gradients, so it and its statistics are buffers. Opt-in: `kmeans_init` places
    the codes by k-means on the first training batch; `dead_code_threshold` > 0 moves codes whose
    EMA count falls below it onto latents of the current batch, drawn uniformly or, with
    `dead_code_sampling='error'`, in proportion to their squared distance from their codes. A placed
    code counts as seen once, so the threshold belongs below 1.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 decay: float = 0.99, epsilon: float = 1e-5, kmeans_init: bool = False,
                 dead_code_threshold: float = 0.0, dead_code_sampling: str = "uniform"):
        super().__init__()
        if dead_code_sampling not in DEAD_CODE_SAMPLING:
            raise ValueError(f"dead_code_sampling {dead_code_sampling!r} is not one of {', '.join(DEAD_CODE_SAMPLING)}")
        self.dead_code_sampling = dead_code_sampling
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost, self.decay, self.epsilon = commitment_cost, decay, epsilon
        self.kmeans_init, self.dead_code_threshold = kmeans_init, dead_code_threshold
        embedding = torch.randn(num_embeddings, embedding_dim)
        self.register_buffer("embedding", embedding)
        # Every code starts as if seen once, so embed_sum / cluster_size is the codebook itself and
        # an unused code decays towards zero instead of being divided by epsilon.
        self.register_buffer("cluster_size", torch.ones(num_embeddings))
        self.register_buffer("embed_sum", embedding.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        # Distances and EMA sums lose whole codes to rounding in half precision.
        with torch.autocast(z_e.device.type, enabled=False):
            z = z_e.float()
            codes, indices = self.nearest_codes(z)
            loss = commitment_loss(z, codes, self.commitment_cost)
            quantized = z + (codes - z).detach()
        return QuantizerOutput(quantized.to(z_e.dtype), loss, indices)

    def nearest_codes(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Float32 latents [B, D, H, W] -> (their nearest codes [B, D, H, W], indices [B, H, W]),
        without gradients; in training, one EMA step of the codebook (k-means and restarts too)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).detach()
        if self.training and self.kmeans_init and not self.initialized:
            self.place_codes_by_kmeans(flat)
        indices = nearest_code(flat, self.embedding.float())
        # Looked up before this step's update of the codebook, as they were compared.
        codes = self.embed_indices(indices.reshape(b, h, w))
        if self.training:
            code_counts = torch.bincount(indices, minlength=self.num_embeddings).float()
            sums = flat.new_zeros(self.num_embeddings, d).index_add_(0, indices, flat)
            errors = self.latent_errors(flat, indices)
            self.update_codebook(code_counts, sums)
            if self.dead_code_threshold > 0:
                self.restart_dead_codes(flat[self.restart_rows(len(flat), errors)])
        return codes, indices.reshape(b, h, w)

    def embed_indices(self, indices: Tensor) -> Tensor:
        """Code indices [B, H, W] -> code vectors [B, D, H, W]."""
        return F.embedding(indices, self.embedding.float()).permute(0, 3, 1, 2)

    @torch.no_grad()
    def place_codes_by_kmeans(self, flat: Tensor) -> None:
        """The codebook set to k-means centroids of latents `flat` [N, D]."""
        # Every process clusters the latents of the whole global batch, as one process would, and
        # then takes rank 0's codes: kernels such as index_add_ on a GPU may round differently.
        flat = all_gather_rows(flat)
        sample = flat[torch.randperm(len(flat), device=flat.device)[:KMEANS_SAMPLES]]
        centroids = kmeans(sample, self.num_embeddings)
        broadcast_from_first_rank(centroids)
        self.embedding.copy_(centroids)
        self.embed_sum.copy_(centroids)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update_codebook(self, code_counts: Tensor, sums: Tensor) -> None:
        """One EMA step from this batch's count of latents per code [K] and their sums [K, D]."""
        all_reduce_sum(code_counts, sums)
        self.cluster_size.mul_(self.decay).add_(code_counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = ((self.cluster_size + self.epsilon)
                    / (total + self.num_embeddings * self.epsilon) * total)
        self.embedding.copy_(self.embed_sum / smoothed.unsqueeze(1))

    def latent_errors(self, flat: Tensor, indices: Tensor) -> Tensor | None:
        """Each latent's squared distance from its code, where restarts are drawn by it (else None)."""
        if self.dead_code_threshold <= 0 or self.dead_code_sampling != "error":
            return None
        return (flat - self.embedding.float()[indices]).square().sum(1)

    def restart_rows(self, positions: int, errors: Tensor | None) -> Tensor:
        """One of the batch's `positions` latents for each code, the candidates that dead codes move
        onto (`restart_rows`, above)."""
        errors = errors if self.dead_code_sampling == "error" else None
        return restart_rows(self.num_embeddings, positions, errors, self.embedding.device)

    @torch.no_grad()
    def restart_dead_codes(self, candidates: Tensor) -> None:
        """Codes used less than `dead_code_threshold` moved onto `candidates` [K, D], latents drawn
        from the batch, one per code."""
        # A candidate for every code, kept by torch.where, avoids a host sync to count the dead.
        # Rank 0's candidates, from its share of the batch: gathering every latent of every step
        # for the rare restart would cost more than the step.
        broadcast_from_first_rank(candidates)
        dead = (self.cluster_size < self.dead_code_threshold).unsqueeze(1)
        self.embedding.copy_(torch.where(dead, candidates, self.embedding))
        self.embed_sum.copy_(torch.where(dead, candidates, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead.squeeze(1), 1.0, self.cluster_size))
