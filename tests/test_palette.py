"""The palette-exact output: each pixel's colour chosen from the sprite's own palette."""
import json
import warnings

import numpy as np
import pytest
import torch

from models import VQVAE
from models.fast import FastPathUnavailable, accelerate
from models import palette
from models.palette import palette_ranks, palette_union, sprite_palettes
from tests.helpers import palette_batch, train
from utils.data.load import SpriteSet
from utils.errors import UserError
from utils.metrics import BITS_PER_COLOUR, bits_per_sprite, colours_per_image
from utils.training.prior import decode_grids, nearest_grids
from utils.training.loop import palette_training_set

TINY_PALETTE = dict(num_layers=1, num_embeddings=16, embedding_dim=8, palette_output=True, palette_features=8)


def keys(images):
    """The 24-bit colour of every pixel of a float batch [B, 3, H, W]."""
    levels = (images * 255).round().long()
    return (levels[:, 0] << 16) | (levels[:, 1] << 8) | levels[:, 2]


def test_palettes_hold_each_images_distinct_colours_and_index_every_pixel():
    x = palette_batch(n=4, colours=12)
    palettes = sprite_palettes(x)
    for b in range(len(x)):
        own = keys(x[b:b + 1]).unique()
        assert int(palettes.valid[b].sum()) == len(own)
        listed = keys(palettes.colours[b, palettes.valid[b]].T[None, :, :, None])[0, :, 0]
        assert torch.equal(listed, own)
        # Every pixel's entry is its own colour: the target of the choice is exact.
        looked_up = palettes.colours[b][palettes.index[b]].permute(2, 0, 1)
        assert torch.equal(looked_up, x[b])


def test_union_palette_holds_the_colours_of_both_parents():
    x = palette_batch(n=2, colours=12)
    union = palette_union(x[:1], x[1:])
    both = torch.cat([keys(x[:1]).flatten(), keys(x[1:]).flatten()]).unique()
    assert union.index is None and int(union.valid.sum()) == len(both)


def test_every_output_colour_is_one_of_the_inputs_own():
    torch.manual_seed(0)
    model = VQVAE(**TINY_PALETTE).eval()
    x = palette_batch(n=4, colours=12)
    out = model(x).reconstruction
    for b in range(len(x)):
        assert torch.isin(keys(out[b:b + 1]), keys(x[b:b + 1])).all()


def test_training_the_choice_makes_pixels_exact():
    torch.manual_seed(0)
    # The scripts' quantiser settings: with k-means placement alone two of the seven colours end
    # on one code here, and the choice cannot part them.
    model = VQVAE(**{**TINY_PALETTE, "num_embeddings": 64, "kmeans_init": True, "dead_code_threshold": 0.5})
    x = palette_batch(n=8, colours=6)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    def exact_share():
        model.eval()
        with torch.no_grad():
            share = (keys(model(x).reconstruction) == keys(x)).float().mean().item()
        model.train()
        return share

    before = exact_share()
    for _ in range(300):
        optimizer.zero_grad()
        terms = model.loss_terms(x, model(x))
        terms["loss"].backward()
        optimizer.step()
    assert terms["palette"].requires_grad and not terms["recon"].requires_grad
    after = exact_share()
    assert before < 0.5 and after > 0.99, (before, after)


def shade_batch(n=8, size=16, shades=6, step=3, seed=1):
    """Sprites of 2x2 cells, each in `shades` shades `step` levels apart of its own random colour:
    a ramp, as pixel art shades, of colours closer together than any small codebook's cells."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256 - shades * step, (n, 1, 3), generator=generator)
    palettes = base + step * torch.arange(shades).view(1, shades, 1)
    cells = torch.randint(0, shades, (n, (size // 2) ** 2, 1), generator=generator)
    images = torch.gather(palettes, 1, cells.expand(-1, -1, 3)).view(n, size // 2, size // 2, 3)
    images = images.repeat_interleave(2, 1).repeat_interleave(2, 2).float() / 255
    return images.permute(0, 3, 1, 2).contiguous()


def test_ranks_tell_apart_colours_one_level_apart_and_ignore_the_padding():
    x = torch.tensor([[[10, 10, 10], [11, 10, 10], [10, 11, 10], [200, 0, 0]],
                      [[5, 5, 5], [5, 5, 5], [5, 5, 5], [5, 5, 6]]], dtype=torch.float32) / 255
    palettes = sprite_palettes(x.view(2, 1, 4, 3).permute(0, 3, 1, 2))
    ranks = palette_ranks(palettes)
    assert ranks.shape == (2, 4, 8)
    first = ranks[0, palettes.valid[0]]
    assert len({tuple(row.tolist()) for row in first}) == 4  # every entry its own place
    assert ranks[1, ~palettes.valid[1]].abs().sum() == 0
    # Red: 10, 10, 11, 200 have dense ranks 0, 0, 1, 2 of 3 distinct levels; over 255 they are 0..2/255.
    red = palettes.colours[0, :, 0] * 255
    assert sorted(ranks[0, :, 0].tolist()) == [0.0, 0.0, 0.5, 1.0]
    assert ranks[0, red.argmax(), 4].item() == pytest.approx(2 / 255)


@pytest.mark.parametrize("context, lowest, highest", [(0, 0.0, 0.5), (8, 0.99, 1.0)])
def test_codes_that_name_palette_entries_rebuild_close_shades_of_unseen_sprites(context, lowest, highest):
    torch.manual_seed(0)
    # Per pixel, 16 codes: a code of the colour alone puts a sprite's six close shades in one or two
    # cells; a code of its place in the palette tells them apart, in sprites it has never seen too.
    model = VQVAE(num_layers=0, adapter_layer=True, num_embeddings=16, embedding_dim=8, palette_output=True,
                  palette_features=8, palette_context=context, kmeans_init=True, dead_code_threshold=0.5)
    x, unseen = shade_batch(size=8, seed=1), shade_batch(size=8, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(300):
        optimizer.zero_grad()
        model.loss_terms(x, model(x))["loss"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        share = (keys(model(unseen).reconstruction) == keys(unseen)).float().mean().item()
    assert lowest <= share <= highest, share


def test_palette_context_needs_a_palette_output():
    with pytest.raises(ValueError, match="needs palette_output=True"):
        VQVAE(num_layers=1, num_embeddings=16, embedding_dim=8, palette_context=4)


def test_ssim_term_trains_through_the_expected_colours():
    model = VQVAE(**TINY_PALETTE, use_ssim_loss=True)
    x = palette_batch(n=2, colours=6)
    terms = model.loss_terms(x, model(x))
    terms["loss"].backward()
    assert model.palette_head.embed[0].weight.grad.abs().sum() > 0


def test_a_few_images_at_a_time_gives_the_whole_batchs_loss_gradients_and_colours(monkeypatch):
    torch.manual_seed(0)
    # In eval mode two passes see the same codebook and BatchNorm statistics; gradients still flow.
    model = VQVAE(**TINY_PALETTE, use_ssim_loss=True).eval()
    x = palette_batch(n=6, colours=10)

    def run():
        model.zero_grad()
        output = model(x)
        terms = model.loss_terms(x, output)
        terms["loss"].backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return output, terms, grads

    whole, whole_terms, whole_grads = run()
    assert len(whole.palette.chunks) == 1 and not whole.palette.recompute
    # Room for the logits of one image at a time: six chunks, each recomputed in the backward pass.
    monkeypatch.setattr(palette, "LOGIT_BUDGET", whole.palette.palettes.colours.shape[1] * 16 * 16)
    monkeypatch.setattr(palette, "KEPT_LOGITS", 0)
    chunked, chunked_terms, chunked_grads = run()
    assert len(chunked.palette.chunks) == 6 and chunked.palette.recompute
    assert torch.equal(chunked.reconstruction, whole.reconstruction)
    for key in ("palette", "ssim", "loss"):
        assert torch.allclose(chunked_terms[key], whole_terms[key], rtol=1e-5, atol=1e-7), key
    assert len(chunked_grads) == len(whole_grads)
    for a, b in zip(chunked_grads, whole_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("context", [0, 4])
def test_decoding_codes_needs_a_palette_and_matches_the_forward_pass_with_the_inputs_own(context):
    torch.manual_seed(0)
    model = VQVAE(**TINY_PALETTE, palette_context=context).eval()
    x = palette_batch(n=3, colours=10)
    with torch.no_grad():
        codes = model.encode(x)
        with pytest.raises(ValueError, match="decodes with a palette"):
            model.decode_indices(codes)
        decoded = model.decode_indices(codes, sprite_palettes(x, with_index=False))
        assert torch.equal(decoded, model(x).reconstruction)


def test_the_fast_path_leaves_a_palette_model_to_its_own_forward_with_one_warning():
    model = VQVAE(**TINY_PALETTE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = accelerate(model, torch.device("cpu"))
    assert runner is model
    assert [str(w.message) for w in caught if issubclass(w.category, FastPathUnavailable)][0].count("palette_head")


def test_bits_per_sprite_counts_the_palette_beside_the_codes():
    images = (palette_batch(n=4, colours=9) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    config = {"image_size": 16, "num_layers": 1, "num_embeddings": 16, "embedding_dim": 8}
    assert bits_per_sprite(config) == 8 * 8 * 4
    palette_bits = BITS_PER_COLOUR * colours_per_image(images)
    assert bits_per_sprite({**config, "palette_output": True}, images) == 8 * 8 * 4 + palette_bits
    with pytest.raises(ValueError, match="pass palette_colours"):
        bits_per_sprite({**config, "palette_output": True})


def test_prior_samples_take_the_palette_of_the_training_grid_sharing_most_codes():
    reference = np.array([[[0, 0], [0, 0]], [[1, 2], [3, 4]], [[1, 2], [0, 0]]], np.int32)
    samples = np.array([[[1, 2], [3, 0]], [[0, 0], [0, 5]]], np.int32)
    assert nearest_grids(samples, reference).tolist() == [1, 0]
    torch.manual_seed(0)
    model = VQVAE(**TINY_PALETTE).eval()
    x = palette_batch(n=2, colours=10)
    owners = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    grids = model.encode(x).numpy().astype(np.int32)
    drawn = decode_grids(model, grids, 2, torch.device("cpu"), palette_images=owners)
    for image, owner in zip(drawn, owners):
        colour = lambda a: a[..., 0].astype(np.int64) << 16 | a[..., 1].astype(np.int64) << 8 | a[..., 2]
        assert np.isin(colour(image), colour(owner)).all()


def test_a_palette_model_leaves_out_training_images_with_more_colours_than_its_limit(capsys):
    plain = (palette_batch(n=3, colours=6) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    noisy = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    images = np.concatenate([plain[:1], noisy[:1], plain[1:], noisy[1:]])
    names = ["a__white", "a__noise0", "b__white", "c__black", "c__noise1"]
    train_set = SpriteSet(images, np.ones(images.shape[:3], bool), names)
    config = {"palette_output": True, "palette_max_colours": 64}
    kept = palette_training_set(train_set, config)
    assert kept.names == ["a__white", "b__white", "c__black"]
    assert np.array_equal(kept.images, plain)
    assert "2 of 5 training images have more than 64 colours" in capsys.readouterr().out
    assert palette_training_set(train_set, {**config, "palette_output": False}) is train_set
    with pytest.raises(UserError, match="every training image has more than palette_max_colours = 2"):
        palette_training_set(train_set, {**config, "palette_max_colours": 2})


@pytest.mark.parametrize("context", ["0", "4"])
def test_palette_model_trains_end_to_end_with_fusions_and_honest_bits(tmp_path, tiny_data, context):
    done = train("train_vqvae.py", tmp_path, tiny_data, "--palette_output=True", "--palette_features=8",
                 f"--palette_context={context}")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["foreign_colour_rate"] == 0.0
    assert metrics["bits_per_sprite"] > 8 * 8 * np.log2(16)
    assert (run / "fusions").is_dir() and any((run / "fusions").rglob("blend.png"))
    history = json.loads((run / "history.json").read_text())
    assert "train_palette" in history[0]
