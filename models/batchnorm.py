"""BatchNorm whose batch statistics cover the batches of every process of a data-parallel run.

PyTorch's own nn.SyncBatchNorm refuses CPU tensors; this one runs wherever the collectives do, so
the CPU tests check what the GPUs run. Its state_dict is BatchNorm2d's, so weights move freely
between one process and many.
"""
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .collectives import is_distributed, summed_over


@torch.no_grad()
def update_running_statistics(bn: nn.BatchNorm2d, mean: Tensor, variance: Tensor, count) -> None:
    """As nn.BatchNorm2d does from the batch `mean` and biased `variance` of `count` values."""
    bn.num_batches_tracked += 1
    # Momentum None is a cumulative average, and running_var is unbiased.
    factor = 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum
    bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
    bn.running_var.mul_(1 - factor).add_(variance * count / (count - 1), alpha=factor)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics are those of the batches of all `process_group`
    (None: every process) together; in one process, or in eval mode, it is nn.BatchNorm2d."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def statistics_group(self):
        """The group whose batches make the batch statistics; None when this process's batch alone."""
        return (self.process_group or dist.group.WORLD) if is_distributed() else None

    def forward(self, x: Tensor) -> Tensor:
        group = self.statistics_group()
        if group is None or not (self.training or self.running_mean is None):
            return super().forward(x)
        self._check_input_dim(x)
        # float32 under any autocast: bfloat16 sums lose small variances and large counts.
        x32 = x.float()
        # summed_over carries gradients, so autograd differentiates through every process's
        # statistics as it does through one process's.
        count = summed_over(x32.new_tensor([x.numel() // x.shape[1]]), group)
        mean = summed_over(x32.sum((0, 2, 3)), group) / count
        # The variance about the global mean: a second collective, but no E[x^2] - E[x]^2.
        variance = summed_over((x32 - mean.view(1, -1, 1, 1)).square().sum((0, 2, 3)), group) / count
        if self.track_running_stats:
            update_running_statistics(self, mean.detach(), variance.detach(), count)
        out = (x32 - mean.view(1, -1, 1, 1)) * (variance + self.eps).rsqrt().view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """`module` with every nn.BatchNorm2d replaced by a SyncBatchNorm2d holding the very same
    parameters and buffers, so an optimiser made before still updates them."""
    if type(module) is nn.BatchNorm2d:
        synced = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, process_group=process_group)
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            setattr(synced, name, tensor)
        return synced.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, process_group))
    return module
