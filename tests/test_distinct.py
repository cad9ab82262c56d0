"""Specifications of running a VQ-VAE on the distinct blocks of a batch (models/distinct.py)."""
import copy

import pytest
import torch

from models import VQVAE
from models import distinct as distinct_module
from models.batchnorm import normalize_by_batch
from models.distinct import PADDING_STEPS, assemble, block_rows, distinct_blocks, padded_length


def palette_batch(n=8, size=16, colours=40, seed=1):
    """Sprites of 2x2 cells in `colours` random colours under a white band: blocks repeat, as in
    pixel art, yet there are more distinct latents than a small codebook has codes."""
    generator = torch.Generator().manual_seed(seed)
    palette = torch.randint(0, 256, (colours, 3), generator=generator)
    cells = torch.randint(0, colours, (n, size // 2, size // 2), generator=generator)
    images = palette[cells].repeat_interleave(2, 1).repeat_interleave(2, 2).float() / 255
    images[:, :4] = 1.0
    return images.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("side", [1, 2, 4])
def test_distinct_blocks_put_back_in_place_give_the_batch_bit_for_bit(side):
    x = palette_batch()
    blocks, repeats = distinct_blocks(x, side)
    rows = block_rows(x, side)
    distinct = len(torch.unique(rows, dim=0))
    assert distinct < len(rows) and len(blocks) == padded_length(distinct)
    assert repeats.counts.sum().item() == len(rows)
    assert torch.equal(repeats.counts, torch.bincount(repeats.inverse, minlength=len(blocks)).float())
    assert (repeats.counts[:distinct] > 0).all()
    grid = (len(x), x.shape[2] // side, x.shape[3] // side)
    assert torch.equal(assemble(blocks, repeats.inverse, *grid), x)


def test_distinct_blocks_are_padded_to_a_few_lengths_with_copies_that_count_zero_times():
    lengths = [padded_length(n) for n in range(1, 5000)]
    assert all(n <= padded <= n * (1 + 1 / PADDING_STEPS) for n, padded in zip(range(1, 5000), lengths))
    # 2,049 to 4,096 distinct blocks make PADDING_STEPS lengths, not 2,048.
    assert len(set(lengths[2048:4096])) == PADDING_STEPS
    x = palette_batch()
    blocks, repeats = distinct_blocks(x, 1)
    padding = repeats.counts == 0
    assert padding.any() and torch.equal(blocks[padding], blocks[:1].expand_as(blocks[padding]))


def test_a_hash_collision_falls_back_to_comparing_whole_blocks(monkeypatch):
    # Zero multipliers hash every block alike: only the exact comparison can tell them apart.
    monkeypatch.setattr(distinct_module, "_hash_multipliers",
                        lambda length, device: torch.zeros(length, dtype=torch.long, device=device))
    x = palette_batch()
    blocks, repeats = distinct_blocks(x, 2)
    assert int((repeats.counts > 0).sum()) == len(torch.unique(block_rows(x, 2), dim=0))
    assert torch.equal(assemble(blocks, repeats.inverse, len(x), 8, 8), x)


def test_blocks_equal_only_in_value_are_kept_apart():
    # -0.0 == 0.0, but the bits differ; keeping both is exact, merging would be too, and is not needed.
    x = torch.zeros(1, 3, 4, 4)
    x[0, 0, 0, 0] = -0.0
    x[0, :, 2:, 2:] = 0.5
    blocks, repeats = distinct_blocks(x, 1)
    assert len(blocks) == 3
    assert torch.equal(assemble(blocks, repeats.inverse, 1, 4, 4).view(torch.int32), x.view(torch.int32))


def test_a_batch_of_nearly_all_distinct_blocks_runs_whole():
    assert distinct_blocks(torch.rand(2, 3, 8, 8), 1) is None
    assert distinct_blocks(torch.rand(2, 3, 8, 8).bfloat16(), 1) is None


def train_steps(model, x, steps=3):
    """`steps` SGD steps on reconstruction + VQ loss; the last output, gradients and state."""
    torch.manual_seed(5)  # k-means seeding and dead-code restarts draw from this stream
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        output = model(x)
        loss = (output.reconstruction - x).square().mean() + output.vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    return output, gradients, copy.deepcopy(model.state_dict())


def assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, tolerance: float):
    """Equal up to float summation order: differences small beside the tensor's own scale."""
    scale = b.float().abs().max().clamp(min=1e-6)
    assert ((a.float() - b.float()).abs().max() / scale).item() <= tolerance


@pytest.mark.parametrize("num_layers, adapter_layer, pixelsight_filters", [
    (0, True, 64),  # the per-pixel Pixel VQ-VAE, on its fused 1x1 path
    (1, True, 64),
    (2, False, 0),  # the plain VQ-VAE
    (2, True, 512),  # the 16x16 Pixel VQ-VAE's widths: its front runs fused (models/pointwise.py)
])
def test_training_on_distinct_blocks_matches_training_on_the_whole_batch(num_layers, adapter_layer,
                                                                        pixelsight_filters):
    model, whole = twin_models(num_layers, adapter_layer=adapter_layer, pixelsight_filters=pixelsight_filters,
                               kmeans_init=True, dead_code_threshold=0.5)
    x = palette_batch()
    assert distinct_blocks(x, 2 ** num_layers) is not None
    output, gradients, state = train_steps(model, x)
    expected_output, expected_gradients, expected_state = train_steps(whole, x)

    assert torch.equal(output.indices, expected_output.indices)
    assert_close_to_scale(output.reconstruction, expected_output.reconstruction, 1e-5)
    assert output.vq_loss.item() == pytest.approx(expected_output.vq_loss.item(), rel=1e-4)
    for name, gradient in gradients.items():
        assert_close_to_scale(gradient, expected_gradients[name], 1e-4)
    for name, tensor in state.items():  # weights, BatchNorm running statistics, codebook and its EMA
        assert_close_to_scale(tensor, expected_state[name], 1e-4)


def twin_models(num_layers, **keys):
    """Two copies of one VQ-VAE: the first runs distinct blocks, the second every block."""
    torch.manual_seed(0)
    model = VQVAE(num_layers, 16, 8, **keys).to(memory_format=torch.channels_last)
    whole = copy.deepcopy(model)
    model.run_distinct_blocks, whole.run_distinct_blocks = True, False
    return model, whole


def test_distinct_blocks_give_the_same_codes_and_images_in_evaluation():
    model, whole = twin_models(2, adapter_layer=True, pixelsight_filters=32)
    x = palette_batch()
    train_steps(model, x, steps=1)
    train_steps(whole, x, steps=1)
    model.eval(), whole.eval()
    with torch.inference_mode():
        output, expected = model(x), whole(x)
    assert torch.equal(output.indices, expected.indices)
    assert_close_to_scale(output.reconstruction, expected.reconstruction, 1e-5)


def test_the_per_pixel_model_on_distinct_colours_under_bfloat16_matches_the_whole_batch():
    model, whole = twin_models(0, adapter_layer=True, pixelsight_filters=64)
    x = palette_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, expected = model(x), whole(x)
    assert output.reconstruction.dtype == torch.float32
    assert torch.equal(output.indices, expected.indices)
    assert_close_to_scale(output.reconstruction, expected.reconstruction, 2e-2)


def test_weighted_batchnorm_of_bfloat16_blocks_computes_in_float32():
    torch.manual_seed(0)
    bn, reference = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    # A mean far above the spread: in bfloat16, x * scale and the shift -mean * scale would cancel
    # to a few bits.
    blocks = (torch.randn(50, 4, 2, 2) * 0.05 + 3).bfloat16().contiguous(memory_format=torch.channels_last)
    counts = torch.randint(1, 400, (50,)).float()
    out = normalize_by_batch(bn, blocks, counts=counts)
    expected = normalize_by_batch(reference, blocks.float(), counts=counts)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(bn.running_var, reference.running_var)
    assert torch.allclose(out.float(), expected, atol=2e-2, rtol=1e-2)


def test_weighted_batchnorm_is_batchnorm_over_the_batch_with_every_copy():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    expanded_bn = copy.deepcopy(bn)
    blocks = torch.randn(6, 5, 2, 2) * 3 + 2
    counts = torch.tensor([1.0, 4, 2, 1, 7, 3])
    copies = blocks.repeat_interleave(counts.long(), 0)
    out = normalize_by_batch(bn, blocks, counts=counts)
    expected = expanded_bn(copies)
    assert torch.allclose(out.repeat_interleave(counts.long(), 0), expected, atol=1e-5)
    assert torch.allclose(bn.running_mean, expanded_bn.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, expanded_bn.running_var, atol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_batchnorm_backward_is_the_derivative_of_its_forward(weighted):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).double()
    x = (torch.randn(5, 3, 2, 2, dtype=torch.float64) * 2 + 1).requires_grad_()
    counts = torch.tensor([1.0, 3, 2, 5, 1], dtype=torch.float64) if weighted else None
    assert torch.autograd.gradcheck(lambda x, w, b: normalize_by_batch(bn, x, counts=counts),
                                    (x, bn.weight, bn.bias))


def test_only_the_wide_and_the_per_pixel_models_run_distinct_blocks_unless_told():
    x = palette_batch()
    plain, wide, per_pixel = (VQVAE(2, 16, 8), VQVAE(2, 16, 8, adapter_layer=True, pixelsight_filters=32),
                              VQVAE(0, 16, 8, adapter_layer=True, pixelsight_filters=32))
    assert [m._worth_running_distinct_blocks(x) for m in (plain, wide, per_pixel)] == [False, True, True]
    assert plain.eval()._worth_running_distinct_blocks(x)
    plain.train()
    plain.run_distinct_blocks, wide.run_distinct_blocks = True, False
    assert plain._worth_running_distinct_blocks(x) and not wide._worth_running_distinct_blocks(x)
