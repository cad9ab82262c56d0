"""Tiny synthetic pixel art made by the tests: few colours, hard edges, transparency."""
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = np.array([[200, 40, 40], [40, 160, 60], [30, 30, 120], [250, 220, 90], [90, 60, 20]], np.uint8)


def sprite_rgba(seed, height=12, width=10):
    """A random blocky RGBA sprite: 2x2 blocks of palette colours, a transparent margin."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, len(PALETTE), (height // 2, width // 2))
    rgb = PALETTE[blocks].repeat(2, 0).repeat(2, 1)
    alpha = (rng.random((height // 2, width // 2)) < 0.8).repeat(2, 0).repeat(2, 1)
    alpha[height // 4, width // 4 * 2 // 2] = True
    out = np.zeros((height + 4, width + 6, 4), np.uint8)
    out[2:2 + height, 3:3 + width, :3] = rgb
    out[2:2 + height, 3:3 + width, 3] = alpha * 255
    return out


def write_species_folders(root, species=10, per_species=2, seed=0):
    """root/<species>/<n>.png RGBA sprites; returns {relative path: rgba array}."""
    root = Path(root)
    made = {}
    for s in range(species):
        for i in range(per_species):
            rgba = sprite_rgba(seed * 1000 + s * 10 + i)
            path = root / f"sp{s:02d}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgba, "RGBA").save(path)
            made[str(path.relative_to(root))] = rgba
    return made
