"""Specifications of `accelerate` and its guard (models/fast/__init__.py, guard.py): a model the fast
path was not written for trains on its own forward, after one warning naming what stopped it; a
model it was written for comes back sharing every parameter and buffer."""
import copy
import warnings

import pytest
import torch
from torch import nn

from models import VAE, VQVAE, Decoder, Encoder, QuantizerOutput, VectorQuantizerEMA
from models.fast import FastPathUnavailable, accelerate
from models.fast.guard import problem
from models.fast.models import FastVQVAE
from tests.helpers import CONFIGURATIONS, palette_batch, seeded_run, tiny_model


def accelerated_with_one_warning(model, match, device="cpu"):
    with pytest.warns(FastPathUnavailable, match=match) as record:
        runner = accelerate(model, device)
    assert len(record) == 1
    return runner


def test_a_3x3_padded_convolution_added_trains_exactly_as_the_reference_and_is_named():
    reference = tiny_model("pixel_vqvae")
    # Each latent now sees its neighbours: distinct pixels run alone would see none.
    reference.encoder.layers.append(nn.Conv2d(8, 8, 3, padding=1))
    runner = accelerated_with_one_warning(copy.deepcopy(reference), r"encoder\.layers\.4 \(Conv2d\(8, 8, kernel_size=\(3, 3\)")
    x = palette_batch()
    losses, state = seeded_run(runner, x)
    expected_losses, expected_state = seeded_run(copy.deepcopy(reference), x)
    assert losses == expected_losses
    assert all(torch.equal(tensor, expected_state[key]) for key, tensor in state.items())
    # What the guard prevents: the fast path forced onto this model trains another model.
    forced_losses, _ = seeded_run(FastVQVAE.of(copy.deepcopy(reference)), x)
    assert abs(forced_losses[-1] - expected_losses[-1]) > 1e-3 * expected_losses[-1]


class HalvedQuantizer(VectorQuantizerEMA):
    """A quantiser whose output is no longer its code."""

    def forward(self, z_e):
        out = super().forward(z_e)
        return QuantizerOutput(out.quantized * 0.5, out.loss, out.indices)


def test_a_subclass_of_the_quantiser_falls_back_to_the_models_own_forward():
    model = tiny_model("pixel_vqvae_16x16")
    quantizer = HalvedQuantizer(16, 8)
    quantizer.load_state_dict(model.quantizer.state_dict())
    model.quantizer = quantizer
    reference = copy.deepcopy(model)
    runner = accelerated_with_one_warning(model, "quantizer is a HalvedQuantizer")
    x = palette_batch()
    assert seeded_run(runner, x, steps=1)[0] == seeded_run(reference, x, steps=1)[0]


@pytest.mark.parametrize("change", ["another activation", "another formula"])
def test_a_changed_output_activation_falls_back(change):
    model = tiny_model("vqvae")
    last = len(model.decoder.layers) - 1
    if change == "another activation":
        model.decoder.layers[last] = nn.Sigmoid()
    else:  # still a StretchedSigmoid, no longer computing one: the hand-written backward would be wrong
        model.decoder.layers[last].forward = torch.sigmoid
    assert accelerated_with_one_warning(model, rf"decoder\.layers\.{last} ") is model


def test_a_hook_on_a_layer_falls_back_for_the_fused_layers_would_not_call_it():
    model = tiny_model("pixel_vqvae")
    model.encoder.layers[1].register_forward_hook(lambda *_: None)
    assert accelerated_with_one_warning(model, r"encoder\.layers\.1 has a hook") is model


def test_a_device_the_fast_path_was_not_written_for_falls_back():
    model = tiny_model("vae")
    assert accelerated_with_one_warning(model, "device meta", device="meta") is model


def test_every_model_the_configurations_build_is_accelerated_without_a_warning():
    for num_layers, adapter_layer, pixelsight_filters in [(0, True, 64), (1, True, 0), (2, False, 0), (4, True, 512)]:
        model = VQVAE(num_layers, 16, 8, adapter_layer=adapter_layer, pixelsight_filters=pixelsight_filters)
        assert problem(model, torch.device("cpu")) is None
    assert problem(VAE(num_layers=4, max_filters=32, latent_dim=8), torch.device("cpu")) is None
    odd = VQVAE(2, 16, 8)
    odd.decoder.layers[2] = nn.LeakyReLU()
    assert "decoder.layers.2 (LeakyReLU" in problem(odd, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in CONFIGURATIONS:
            assert accelerate(tiny_model(name), "cpu") is not None


def test_a_subclass_of_a_model_or_its_parts_falls_back():
    class MyEncoder(Encoder):
        pass

    model = tiny_model("vqvae")
    model.encoder.__class__ = MyEncoder
    assert "encoder is a MyEncoder" in problem(model, torch.device("cpu"))
    model = tiny_model("vqvae")
    model.decoder.__class__ = type("MyDecoder", (Decoder,), {})
    assert "decoder is a MyDecoder" in problem(model, torch.device("cpu"))
    assert "MyVQVAE is not" in problem(type("MyVQVAE", (VQVAE,), {})(2, 16, 8), torch.device("cpu"))


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_the_accelerated_model_holds_the_models_own_parameters_and_buffers(name):
    model = tiny_model(name)
    runner = accelerate(model, "cpu")
    assert runner is not model and accelerate(runner, "cpu") is runner
    assert list(runner.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(runner.parameters(), model.parameters()))
    assert all(a is b for a, b in zip(runner.buffers(), model.buffers()))
    # Loading into either loads into both; an optimiser of the model's parameters trains the runner.
    other = tiny_model(name, seed=1)
    model.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(runner.state_dict().values(), other.state_dict().values()))
    before = [p.clone() for p in model.parameters()]
    seeded_run(runner, palette_batch(), steps=1)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("quantizer, name", [("residual", "ResidualVectorQuantizer"), ("fsq", "FiniteScalarQuantizer")])
def test_the_residual_and_finite_scalar_quantisers_train_on_the_reference_path(quantizer, name):
    cls, keys = CONFIGURATIONS["pixel_vqvae_16x16"]
    torch.manual_seed(0)
    model = cls(**keys, quantizer=quantizer, residual_depth=2, fsq_levels="4,4").to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    # The fast path's decoder runs once per code of a codebook and its quantiser is the EMA one.
    runner = accelerated_with_one_warning(model, f"quantizer is a {name}, not the VectorQuantizerEMA")
    assert runner is model
    x = palette_batch()
    losses, state = seeded_run(runner, x)
    expected_losses, expected_state = seeded_run(reference, x)
    assert losses == expected_losses
    assert all(torch.equal(tensor, expected_state[key]) for key, tensor in state.items())
