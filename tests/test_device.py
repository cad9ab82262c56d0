"""Specifications of choosing the device and setting up the CPU allocator (utils/device.py)."""
import platform
import sys

import pytest
import torch

from utils.device import choose_device, keep_freed_memory
from utils.errors import UserError


def test_choosing_a_device_keeps_freed_memory_where_glibc_allocates():
    assert choose_device("cpu") == torch.device("cpu")
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc


def test_an_unknown_or_missing_device_is_a_user_error():
    with pytest.raises(UserError, match="not a device name"):
        choose_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            choose_device("cuda")
