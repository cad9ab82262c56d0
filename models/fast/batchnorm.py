"""BatchNorm over distinct blocks weighted by their counts, and BatchNorm + ReLU in one CPU kernel.

Both are nn.BatchNorm2d in training mode, computed another way: their batch statistics, running
statistics and gradients are BatchNorm's (tests/test_fast_layers.py compares them in float64).
"""
import torch
from torch import Tensor, nn

from ..batchnorm import SyncBatchNorm2d, update_running_statistics
from ..collectives import summed_over
from . import kernels


def normalize_by_batch(bn: nn.BatchNorm2d, x: Tensor, group=None, counts: Tensor | None = None,
                       statistics: list | None = None) -> Tensor:
    """BatchNorm in training mode over the batches of `group` (None: this process's alone).

    With `counts`, x holds distinct blocks [U, C, s, s] and block u stands for counts[u] copies of
    itself: the statistics, and the running ones, are those of the batch with every copy in it.
    `statistics`, a list, receives the batch's (mean, variance, count).
    """
    out, mean, variance, count = _NormalizeByBatch.apply(x, bn.weight if bn.affine else None,
                                                        bn.bias if bn.affine else None, counts, group, bn.eps)
    if bn.training and bn.track_running_stats:
        update_running_statistics(bn, mean, variance, count)
    if statistics is not None:
        statistics.append((mean, variance, count))
    return out


def _rows(x: Tensor) -> Tensor:
    """[U, C, s, s] -> [U * s * s, C] rows, free for a channels-last x."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _wide(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class _NormalizeByBatch(torch.autograd.Function):
    """BatchNorm with batch statistics weighted per block, with its closed-form backward: through
    autograd the same maths takes a dozen passes over the activations, here it takes about five.

    Computed in float32 under any autocast: bfloat16 sums lose small variances and large counts.
    Block u's copies share its gradient, which autograd has already summed over them, so only the
    statistics' terms carry the counts.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, counts, group, eps):
        dtype = x.dtype
        # Under a bfloat16 autocast the arithmetic is float32 all the same: the shift -mean * scale
        # cancels x * scale to a few bits in bfloat16 when the mean is large beside the spread.
        x = _wide(x)
        rows = _rows(x)
        positions = x.shape[2] * x.shape[3]
        weights = (rows.new_ones(len(rows)) if counts is None
                   else counts.to(rows.dtype).repeat_interleave(positions))
        # Weighted sums over rows as matrix-vector products: one read of the activations each,
        # where reductions over the small spatial axes of channels-last blocks crawl.
        first = summed_over(torch.cat([weights @ rows, weights.sum().reshape(1)]), group)
        count = first[-1]
        mean = first[:-1] / count
        # The variance about the global mean needs a second collective, but never loses
        # precision to E[x^2] - E[x]^2.
        variance = summed_over(weights @ (rows - mean).square_(), group) / count
        invstd = (variance + eps).rsqrt()
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        out = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
        ctx.save_for_backward(x, weight, counts, mean, invstd, count)
        ctx.group = group
        ctx.mark_non_differentiable(mean, variance, count)
        return out.to(dtype), mean, variance, count

    @staticmethod
    def backward(ctx, grad_out, *_):
        x, weight, counts, mean, invstd, count = ctx.saved_tensors
        g = _wide(grad_out)
        if x.is_contiguous(memory_format=torch.channels_last):
            g = g.contiguous(memory_format=torch.channels_last)
        g_rows, x_rows = _rows(g), _rows(x)
        sum_g = g_rows.sum(0)
        # Sum of g * (x - mean) as sum(g * x) - mean * sum(g): one pass, and the pre-BatchNorm
        # activations have means of the order of their spread, so little cancels.
        sum_g_xhat = ((g_rows * x_rows).sum(0) - mean * sum_g) * invstd
        # The parameters' gradients are this process's (DistributedDataParallel sums them); the
        # input's gradient goes through the statistics of every process's batch.
        global_g, global_g_xhat = summed_over(torch.cat([sum_g, sum_g_xhat]), ctx.group).split(len(sum_g))
        scale = invstd if weight is None else invstd * weight
        # d/dx of the statistics: block u's share of the batch is counts[u] / count.
        share = (x.new_ones(1, 1, dtype=mean.dtype) if counts is None else counts.to(mean.dtype).unsqueeze(1)) / count
        slope = share * (scale * global_g_xhat * invstd)
        offset = slope * mean - share * (scale * global_g)
        rows = len(slope)
        grad_x = torch.addcmul(offset.view(rows, -1, 1, 1), x, -slope.view(rows, -1, 1, 1))
        grad_x.addcmul_(g, scale.view(1, -1, 1, 1))
        grad_weight = sum_g_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_g if ctx.needs_input_grad[2] else None
        return grad_x.to(grad_out.dtype), grad_weight, grad_bias, None, None, None


class _BatchNormReLU(torch.autograd.Function):
    """relu(BatchNorm in training mode) of a channels-last float32 x, by the CPU kernels: three
    passes over x forward and two back, faster than torch's BatchNorm and ReLU at the sizes below."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        rows = _rows(x)
        out, mean, variance, scale, shift = torch.ops.pixel_vqvae.batch_norm_relu(rows, weight, bias, eps)
        ctx.save_for_backward(rows, mean, variance, scale, shift, weight)
        ctx.eps, ctx.shape = eps, x.shape
        ctx.mark_non_differentiable(mean, variance)
        b, c, h, w = x.shape
        return out.view(b, h, w, c).permute(0, 3, 1, 2), mean, variance

    @staticmethod
    def backward(ctx, grad_out, *_):
        rows, mean, variance, scale, shift, weight = ctx.saved_tensors
        g = _rows(grad_out.contiguous(memory_format=torch.channels_last))
        grad_x, grad_weight, grad_bias = torch.ops.pixel_vqvae.batch_norm_relu_backward(
            g, rows, mean, variance, scale, shift, weight, ctx.eps)
        b, c, h, w = ctx.shape
        return grad_x.view(b, h, w, c).permute(0, 3, 1, 2), grad_weight, grad_bias, None


# Where `_BatchNormReLU` measured faster than torch's BatchNorm and ReLU, forward and backward:
# activations of 4,096 rows or more and 8 MiB or less (bench/README.md).
FUSED_MIN_ROWS = 4096
FUSED_MAX_BYTES = 8 * 2**20


def runs_fused_with_relu(bn: nn.Module, after: nn.Module, x: Tensor) -> bool:
    """Whether `bn` then `after` on x run as one `_BatchNormReLU`: a training-mode affine
    BatchNorm over this process's batch alone, a ReLU after it, channels-last float32 x on the CPU
    whose channels are a multiple of the kernels' vector width, of a size where it pays."""
    plain = type(bn) is nn.BatchNorm2d or (type(bn) is SyncBatchNorm2d and bn.statistics_group() is None)
    return (plain and bn.training and bn.affine and bn.track_running_stats and type(after) is nn.ReLU
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.shape[0] * x.shape[2] * x.shape[3] >= FUSED_MIN_ROWS
            and x.numel() * x.element_size() <= FUSED_MAX_BYTES
            and x.shape[1] % kernels.LANES == 0 and x.is_contiguous(memory_format=torch.channels_last)
            and kernels.available())


def run_fusing_batch_norm_relu(layers: nn.Sequential, x: Tensor) -> Tensor:
    """layers(x), each BatchNorm and the ReLU after it as one `_BatchNormReLU` where they can be,
    and a SyncBatchNorm2d of several processes by `normalize_by_batch`'s closed-form backward."""
    i = 0
    while i < len(layers):
        layer = layers[i]
        if i + 1 < len(layers) and isinstance(layer, nn.BatchNorm2d) and runs_fused_with_relu(layer, layers[i + 1], x):
            x, mean, variance = _BatchNormReLU.apply(x, layer.weight, layer.bias, layer.eps)
            update_running_statistics(layer, mean, variance, x.shape[0] * x.shape[2] * x.shape[3])
            i += 2
            continue
        group = layer.statistics_group() if type(layer) is SyncBatchNorm2d else None
        if group is not None and (layer.training or layer.running_mean is None):
            layer._check_input_dim(x)
            x = normalize_by_batch(layer, x, group)
        else:
            x = layer(x)
        i += 1
    return x
