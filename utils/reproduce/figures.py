"""The figures of docs/results/results.md: models side by side, rate against exactness, the ablation.

Sprites are enlarged by repeating pixels (utils.plots.upscale_nearest) and drawn without
interpolation, so every pixel of a reconstruction is shown as it is.
"""
import matplotlib
import numpy as np
from matplotlib.figure import Figure

from utils.plots import _save_figure, image_grid, upscale_nearest

SPRITE_PIXELS_SHOWN = 128  # each sprite enlarged to about this many screen pixels a side
COLOURS = matplotlib.colormaps["tab20"]
MARKERS = {"paper": "o", "ablation": "s", "exact": "^"}  # by the group a point's label begins with


def reconstruction_figure(rows, path):
    """The same sprites (top row) over each model's reconstructions of them, one row per
    (label, inputs, reconstructions) of `rows`, with the inputs of the first."""
    inputs = rows[0][1]
    count, height = len(inputs), inputs.shape[1]
    factor = max(1, SPRITE_PIXELS_SHOWN // height)
    grid = upscale_nearest(image_grid(np.concatenate([inputs] + [outputs for _, _, outputs in rows]), count), factor)
    labels = ["input"] + [label for label, _, _ in rows]
    fig = Figure(figsize=(grid.shape[1] / 100 + 2.5, grid.shape[0] / 100 + 0.3))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, interpolation="nearest")
    step = (height + 1) * factor
    ax.set_yticks([factor + step * i + height * factor / 2 for i in range(len(labels))], labels)
    ax.set_xticks([])
    _save_figure(fig, path, crop=True)


def rate_figure(points, path):
    """Sprite-pixel exactness and SSIM against bits per sprite, one point per configuration:
    `points` holds (label, bits, (exact mean, sd), (SSIM mean, sd)); those without bits are left
    out. Returns whether there was a point to draw."""
    points = [p for p in points if p[1] is not None and p[2][0] is not None]
    if not points:
        return False
    # A legend, not labels beside the points: configurations of one rate sit on top of each other.
    colours = [COLOURS(i % COLOURS.N) for i in range(len(points))]
    fig = Figure(figsize=(11, 4.2 + 0.17 * ((len(points) + 1) // 2)), layout="constrained")
    for panel, (title, index, scale) in enumerate((("sprite pixels exact (%)", 2, 100), ("SSIM", 3, 1))):
        ax = fig.add_subplot(1, 2, panel + 1)
        for (label, bits, *values), colour in zip(points, colours):
            mean, sd = values[index - 2]
            ax.errorbar([bits], [mean * scale], yerr=[(sd or 0) * scale], fmt=MARKERS.get(label.split(":")[0], "o"),
                        color=colour, capsize=4, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per sprite (grid cells x log2 codebook size)")
        ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    _save_figure(fig, path)
    return True


def ablation_figure(stages, path):
    """One panel of bars per metric, a bar per stage: `stages` holds (label, {metric: (mean, sd)})."""
    metrics = list(stages[0][1])
    fig = Figure(figsize=(4.5 * len(metrics), 4.2))
    x = np.arange(len(stages))
    for panel, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), panel + 1)
        means = [values[metric][0] or 0 for _, values in stages]
        sds = [values[metric][1] or 0 for _, values in stages]
        ax.bar(x, means, yerr=sds, capsize=4, color="tab:blue")
        ax.set_xticks(x, [label for label, _ in stages], rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
    _save_figure(fig, path)
