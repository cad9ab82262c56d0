"""Data-parallel training under torchrun: one process per device, rank 0 the one that speaks.

`python train_x.py` is one process. `torchrun --nproc_per_node=N train_x.py` starts N, which join
one process group here; each takes a `batch_size` share of every global batch of N * batch_size
images, DistributedDataParallel averages their gradients, and the models keep their own state in
step (models/collectives.py). Only rank 0 prints and writes files; the others wait for it.
"""
import contextlib
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models.batchnorm import convert_sync_batchnorm
from models.collectives import broadcast_from_first_rank, is_distributed
from utils.device import choose_device
from utils.errors import UserError


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_first_rank() -> bool:
    return rank() == 0


@contextlib.contextmanager
def process_group():
    """Under torchrun with more than one process: this process in their group for the duration,
    printing only on rank 0. Gloo carries CPU tensors and every exchange of Python objects, NCCL
    GPU tensors, so the group exists before the config is read and says which device is used."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield
        return
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        with contextlib.ExitStack() as stack:
            if not is_first_rank():
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            yield
    finally:
        dist.destroy_process_group()


def process_device(name):
    """The device of config key `device` for this process; in a group, a GPU is its LOCAL_RANK's."""
    device = choose_device(name)
    if device.type != "cuda" or not is_distributed():
        return device
    if device.index is not None:
        raise UserError(f"under torchrun each process takes the GPU of its LOCAL_RANK; "
                        f"give --device=cuda or auto, not {name!r}")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return device


def agreed(work, first_rank_only=False):
    """work()'s result on every rank, or, when work raised a UserError on any rank, that error on
    every rank: alone, the others would wait for the failed rank in their next collective.

    With `first_rank_only` work runs on rank 0 alone (it writes files, or reads what all need) and
    the others receive its result."""
    if not is_distributed():
        return work()
    result, message = None, None
    if is_first_rank() or not first_rank_only:
        try:
            result = work()
        except UserError as err:
            message = str(err)
    messages = [None] * world_size()
    dist.all_gather_object(messages, message)
    for who, said in enumerate(messages):
        if said is not None:
            raise UserError(said if who == 0 else f"rank {who}: {said}")
    if first_rank_only:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def batch_shares(order, batch_size, training):
    """(index, start, size) for each global batch of `world_size() * batch_size` images cut from
    `order`: this rank's images, their offset in the global batch, and its size.

    Rank r takes the r-th slice, so N processes see together exactly the batches of one process
    with N times the batch size. The last, smaller batch is split as evenly as it goes; in training
    it is left out when it holds fewer images than there are ranks, for every rank must step."""
    ranks, me = world_size(), rank()
    for begin in range(0, len(order), batch_size * ranks):
        batch = order[begin:begin + batch_size * ranks]
        if training and len(batch) < ranks:
            return
        start, stop = len(batch) * me // ranks, len(batch) * (me + 1) // ranks
        yield batch[start:stop], start, len(batch)


def data_parallel(model, device, sync_batchnorm):
    """The module this process trains: `model` itself, or, in a group, `model` wrapped to average
    gradients, its BatchNorm layers first made to share statistics when `sync_batchnorm`.

    Parameters and buffers stay the objects `model` holds, so an optimiser of `model.parameters()`
    and `model.state_dict()` serve either way."""
    if not is_distributed():
        return model
    if sync_batchnorm:
        convert_sync_batchnorm(model)
    # Buffers are sent once, not at every step: the codebook and synced BatchNorm keep themselves
    # equal, and every evaluation first takes rank 0's (same_buffers_as_first_rank).
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def same_buffers_as_first_rank(model):
    """Rank 0's buffers on every rank, so that all evaluate the one model rank 0 saves, even with
    per-process BatchNorm running statistics."""
    for buffer in model.buffers():
        broadcast_from_first_rank(buffer)


def earliest_over_ranks(step: torch.Tensor) -> int:
    """The smallest of every rank's `step` (a scalar tensor)."""
    if is_distributed():
        step = step.clone()
        dist.all_reduce(step, op=dist.ReduceOp.MIN)
    return int(step.item())


def summed_over_ranks(values: dict) -> dict:
    """Every rank's {name: float} added up name by name; a rank may lack names it never saw."""
    if not is_distributed():
        return values
    every = [None] * world_size()
    dist.all_gather_object(every, values)
    names = dict.fromkeys(name for rank_values in every for name in rank_values)
    return {name: sum(rank_values.get(name, 0.0) for rank_values in every) for name in names}


def gathered_on_first_rank(count, index, rows):
    """On rank 0, every rank's `rows` put at their `index` of an array of `count`; elsewhere None."""
    parts = [(index, rows)]
    if is_distributed():
        parts = [None] * world_size() if is_first_rank() else None
        dist.gather_object((index, rows), parts, dst=0)
        if parts is None:
            return None
    out = np.empty((count, *rows.shape[1:]), rows.dtype)
    for part_index, part_rows in parts:
        out[part_index] = part_rows
    return out


def barrier():
    if is_distributed():
        dist.barrier()
