"""Whether config key `fast` asks for models/fast on a device, and the model accelerated so."""
import torch

from models.fast import accelerate
from utils.errors import UserError

FAST_SETTINGS = {"auto": None, "true": True, "false": False}
# Where `fast="auto"` accelerates: the devices the fast path was measured faster on (bench/README.md).
FAST_BY_DEFAULT = ("cpu",)


def uses_fast_path(config, device):
    """Whether config key `fast` ('auto', True or False) asks for models/fast on `device`."""
    setting = str(config.get("fast", "auto")).lower()
    if setting not in FAST_SETTINGS:
        raise UserError(f"fast {config['fast']!r} is not one of auto, True, False")
    wanted = FAST_SETTINGS[setting]
    return torch.device(device).type in FAST_BY_DEFAULT if wanted is None else wanted


def accelerated(model, config, device):
    """`model`, or the module of models/fast that trains it faster where config key `fast` asks:
    either way the same parameters and buffers."""
    return accelerate(model, device) if uses_fast_path(config, device) else model
