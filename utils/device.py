"""Where tensors live: chosen by the caller's config, never hard-coded in a module."""
import torch

from utils.errors import UserError


def choose_device(name):
    """'auto' is CUDA when present, else the CPU; any other name must be usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a device name (try auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for, but CUDA is not available here")
    return device
