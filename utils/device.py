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
