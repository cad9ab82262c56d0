"""Reference against fast: the models of models/ train and evaluate on models/fast as they do on
their own forward, for each configuration the bench times (tests/helpers.py: CONFIGURATIONS).

Float32 sums in another order differ in their last bits, and a few steps of training carry that
on. The tolerance: after a seeded run, every loss, weight, codebook and BatchNorm statistic of the
fast run lies no further from the same run of the reference model in float64 than
FLOAT32_FACTOR times the reference's own float32 run does, or within FLOOR of the tensor's
largest value. A wrong term (a missing count, a skipped gradient) moves them by 1e-3 to 1.

These checks are what models/fast/fingerprints.json records: with PIXEL_VQVAE_REFRESH_FAST_FINGERPRINTS=1
the last test runs every one of them again and, when all pass, writes the fingerprints of the code
they passed on (models/fast/mirrors.py); without it, that test fails while the code differs from
the fingerprints, as the guard then keeps the fast path off."""
import copy
import json
import os

import pytest
import torch

from models import VQVAE
from models.fast import accelerate, mirrors
from models.fast import batchnorm as fast_batchnorm
from models.fast import kernels
from models.fast.distinct import distinct_blocks
from tests.helpers import (CONFIGURATIONS, assert_close_to_scale, counting_fused_calls, palette_batch, seeded_run,
                           tiny_model)

FLOAT32_FACTOR = 4
FLOOR = 1e-5


def assert_as_close_as_float32_allows(fast, reference32, reference64, name):
    scale = reference64.abs().max().clamp(min=1e-6).item()
    fast_gap = (fast.double() - reference64).abs().max().item()
    float32_gap = (reference32.double() - reference64).abs().max().item()
    allowed = max(FLOAT32_FACTOR * float32_gap, FLOOR * scale)
    assert fast_gap <= allowed, f"{name}: {fast_gap:.3g} from float64, allowed {allowed:.3g}"


@pytest.fixture(autouse=True)
def fast_path_on_the_code_as_it_is(monkeypatch):
    """The fast path against the code of models/ as it is now, whatever fingerprints.json says:
    these checks passing is what lets it be refreshed."""
    monkeypatch.setattr(mirrors, "checked", mirrors.current)


@pytest.fixture
def kernels_at_any_size(monkeypatch):
    """The BatchNorm + ReLU kernel on these tiny batches too (its size bounds are speed, not
    correctness: tests/test_fast_policy.py); a list counting its calls."""
    monkeypatch.setattr(fast_batchnorm, "FUSED_MIN_ROWS", 0)
    return counting_fused_calls(monkeypatch)


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_a_seeded_run_on_the_fast_path_trains_as_the_reference_model_does(name, kernels_at_any_size):
    check_training(name, kernels_at_any_size)


def check_training(name, fused_calls):
    reference = tiny_model(name)
    fast = accelerate(copy.deepcopy(reference), "cpu")
    x = palette_batch()
    losses, state = seeded_run(fast, x)
    losses32, state32 = seeded_run(copy.deepcopy(reference), x)
    losses64, state64 = seeded_run(copy.deepcopy(reference).double(), x.double())
    for step, (loss, loss32, loss64) in enumerate(zip(losses, losses32, losses64)):
        assert_as_close_as_float32_allows(torch.tensor(loss), torch.tensor(loss32),
                                          torch.tensor(loss64, dtype=torch.float64), f"loss {step}")
    assert state.keys() == state32.keys()
    for key, tensor in state.items():
        if tensor.is_floating_point():
            assert_as_close_as_float32_allows(tensor, state32[key], state64[key], key)
        else:
            assert torch.equal(tensor, state32[key]), key
    # The pieces each configuration exists to exercise did run.
    if name.startswith("pixel_vqvae"):
        assert fast.encoder.pointwise and distinct_blocks(x, 2 ** fast.num_layers) is not None
        assert fast._worth_running_distinct_blocks(x) and fast.decode_by_code
    if name in ("vqvae", "vae") and kernels.available():
        assert fused_calls


EVALUATED = ["pixel_vqvae", "pixel_vqvae_16x16", "vqvae"]


@pytest.mark.parametrize("name", EVALUATED)
def test_evaluation_on_the_fast_path_gives_the_reference_codes_and_images(name):
    check_evaluation(name)


def check_evaluation(name):
    reference = tiny_model(name)
    x = palette_batch()
    seeded_run(reference, x, steps=1)
    fast = accelerate(copy.deepcopy(reference), "cpu").eval()
    reference.eval()
    with torch.inference_mode():
        output, expected = fast(x), reference(x)
        # Evaluation runs distinct blocks even where training does not (the plain VQ-VAE).
        assert fast._worth_running_distinct_blocks(x)
    assert torch.equal(output.indices, expected.indices)
    assert_close_to_scale(output.reconstruction, expected.reconstruction, 1e-5)


def test_the_per_pixel_model_under_bfloat16_stays_close_to_the_reference():
    check_bfloat16()


def check_bfloat16():
    # Without k-means, whose seeding is a draw that bfloat16 latents change.
    torch.manual_seed(0)
    reference = VQVAE(0, 16, 8, adapter_layer=True, pixelsight_filters=64).to(memory_format=torch.channels_last)
    fast = accelerate(copy.deepcopy(reference), "cpu")
    x = palette_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, expected = fast(x), reference(x)
    assert output.reconstruction.dtype == torch.float32
    assert torch.equal(output.indices, expected.indices)
    assert_close_to_scale(output.reconstruction, expected.reconstruction, 2e-2)


def test_the_fingerprints_are_those_of_the_code_these_checks_pass_on(kernels_at_any_size):
    if os.environ.get(mirrors.REFRESH_VARIABLE) == "1":
        # Every check again, in this test: a refresh must not follow a run that left some out (-k).
        for name in sorted(CONFIGURATIONS):
            kernels_at_any_size.clear()
            check_training(name, kernels_at_any_size)
        for name in EVALUATED:
            check_evaluation(name)
        check_bfloat16()
        mirrors.FINGERPRINTS.write_text(json.dumps(mirrors.current(), indent=2) + "\n")
    committed = json.loads(mirrors.FINGERPRINTS.read_text())
    stale = sorted(name for name, value in mirrors.current().items() if committed.get(name) != value)
    assert committed.keys() == mirrors.current().keys() and not stale, (
        f"{', '.join(stale) or 'the list of mirrored methods'} changed since the fast path was checked "
        f"against it: update its twin in models/fast if it no longer computes the same, then `{mirrors.REFRESH}`")
