"""A VQ-VAE's batch as its distinct blocks, each run through the model once.

With `num_layers` n, each latent of a VQ-VAE sees one 2^n x 2^n block of pixels and nothing else
(the encoder's 2x2 stride-2 convolutions do not overlap), and the decoder rebuilds that block from
that latent alone. Apart from BatchNorm's batch statistics and the codebook's EMA, the model is one
function applied block by block. Pixel art repeats blocks: flat backgrounds, outlines, the few
colours of a palette (one batch of 64 Pokemon sprites holds about 115,000 distinct colours in its
262,144 pixels, and 9,000 distinct 4x4 blocks in 16,384). So the model runs once per distinct
block, and the statistics weight each block by its count: the losses, gradients and codebook are
those of the whole batch, up to the order of float summation.
"""
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..batchnorm import SyncBatchNorm2d
from .batchnorm import normalize_by_batch, run_fusing_batch_norm_relu

# Above this share of distinct blocks, gathering them costs more than the repeats save.
MAX_DISTINCT_SHARE = 0.9
# Lengths a batch's distinct blocks are padded to in each doubling (`padded_length`).
PADDING_STEPS = 16
# Odd 64-bit multipliers of the block hash, from a fixed seed: the global random stream, which
# k-means and code restarts draw from, must not depend on whether blocks are deduplicated.
HASH_SEED = 0x5EED


class Repeats(NamedTuple):
    counts: Tensor  # [U] float32: how often each distinct block occurs in the batch
    inverse: Tensor  # [B * h * w] long: the distinct block at each block position, row-major


def block_rows(x: Tensor, side: int) -> Tensor:
    """[B, C, H, W] -> [B * H/side * W/side, C * side * side], one row per block, row-major."""
    b, c, height, width = x.shape
    blocks = x.reshape(b, c, height // side, side, width // side, side).permute(0, 2, 4, 1, 3, 5)
    return blocks.reshape(-1, c * side * side)


def _hash_multipliers(length: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(HASH_SEED)
    return (torch.randint(-2**62, 2**62, (length,), generator=generator, dtype=torch.long) | 1).to(device)


def one_member_each(inverse: Tensor, groups: int) -> Tensor:
    """For each group, the index of one row in it (which one does not matter: they are compared)."""
    first = torch.empty(groups, dtype=torch.long, device=inverse.device)
    return first.scatter_(0, inverse, torch.arange(len(inverse), device=inverse.device))


def padded_length(length: int) -> int:
    """`length` rounded up to a multiple of 1/PADDING_STEPS of the power of two below it: at most
    100/PADDING_STEPS % more, and PADDING_STEPS lengths in each doubling."""
    if length <= PADDING_STEPS:
        return length
    step = 2 ** (length.bit_length() - 1) // PADDING_STEPS
    return -(-length // step) * step


def distinct_blocks(x: Tensor, side: int) -> tuple[Tensor, Repeats] | None:
    """The distinct side x side blocks of float32 images x [B, C, H, W], as images [U, C, side, side],
    with their Repeats; None when nearly every block is distinct or x is not float32. The last
    blocks may be padding, copies of the first with a count of 0 that no position refers to.

    Blocks are equal when their bits are: exact, whatever the values.
    """
    if x.dtype != torch.float32 or x.shape[2] % side or x.shape[3] % side:
        return None
    bits = block_rows(x, side).contiguous().view(torch.int32)
    # A random linear hash (wrapping in 64 bits) finds candidate groups fast; every block is then
    # compared with its group's representative, and a collision falls back to an exact row sort.
    keys = (bits.long() * _hash_multipliers(bits.shape[1], x.device)).sum(1)
    _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    first = one_member_each(inverse, len(counts))
    if not torch.equal(bits[first][inverse], bits):
        _, inverse, counts = torch.unique(bits, dim=0, return_inverse=True, return_counts=True)
        first = one_member_each(inverse, len(counts))
    if len(counts) > MAX_DISTINCT_SHARE * len(keys):
        return None
    # Padded with copies of the first block that count 0 times, to one of a few lengths: the number
    # of distinct blocks changes every batch, and tensors of ever new sizes fragmented the heap that
    # utils/device.py keeps, most under bfloat16 (the 16x16 Pixel VQ-VAE grew to 7.3 GB in 200 steps).
    padding = padded_length(len(counts)) - len(counts)
    first = torch.cat([first, first[:1].expand(padding)])
    counts = torch.cat([counts, counts.new_zeros(padding)])
    blocks = bits[first].view(torch.float32).reshape(-1, x.shape[1], side, side)
    # Channels-last: the block layers and the weighted BatchNorm read it as rows without a copy.
    blocks = blocks.contiguous(memory_format=torch.channels_last)
    return blocks, Repeats(counts.float(), inverse)


def assemble(blocks: Tensor, inverse: Tensor, batch: int, rows: int, columns: int) -> Tensor:
    """Blocks [U, C, s, s] -> images [batch, C, rows * s, columns * s] with block inverse[i] at
    block position i; the gradient of each distinct block is the sum over its positions."""
    _, c, side, _ = blocks.shape
    # index_select's backward is an index_add_, twice as fast as indexing's accumulating put.
    placed = blocks.index_select(0, inverse).reshape(batch, rows, columns, c, side, side).permute(0, 3, 1, 4, 2, 5)
    return placed.reshape(batch, c, rows * side, columns * side)


def _channels_last_rows(x: Tensor) -> Tensor:
    """[U, C, s, s] -> [U, s, s, C], free for a channels-last x."""
    return x.permute(0, 2, 3, 1)


def _from_rows(rows: Tensor) -> Tensor:
    """[U, s, s, C] -> the channels-last [U, C, s, s] it already is in memory."""
    return rows.permute(0, 3, 1, 2)


def conv_2x2_on_blocks(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 2x2 stride-2 convolution of blocks [U, C, s, s] as one matrix product.

    On a batch of tiny images oneDNN's convolutions run several times slower per pixel than on
    whole images; as a matrix product of 2x2 patches the work is one large GEMM again."""
    u, c, side, _ = x.shape
    half = side // 2
    patches = _channels_last_rows(x).reshape(u, half, 2, half, 2, c).transpose(2, 3).reshape(-1, 4 * c)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 4 * c)
    out = nn.functional.linear(patches, weight, conv.bias)
    return _from_rows(out.reshape(u, half, half, conv.out_channels))


def conv_transpose_2x2_on_blocks(x: Tensor, conv: nn.ConvTranspose2d) -> Tensor:
    """A 2x2 stride-2 transposed convolution of blocks [U, C, s, s] as one matrix product."""
    u, c, side, _ = x.shape
    out_channels = conv.out_channels
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c, 4 * out_channels)
    out = _channels_last_rows(x).reshape(-1, c) @ weight
    if conv.bias is not None:
        out = out + conv.bias.repeat(4)
    out = out.reshape(u, side, side, 2, 2, out_channels).transpose(2, 3)
    return _from_rows(out.reshape(u, 2 * side, 2 * side, out_channels))


def conv_1x1_on_blocks(x: Tensor, conv: nn.Conv2d) -> Tensor:
    u, c, side, _ = x.shape
    weight = conv.weight.reshape(conv.out_channels, c)
    rows = _channels_last_rows(x).reshape(-1, c)
    if min(c, conv.out_channels) <= NARROW_CHANNELS:
        out = _NarrowLinear.apply(rows, weight, conv.bias)
    else:
        out = nn.functional.linear(rows, weight, conv.bias)
    return _from_rows(out.reshape(u, side, side, conv.out_channels))


# The rows of a 1x1 layer to or from colours: at most this many channels on one side.
NARROW_CHANNELS = 4
# Rows of each of the products whose sum is such a layer's weight gradient.
OUTER_CHUNK_ROWS = 256


def summed_outer_products(g: Tensor, x: Tensor) -> Tensor:
    """g.t() @ x for many rows and a handful of columns on one side, as a batch of 256-row products
    summed: MKL runs one such tall, thin product several times slower (bench/README.md)."""
    full = len(g) // OUTER_CHUNK_ROWS * OUTER_CHUNK_ROWS
    chunks = full // OUTER_CHUNK_ROWS
    out = (g[:full].reshape(chunks, OUTER_CHUNK_ROWS, g.shape[1]).transpose(1, 2)
           @ x[:full].reshape(chunks, OUTER_CHUNK_ROWS, x.shape[1])).sum(0)
    return out.addmm_(g[full:].t(), x[full:])


class _NarrowLinear(torch.autograd.Function):
    """F.linear whose weight gradient is `summed_outer_products`, computed in float32."""

    @staticmethod
    def forward(ctx, rows, weight, bias):
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return nn.functional.linear(rows, weight, bias)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, g):
        rows, weight = ctx.saved_tensors
        grad_rows = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_rows = (g.float() @ weight.float()).to(rows.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = summed_outer_products(g.float(), rows.float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.float().sum(0).to(weight.dtype)
        return grad_rows, grad_weight, grad_bias


def is_2x2_stride_2(conv: nn.Module) -> bool:
    return conv.kernel_size == (2, 2) and conv.stride == (2, 2) and conv.padding == (0, 0) and conv.groups == 1


def run_layers(layers: nn.Sequential, x: Tensor, counts: Tensor | None, trace: list | None = None) -> Tensor:
    """layers(x); with `counts`, x holds distinct blocks: BatchNorm's batch statistics weigh block u
    counts[u] times, and the encoder's and decoder's convolutions run as matrix products.

    `trace`, a list, receives (layer, input, output, batch statistics or None) of each layer, for
    a backward pass of its own (models/fast/codes.py); an in-place layer's input is its output."""
    if counts is None:
        return run_fusing_batch_norm_relu(layers, x)
    for layer in layers:
        given, statistics = x, []
        if isinstance(layer, nn.BatchNorm2d) and (layer.training or layer.running_mean is None):
            group = layer.statistics_group() if type(layer) is SyncBatchNorm2d else None
            x = normalize_by_batch(layer, x, group, counts, statistics)
        elif type(layer) is nn.Conv2d and layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.groups == 1:
            x = conv_1x1_on_blocks(x, layer)
        elif type(layer) is nn.Conv2d and is_2x2_stride_2(layer):
            x = conv_2x2_on_blocks(x, layer)
        elif type(layer) is nn.ConvTranspose2d and is_2x2_stride_2(layer) and layer.output_padding == (0, 0):
            x = conv_transpose_2x2_on_blocks(x, layer)
        else:
            x = layer(x)
        if trace is not None:
            trace.append((layer, given, x, statistics[0] if statistics else None))
    return x
