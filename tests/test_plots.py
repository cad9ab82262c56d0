import numpy as np
import pytest
from PIL import Image

from tests.sprites import PALETTE, sprite_rgba
from utils.plots import (image_grid, plot_codebook_usage, plot_losses, save_gif, save_png,
                         upscale_nearest)

PANEL_PIXELS = (400, 320)  # one panel at the plots' figure size and dpi


def sprite_rgb(seed):
    return sprite_rgba(seed)[..., :3]


def read_gif_frames(path):
    with Image.open(path) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB")))
        return frames, gif.info


def test_upscale_turns_each_pixel_into_a_constant_block():
    image = sprite_rgb(0)
    big = upscale_nearest(image, 4)
    assert big.shape == (image.shape[0] * 4, image.shape[1] * 4, 3)
    block = big[4 * 5:4 * 6, 4 * 7:4 * 8]
    assert (block == image[5, 7]).all()


def test_image_grid_tiles_row_by_row_with_padding_around_every_image():
    images = np.stack([np.full((4, 3, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = image_grid(images, ncols=2, pad=1, pad_value=255)
    assert grid.shape == (1 + 3 * (4 + 1), 1 + 2 * (3 + 1), 3)
    assert (grid[6:10, 5:8] == 40).all()  # the fourth image: second row, second column
    assert (grid[0] == 255).all() and (grid[:, 4] == 255).all()
    assert (grid[11:15, 5:8] == 255).all()  # no sixth image: the cell stays padding


def test_save_png_keeps_exact_colours_and_refuses_floats(tmp_path):
    image = sprite_rgb(1)
    save_png(image, tmp_path / "sprite.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sprite.png")), image)
    with pytest.raises(TypeError):
        save_png(image / 255.0, tmp_path / "float.png")


def test_gif_of_few_colour_frames_reads_back_exactly(tmp_path):
    frames = [sprite_rgb(seed) for seed in range(3)]
    # Colours one level apart are the ones a palette quantiser is tempted to merge.
    frames[1][0, :4] = [(10, 10, 10), (11, 10, 10), (10, 11, 10), (10, 10, 11)]
    save_gif(frames, tmp_path / "anim.gif", duration_ms=250, scale=3)
    back, info = read_gif_frames(tmp_path / "anim.gif")
    assert len(back) == 3
    for frame, read in zip(frames, back):
        assert np.array_equal(read, upscale_nearest(frame, 3))
    assert info["loop"] == 0 and info["duration"] == 250


def test_gif_frame_with_more_than_256_colours_is_quantised_close(tmp_path):
    rng = np.random.default_rng(0)
    noisy = np.clip(PALETTE[rng.integers(0, 5, (24, 24))] + rng.integers(-6, 7, (24, 24, 3)),
                    0, 255).astype(np.uint8)
    assert len(np.unique(noisy.reshape(-1, 3), axis=0)) > 256
    save_gif([noisy], tmp_path / "noisy.gif", scale=1)
    (back,), _ = read_gif_frames(tmp_path / "noisy.gif")
    assert len(np.unique(back.reshape(-1, 3), axis=0)) <= 256
    assert np.abs(back.astype(int) - noisy).mean() < 3


HISTORY = {
    "epoch": [1, 2, 3],
    "train_loss": [3.0, 2.0, 1.5], "val_loss": [3.2, 2.4, 2.0],
    "train_recon": [2.0, 1.2, 0.9], "val_recon": [2.1, 1.5, 1.2],
    "train_vq": [1.0, 0.8, 0.6],
    "train_codes_used": [40, 200, 310], "val_perplexity": [30.0, 150.0, 260.0],
    "train_seconds": [12.0, 11.5, 11.8],
}


def test_plot_losses_draws_one_panel_per_loss_term_and_skips_other_numbers(tmp_path):
    assert plot_losses(HISTORY, tmp_path / "losses.png") == ["loss", "recon", "vq"]
    with Image.open(tmp_path / "losses.png") as png:
        assert png.format == "PNG"
        assert png.size == (3 * PANEL_PIXELS[0], PANEL_PIXELS[1])


def test_plot_losses_accepts_per_epoch_dicts_with_missing_validation(tmp_path):
    epochs = [{"epoch": 1, "train_kl": 0.5, "train_loss": 3.0},
              {"epoch": 2, "train_kl": 0.4, "train_loss": 2.0, "val_loss": 2.5}]
    assert plot_losses(epochs, tmp_path / "losses.png") == ["loss", "kl"]
    assert (tmp_path / "losses.png").stat().st_size > 0


def test_plot_losses_refuses_a_history_without_losses(tmp_path):
    with pytest.raises(ValueError, match="train_seconds"):
        plot_losses({"train_seconds": [12.0]}, tmp_path / "losses.png")
    assert not (tmp_path / "losses.png").exists()


def test_plot_codebook_usage_adds_the_sorted_histogram_panel(tmp_path):
    counts = np.zeros(512, np.int64)
    counts[:310] = np.arange(310) + 1
    terms = plot_codebook_usage(HISTORY, counts, tmp_path / "codebook.png")
    assert terms == ["codes_used", "perplexity"]
    with Image.open(tmp_path / "codebook.png") as png:
        assert png.size == (3 * PANEL_PIXELS[0], PANEL_PIXELS[1])
        assert len(np.unique(np.asarray(png.convert("RGB")).reshape(-1, 3), axis=0)) > 2


def test_plot_codebook_usage_without_per_epoch_numbers_shows_only_the_histogram(tmp_path):
    assert plot_codebook_usage({"train_loss": [1.0]}, [5, 0, 3], tmp_path / "codebook.png") == []
    with Image.open(tmp_path / "codebook.png") as png:
        assert png.size == PANEL_PIXELS
