"""A fused 1x1 stack, Conv1x1 -> BatchNorm -> ReLU -> Conv1x1, for the all-1x1 Pixel VQ-VAE.

With `num_layers=0`, the adapter and PixelSight, every encoder and decoder layer is 1x1: per pixel
a small MLP whose hidden layer is `pixelsight_filters` wide. Run layer by layer on a CPU, each op
streams that wide activation through memory, in forward and again in backward. Here the pixels go
through in chunks small enough for the hidden activation to stay in cache, and backward recomputes
it chunk by chunk, so only the narrow input and output ever reach memory.

BatchNorm's batch statistics of y = x W1^T follow exactly from the input's mean and covariance,
which are cheap when the input is narrow (3 colours, or a 32-wide latent):
mean_y = W1 mu_x and var_y[c] = w_c^T Sigma_x w_c. BatchNorm then folds into an affine map
x A^T + b. That folding, and mu_x and Sigma_x, are ordinary differentiable ops on small tensors, so
autograd carries the gradient through the batch statistics; only the wide chunked core,
(x, A, b, W2, bias2) -> relu(x A^T + b) W2^T + bias2, has a hand-written backward.

The same stack with a 2x2 stride-2 convolution last opens the encoders with an adapter and 2x2
layers (adapter, BatchNorm, ReLU, first downsampling layer); where the adapter is wide, as in the
16x16 Pixel VQ-VAE, its hidden activation is the widest tensor of the model (`FastEncoder` fuses
it from 128 channels). There the rows are 2x2 patches, and A is four copies of the folded adapter on
its diagonal.
"""
import torch
from torch import Tensor, nn

from ..batchnorm import SyncBatchNorm2d, update_running_statistics
from ..collectives import summed_over
from .threads import cpu_has_bfloat16, row_chunks, run_on_threads

# Bytes of hidden activations per chunk: about one core's L2 cache, 512 rows of 512 fp32 channels
# (half and double that measured within a few percent: bench/README.md).
HIDDEN_BYTES_PER_CHUNK = 2**20


def default_chunk_rows(hidden: int, dtype: torch.dtype) -> int:
    return max(64, HIDDEN_BYTES_PER_CHUNK // (hidden * dtype.itemsize))


def _fused_linear_relu_available(x: Tensor) -> bool:
    # oneDNN has no bfloat16 inner product on CPUs without bfloat16 instructions (AVX2 alone):
    # it refuses to build the primitive rather than fall back.
    dtype_supported = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu_has_bfloat16())
    return (x.device.type == "cpu" and dtype_supported
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _hidden(x: Tensor, A: Tensor, b: Tensor, fused_linear_relu: bool) -> Tensor:
    """relu(x A^T + b) for one chunk."""
    if fused_linear_relu:
        # oneDNN adds the bias and applies the ReLU as the product is written out, saving two
        # passes over the hidden chunk (the op PyTorch's own compiler uses for linear + relu).
        return torch.ops.mkldnn._linear_pointwise(x, A, b, "relu", [], "")
    return torch.addmm(b, x, A.t()).relu_()


class PointwiseCore(torch.autograd.Function):
    """rows [P, in] -> relu(rows A^T + b) W2^T + bias2, [P, out], never holding all of [P, hidden].

    With `bfloat16` the matrix products run in bfloat16 (the hidden chunk is rounded to it); the
    sums over chunks, the biases and the returned tensors stay in the input's dtype.
    """

    @staticmethod
    def forward(ctx, rows, A, b, W2, bias2, chunk_rows, bfloat16):
        ctx.save_for_backward(rows, A, b, W2, bias2)
        ctx.chunk_rows, ctx.bfloat16 = chunk_rows, bfloat16
        low = torch.bfloat16 if bfloat16 else rows.dtype
        rows_low, A_low, b_low = rows.to(low), A.to(low).contiguous(), b.to(low)
        W2t_low = W2.to(low).t()
        fused_linear_relu = _fused_linear_relu_available(rows_low)
        out = rows.new_empty(rows.shape[0], W2.shape[0])

        def work(chunks):
            for start, stop in chunks:
                hidden = _hidden(rows_low[start:stop], A_low, b_low, fused_linear_relu)
                if bfloat16:
                    out[start:stop] = hidden @ W2t_low
                else:
                    torch.mm(hidden, W2t_low, out=out[start:stop])

        run_on_threads(work, row_chunks(rows.shape[0], chunk_rows), rows.device)
        if bias2 is not None:
            out += bias2
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, A, b, W2, bias2 = ctx.saved_tensors
        need_rows, need_A, need_b, need_W2, need_bias2 = ctx.needs_input_grad[:5]
        grad_bias2 = grad_out.sum(0) if need_bias2 and bias2 is not None else None
        if not (need_rows or need_A or need_b or need_W2):
            return None, None, None, None, grad_bias2, None, None
        low = torch.bfloat16 if ctx.bfloat16 else rows.dtype
        rows_low, A_low, b_low = rows.to(low), A.to(low).contiguous(), b.to(low)
        # [in, hidden] layouts: with in = 3, products shaped [hidden, chunk] x [chunk, 3] run
        # several times slower in MKL than the same work laid out as [3, chunk] x [chunk, hidden].
        At_low = A_low.t().contiguous()
        W2_low, grad_out_low = W2.to(low), grad_out.contiguous().to(low)
        fused_linear_relu = _fused_linear_relu_available(rows_low)
        grad_rows = torch.empty_like(rows) if need_rows else None

        def work(chunks):
            """This share's sums of grad A^T, grad b and grad W2 (zero where not needed)."""
            grad_At = A.new_zeros(A.shape[1], A.shape[0])
            grad_b, grad_W2 = torch.zeros_like(b), torch.zeros_like(W2)
            # One buffer for every chunk's hidden gradient: a fresh one each time costs page faults.
            grad_hidden_buffer = rows_low.new_empty(max(stop - start for start, stop in chunks), A.shape[0])
            for start, stop in chunks:
                x, g = rows_low[start:stop], grad_out_low[start:stop]
                hidden = _hidden(x, A_low, b_low, fused_linear_relu)
                if need_W2:
                    grad_W2 += g.t() @ hidden
                if not (need_rows or need_A or need_b):
                    continue
                grad_hidden = torch.mm(g, W2_low, out=grad_hidden_buffer[:stop - start])
                # ReLU passes gradient only where its output is positive, as autograd's does.
                torch.ops.aten.threshold_backward.grad_input(grad_hidden, hidden, 0, grad_input=grad_hidden)
                if need_A:
                    grad_At += x.t() @ grad_hidden
                if need_b:
                    grad_b += grad_hidden.sum(0)
                if need_rows:
                    grad_rows[start:stop] = grad_hidden @ At_low.t()
            return grad_At, grad_b, grad_W2

        shares = run_on_threads(work, row_chunks(rows.shape[0], ctx.chunk_rows), rows.device)
        grad_At, grad_b, grad_W2 = (sum(parts) for parts in zip(*shares))
        return (grad_rows, grad_At.t() if need_A else None, grad_b if need_b else None,
                grad_W2 if need_W2 else None, grad_bias2, None, None)


def fused_pointwise(x: Tensor, conv1: nn.Conv2d, bn: nn.BatchNorm2d, conv2: nn.Conv2d,
                    chunk_rows: int = 0, bfloat16: bool = False, counts: Tensor | None = None) -> Tensor:
    """conv2(relu(bn(conv1(x)))) for a 1x1 conv1 and a 1x1 or 2x2 stride-2 conv2, computed
    chunk by chunk of pixels (or of 2x2 patches).

    Uses the modules' own parameters and buffers (running statistics are updated in training mode
    exactly as BatchNorm would), so a model keeps its state_dict either way. The result is in
    channels-last memory format for channels-last input, contiguous otherwise. `chunk_rows` 0 sizes
    chunks by `HIDDEN_BYTES_PER_CHUNK`. Under a bfloat16 autocast the core's products run in bfloat16.
    With `counts`, image u of x stands for counts[u] copies of itself in the batch statistics.
    """
    bfloat16 = bfloat16 or (torch.is_autocast_enabled(x.device.type)
                            and torch.get_autocast_dtype(x.device.type) == torch.bfloat16)
    # The statistics stay in float32 under any autocast (a bfloat16 covariance loses the small
    # variances), and the core's hand-written products must not be recast by one.
    with torch.autocast(x.device.type, enabled=False):
        batch, channels, height, width = x.shape
        # Flattened through the channels-last order the training loop keeps them in, so their
        # gradients come back in that layout too (DistributedDataParallel warns of any other).
        W1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.out_channels, channels)
        # A 2x2 stride-2 conv2 reads 2x2 patches of the hidden pixels, (row, column, channel) order.
        side = conv2.kernel_size[0]
        W2 = conv2.weight.permute(0, 2, 3, 1).reshape(conv2.out_channels, side * side * conv1.out_channels)
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels).to(W1.dtype)
        # As nn.BatchNorm2d: batch statistics in training, or always when no running ones are kept.
        use_batch_statistics = bn.training or bn.running_mean is None
        if use_batch_statistics:
            if rows.shape[0] < 2:
                raise ValueError(f"BatchNorm needs more than 1 value per channel in training, got {tuple(x.shape)}")
            # A SyncBatchNorm2d's statistics are those of every process's rows: the sums are summed.
            group = bn.statistics_group() if type(bn) is SyncBatchNorm2d else None
            if counts is None:
                weights, local = None, rows.new_tensor([rows.shape[0]])
            else:
                weights = counts.repeat_interleave(height * width).unsqueeze(1)
                local = weights.sum().reshape(1)
            sums = rows.sum(0) if weights is None else (weights * rows).sum(0)
            first = summed_over(torch.cat([sums, local]), group)
            count = first[-1]
            # Centred rows make the core's shift BatchNorm's bias alone, and keep bfloat16's rounding
            # error relative to the spread of the input rather than to its mean.
            rows_mean = first[:-1] / count
            rows = rows - rows_mean
            weighted = rows if weights is None else weights * rows
            covariance = summed_over(weighted.t() @ rows, group) / count
            # Rounding can leave w^T Sigma w a hair below zero where BatchNorm's own variance cannot go.
            variance = ((W1 @ covariance) * W1).sum(1).clamp(min=0)
            if bn.training and bn.track_running_stats:
                mean = W1 @ rows_mean.detach()
                if conv1.bias is not None:
                    mean = mean + conv1.bias.detach()
                update_running_statistics(bn, mean, variance, count)
            scale = torch.rsqrt(variance + bn.eps)
            shift = torch.zeros_like(scale)
        else:
            scale = torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if conv1.bias is not None:
                shift = shift + conv1.bias * scale
        if bn.affine:
            scale = bn.weight * scale
            shift = bn.weight * shift + bn.bias
        A = scale.unsqueeze(1) * W1
        if side > 1:
            # Each patch's pixels share conv1 and BatchNorm: one block of A per pixel of the patch.
            # The zeros cost little beside conv2, as conv1 reads only a few colour channels.
            rows = (rows.reshape(batch, height // side, side, width // side, side, channels)
                    .transpose(2, 3).reshape(-1, side * side * channels))
            A, shift = torch.block_diag(*[A] * side ** 2), shift.repeat(side ** 2)
        chunk_rows = chunk_rows or default_chunk_rows(A.shape[0], torch.bfloat16 if bfloat16 else A.dtype)
        out = PointwiseCore.apply(rows, A, shift, W2, conv2.bias, chunk_rows, bfloat16)
    out = out.reshape(batch, height // side, width // side, -1).permute(0, 3, 1, 2)
    if not x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous()
    return out


def is_pointwise_stack(layers, patches: bool = False) -> bool:
    """Whether `layers` is exactly Conv1x1 -> BatchNorm2d (or SyncBatchNorm2d) -> ReLU -> Conv1x1,
    all stride 1; with `patches`, the last may also be a 2x2 stride-2 convolution."""
    if len(layers) != 4:
        return False
    conv1, bn, relu, conv2 = layers

    def conv(layer, side):
        return (type(layer) is nn.Conv2d and layer.kernel_size == (side, side) and layer.stride == (side, side)
                and layer.padding == (0, 0) and layer.groups == 1)

    last = conv(conv2, 1) or (patches and conv(conv2, 2))
    return (conv(conv1, 1) and last and type(bn) in (nn.BatchNorm2d, SyncBatchNorm2d)
            and type(relu) is nn.ReLU and bn.num_features == conv1.out_channels
            and conv2.in_channels == conv1.out_channels)
