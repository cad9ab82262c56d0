"""Collectives that keep the replicas of a data-parallel run in step, and do nothing in one process.

The models call them where state does not come from gradients, which DistributedDataParallel
averages on its own: the EMA codebook and BatchNorm's batch statistics.
"""
import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(*tensors: Tensor) -> None:
    """Each tensor, in place, summed over every process."""
    if is_distributed():
        for tensor in tensors:
            dist.all_reduce(tensor)


def broadcast_from_first_rank(tensor: Tensor) -> None:
    """The tensor, in place, as rank 0 holds it."""
    if is_distributed():
        dist.broadcast(tensor, src=0)


def all_gather_rows(rows: Tensor) -> Tensor:
    """The rows of every process, in rank order; the processes may hold different numbers."""
    if not is_distributed():
        return rows
    counts = [torch.zeros((), dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor(len(rows), device=rows.device))
    counts = [int(count) for count in counts]
    # all_gather moves equal shapes only, so every part travels padded to the longest.
    padded = rows.new_zeros(max(counts), *rows.shape[1:])
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


class _SumOverProcesses(torch.autograd.Function):
    # The gradient of a sum that every process uses is the sum of every process's gradient.
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return _SumOverProcesses.apply(grad, ctx.group), None


def summed_over(tensor: Tensor, group) -> Tensor:
    """`tensor` summed over the processes of `group`, gradients included; itself when group is None."""
    return tensor if group is None else _SumOverProcesses.apply(tensor, group)
