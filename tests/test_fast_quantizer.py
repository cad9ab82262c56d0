"""Specifications of the quantiser's fast forward (models/fast/quantizer.py): it is the reference
quantiser's forward (models/quantizer.py), on the whole batch and on distinct latents."""
import copy

import pytest
import torch

from models import VectorQuantizerEMA
from models.fast.distinct import distinct_blocks
from models.fast.quantizer import first_argmin, nearest_code, quantize
from tests.helpers import assert_close_to_scale, palette_batch


@pytest.mark.parametrize("inference", [False, True])
def test_nearest_code_in_cache_sized_blocks_on_two_threads_equals_the_whole_distance_matrix(inference):
    torch.manual_seed(0)
    # 300 codes, not a multiple of the kernels' 16 lanes: the blocks of torch's ops.
    x, codebook = torch.randn(20_000, 8), torch.randn(300, 8)
    expected = (x.unsqueeze(1) - codebook).square().sum(2).argmin(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode(inference):
            found = nearest_code(x, codebook)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(found, expected)


@pytest.mark.parametrize("codes", [64, 256, 1024, 300])
def test_first_argmin_by_groups_picks_what_argmin_picks_ties_and_nan_included(codes):
    torch.manual_seed(0)
    distances = torch.randn(500, codes)
    # Equal minima in two groups and within one group, as duplicated codes give; NaN, as argmin
    # takes for a minimum.
    distances[0, [codes - 1, 40, 3]] = distances[1, [7, 5]] = -100.0
    distances[2, [codes // 2, 9]] = float("nan")
    distances[3] = 0.0
    found = first_argmin(distances)
    assert torch.equal(found, distances.argmin(1))
    assert found[:4].tolist() == [3, 5, 9, 0]


def quantizer_pair(**keys):
    torch.manual_seed(0)
    reference = VectorQuantizerEMA(16, 3, decay=0.5, **keys)
    return reference, copy.deepcopy(reference)


def colour_latents():
    """Latents [8, 3, 16, 16] of palette sprites: the colours themselves, so pixels repeat."""
    return (palette_batch() * 4 - 2).contiguous(memory_format=torch.channels_last)


def step(quantizer, z, run):
    """One training step's output, z's gradient under an upstream gradient, and the buffers after."""
    z = z.detach().clone().requires_grad_()
    torch.manual_seed(3)  # k-means and restarts
    out = run(quantizer, z)
    upstream = torch.linspace(-1, 1, out.quantized.numel()).reshape(out.quantized.shape)
    ((out.quantized * upstream).sum() + 3 * out.loss).backward()
    return out, z.grad, {name: buffer.clone() for name, buffer in quantizer.named_buffers()}


@pytest.mark.parametrize("keys", [dict(), dict(kmeans_init=True, dead_code_threshold=0.99),
                                  dict(kmeans_init=True, dead_code_threshold=0.99, dead_code_sampling="error")])
def test_the_fast_forward_is_the_reference_forward_on_the_whole_batch(keys):
    reference, fast = quantizer_pair(**keys)
    z = colour_latents()
    expected, expected_grad, expected_state = step(reference, z, lambda q, z: q(z))
    out, grad, state = step(fast, z, quantize)
    assert torch.equal(out.indices, expected.indices)
    assert_close_to_scale(out.quantized, expected.quantized, 1e-6)
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    assert_close_to_scale(grad, expected_grad, 1e-5)
    for name, buffer in state.items():
        assert_close_to_scale(buffer, expected_state[name], 1e-5, name)


@pytest.mark.parametrize("keys", [dict(), dict(kmeans_init=True, dead_code_threshold=0.99),
                                  dict(kmeans_init=True, dead_code_threshold=0.99, dead_code_sampling="error")])
def test_distinct_latents_with_their_counts_quantise_as_the_whole_batch_does(keys):
    # k-means sees the batch with its copies, and a restarted code lands on the latent of the
    # position the reference draws: the same random numbers, the same codes.
    reference, fast = quantizer_pair(**keys)
    z = colour_latents()
    expected, expected_grad, expected_state = step(reference, z, lambda q, z: q(z))
    blocks, repeats = distinct_blocks(z, 1)
    assert len(blocks) < len(repeats.inverse)
    latents = blocks.detach().clone().requires_grad_()
    torch.manual_seed(3)
    out = quantize(fast, latents, repeats)
    batch, _, height, width = z.shape
    # Each position's output is its block's: the copies' upstream gradients sum on the block.
    grid = out.quantized.reshape(-1, 3)[repeats.inverse].reshape(batch, height, width, 3).permute(0, 3, 1, 2)
    upstream = torch.linspace(-1, 1, grid.numel()).reshape(grid.shape)
    ((grid * upstream).sum() + 3 * out.loss).backward()
    assert torch.equal(out.indices.flatten()[repeats.inverse], expected.indices.flatten())
    assert_close_to_scale(grid, expected.quantized, 1e-6)
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    summed = torch.zeros(len(blocks), 3).index_add_(0, repeats.inverse, expected_grad.permute(0, 2, 3, 1).reshape(-1, 3))
    assert_close_to_scale(latents.grad.reshape(-1, 3), summed, 1e-5)
    for name, buffer in fast.named_buffers():
        assert_close_to_scale(buffer, expected_state[name], 1e-5, name)
