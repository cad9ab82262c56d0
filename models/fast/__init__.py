"""The models of models/ trained faster on the CPU, through one call: `accelerate(model, device)`.

    model = build_model("vqvae", config).to(device)
    fast = accelerate(model, device)  # the same parameters and buffers; trains as `model` does

What each piece does, why it is exact and how that is tested: models/fast/README.md.
"""
import warnings

from torch import nn

from ..vqvae import VQVAE
from .guard import problem
from .models import FastVAE, FastVQVAE


class FastPathUnavailable(UserWarning):
    """The model holds a module the fast path does not run exactly, so it trains as it is."""


def accelerate(model: nn.Module, device) -> nn.Module:
    """A module that trains and evaluates as `model` does, up to float32 summation order, on the
    CPU paths of this package: it holds `model`'s own parameters, buffers and submodules, so an
    optimiser of `model.parameters()` trains both and their state_dicts are one.

    Call it once the model is on `device`. Where the guard (models/fast/guard.py) finds a module,
    or a device, it was not written for, `model` itself is returned, after one warning naming it."""
    if isinstance(model, (FastVQVAE, FastVAE)):
        return model
    found = problem(model, device)
    if found:
        warnings.warn(f"the fast path is off: {found}; training on the model's own forward", FastPathUnavailable,
                      stacklevel=2)
        return model
    return FastVQVAE.of(model) if type(model) is VQVAE else FastVAE.of(model)
