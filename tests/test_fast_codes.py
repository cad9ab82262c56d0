"""Specifications of running a VQ-VAE's decoder once per code in use (models/fast/codes.py)."""
import copy

import pytest
import torch

from models import VQVAE
from models.fast import accelerate, codes
from models.fast.distinct import _NarrowLinear, summed_outer_products
from tests.helpers import assert_close_to_scale, palette_batch
from models.losses import ssim


def by_code_and_whole(num_layers=2, **keys):
    """Two copies of one VQ-VAE: the first accelerated, running distinct blocks and decoding once
    per code; the second the reference model, which runs every block of the batch."""
    torch.manual_seed(0)
    whole = VQVAE(num_layers, 16, 8, **keys).to(memory_format=torch.channels_last)
    model = accelerate(copy.deepcopy(whole), "cpu")
    model.run_distinct_blocks = True
    assert model.decode_by_code
    return model, whole


def step(model, x, bfloat16=False):
    """One forward and backward pass with the SSIM term, whose gradient differs from one copy of a
    block to the next: the straight-through gradient must reach each block's latent as its own."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        output = model(x)
        loss = (output.reconstruction - x).square().mean() + output.vq_loss + 0.5 * (1 - ssim(output.reconstruction, x))
    loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("keys", [dict(adapter_layer=True, pixelsight_filters=32), dict(),
                                  dict(num_layers=0, adapter_layer=True, pixelsight_filters=32)])
@pytest.mark.parametrize("through", ["each block", "each code's jacobian"])
def test_decoding_once_per_code_gives_the_gradients_of_decoding_every_block(keys, through, monkeypatch):
    # Latent gradients per block, or through per-code Jacobians (chosen by the count of blocks).
    monkeypatch.setattr(codes, "JACOBIAN_ROW_SHARE", 0.0 if through == "each block" else 1e9)
    model, whole = by_code_and_whole(**keys)
    # Blocks of 4x4, and single pixels of more colours than the per-pixel model has codes.
    x = palette_batch(colours=40 if model.num_layers else 200)
    model.train(), whole.train()
    output, gradients = step(model, x)
    if model.num_layers == 0:
        # The per-pixel decoder sees only a handful of distinct latents, and its BatchNorm's
        # rounding in float32 moves the whole batch's gradients by up to 3% of their scale (more
        # on its fused path): the reference is the whole batch in float64.
        whole.double()
        x = x.double()
    expected, expected_gradients = step(whole, x)
    assert torch.equal(output.indices, expected.indices)
    # Fewer codes than distinct blocks: the decoder ran on fewer rows.
    side = 2 ** model.num_layers
    blocks = x.unfold(2, side, side).unfold(3, side, side).reshape(-1, 3 * side * side)
    assert len(torch.unique(output.indices)) < len(torch.unique(blocks, dim=0))
    assert_close_to_scale(output.reconstruction, expected.reconstruction, 1e-5)
    for name, gradient in gradients.items():  # the encoder's come through each block's latent
        assert_close_to_scale(gradient, expected_gradients[name], 1e-4)
    for name, tensor in model.state_dict().items():  # BatchNorm's running statistics, the codebook
        assert_close_to_scale(tensor, whole.state_dict()[name], 1e-5)


def test_decoding_by_code_with_batchnorm_on_running_statistics_passes_gradients_too():
    model, whole = by_code_and_whole(adapter_layer=True, pixelsight_filters=32)
    x = palette_batch()
    for m in (model, whole):
        m.train()
        m(x)  # running statistics away from their initial 0 and 1
        m.decoder.layers[4].eval()  # the BatchNorm after the transposed convolution on them
    _, gradients = step(model, x)
    _, expected_gradients = step(whole, x)
    for name, gradient in gradients.items():
        assert_close_to_scale(gradient, expected_gradients[name], 1e-4)


def test_decoding_by_code_under_bfloat16_is_as_close_to_float32_as_the_whole_batch_is():
    model, whole = by_code_and_whole(adapter_layer=True, pixelsight_filters=32)
    whole_bfloat16, reference = copy.deepcopy(whole), copy.deepcopy(whole)
    x = palette_batch()
    for m in (model, whole_bfloat16, reference):
        m.train()
    output, gradients = step(model, x, bfloat16=True)
    expected, expected_gradients = step(whole_bfloat16, x, bfloat16=True)
    _, exact_gradients = step(reference, x)
    assert output.reconstruction.dtype == torch.float32
    assert_close_to_scale(output.reconstruction, expected.reconstruction, 2e-2)
    # bfloat16 moves this tiny model's gradients by 1-70% of their scale, either way, so the
    # test is on the mean over its tensors: a wrong term for the batch statistics moves them ~100%.
    errors, whole_errors = [], []
    for name, exact in exact_gradients.items():
        scale = exact.abs().max()
        errors.append(((gradients[name] - exact).abs().max() / scale).item())
        whole_errors.append(((expected_gradients[name] - exact).abs().max() / scale).item())
    assert sum(errors) <= 1.25 * sum(whole_errors)


def test_narrow_products_sum_to_the_whole_product():
    torch.manual_seed(0)
    g, x = torch.randn(1000, 128, dtype=torch.float64), torch.randn(1000, 3, dtype=torch.float64)
    assert torch.allclose(summed_outer_products(g, x), g.t() @ x)
    rows = torch.randn(300, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_NarrowLinear.apply, (rows, weight, bias))
