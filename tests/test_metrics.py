import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from tests.helpers import exit_status
from tests.sprites import sprite_rgba
from utils.metrics import (PSNR_CAP_DB, bits_per_sprite, cleanliness, codebook_stats, colours_per_image, exact_pixel_rate,
                           foreign_colour_rate, image_metrics, main, mse, palette_metrics, psnr,
                           outline_continuities, palette_overlap, silhouette_overlap, silhouettes, speckle_rates,
                           sprite_exact_pixel_rate, ssim, to_uint8)

REPO = Path(__file__).resolve().parents[1]
RED, GREEN, BLUE, WHITE = (200, 40, 40), (40, 160, 60), (30, 30, 120), (255, 255, 255)


def sprites_on_white(count):
    """Opaque RGB sprite images and their masks, as the dataset stores them."""
    rgba = np.stack([sprite_rgba(seed) for seed in range(count)])
    masks = rgba[..., 3] > 0
    return np.where(masks[..., None], rgba[..., :3], 255).astype(np.uint8), masks


def flat(colour, size=4):
    return np.full((1, size, size, 3), colour, np.uint8)


def test_identical_images_score_perfectly():
    images, masks = sprites_on_white(3)
    metrics = image_metrics(images, images.copy(), masks)
    assert metrics["mse"] == 0.0
    assert metrics["ssim"] == pytest.approx(1.0)
    assert metrics["psnr"] == PSNR_CAP_DB
    assert metrics["exact_pixel_rate"] == 1.0
    assert metrics["sprite_exact_pixel_rate"] == 1.0
    assert metrics["foreign_colour_rate"] == 0.0
    assert metrics["input_colours"] == metrics["output_colours"]


def test_image_metrics_reports_sprite_rate_only_when_masks_are_given():
    images, _ = sprites_on_white(2)
    assert list(image_metrics(images, images)) == [
        "mse", "ssim", "psnr", "exact_pixel_rate",
        "input_colours", "output_colours", "foreign_colour_rate"]


def test_three_of_sixteen_changed_pixels_leave_thirteen_sixteenths_exact():
    ref = flat(RED)
    out = ref.copy()
    out[0, 0, 0] = GREEN
    out[0, 1, 2, 2] += 1  # one level in one channel is already a different colour
    out[0, 3, 3] = WHITE
    assert exact_pixel_rate(ref, out) == 13 / 16


def test_sprite_rate_counts_only_pixels_inside_the_mask():
    ref = flat(RED)
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 1:3, 1:3] = True
    out = ref.copy()
    out[0, 1, 1] = BLUE  # the one sprite pixel lost
    out[0, 0, :2] = WHITE  # background errors must not count
    assert sprite_exact_pixel_rate(ref, out, masks) == 3 / 4
    assert exact_pixel_rate(ref, out) == 13 / 16


def test_sprite_rate_pools_pixels_so_bigger_sprites_weigh_more():
    ref = np.concatenate([flat(RED), flat(GREEN)])
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = True  # a one-pixel sprite, lost
    masks[1] = True  # a sixteen-pixel sprite, intact
    out = ref.copy()
    out[0, 0, 0] = BLUE
    assert sprite_exact_pixel_rate(ref, out, masks) == 16 / 17


def test_sprite_rate_is_nan_when_no_pixel_is_sprite():
    ref = flat(RED)
    assert math.isnan(sprite_exact_pixel_rate(ref, ref, np.zeros((1, 4, 4), bool)))


def two_colour_sprite():
    """A 4x4 image: a red and a blue sprite pixel each side of a 2x2 block, on white background."""
    ref = flat(WHITE)
    mask = np.zeros((1, 4, 4), bool)
    ref[0, 1, 1] = ref[0, 1, 2] = RED
    ref[0, 2, 1] = ref[0, 2, 2] = BLUE
    mask[0, 1:3, 1:3] = True
    return ref, mask


def test_palette_snapping_makes_a_near_colour_exact_and_a_wrong_palette_colour_stays_wrong():
    ref, mask = two_colour_sprite()
    out = ref.copy()
    out[0, 1, 1] = (190, 50, 45)  # off red, nearest red: exact once snapped
    out[0, 2, 1] = RED  # a palette colour, but the wrong one
    out[0, 0, 0] = BLUE  # background: not scored
    metrics = palette_metrics(ref, out, mask)
    assert sprite_exact_pixel_rate(ref, out, mask) == 2 / 4
    assert metrics["palette_exact_pixel_rate"] == 3 / 4
    assert metrics["palette_colours"] == 2
    assert metrics["palette_bits"] == 48


def test_a_near_colour_counts_only_if_its_nearest_palette_colour_is_right():
    ref, mask = two_colour_sprite()
    out = ref.copy()
    # On a red pixel: nearer blue than red, so snapped to the wrong colour. White is not in the
    # palette (it is background only): a white sprite pixel snaps to its nearest, red, here right.
    out[0, 1, 1] = (60, 40, 110)
    out[0, 1, 2] = WHITE
    assert palette_metrics(ref, out, mask)["palette_exact_pixel_rate"] == 3 / 4


def test_palette_is_each_sprites_own_and_pools_pixels_over_the_batch():
    ref, mask = two_colour_sprite()
    other = flat(GREEN)
    refs, masks = np.concatenate([ref, other]), np.concatenate([mask, np.ones((1, 4, 4), bool)])
    out = refs.copy()
    out[1, 0, 0] = RED  # red is in the first sprite's palette, not this one's: snapped back to green
    out[0, 1, 1] = GREEN  # green is not in the first palette: snapped to its nearest, blue, wrong
    metrics = palette_metrics(refs, out, masks)
    assert metrics["palette_exact_pixel_rate"] == (3 + 16) / (4 + 16)
    assert metrics["palette_colours"] == (2 + 1) / 2
    assert metrics["palette_bits"] == 24 * 1.5


def test_image_metrics_with_masks_include_the_palette_exact_share():
    images, masks = sprites_on_white(2)
    metrics = image_metrics(images, images.copy(), masks)
    assert metrics["palette_exact_pixel_rate"] == 1.0
    assert metrics["palette_colours"] == np.mean([len({tuple(c) for c in i[m]}) for i, m in zip(images, masks)])


def test_bits_per_sprite_is_grid_cells_times_log2_codebook_size_and_none_for_the_vae():
    assert bits_per_sprite({"image_size": 64, "num_layers": 0, "adapter_layer": True, "num_embeddings": 256,
                            "embedding_dim": 8}) == 64 * 64 * 8
    assert bits_per_sprite({"image_size": 64, "num_layers": 2, "num_embeddings": 1024, "embedding_dim": 8}) == 16 * 16 * 10
    assert bits_per_sprite({"image_size": 64, "num_layers": 4, "latent_dim": 256}) is None


def test_cli_scores_sprite_and_palette_shares_where_the_inputs_have_alpha(tmp_path):
    images, masks = sprites_on_white(2)
    changed = images.copy()
    changed[0][masks[0]] = 0  # every sprite pixel of the first image black
    write_pngs(tmp_path / "inputs", np.concatenate([images, np.where(masks, 255, 0)[..., None].astype(np.uint8)], -1),
               ["a.png", "b.png"])
    write_pngs(tmp_path / "recon", changed, ["a.png", "b.png"])
    assert main([str(tmp_path / "inputs"), str(tmp_path / "recon"), "--json", str(tmp_path / "m.json")]) == 0
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["sprite_exact_pixel_rate"] == pytest.approx(masks[1].sum() / masks.sum())
    assert saved["sprite_exact_pixel_rate"] == sprite_exact_pixel_rate(images, changed, masks)
    assert saved["palette_exact_pixel_rate"] == palette_metrics(images, changed, masks)["palette_exact_pixel_rate"]


def test_cli_without_alpha_scores_no_sprite_share(tmp_path):
    images, _ = sprites_on_white(2)
    write_pngs(tmp_path / "inputs", images, ["a.png", "b.png"])
    write_pngs(tmp_path / "recon", images, ["a.png", "b.png"])
    assert main([str(tmp_path / "inputs"), str(tmp_path / "recon"), "--json", str(tmp_path / "m.json")]) == 0
    assert "sprite_exact_pixel_rate" not in json.loads((tmp_path / "m.json").read_text())


def test_foreign_colours_are_judged_against_that_image_input_only():
    ref = np.concatenate([flat(RED), flat(GREEN)])
    ref[0, 0, 0] = BLUE
    out = ref.copy()
    out[0, 3, 3] = BLUE  # elsewhere in its own input: not foreign
    out[0, 2, 2] = GREEN  # only in the other image's input: foreign
    out[1, 0, 0] = RED  # likewise
    out[1, 1, 1] = (41, 160, 60)  # one level off GREEN: foreign
    assert foreign_colour_rate(ref, out) == 3 / 32


def test_colours_per_image_counts_distinct_rgb_colours():
    one = flat(RED)
    three = flat(RED)
    three[0, 0, 0] = GREEN
    three[0, 1, 1] = (200, 40, 41)
    assert colours_per_image(np.concatenate([one, three])) == 2.0


def test_mse_and_psnr_work_on_unit_range_colours():
    ref, out = flat(0), flat(51)  # 51/255 = 0.2 in every channel
    assert mse(ref, out) == pytest.approx(0.04)
    assert psnr(ref, out) == pytest.approx(10 * math.log10(1 / 0.04))


def test_psnr_is_the_mean_of_skimage_per_image_psnr():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    out = np.clip(ref.astype(int) + rng.integers(-20, 21, ref.shape), 0, 255).astype(np.uint8)
    expected = np.mean([peak_signal_noise_ratio(r / 255, o / 255, data_range=1.0)
                        for r, o in zip(ref, out)])
    assert psnr(ref, out) == pytest.approx(expected)


def test_psnr_caps_identical_images_so_the_mean_stays_finite():
    ref = np.concatenate([flat(0), flat(0)])
    out = np.concatenate([flat(0), flat(51)])
    assert psnr(ref, out) == pytest.approx((PSNR_CAP_DB + 10 * math.log10(1 / 0.04)) / 2)


def test_ssim_of_flat_images_is_the_luminance_term_with_unit_data_range():
    # With no variance SSIM reduces to (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1),
    # C1 = (0.01 * 1)^2; a 0..255 data range would give nearly 1 here.
    x, y = 100 / 255, 150 / 255
    c1 = 0.01 ** 2
    expected = (2 * x * y + c1) / (x * x + y * y + c1)
    assert ssim(flat(100, 16), flat(150, 16)) == pytest.approx(expected, abs=1e-9)


def test_ssim_drops_below_one_when_a_sprite_changes():
    images, _ = sprites_on_white(2)
    assert ssim(images, images[::-1]) < 0.9


def test_to_uint8_rounds_instead_of_truncating():
    values = np.array([0.0, 0.999, 1.0, 0.5 / 255 - 1e-6, 0.5 / 255 + 1e-6, 254.6 / 255])
    assert to_uint8(values).tolist() == [0, 255, 255, 0, 1, 255]


def test_to_uint8_clamps_out_of_range_values():
    assert to_uint8(np.array([-0.3, 1.7])).tolist() == [0, 255]


def test_to_uint8_inverts_division_by_255_for_every_level():
    levels = np.arange(256, dtype=np.uint8)
    assert np.array_equal(to_uint8(levels / 255.0), levels)
    assert np.array_equal(to_uint8(torch.from_numpy(levels).float() / 255), levels)


def test_codebook_stats_on_uniform_use_of_half_the_codes():
    stats = codebook_stats(np.array([5, 0, 5, 0, 5, 0, 5, 0]))
    assert stats["codes_used"] == 4
    assert stats["dead_codes"] == 4
    assert stats["usage"] == 0.5
    assert stats["perplexity"] == pytest.approx(4.0)


def test_codebook_perplexity_is_exp_entropy_of_the_whole_histogram():
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert codebook_stats([3, 1])["perplexity"] == pytest.approx(math.exp(entropy))


def test_codebook_stats_refuses_an_empty_histogram():
    with pytest.raises(ValueError):
        codebook_stats(np.zeros(8))


def write_pngs(folder, images, names):
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names):
        Image.fromarray(image).save(folder / name)


def test_cli_scores_folders_paired_by_name_and_saves_json_beside_outputs(tmp_path, capsys):
    images, _ = sprites_on_white(2)
    changed = images.copy()
    changed[1, 0, 0] = (0, 0, 0)
    # Written in opposite name order: pairing must go by name, not listing order.
    write_pngs(tmp_path / "inputs", images, ["a.png", "b.png"])
    write_pngs(tmp_path / "recon", changed[::-1], ["b.png", "a.png"])
    assert main([str(tmp_path / "inputs"), str(tmp_path / "recon")]) == 0
    saved = json.loads((tmp_path / "metrics_recon.json").read_text())
    assert saved["images"] == 2
    assert saved["exact_pixel_rate"] == pytest.approx(1 - 1 / images[0, ..., 0].size / 2)
    assert "exact_pixel_rate" in capsys.readouterr().out


def test_cli_refuses_mismatched_names_and_lists_them(tmp_path):
    images, _ = sprites_on_white(3)
    write_pngs(tmp_path / "inputs", images, ["a.png", "b.png", "c.png"])
    write_pngs(tmp_path / "recon", images, ["a.png", "b.png", "z.png"])
    run = subprocess.run([sys.executable, "-m", "utils.metrics", str(tmp_path / "inputs"),
                          str(tmp_path / "recon"), "--json", str(tmp_path / "m.json")],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2
    err = run.stderr
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "c.png" in err and "z.png" in err
    assert not (tmp_path / "m.json").exists()


def test_cli_refuses_images_of_different_sizes(tmp_path, capsys):
    images, _ = sprites_on_white(1)
    write_pngs(tmp_path / "inputs", images, ["a.png"])
    write_pngs(tmp_path / "recon", [np.zeros((20, 20, 3), np.uint8)], ["a.png"])
    assert exit_status(main, [str(tmp_path / "inputs"), str(tmp_path / "recon")]) == 2
    assert "a.png is 16x16" in capsys.readouterr().err


def _sprite_on_white():
    """A 6x6 white image holding a 4x4 square: a black outline ring around a 2x2 red body."""
    image = np.full((6, 6, 3), 255, np.uint8)
    image[1:5, 1:5] = 0
    image[2:4, 2:4] = (200, 0, 0)
    return image


def test_speckle_counts_pixels_no_neighbour_shares():
    clean = _sprite_on_white()
    speckled = clean.copy()
    speckled[2, 2] = (0, 0, 200)  # one blue pixel amid red and black: isolated
    rates = speckle_rates(np.stack([clean, speckled]), (255, 255, 255))
    # 16 sprite pixels; the blue one alone has no neighbour of its colour (red at (2,3) still has (3,3)).
    assert rates[0] == 0.0
    assert rates[1] == pytest.approx(1 / 16)
    assert np.isnan(speckle_rates(np.full((1, 4, 4, 3), 255, np.uint8), (255, 255, 255))[0])


def test_outline_continuity_is_the_dark_share_of_the_silhouettes_edge():
    clean = _sprite_on_white()
    gap = clean.copy()
    gap[1, 2:4] = (240, 200, 200)  # two light pixels break the top of the outline
    soft = np.full((1, 6, 6, 3), 255, np.uint8)
    soft[0, 1:5, 1:5] = (200, 0, 0)  # no outline at all
    values = outline_continuities(np.stack([clean, gap, soft[0]]), (255, 255, 255))
    assert values.tolist() == [1.0, pytest.approx(10 / 12), 0.0]


def test_cleanliness_on_a_black_background_ignores_black_pixels_as_background():
    image = np.zeros((1, 6, 6, 3), np.uint8)
    image[0, 2:4, 2:4] = (200, 0, 0)
    scores = cleanliness(image, np.array([[0, 0, 0]], np.uint8))
    assert scores["colours"].tolist() == [2.0]
    assert scores["speckle_rate"].tolist() == [0.0]
    assert silhouettes(image, (0, 0, 0)).sum() == 4


def test_a_fusion_keeps_a_parents_shape_and_palette_by_measure():
    parent = _sprite_on_white()
    shifted = np.full_like(parent, 255)
    shifted[1:5, 2:6] = parent[1:5, 1:5]  # the same square one pixel right
    recoloured = parent.copy()
    recoloured[2:4, 2:4] = (0, 0, 200)  # the body in a colour the parent lacks
    white = (255, 255, 255)
    overlap = silhouette_overlap(np.stack([parent, shifted]), np.stack([parent, parent]), white)
    assert overlap.tolist() == [1.0, pytest.approx(12 / 20)]
    kept = palette_overlap(np.stack([parent, recoloured]), np.stack([parent, parent]), white)
    assert kept.tolist() == [1.0, pytest.approx(12 / 16)]
    assert np.isnan(palette_overlap(np.full((1, 4, 4, 3), 255, np.uint8), parent[None, :4, :4], white)[0])
