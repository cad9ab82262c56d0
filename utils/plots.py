"""Figures and image files for a run: grids, GIFs, loss curves and codebook usage.

Pixel art is only ever enlarged by repeating pixels, never resampled, and saved losslessly.

A training history is either a dict of per-epoch lists or a list of per-epoch dicts, with keys
`<split>_<name>`, split `train` or `val`: `train_loss`, `val_recon`, `val_perplexity`. An
`epoch` key, when present, gives the x axis; otherwise epochs count from 1. Other keys are
ignored.
"""
import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from utils.io import atomic_path
from utils.metrics import codebook_stats, colour_keys

SPLITS = ("train", "val")
# What a history holds per split beside the loss terms, which are whatever the model names.
NOT_LOSS_TERMS = ("seconds", "images", "codes_used", "dead_codes", "usage", "perplexity", "codes_used_per_level")


def upscale_nearest(image, factor):
    """Enlarge [H, W, ...] by repeating every pixel factor x factor times."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def image_grid(images, ncols, pad=1, pad_value=255):
    """Tile uint8 images [N, H, W, 3] row by row, `pad` pixels around and between them."""
    n, h, w, c = images.shape
    nrows = math.ceil(n / ncols)
    grid = np.full((pad + nrows * (h + pad), pad + ncols * (w + pad), c), pad_value, np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // ncols) * (h + pad), pad + (i % ncols) * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def save_png(array, path):
    """Write a uint8 [H, W] or [H, W, 3|4] array as a PNG, colours exactly as given."""
    if array.dtype != np.uint8:
        raise TypeError(f"save_png writes exact 8-bit colours; got {array.dtype}, use to_uint8")
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _palette_frame(frame):
    """A frame as a palette image holding exactly its own colours.

    Pillow's own RGB-to-palette conversion may merge similar colours (Pillow issue #6832),
    which would make a GIF of pixel art lie about the palette."""
    keys = colour_keys(frame)
    colours, index = np.unique(keys, return_inverse=True)
    if len(colours) > 256:
        # A GIF frame holds at most 256 colours: blurry reconstructions are quantised, lossily.
        return Image.fromarray(frame).quantize(256)
    image = Image.fromarray(index.reshape(keys.shape).astype(np.uint8))
    rgb = np.stack([colours >> 16, colours >> 8, colours], axis=1) & 255
    image.putpalette(rgb.astype(np.uint8).ravel().tolist())  # makes the grey image "P"
    return image


def save_gif(frames, path, duration_ms=300, scale=4):
    """Write uint8 [H, W, 3] frames as a GIF that loops forever, each pixel scale x scale.

    A frame with at most 256 colours comes back exactly; identical consecutive frames may be
    stored once with their durations added."""
    images = [_palette_frame(upscale_nearest(frame, scale)) for frame in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=duration_ms, loop=0)


def _columns(history):
    """A history as {key: per-epoch list}, gaps as NaN so matplotlib leaves them out."""
    if isinstance(history, dict):
        return {key: list(values) for key, values in history.items()}
    keys = list(dict.fromkeys(key for epoch in history for key in epoch))
    return {key: [epoch.get(key, math.nan) for epoch in history] for key in keys}


def _terms(columns, names):
    """The names that the history holds for at least one split."""
    return [name for name in names if any(f"{split}_{name}" in columns for split in SPLITS)]


def loss_terms(columns):
    """Every loss term the history holds for a split, by name, the total 'loss' first."""
    named = dict.fromkeys(key.split("_", 1)[1] for key in columns if key.split("_", 1)[0] in SPLITS)
    terms = [name for name in named if name not in NOT_LOSS_TERMS]
    return sorted(terms, key=lambda name: name != "loss")


def _plot_splits(ax, columns, term):
    for split in SPLITS:
        values = columns.get(f"{split}_{term}")
        if values is not None:
            epochs = columns.get("epoch", range(1, len(values) + 1))
            ax.plot(list(epochs)[:len(values)], values, marker=".", label=split)
    ax.set_title(term)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()


def _save_figure(fig, path, crop=False):
    """`crop`: save the figure's drawn extent rather than its set size, so that what reaches past
    its edge (long labels beside a fixed-aspect image) is kept."""
    if fig.get_layout_engine() is None:  # one that lays out a legend outside the axes keeps its own
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight" if crop else None)


def _new_figure(panels):
    # A bare Figure renders with Agg without pyplot, so no global backend is switched and
    # no window is ever opened on a headless machine.
    return Figure(figsize=(4 * panels, 3.2))


def plot_losses(history, path):
    """One panel per loss term of the history, train and validation over epochs, each titled by
    the name the model gave it.

    Returns the terms plotted."""
    columns = _columns(history)
    terms = loss_terms(columns)
    if not terms:
        raise ValueError(f"no train_/val_ loss keys in history: {sorted(columns)}")
    fig = _new_figure(len(terms))
    for i, term in enumerate(terms):
        _plot_splits(fig.add_subplot(1, len(terms), i + 1), columns, term)
    _save_figure(fig, path)
    return terms


def plot_codebook_usage(history, counts, path):
    """Codes used and perplexity over epochs, then the final code histogram, most used first."""
    columns = _columns(history)
    terms = _terms(columns, ("codes_used", "perplexity"))
    panels = len(terms) + 1
    fig = _new_figure(panels)
    for i, term in enumerate(terms):
        ax = fig.add_subplot(1, panels, i + 1)
        # Both are bounded by the codebook size, reached only when every code is used evenly.
        ax.axhline(len(counts), color="grey", linestyle=":", label="codebook size")
        _plot_splits(ax, columns, term)
    stats = codebook_stats(counts)
    ax = fig.add_subplot(1, panels, panels)
    ax.bar(np.arange(len(counts)), np.sort(np.asarray(counts))[::-1], width=1.0)
    ax.set_title(f"{stats['codes_used']}/{len(counts)} codes used, "
                 f"perplexity {stats['perplexity']:.1f}")
    ax.set_xlabel("code, by use")
    ax.set_ylabel("times chosen")
    # Background codes are chosen millions of times, sprite colours thousands: only a log
    # scale shows both.
    ax.set_yscale("log")
    _save_figure(fig, path)
    return terms
