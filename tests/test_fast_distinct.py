"""Specifications of a batch as its distinct blocks (models/fast/distinct.py) and of BatchNorm over
blocks weighted by their counts (models/fast/batchnorm.py). That a VQ-VAE trains on them as on
the whole batch is tests/test_fast_equivalence.py's."""
import copy

import pytest
import torch

from models.fast import distinct as distinct_module
from models.fast.batchnorm import normalize_by_batch
from models.fast.distinct import PADDING_STEPS, assemble, block_rows, distinct_blocks, padded_length
from tests.helpers import palette_batch


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
