"""Specifications of the gated PixelCNN prior: no blind spot, causal sampling, learning."""
import math

import pytest
import torch

from models.pixelcnn import GatedPixelCNN, bits_per_code, negative_log_likelihood, sample_codes

STRIPE_CODES = 8


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Convolutions this small gain nothing from a second thread and run many times slower when
    # another process holds the other core, as a training run on the same machine does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_receptive_field(i: tuple[int, int], j: tuple[int, int], kernel_size: int,
                       num_layers: int) -> bool:
    """Whether the logits at j depend on the code at i, worked out by hand from the layer shapes.

    The first horizontal layer reaches k//2 + 1 codes left and each later one k//2 more; the
    vertical stack grows a full box, k//2 rows up and k//2 columns either side per layer, and the
    horizontal stack takes it from the row above.
    """
    (row, col), (row_j, col_j) = i, j
    reach = num_layers * (kernel_size // 2)
    if row_j == row:
        return col < col_j <= col + reach + 1
    return 0 < row_j - row <= reach + 1 and abs(col_j - col) <= reach


def stripes(n: int) -> torch.Tensor:
    """n 8x8 grids of diagonal stripes, code (phase + row +- col) mod 8, random phase and slant."""
    phase = torch.randint(STRIPE_CODES, (n, 1, 1))
    slant = torch.randint(2, (n, 1, 1)) * 2 - 1
    rows, cols = torch.arange(8).view(1, 8, 1), torch.arange(8).view(1, 1, 8)
    return (phase + rows + slant * cols) % STRIPE_CODES


def stripe_slant(grid: torch.Tensor) -> int | None:
    """The slant (1 or -1) of an 8x8 grid of stripes, None if the grid is not stripes."""
    rows, cols = torch.arange(8).view(8, 1), torch.arange(8).view(1, 8)
    for slant in (1, -1):
        if torch.equal(grid, (grid[0, 0] + rows + slant * cols) % STRIPE_CODES):
            return slant
    return None


# Causality


@pytest.mark.parametrize("kernel_size, num_layers, num_classes", [(3, 3, 0), (5, 1, 0), (3, 2, 4)])
def test_each_code_reaches_exactly_the_later_logits_in_its_receptive_field(kernel_size, num_layers,
                                                                           num_classes):
    # Exhaustive on a 6x6 grid: batch element i has only code i changed. For i = (r, c) the field
    # holds j = (r+1, c - reach), down-left of i, which the original PixelCNN's blind spot misses.
    size, num_embeddings = 6, 5
    model = GatedPixelCNN(num_embeddings, hidden_channels=8, num_layers=num_layers,
                          kernel_size=kernel_size, num_classes=num_classes).double().eval()
    codes = torch.randint(num_embeddings, (1, size, size))
    perturbed = codes.repeat(size * size, 1, 1).view(size * size, size * size)
    diagonal = torch.arange(size * size)
    perturbed[diagonal, diagonal] = (perturbed[diagonal, diagonal] + 1) % num_embeddings
    labels = torch.full((size * size,), 1) if num_classes else None

    with torch.no_grad():
        base = model(codes.expand(size * size, -1, -1), labels)
        changed = model(perturbed.view(-1, size, size), labels)
    change = (changed - base).abs().amax(1).view(size * size, size * size)

    positions = [divmod(k, size) for k in range(size * size)]
    expected = torch.tensor([[in_receptive_field(i, j, kernel_size, num_layers) for j in positions]
                             for i in positions])
    assert torch.equal(change > 1e-9, expected)


def test_changing_the_code_at_i_leaves_the_logits_up_to_i_unchanged_for_every_i():
    # The property sampling rests on, stated directly: the logits at j (raster order) may depend
    # only on the codes before j. The default kernel, at a depth that reaches the whole grid.
    size, num_embeddings = 5, 4
    model = GatedPixelCNN(num_embeddings, hidden_channels=8, num_layers=3).double().eval()
    codes = torch.randint(num_embeddings, (1, size, size))
    with torch.no_grad():
        base = model(codes).flatten(2)
        for i in range(size * size):
            perturbed = codes.clone().view(-1)
            perturbed[i] = (perturbed[i] + 1) % num_embeddings
            changed = model(perturbed.view(1, size, size)).flatten(2)
            assert torch.equal(changed[..., :i + 1], base[..., :i + 1]), i
            if i + 1 < size * size:
                assert not torch.equal(changed[..., i + 1], base[..., i + 1]), i


def test_a_model_without_a_type_a_layer_is_refused():
    with pytest.raises(ValueError, match="num_layers"):
        GatedPixelCNN(8, num_layers=0)


def test_even_kernel_sizes_are_refused():
    with pytest.raises(ValueError, match="odd"):
        GatedPixelCNN(8, kernel_size=4)


# Shapes and likelihood


@pytest.mark.parametrize("num_layers", [1, 2, 5])
def test_logits_cover_every_code_of_a_non_square_grid(num_layers):
    model = GatedPixelCNN(11, hidden_channels=8, num_layers=num_layers)
    logits = model(torch.randint(11, (2, 4, 7)))
    assert logits.shape == (2, 11, 4, 7)


def test_uniform_logits_cost_log2_of_the_codebook_size_in_bits():
    codes = torch.randint(8, (2, 3, 3))
    assert bits_per_code(torch.zeros(2, 8, 3, 3), codes).item() == pytest.approx(3.0)
    assert negative_log_likelihood(torch.zeros(2, 8, 3, 3), codes).item() == pytest.approx(
        math.log(8))


def test_confident_correct_logits_cost_almost_nothing_and_wrong_ones_a_lot():
    codes = torch.randint(8, (2, 3, 3))
    one_hot = torch.nn.functional.one_hot(codes, 8).permute(0, 3, 1, 2).float()
    assert bits_per_code(20 * one_hot, codes).item() < 1e-6
    assert bits_per_code(-20 * one_hot, codes).item() > 20


# Sampling


def test_samples_are_long_codes_in_range_with_the_requested_shape():
    model = GatedPixelCNN(7, hidden_channels=8, num_layers=2)
    codes = sample_codes(model, (3, 4, 5), generator=0)
    assert codes.shape == (3, 4, 5) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 7
    # An untrained model is close to uniform, so one draw of 60 codes uses most of the codebook.
    assert len(codes.unique()) >= 5


def test_the_same_seed_gives_the_same_samples_and_another_seed_different_ones():
    model = GatedPixelCNN(7, hidden_channels=8, num_layers=2)
    first = sample_codes(model, (2, 4, 4), generator=3)
    assert torch.equal(first, sample_codes(model, (2, 4, 4), generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(first, sample_codes(model, (2, 4, 4), generator=4))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_near_zero_temperature_samples_the_greedy_decoding(num_classes):
    model = GatedPixelCNN(7, hidden_channels=8, num_layers=2, num_classes=num_classes).eval()
    labels = torch.tensor([0, 2]) if num_classes else None
    # Greedy decoding from the full grid, while `sample_codes` leaves out the rows below.
    greedy = torch.zeros(2, 4, 5, dtype=torch.long)
    with torch.no_grad():
        for row in range(4):
            for col in range(5):
                greedy[:, row, col] = model(greedy, labels)[:, :, row, col].argmax(1)
    assert torch.equal(sample_codes(model, (2, 4, 5), temperature=1e-6, generator=0, labels=labels),
                       greedy)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        sample_codes(GatedPixelCNN(7, hidden_channels=8, num_layers=1), (1, 2, 2), temperature=0)


# Learning


@pytest.fixture(scope="module")
def stripes_prior() -> GatedPixelCNN:
    torch.manual_seed(0)
    model = GatedPixelCNN(STRIPE_CODES, hidden_channels=32, num_layers=4, kernel_size=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(200):
        codes = stripes(16)
        loss = negative_log_likelihood(model(codes), codes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_training_on_stripes_lowers_the_bits_per_code_far_below_uniform(stripes_prior):
    # Phase (3 bits) and slant (1 bit) over 64 codes leave 1/16 bit per code to learn down to.
    codes = stripes(64)
    with torch.no_grad():
        bits = bits_per_code(stripes_prior(codes), codes).item()
    assert bits < 0.12


def test_a_prior_trained_on_stripes_samples_stripes(stripes_prior):
    samples = sample_codes(stripes_prior, (8, 8, 8), generator=0)
    slants = [stripe_slant(grid) for grid in samples]
    assert sum(slant is not None for slant in slants) >= 6
    # Both slants and several phases: the prior has not collapsed onto one grid.
    assert {1, -1} <= set(slants)
    assert len({grid[0, 0].item() for grid in samples}) >= 3


# Conditioning


def test_class_labels_shift_the_logits_of_the_same_codes():
    model = GatedPixelCNN(7, hidden_channels=8, num_layers=2, num_classes=3)
    logits = model(torch.randint(7, (1, 4, 4)).expand(3, -1, -1), torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 7, 4, 4)
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert (logits[a] - logits[b]).abs().max() > 1e-3


def test_labels_are_needed_exactly_when_the_model_is_conditional():
    codes = torch.randint(7, (2, 3, 3))
    with pytest.raises(ValueError, match="labels"):
        GatedPixelCNN(7, hidden_channels=8, num_layers=1, num_classes=3)(codes)
    with pytest.raises(ValueError, match="labels"):
        GatedPixelCNN(7, hidden_channels=8, num_layers=1)(codes, torch.tensor([0, 1]))
