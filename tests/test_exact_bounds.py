"""bench/exact_bounds.py: the colour-only bound and the lossless bits count what they say."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import exact_bounds  # noqa: E402
from utils.data.load import SpriteSet  # noqa: E402


def test_each_code_keeps_only_its_commonest_colour_of_each_image():
    images = np.zeros((2, 2, 4, 3), np.uint8)
    images[0, 0] = [[1, 1, 1], [1, 1, 1], [1, 1, 1], [2, 2, 2]]  # near black: one cell, 3 of 4
    images[0, 1] = [[255, 255, 255], [254, 254, 254], [0, 0, 0], [0, 0, 0]]
    images[1] = [250, 250, 250]  # another image's white cell counts apart
    masks = np.ones((2, 2, 4), bool)
    masks[0, 1, 2:] = False  # background, not scored
    centroids = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    share = exact_bounds.colour_code_bound(SpriteSet(images, masks, ["a", "b"]), centroids)
    assert share == (3 + 1 + 8) / (6 + 8)


def test_lossless_bits_hold_an_exact_copy_and_a_plain_image_costs_little():
    rng = np.random.default_rng(0)
    plain = np.full((64, 64, 3), 255, np.uint8)
    noisy = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # 4,096 colours: WebP only
    assert exact_bounds.lossless_bits(plain) < 64 * 8
    assert 64 * 64 * 24 * 0.9 < exact_bounds.lossless_bits(noisy) < 64 * 64 * 24 * 1.1


def test_the_one_colour_floor_counts_sprite_pixels_only():
    images = np.zeros((2, 2, 2, 3), np.uint8)
    images[0, 0, 0] = [9, 9, 9]
    images[:, 1] = 255  # white background, the commonest colour overall, left out by the masks
    masks = np.zeros((2, 2, 2), bool)
    masks[:, 0] = True
    colour, share = exact_bounds.commonest_colour(SpriteSet(images, masks, ["a", "b"]))
    assert colour == 0 and share == 3 / 4


def test_indexed_colour_costs_a_palette_index_a_pixel_and_the_palette():
    images = np.zeros((3, 4, 4, 3), np.uint8)
    images[1, 0, :3] = [[1, 0, 0], [2, 0, 0], [3, 0, 0]]  # four colours: 2 bits a pixel
    images[2, 0, 0] = 9  # two colours: 1 bit a pixel
    bits = exact_bounds.indexed_bits(images)
    assert bits.tolist() == [24, 16 * 2 + 4 * 24, 16 * 1 + 2 * 24]
