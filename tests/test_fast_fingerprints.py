"""The fast path is safe by construction (models/fast/mirrors.py): edit a method of models/ that it
mirrors, or a loss term, and a CPU run with fast="auto" trains the edit, bit for bit as the
reference path does, after one warning naming what changed and the command that re-checks it."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_pixel_vqvae
from models import Decoder, Encoder, VectorQuantizerEMA, VQVAE, build_model
from models.fast import FastPathUnavailable, mirrors
from models.fast.models import FastVQVAE
from tests.helpers import TINY, palette_batch
from utils.config import parse_config
from utils.data.load import SpriteSet
from utils.training.fast_path import accelerated
from utils.training.loop import make_optimizer, run_epoch, seed_everything

CPU = torch.device("cpu")
IMAGES = 16  # two training steps of the loop at batch 8
# The originals, so that an edit made twice wraps them, not the edit before.
DECODER_FORWARD, VQVAE_FORWARD, QUANTIZER_FORWARD = Decoder.forward, VQVAE.forward, VectorQuantizerEMA.forward


def doubled_latents(monkeypatch, model):
    monkeypatch.setattr(Encoder, "forward", lambda self, x: 2 * self.layers(x))


def darkened_output(monkeypatch, model):
    monkeypatch.setattr(Decoder, "forward", lambda self, z: 0.9 * DECODER_FORWARD(self, z))


def quadrupled_vq_loss(monkeypatch, model):
    monkeypatch.setattr(VQVAE, "forward", lambda self, x: (lambda out: out._replace(vq_loss=4 * out.vq_loss))(VQVAE_FORWARD(self, x)))


def square_root_commitment_loss(monkeypatch, model):
    monkeypatch.setattr(VectorQuantizerEMA, "forward", lambda self, z_e: (lambda out: out._replace(loss=out.loss.sqrt()))(QUANTIZER_FORWARD(self, z_e)))


def absolute_error_losses(monkeypatch, model):
    # The reconstruction term of the loop and the commitment term of the reference quantiser.
    monkeypatch.setattr(F, "mse_loss", lambda a, b: F.l1_loss(a, b))


def encoder_subclass_halving_latents(monkeypatch, model):
    model.encoder.__class__ = type("HalvingEncoder", (Encoder,), {"forward": lambda self, x: self.layers(x) / 2})


def quantiser_forward_set_on_the_module(monkeypatch, model):
    quantizer = model.quantizer
    quantizer.forward = lambda z_e: (lambda out: out._replace(loss=100 * out.loss))(QUANTIZER_FORWARD(quantizer, z_e))


# Each edit, a change of the maths, and what the one warning must name.
EDITS = {
    "Encoder.forward": (doubled_latents, "models.encoder.Encoder.forward"),
    "Decoder.forward": (darkened_output, "models.decoder.Decoder.forward"),
    "VQVAE.forward": (quadrupled_vq_loss, "models.vqvae.VQVAE.forward"),
    "VectorQuantizerEMA.forward": (square_root_commitment_loss, "models.quantizer.VectorQuantizerEMA.forward"),
    "mse_loss": (absolute_error_losses, "torch.nn.functional.mse_loss"),
    "a subclass": (encoder_subclass_halving_latents, "encoder is a HalvingEncoder"),
    "an instance's forward": (quantiser_forward_set_on_the_module, "quantizer sets its own forward"),
}


def sprites():
    images = (palette_batch(n=IMAGES, colours=12) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return SpriteSet(images, np.ones(images.shape[:3], bool), [f"s{i}__white" for i in range(IMAGES)])


def trained(fast, edit=None, monkeypatch=None):
    """One epoch of the training loop on the per-pixel Pixel VQ-VAE with config key `fast`, after
    `edit`: the loss terms, the state, and the FastPathUnavailable warnings accelerating gave."""
    config = parse_config(train_pixel_vqvae.config, TINY["train_pixel_vqvae.py"] + [
        "--image_size=16", "--batch_size=8", "--learning_rate=0.003", f"--fast={fast}"])
    seed_everything(config["seed"])
    model = build_model("vqvae", config).to(memory_format=torch.channels_last)
    if edit:
        edit(monkeypatch, model)
    optimizer = make_optimizer(model, config, CPU)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        runner = accelerated(model, config, CPU)
    means, _, _ = run_epoch(runner, "vqvae", sprites(), config, CPU, 0, optimizer)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    return means, state, runner, [str(w.message) for w in record if w.category is FastPathUnavailable]


def relative_gap(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def unedited_reference():
    return trained(False)


@pytest.mark.parametrize("name", sorted(EDITS))
def test_an_edit_of_what_the_fast_path_mirrors_is_what_a_cpu_run_trains(name, monkeypatch, unedited_reference):
    edit, named = EDITS[name]
    means, state, runner, messages = trained("auto", edit, monkeypatch)
    assert not isinstance(runner, FastVQVAE)
    assert len(messages) == 1 and named in messages[0], messages
    if not named.startswith("torch.") and "is a" not in named and "sets its own" not in named:
        assert mirrors.REFRESH in messages[0]
    expected_means, expected_state, _, _ = trained(False, edit, monkeypatch)
    assert means == expected_means
    assert all(torch.equal(tensor, expected_state[key]) for key, tensor in state.items())
    # Rounding alone leaves 1e-6 of a tensor's scale between runs (test_fast_equivalence.py).
    unedited = unedited_reference[1]
    assert max(relative_gap(tensor, unedited[key]) for key, tensor in state.items()) > 1e-2


def test_the_unedited_model_takes_the_fast_path_without_a_warning(unedited_reference):
    means, _, runner, messages = trained("auto")
    assert isinstance(runner, FastVQVAE) and messages == []
    # Up to float32 summation order, the reference's run (test_fast_equivalence.py bounds it).
    assert means["loss"] == pytest.approx(unedited_reference[0]["loss"], rel=1e-4)


def test_a_method_with_no_source_to_read_counts_as_changed(monkeypatch):
    monkeypatch.setattr(Decoder, "forward", torch.sigmoid)
    assert mirrors.fingerprint(Decoder.forward) is None
    assert "models.decoder.Decoder.forward (mirrored by FastDecoder.forward" in mirrors.mirror_problem()


def test_every_mirrored_name_resolves_to_a_method_or_function():
    for qualified in list(mirrors.MIRRORED) + mirrors.TORCH_OWN:
        owner, name = mirrors.resolve(qualified)
        assert callable(getattr(owner, name)), qualified
