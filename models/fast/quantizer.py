"""The EMA quantiser's forward on the CPU: nearest codes by the kernel or in cache-sized blocks, the
straight-through estimator and commitment loss in one pass, and distinct latents weighted by count.

`quantize(quantizer, z_e)` is `quantizer(z_e)` of a `VectorQuantizerEMA` (models/quantizer.py),
on that module's own buffers and with its own codebook updates, k-means and restarts.
"""
import torch
from torch import Tensor

from ..losses import commitment_loss
from ..quantizer import QuantizerOutput, VectorQuantizerEMA
from . import kernels
from .distinct import Repeats
from .threads import row_chunks

# Distances computed per block of rows: 8 MiB measured fastest of the sizes tried, and 2x faster
# than one whole matrix (bench/README.md).
DISTANCE_BYTES_PER_CHUNK = 8 * 2**20
ARGMIN_GROUP = 32  # codes per group in `first_argmin`: 8 and 16 measured slower than argmin itself


def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """models.quantizer.nearest_code: the same argmin, the first of equal distances."""
    norms, codebook_t = codebook.square().sum(1), codebook.t()
    if x.device.type != "cpu":
        return torch.addmm(norms, x, codebook_t, alpha=-2).argmin(1)
    if (x.dtype == codebook.dtype == torch.float32 and len(codebook) % kernels.LANES == 0
            and kernels.available()):
        return kernels.nearest_code(x, codebook, norms)
    # On the CPU the whole [rows, codes] matrix (256 MiB for a batch of the per-pixel model)
    # would be written out and read back for the argmin; cache-sized blocks of it are not. Each
    # block's ops run on torch's own threads, which measured faster than a Python thread per core.
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
    minimal group. NaN is a minimum for both, as it is for argmin."""
    rows, codes = distances.shape
    if codes % ARGMIN_GROUP or codes == ARGMIN_GROUP:
        return distances.argmin(1)
    groups = distances.view(rows, codes // ARGMIN_GROUP, ARGMIN_GROUP)
    group = groups.amin(2).argmin(1)
    return group * ARGMIN_GROUP + groups[torch.arange(rows, device=distances.device), group].argmin(1)


class _StraightThrough(torch.autograd.Function):
    """The codes, with the gradient of the latents z passed straight through to z, and the
    commitment loss of models/losses.py, block u counted counts[u] times: `z + (codes - z).detach()`
    and `commitment_loss(z, codes, commitment_cost, counts)`.

    The backward pass is one pass over the latents, where autograd's took several; and the
    decoder gets the codes exactly."""

    @staticmethod
    def forward(ctx, z, codes, counts, commitment_cost):
        ctx.save_for_backward(z, codes, counts)
        size = z.numel() if counts is None else counts.sum() * z[0].numel()
        ctx.factor = commitment_cost / size
        # A new tensor: an input returned as it is comes out as a view of that input.
        return codes.clone(), commitment_loss(z, codes, commitment_cost, counts)

    @staticmethod
    def backward(ctx, grad_codes, grad_loss):
        z, codes, counts = ctx.saved_tensors
        diff = z - codes
        slope = 2 * ctx.factor * grad_loss
        if counts is not None:
            slope = (slope * counts).view(-1, 1, 1, 1)
        grad = diff * slope
        return (grad if grad_codes is None else grad.add_(grad_codes)), None, None, None


def quantize(quantizer: VectorQuantizerEMA, z_e: Tensor, repeats: Repeats | None = None) -> QuantizerOutput:
    """quantizer(z_e). With `repeats`, z_e [U, D, 1, 1] holds the latents of distinct blocks, which
    stand for repeats.counts[u] copies each in the codebook's update and the loss
    (models/fast/distinct.py)."""
    b, d, h, w = z_e.shape
    if repeats is not None and (h, w) != (1, 1):
        raise ValueError(f"with repeats, z_e holds one latent per block, got {tuple(z_e.shape)}")
    with torch.autocast(z_e.device.type, enabled=False):
        z = z_e.float()
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).detach()
        # Latents are drawn from the batch with its copies: the same random numbers, and the
        # same latents, as the whole batch gives.
        if quantizer.training and quantizer.kmeans_init and not quantizer.initialized:
            quantizer.place_codes_by_kmeans(flat if repeats is None else flat[repeats.inverse])
        indices = nearest_code(flat, quantizer.embedding.float())
        codes = quantizer.embed_indices(indices.reshape(b, h, w))
        counts = None if repeats is None else repeats.counts
        if quantizer.training:
            k = quantizer.num_embeddings
            if counts is None:
                code_counts = torch.bincount(indices, minlength=k).float()
                sums = flat.new_zeros(k, d).index_add_(0, indices, flat)
            else:
                code_counts = flat.new_zeros(k).index_add_(0, indices, counts)
                sums = flat.new_zeros(k, d).index_add_(0, indices, flat * counts.unsqueeze(1))
            errors = quantizer.latent_errors(flat, indices)
            quantizer.update_codebook(code_counts, sums)
            if quantizer.dead_code_threshold > 0:
                positions = len(flat) if repeats is None else len(repeats.inverse)
                if errors is not None and repeats is not None:
                    errors = errors[repeats.inverse]
                rows = quantizer.restart_rows(positions, errors)
                quantizer.restart_dead_codes(flat[rows if repeats is None else repeats.inverse[rows]])
        quantized, loss = _StraightThrough.apply(z, codes, counts, quantizer.commitment_cost)
    return QuantizerOutput(quantized.to(z_e.dtype), loss, indices.reshape(b, h, w))
