import pytest
import torch

from models.gpt import GPTPrior
from models.sampling import draw, filtered_probabilities


def tiny(num_classes=0, cells=12):
    torch.manual_seed(0)
    return GPTPrior(num_embeddings=7, code_cells=cells, width=16, num_layers=2, num_heads=2,
                    num_classes=num_classes).eval()


def test_each_codes_logits_see_only_the_codes_before_it():
    model = tiny()
    codes = torch.randint(0, 7, (1, 3, 4))
    base = model(codes)
    for t in range(12):
        changed = codes.clone().view(-1)
        changed[t] = (changed[t] + 1) % 7
        moved = (model(changed.view(1, 3, 4)) - base).abs().amax(1).view(-1) > 1e-6
        assert not moved[:t + 1].any(), t
        if t < 11:
            assert moved[t + 1:].any(), t


def test_the_label_is_the_first_positions_token():
    model = tiny(num_classes=2)
    codes = torch.randint(0, 7, (2, 3, 4))
    white, black = model(codes, torch.tensor([0, 0])), model(codes, torch.tensor([1, 1]))
    assert (white - black).abs().amax() > 1e-4
    with pytest.raises(ValueError, match="labels are needed"):
        model(codes)


def test_kv_cache_sampling_matches_greedy_decoding_over_the_whole_sequence():
    model = tiny(num_classes=2)
    labels = torch.tensor([0, 1, 1])
    drawn = model.sample((3, 3, 4), temperature=1e-6, generator=0, labels=labels)
    greedy = torch.zeros(3, 12, dtype=torch.long)
    for t in range(12):
        logits = model(greedy.view(3, 3, 4), labels).view(3, 7, 12)[:, :, t]
        greedy[:, t] = logits.argmax(1)
    assert torch.equal(drawn.view(3, 12), greedy)


def test_sampling_is_seeded_and_kept_codes_stay():
    model = tiny()
    first = model.sample((4, 3, 4), generator=5)
    assert torch.equal(first, model.sample((4, 3, 4), generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(first, model.sample((4, 3, 4), generator=6))
    keep = torch.zeros(4, 3, 4, dtype=torch.bool)
    keep[:, 0] = True
    prefix = torch.full((4, 3, 4), 6)
    kept = model.sample((4, 3, 4), generator=5, prefix=prefix, keep=keep)
    assert (kept[:, 0] == 6).all()


def test_a_grid_longer_than_the_prior_is_refused():
    with pytest.raises(ValueError, match="longer than"):
        tiny(cells=8)(torch.zeros(1, 3, 4, dtype=torch.long))


def test_top_k_and_top_p_keep_the_likeliest_codes_and_renormalise():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert torch.allclose(filtered_probabilities(logits, top_k=2), torch.tensor([[0.625, 0.375, 0.0]]))
    assert torch.allclose(filtered_probabilities(logits, top_p=0.6), torch.tensor([[0.625, 0.375, 0.0]]))
    # The codes likelier than the second already hold 0.5: at top_p 0.5 the first alone is left.
    assert torch.allclose(filtered_probabilities(logits, top_p=0.5), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(filtered_probabilities(logits), torch.tensor([[0.5, 0.3, 0.2]]))
    for bad in ({"temperature": 0}, {"top_k": -1}, {"top_p": 0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            draw(logits, **bad)


def test_a_trained_gpt_draws_each_labels_grid():
    torch.manual_seed(0)
    model = GPTPrior(num_embeddings=5, code_cells=6, width=32, num_layers=2, num_heads=2, num_classes=2)
    grids = torch.tensor([[[0, 1, 2], [3, 4, 0]], [[4, 4, 3], [2, 1, 1]]])
    labels = torch.tensor([0, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(grids, labels), grids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    drawn = model.eval().sample((2, 2, 3), generator=0, labels=labels, top_k=1)
    assert torch.equal(drawn, grids)


def test_a_strong_bias_makes_the_prior_draw_the_favoured_codes():
    model = tiny()
    favoured = torch.randint(0, 7, (3, 3, 4))
    bias = torch.zeros(3, 3, 4, 7).scatter_(-1, favoured[..., None], 50.0)
    assert torch.equal(model.sample((3, 3, 4), generator=0, bias=bias), favoured)
