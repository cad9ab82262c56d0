"""A VQ-VAE's decoder run once per code in the batch, not once per block.

The decoder sees nothing of a block but its code: every block quantised to one code comes out as
the same pixels. So the decoder's forward pass, and the gradients of its weights, need one row per
code in use (hundreds), where a batch has thousands of distinct blocks. Only the straight-through
gradient to each block's latent differs block by block: the block's own reconstruction gradient
goes back through the decoder, taken at its code's activations, with BatchNorm's terms for the
batch statistics. That backward pass is written out here, layer by layer: the input gradients'
matrix products alone, a third of the decoder's work per block.
"""
import torch
from torch import Tensor, nn

from ..batchnorm import SyncBatchNorm2d
from ..collectives import summed_over
from ..decoder import OUTPUT_MARGIN
from .distinct import one_member_each, padded_length


def decode_by_code(decoder: nn.Module, quantized: Tensor, indices: Tensor, counts: Tensor) -> Tensor:
    """decoder(quantized, counts) of a FastDecoder for distinct blocks: latents `quantized` [U, D, 1, 1], equal to
    the codes `indices` [U] and passing gradients straight through, block u standing for counts[u]
    copies of itself. Returns reconstructions [U, C, s, s], gradients as the decoder's own."""
    codes, code_of_block = torch.unique(indices, return_inverse=True)
    # Padded as distinct blocks are (models/fast/distinct.py), the codes in use changing every batch.
    rows = padded_length(len(codes))
    code_counts = counts.new_zeros(rows).index_add_(0, code_of_block, counts)
    # The code vectors as quantised, before this step's update of the codebook.
    members = one_member_each(code_of_block, len(codes))
    latents = quantized.detach()[torch.cat([members, members[:1].expand(rows - len(codes))])]
    trace = [] if quantized.requires_grad else None
    decoded = decoder(latents, code_counts, trace)
    reconstruction = decoded.index_select(0, code_of_block)
    if trace is None:
        return reconstruction
    return _ThroughToEachLatent.apply(reconstruction, quantized, trace, code_of_block, counts)


class _ThroughToEachLatent(torch.autograd.Function):
    """The reconstruction as it is; its backward also gives each block's latent its gradient."""

    @staticmethod
    def forward(ctx, reconstruction, quantized, trace, code_of_block, counts):
        ctx.trace, ctx.latent_dtype = trace, quantized.dtype
        ctx.save_for_backward(code_of_block, counts)
        return reconstruction.clone()

    @staticmethod
    def backward(ctx, grad):
        code_of_block, counts = ctx.saved_tensors
        latents = None
        if ctx.needs_input_grad[1]:
            # The precision of each product is the forward pass's, set by hand.
            with torch.autocast(grad.device.type, enabled=False):
                latents = latent_gradients(ctx.trace, grad, code_of_block, counts).to(ctx.latent_dtype)
        return grad, latents, None, None, None


def _rows(x: Tensor) -> Tensor:
    """[n, C, s, s] -> [n, s, s, C], free for a channels-last x."""
    return x.permute(0, 2, 3, 1)


def _forward_matrix(conv: nn.Module) -> Tensor:
    """F with conv's output = input rows @ F: [C_in, C_out], or [C_in, 2 * 2 * C_out] for a 2x2
    transposed convolution, its 2x2 patch of outputs row-major with channels fastest."""
    weight = conv.weight.detach()
    if type(conv) is nn.Conv2d:
        return weight.reshape(conv.out_channels, conv.in_channels).t()
    return weight.permute(0, 2, 3, 1).reshape(conv.in_channels, -1)


def _output_patches(conv: nn.Module, g: Tensor) -> Tensor:
    """Gradients [n, S, S, C_out] of conv's outputs -> rows of the patches each input row made."""
    n, side, _, channels = g.shape
    if type(conv) is nn.Conv2d:
        return g.reshape(-1, channels)
    half = side // 2
    return g.reshape(n, half, 2, half, 2, channels).transpose(2, 3).reshape(-1, 4 * channels)


def _input_gradient(conv, g, matrix, given):
    """Gradient rows of conv's inputs, shaped as the rows of its input `given` [n, C_in, s, s]."""
    rows = _output_patches(conv, g).to(matrix.dtype)
    out = (rows @ matrix.t()).float()
    return out.reshape(len(g), given.shape[2], given.shape[3], conv.in_channels)


# Latent gradients go through each code's Jacobian when its rows, codes x (outputs per block + 1),
# number at most this share of the blocks: the per-pixel model's 256 x 4 against some 100,000.
JACOBIAN_ROW_SHARE = 0.5


def latent_gradients(trace: list, grad: Tensor, code_of_block: Tensor, counts: Tensor) -> Tensor:
    """The gradients [U, D, 1, 1] of the latents of distinct blocks whose reconstructions have
    gradients `grad` [U, C, s, s] (each summed over the block's copies), through a decoder whose
    forward pass over the codes `trace` holds (`run_layers`)."""
    codes = len(trace[0][1])
    if codes * (grad[0].numel() + 1) <= JACOBIAN_ROW_SHARE * len(grad):
        return _latent_gradients_by_jacobian(trace, grad, code_of_block, counts, codes)
    return _latent_gradients_per_block(trace, grad, code_of_block, counts)


def _latent_gradients_by_jacobian(trace, grad, code_of_block, counts, codes):
    """`latent_gradients` from per-code linear maps, for blocks with few outputs and many blocks.

    The masks and batch statistics of the backward pass are fixed per code, so it is linear in
    each block's gradient g_u: J_k^T g_u, less counts[u] times a vector P_k of BatchNorm's
    statistics' terms. J_k comes from unit gradients with no share in the statistics, and P_k
    from the blocks' gradients summed per code, whose statistics' terms are those of all blocks.
    The work per block is then outputs x D multiply-adds, not the decoder's backward."""
    outputs = grad[0].numel()
    unit = torch.eye(outputs, dtype=torch.float32, device=grad.device).reshape(outputs, *grad.shape[1:])
    code_of_unit = torch.arange(codes, device=grad.device).repeat_interleave(outputs)
    # No counts: the unit gradients take no part in the statistics, nor in their collectives, so
    # the processes of a data-parallel run meet in the same collectives on either path.
    jacobians = _latent_gradients_per_block(trace, unit.repeat(codes, 1, 1, 1), code_of_unit,
                                            None).reshape(codes, outputs, -1)
    summed = grad.new_zeros(codes, *grad.shape[1:]).index_add_(0, code_of_block, grad).float()
    code_counts = counts.new_zeros(codes).index_add_(0, code_of_block, counts)
    through_summed = _latent_gradients_per_block(trace, summed, torch.arange(codes, device=grad.device),
                                                 code_counts).reshape(codes, -1)
    linear_part = torch.einsum("kj,kjd->kd", summed.reshape(codes, outputs), jacobians)
    # A code of padding blocks alone counts 0 times, and its terms are 0 (models/fast/distinct.py).
    statistics_terms = (linear_part - through_summed) / code_counts.clamp(min=1).unsqueeze(1)
    # Each block's row of factors (g_u, -counts[u]) times its code's stacked maps, one factor at a time.
    maps = torch.cat([jacobians, statistics_terms.unsqueeze(1)], 1).transpose(0, 1).contiguous()
    factors = torch.cat([grad.reshape(len(grad), outputs).float(), -counts.unsqueeze(1)], 1)
    latents = factors[:, :1] * maps[0].index_select(0, code_of_block)
    for j in range(1, outputs + 1):
        latents.addcmul_(factors[:, j:j + 1], maps[j].index_select(0, code_of_block))
    return latents.reshape(len(grad), -1, 1, 1)


def _latent_gradients_per_block(trace, grad, code_of_block, counts):
    (conv, conv_in, conv_out, _), (_, sigmoid_in, _, _) = trace[-2:]
    sigmoid = torch.sigmoid(_rows(sigmoid_in).float())
    slope = sigmoid * (1 - sigmoid) * (1 + 2 * OUTPUT_MARGIN)
    g = _rows(grad).float() * slope[code_of_block]
    g = _input_gradient(conv, g, _forward_matrix(conv).to(conv_out.dtype), conv_in)
    for index in range(len(trace) - 5, -1, -3):
        (conv, conv_in, conv_out, _), (bn, bn_in, _, statistics), (_, _, relu_out, _) = trace[index:index + 3]
        g = g * (_rows(relu_out) > 0)[code_of_block]
        g = _through_batchnorm_and_conv(conv, conv_in, conv_out, bn, bn_in, statistics, g, code_of_block, counts)
    return g.permute(0, 3, 1, 2)


def _through_batchnorm_and_conv(conv, conv_in, conv_out, bn, bn_in, statistics, g, code_of_block, counts):
    """Gradient of conv's inputs from that of BatchNorm's outputs g [U, S, S, C] (conv feeds bn).

    Per block, BatchNorm's backward is g * scale less terms of the batch statistics, which are
    per code times the block's share; they and the scale pass through conv's linear backward
    on the few codes and in its weights, so the blocks' activations are read twice, not six times."""
    matrix = _forward_matrix(conv)
    repeat = matrix.shape[1] // bn.num_features
    invstd = (bn.running_var if statistics is None else statistics[1]).add(bn.eps).rsqrt()
    scale = invstd if bn.weight is None else invstd * bn.weight.detach()
    out = _input_gradient(conv, g, (matrix * scale.repeat(repeat)).to(conv_out.dtype), conv_in)
    # Running statistics are a fixed per-channel affine map; gradients without counts have no
    # share in the batch statistics.
    if statistics is None or counts is None:
        return out
    mean, _, count = statistics
    normalized = (_rows(bn_in).float() - mean) * invstd  # [K, S, S, C], per code
    summed = torch.zeros_like(normalized).index_add_(0, code_of_block, g)
    sums = torch.cat([summed.sum((0, 1, 2)), (summed * normalized).sum((0, 1, 2))])
    group = bn.statistics_group() if type(bn) is SyncBatchNorm2d else None
    sum_g, sum_g_normalized = summed_over(sums, group).split(bn.num_features)
    # Per code: the statistics' terms, before each block's share of the batch weighs them.
    terms = normalized * (scale * sum_g_normalized) + scale * sum_g
    terms = _input_gradient(conv, terms, matrix.float(), conv_in)
    # Block u's copies are counts[u] of the count values each statistic averages.
    share = (counts / count).view(-1, 1, 1, 1)
    return out.addcmul_(terms[code_of_block], share, value=-1)
