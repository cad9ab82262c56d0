"""The paper's models in plain PyTorch, and `build_model` to make one from a script's config.

models/fast trains them faster on the CPU, behind `models.fast.accelerate(model, device)`."""
import inspect

import torch
from torch import nn

from .decoder import Decoder
from .encoder import Encoder
from .fsq import FiniteScalarQuantizer
from .gpt import GPTPrior
from .pixelcnn import GatedPixelCNN, bits_per_code, negative_log_likelihood, sample_codes
from .quantizer import QuantizerOutput, VectorQuantizerEMA
from .residual import ResidualVectorQuantizer
from .vae import VAE, VAEOutput
from .vqvae import VQVAE, VQVAEOutput

MODELS = {"vae": VAE, "vqvae": VQVAE, "pixelcnn": GatedPixelCNN, "gpt": GPTPrior}
PRIORS = ("pixelcnn", "gpt")  # the models over a VQ model's code grids

__all__ = ["Decoder", "Encoder", "FiniteScalarQuantizer", "GPTPrior", "GatedPixelCNN", "MODELS", "PRIORS", "QuantizerOutput",
           "ResidualVectorQuantizer", "VAE", "VAEOutput", "VQVAE", "VQVAEOutput", "VectorQuantizerEMA", "bits_per_code", "build_model", "model_defaults", "model_keys",
           "described_model", "negative_log_likelihood", "objective_keys", "sample_codes"]


def model_keys(model_type: str) -> list[str]:
    """The config keys the model of `model_type` takes."""
    if model_type not in MODELS:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(MODELS)}")
    return list(inspect.signature(MODELS[model_type]).parameters)


def model_defaults(model_type: str) -> dict:
    """The defaults of the model keys that have one: what a config saved before the key existed meant."""
    parameters = inspect.signature(MODELS[model_type]).parameters
    return {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}


def objective_keys(model_type: str) -> tuple[str, ...]:
    """The model keys that weigh its objective's terms rather than shape its tensors."""
    return getattr(MODELS[model_type], "objective_keys", ())


def build_model(model_type: str, config: dict) -> nn.Module:
    """The model of `model_type` ('vae', 'vqvae', 'pixelcnn' or 'gpt') built from the model keys of `config`.

    Other keys (epochs, learning rate, ...) are ignored, so a script passes its whole config.
    """
    keys = model_keys(model_type)
    parameters = inspect.signature(MODELS[model_type]).parameters
    missing = [k for k in keys
               if k not in config and parameters[k].default is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"config for model_type {model_type!r} lacks {missing}")
    return MODELS[model_type](**{k: config[k] for k in keys if k in config})


def described_model(model_type: str, config: dict) -> nn.Module:
    """The model of `config` without weights (on the meta device), to ask for its facts, such as
    its code grid and bits per sprite, where only a config is at hand: no memory, no random draws."""
    with torch.device("meta"):
        return build_model(model_type, config)
