"""Where tensors live: chosen by the caller's config, never hard-coded in a module."""
import ctypes
import functools
import sys
from pathlib import Path

import torch

from utils.errors import UserError


# glibc's mallopt parameters, and the largest value each takes.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
LARGEST_INT = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the next allocation instead of returning it to the kernel.

    Otherwise each large activation is fresh memory mapped for it, and its first write faults in
    every page, several times slower than a copy into reused memory (bench/README.md). The peak
    memory is the same; what is freed is kept until the process ends.
    True where it took effect (Linux with glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(parameter, value) == 1 for parameter, value in
                   ((M_MMAP_THRESHOLD, LARGEST_INT), (M_TRIM_THRESHOLD, LARGEST_INT), (M_TOP_PAD, 0)))
    except (OSError, AttributeError):  # another C library
        return False


def choose_device(name):
    """'auto' is CUDA when present, else the CPU; any other name must be usable here.

    Also sets the process's allocator to keep freed memory (`keep_freed_memory`), for the CPU."""
    keep_freed_memory()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a device name (try auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for, but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} was asked for, but this PyTorch has no MPS (Apple GPU) support here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {name!r} is not one this project runs on (try auto, cpu or cuda)")
    return device


def describe_machine(device):
    """The processor a figure belongs to: the development machines have changed between sessions."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0] if names else 'unknown CPU'}, {len(names) or '?'} cores, {torch.backends.cpu.get_cpu_capability()}"


# What training holds for each parameter: the weight, its gradient and Adam's two moments.
TRAINING_COPIES = 4
GIB = 2**30


def free_memory(device):
    """Bytes free for new tensors on `device`, or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:  # not Linux
        return None
    available = [int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")]
    return available[0] if available else None


def refuse_beyond_memory(needed, what, device, advice):
    """A UserError before `what` allocates `needed` bytes that `device` has not got free, rather
    than the allocator's traceback (or the kernel's kill) once it tries."""
    device = torch.device(device)
    free = free_memory(device)
    if free is not None and needed > free:
        raise UserError(f"{what} needs at least {needed / GIB:.1f} GiB, but {device.type} has "
                        f"{free / GIB:.1f} GiB free; {advice}")


def training_bytes(model):
    """The least memory training `model` takes: its parameters' copies and its buffers (a
    codebook's running counts), before any activation."""
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return TRAINING_COPIES * parameters + sum(b.numel() * b.element_size() for b in model.buffers())
