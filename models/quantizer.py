"""Vector quantiser whose codebook follows an exponential moving average (VQ-VAE, VQ-VAE-2)."""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .distinct import Repeats
from .distributed import all_gather_rows, all_reduce_sum, broadcast_from_first_rank
from .threads import row_chunks

KMEANS_SAMPLES = 16384  # latents k-means sees; enough to place the codes, cheap at any batch size
KMEANS_ITERATIONS = 10
# Distances computed per block of rows: 4 MiB measured 2x faster than one matrix at 256 and 1024
# codes on a Zen 3; 8 MiB 3-6% faster than 4 on a Zen 5, in interleaved runs (262,144 latents
# at 256 codes: 41.4 ms against 44.2).
DISTANCE_BYTES_PER_CHUNK = 8 * 2**20
ARGMIN_GROUP = 32  # codes per group in `first_argmin`: 8 and 16 measured slower than argmin itself


class QuantizerOutput(NamedTuple):
    quantized: Tensor  # [B, D, H, W]; equals the codes, passes gradients straight through to z_e
    loss: Tensor  # commitment loss
    indices: Tensor  # [B, H, W]


def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    # ||x||^2 is the same for every code, so the argmin needs only ||e||^2 - 2 x.e.
    norms, codebook_t = codebook.square().sum(1), codebook.t()
    if x.device.type != "cpu":
        return torch.addmm(norms, x, codebook_t, alpha=-2).argmin(1)
    if (x.dtype == codebook.dtype == torch.float32 and len(codebook) % kernels.LANES == 0
            and kernels.available()):
        return kernels.nearest_code(x, codebook, norms)
    # On the CPU the whole [rows, codes] matrix (256 MiB for a batch of the per-pixel model)
    # would be written out and read back for the argmin; cache-sized blocks of it are not. Each
    # block's ops run on torch's own threads: a Python thread per core, as models/threads.py
    # runs, made the quantiser of a 16,384-latent batch 19.5 ms instead of 12.6 on a 2-core Zen 3.
    indices = torch.empty(len(x), dtype=torch.long)
    block_rows = max(64, DISTANCE_BYTES_PER_CHUNK // (len(codebook) * x.dtype.itemsize))
    for start, stop in row_chunks(len(x), block_rows):
        distances = torch.addmm(norms, x[start:stop], codebook_t, alpha=-2)
        indices[start:stop] = first_argmin(distances)
    return indices


def first_argmin(distances: Tensor) -> Tensor:
    """distances.argmin(1), the first of equal minima included, found group by group of codes.

    torch's argmin walks a row one value at a time; `amin` over groups of 32 codes is vectorised,
    and the argmins left are over a row's group minima, then over the 32 codes of its first
    minimal group: [4,096 x 256] in 0.28 ms instead of 0.39 on a 2-core Zen 5. NaN is a minimum
    for both, as it is for argmin."""
    rows, codes = distances.shape
    if codes % ARGMIN_GROUP or codes == ARGMIN_GROUP:
        return distances.argmin(1)
    groups = distances.view(rows, codes // ARGMIN_GROUP, ARGMIN_GROUP)
    group = groups.amin(2).argmin(1)
    return group * ARGMIN_GROUP + groups[torch.arange(rows, device=distances.device), group].argmin(1)


class _StraightThrough(torch.autograd.Function):
    """The codes, with the gradient of the latents z passed straight through to z, and the
    commitment loss: commitment_cost times the mean of (z - codes)^2, block u counted counts[u]
    times. The codes are buffers, so the loss pulls only z towards them.

    One pass over the latents each way, where `z + (codes - z).detach()` and F.mse_loss took five
    (and F.mse_loss's gradient came out channels-first); and the decoder gets the codes exactly."""

    @staticmethod
    def forward(ctx, z, codes, counts, commitment_cost):
        diff = z - codes
        squares = diff.square()
        if counts is None:
            size, loss = diff.numel(), squares.sum()
        else:
            size, loss = counts.sum() * diff[0].numel(), counts @ squares.sum([1, 2, 3])
        ctx.save_for_backward(diff, counts)
        ctx.factor = commitment_cost / size
        # A new tensor: an input returned as it is comes out as a view of that input.
        return codes.clone(), ctx.factor * loss

    @staticmethod
    def backward(ctx, grad_codes, grad_loss):
        diff, counts = ctx.saved_tensors
        slope = 2 * ctx.factor * grad_loss
        if counts is not None:
            slope = (slope * counts).view(-1, 1, 1, 1)
        grad = diff * slope
        return (grad if grad_codes is None else grad.add_(grad_codes)), None, None, None


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


class VectorQuantizerEMA(nn.Module):
    """Maps each latent vector to its nearest of `num_embeddings` codes of size `embedding_dim`.

    The codebook is learnt by EMA of the latents assigned to each code (with Laplace-smoothed
    counts), not by gradients, so it and its statistics are buffers. Opt-in: `kmeans_init` places
    the codes by k-means on the first training batch; `dead_code_threshold` > 0 moves codes whose
    EMA count falls below it onto random latents of the current batch. A placed code counts as
    seen once, so the threshold belongs below 1.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 decay: float = 0.99, epsilon: float = 1e-5, kmeans_init: bool = False,
                 dead_code_threshold: float = 0.0):
        super().__init__()
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

    def forward(self, z_e: Tensor, repeats: Repeats | None = None) -> QuantizerOutput:
        """`repeats`: z_e [U, D, 1, 1] holds the latents of distinct blocks, which stand for
        repeats.counts[u] copies each in the codebook's update and the loss (models/distinct.py)."""
        b, d, h, w = z_e.shape
        if repeats is not None and (h, w) != (1, 1):
            raise ValueError(f"with repeats, z_e holds one latent per block, got {tuple(z_e.shape)}")
        # Distances and EMA sums lose whole codes to rounding in half precision.
        with torch.autocast(z_e.device.type, enabled=False):
            z = z_e.float()
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            # Latents are sampled from the batch with its copies, drawing the same random numbers
            # as without distinct blocks.
            positions = None if repeats is None else repeats.inverse
            if self.training and self.kmeans_init and not self.initialized:
                self._place_codes_by_kmeans(flat.detach() if positions is None else flat.detach()[positions])
            indices = nearest_code(flat.detach(), self.embedding.float()).reshape(b, h, w)
            # Looked up before this step's update of the codebook, as they were compared.
            codes = self.embed_indices(indices)
            counts = None if repeats is None else repeats.counts
            if self.training:
                self._update_codebook(flat.detach(), indices.flatten(), counts)
                if self.dead_code_threshold > 0:
                    self._restart_dead_codes(flat.detach(), positions)
            quantized, loss = _StraightThrough.apply(z, codes, counts, self.commitment_cost)
        return QuantizerOutput(quantized.to(z_e.dtype), loss, indices)

    def embed_indices(self, indices: Tensor) -> Tensor:
        """Code indices [B, H, W] -> code vectors [B, D, H, W]."""
        return F.embedding(indices, self.embedding.float()).permute(0, 3, 1, 2)

    @torch.no_grad()
    def _place_codes_by_kmeans(self, flat: Tensor) -> None:
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
    def _update_codebook(self, flat: Tensor, indices: Tensor, counts: Tensor | None) -> None:
        if counts is None:
            code_counts = torch.bincount(indices, minlength=self.num_embeddings).float()
            sums = flat.new_zeros(self.num_embeddings, self.embedding_dim).index_add_(0, indices, flat)
        else:
            code_counts = flat.new_zeros(self.num_embeddings).index_add_(0, indices, counts)
            sums = flat.new_zeros(self.num_embeddings, self.embedding_dim).index_add_(
                0, indices, flat * counts.unsqueeze(1))
        all_reduce_sum(code_counts, sums)
        self.cluster_size.mul_(self.decay).add_(code_counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = ((self.cluster_size + self.epsilon)
                    / (total + self.num_embeddings * self.epsilon) * total)
        self.embedding.copy_(self.embed_sum / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor, positions: Tensor | None) -> None:
        """`positions`: the row of flat at each position of the batch, when flat holds distinct ones."""
        # A candidate for every code, kept by torch.where, avoids a host sync to count the dead.
        batch = len(flat) if positions is None else len(positions)
        rows = torch.randint(batch, (self.num_embeddings,), device=flat.device)
        candidates = flat[rows if positions is None else positions[rows]]
        # Rank 0's candidates, from its share of the batch: gathering every latent of every step
        # for the rare restart would cost more than the step.
        broadcast_from_first_rank(candidates)
        dead = (self.cluster_size < self.dead_code_threshold).unsqueeze(1)
        self.embedding.copy_(torch.where(dead, candidates, self.embedding))
        self.embed_sum.copy_(torch.where(dead, candidates, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead.squeeze(1), 1.0, self.cluster_size))
