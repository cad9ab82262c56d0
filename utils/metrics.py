"""Reconstruction metrics for pixel art, and the command line that scores two folders of PNGs.

Images are uint8 arrays [N, H, W, 3] holding exact 8-bit colours; sprite masks are bool [N, H, W],
True where the source sprite was opaque. Besides the paper's MSE and SSIM we count exact colours,
because a pixel-art reconstruction that is one level off everywhere scores well on MSE yet no
longer uses the sprite's palette.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

from models import described_model
from models.palette import BITS_PER_COLOUR
from utils.data.sprites import SkipImage, read_image_file, regular_files
from utils.errors import UserError, exit_on_user_error, warn
from utils.io import write_json

# Reported for identical images, whose PSNR is infinite. No other 8-bit image pair up to 226x226
# pixels comes this close (one channel one level off is 48.1 dB + 10 log10(3 H W)), so the cap
# never ties with a real error, and the mean over a dataset stays finite.
PSNR_CAP_DB = 100.0


def to_uint8(x):
    """Floats in [0, 1] (numpy array or torch tensor, any layout) -> uint8, rounding half up.

    Truncation would map 0.999 to 254, so white could never come out as 255."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    return np.floor(x * 255.0 + 0.5).astype(np.uint8)


def _as_unit_floats(images):
    return images.astype(np.float64) / 255.0


def colour_keys(images):
    """One integer per pixel of uint8 [..., 3] RGB, equal exactly when the colours are equal."""
    images = images.astype(np.int64)
    return (images[..., 0] << 16) | (images[..., 1] << 8) | images[..., 2]


def _colour_keys_per_image(images):
    return colour_keys(images).reshape(len(images), -1)


def _per_image_mse(ref, out):
    return ((_as_unit_floats(ref) - _as_unit_floats(out)) ** 2).mean(axis=(1, 2, 3))


def mse(ref, out):
    """Mean squared error on [0, 1] colours over all pixels and channels."""
    return float(_per_image_mse(ref, out).mean())


def psnr(ref, out):
    """Mean over images of PSNR with data range 1; identical images count as PSNR_CAP_DB.

    Same formula as skimage's peak_signal_noise_ratio, computed for the whole batch at once
    rather than calling it image by image."""
    per_image = _per_image_mse(ref, out)
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(1.0 / per_image)
    return float(np.minimum(db, PSNR_CAP_DB).mean())


def ssim(ref, out):
    """Mean over images of SSIM with the paper's tf.image.ssim settings.

    Gaussian window 11 wide, sigma 1.5, K1 0.01, K2 0.03, averaged over the colour channels;
    images must be at least 11x11."""
    ref, out = _as_unit_floats(ref), _as_unit_floats(out)
    return float(np.mean([
        structural_similarity(r, o, win_size=11, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0, channel_axis=-1)
        for r, o in zip(ref, out)
    ]))


def _exact_pixels(ref, out):
    return np.all(ref == out, axis=-1)


def exact_pixel_rate(ref, out):
    """Share of pixels whose full 8-bit RGB colour is reproduced exactly."""
    return float(_exact_pixels(ref, out).mean())


def sprite_exact_pixel_rate(ref, out, masks):
    """exact_pixel_rate over sprite pixels only, pooled over the batch (NaN if there are none).

    Background is most of a sprite image and easy to get right; this is the rate that shows
    whether the sprite itself survived."""
    masks = np.asarray(masks, dtype=bool)
    if not masks.any():
        return float("nan")
    return float(_exact_pixels(ref, out)[masks].mean())


def colour_counts(images):
    """The number of distinct RGB colours of each image [N]."""
    keys = np.sort(_colour_keys_per_image(images), axis=1)
    return 1 + (np.diff(keys, axis=1) != 0).sum(axis=1)


def colours_per_image(images):
    """Mean number of distinct RGB colours in an image."""
    return float(colour_counts(images).mean())


# An outline pixel is dark: no channel above this (Pokemon box sprites draw near-black outlines).
OUTLINE_MAX_CHANNEL = 96


def _four_neighbours(values, beyond):
    """The values [4, N, H, W] of each pixel's four neighbours in `values` [N, H, W]; `beyond`
    past the image's edge."""
    padded = np.pad(values, ((0, 0), (1, 1), (1, 1)), constant_values=beyond)
    return np.stack([padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]])


def silhouettes(images, background):
    """bool [N, H, W]: the pixels of each uint8 image that are not its background, uint8 [N, 3]
    (or one [3] for all): a generated sprite has no alpha channel to say where it is."""
    return (images != np.asarray(background, np.uint8).reshape(-1, 1, 1, 3)).any(-1)


def speckle_rates(images, background):
    """Per image [N], the share of its sprite pixels whose colour none of its four neighbours has:
    isolated pixels, the speckle of a sampler that mixes codes. NaN for an image that is all background."""
    keys = colour_keys(images)
    sprite = silhouettes(images, background)
    isolated = (_four_neighbours(keys, -1) != keys[None]).all(0) & sprite
    with np.errstate(invalid="ignore", divide="ignore"):
        return isolated.sum((1, 2)) / sprite.sum((1, 2))


def outline_continuities(images, background):
    """Per image [N], the share of its silhouette's edge (sprite pixels beside the background or
    the image's border) drawn dark, as an outline: a gap or a soft, light edge lowers it. NaN for an
    image with no sprite pixel. Meaningful on light backgrounds only: on black, a dark outline
    is indistinguishable from the background it sits on."""
    sprite = silhouettes(images, background)
    edge = sprite & ~_four_neighbours(sprite, False).all(0)
    dark = (images <= OUTLINE_MAX_CHANNEL).all(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (edge & dark).sum((1, 2)) / edge.sum((1, 2))


def cleanliness(images, background):
    """Per-image distinct colours, speckle rate and outline continuity of uint8 `images` drawn on
    `background` (see the functions above), as {name: float array [N]}."""
    return {"colours": colour_counts(images).astype(float), "speckle_rate": speckle_rates(images, background),
            "outline_continuity": outline_continuities(images, background)}


def silhouette_overlap(images, parents, background):
    """Per pair [N], intersection over union of the silhouettes of `images` and of `parents`: how
    much of a parent's shape a fusion keeps. NaN where both are all background."""
    a, b = silhouettes(images, background), silhouettes(parents, background)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a & b).sum((1, 2)) / (a | b).sum((1, 2))


def palette_overlap(images, parents, background):
    """Per pair [N], the share of each image's sprite pixels whose exact colour the parent's sprite
    has: how much of a parent's palette a fusion keeps. NaN for an image that is all background."""
    keys, parent_keys = colour_keys(images), colour_keys(parents)
    sprite, parent_sprite = silhouettes(images, background), silhouettes(parents, background)
    shares = np.full(len(images), np.nan)
    for i in range(len(images)):
        if sprite[i].any():
            shares[i] = np.isin(keys[i][sprite[i]], parent_keys[i][parent_sprite[i]]).mean()
    return shares


def foreign_colour_rate(ref, out):
    """Share of output pixels whose colour appears nowhere in the matching input image."""
    # Tagging each key with its image index lets one isin() test every image against its own
    # input only.
    image_tag = np.arange(len(ref), dtype=np.int64)[:, None] << 24
    ref_keys = _colour_keys_per_image(ref) + image_tag
    out_keys = _colour_keys_per_image(out) + image_tag
    return float(1.0 - np.isin(out_keys, ref_keys).mean())


def palette_metrics(ref, out, masks):
    """Exactness once the sprite's own palette is known: each output sprite pixel snapped to the
    nearest (squared RGB distance) of the input sprite's distinct opaque colours.

    Returns `palette_exact_pixel_rate` (pooled over the batch's sprite pixels, like
    sprite_exact_pixel_rate; NaN when there are none), `palette_colours`, the mean palette size,
    and `palette_bits`, that palette's mean side information at BITS_PER_COLOUR a colour.
    A near colour outside the palette is snapped, so it counts only if its nearest palette
    colour is the right one; ties go to the palette colour of the smaller RGB key."""
    masks = np.asarray(masks, dtype=bool)
    exact, sizes = 0, []
    for r, o, m in zip(ref, out, masks):
        palette = np.unique(colour_keys(r[m]))
        sizes.append(len(palette))
        if not len(palette):
            continue
        colours = np.stack([palette >> 16, (palette >> 8) & 255, palette & 255], axis=-1)
        distances = ((o[m].astype(np.int64)[:, None, :] - colours[None]) ** 2).sum(-1)
        exact += int((palette[distances.argmin(1)] == colour_keys(r[m])).sum())
    pixels = int(masks.sum())
    return {"palette_exact_pixel_rate": exact / pixels if pixels else float("nan"),
            "palette_colours": float(np.mean(sizes)) if sizes else float("nan"),
            "palette_bits": BITS_PER_COLOUR * float(np.mean(sizes)) if sizes else float("nan")}


# The facts below are the model's own (models/vqvae.py), asked of the model a saved config builds.

def _model_of(config):
    return described_model("vqvae" if "num_embeddings" in config else "vae", config)


def codes_per_cell(config):
    """Codes that name one cell of the grid of the VQ model of `config`."""
    return _model_of(config).codes_per_cell


def code_histogram_size(config):
    """Bins of the code histogram of the VQ model of `config`."""
    return _model_of(config).code_histogram_size


def draws_with_palette(config):
    """Whether the model of `config` draws with the sprite's palette, so that its bits count it."""
    return bool(getattr(_model_of(config), "draws_with_palette", False))


def code_grid_size(config):
    """Side of the code grid of the VQ model of `config` for its image_size."""
    return _model_of(config).code_grid_size(config["image_size"])


def bits_per_sprite(config, images=None):
    """Bits that rebuild one image of the model of `config`, as the model counts them; a
    palette-output model's palettes are those of uint8 `images` (their mean number of colours).
    None for the VAE, whose latent is a vector of floats with no fixed bit count."""
    palette_colours = None if images is None else colours_per_image(images)
    return _model_of(config).bits_per_sprite(config["image_size"], palette_colours)


def codebook_stats(counts, codebooks=1):
    """Health of a codebook from how often each code was chosen over a whole dataset.

    Perplexity is exp(entropy) of the normalised histogram: the number of equally used codes
    that would give the same entropy. Averaging per-batch perplexities instead would understate
    it, since one batch sees only a few of the codes. A residual quantiser's histogram holds its
    `codebooks` one after another: codes_used counts over all of them, and codes_used_per_level
    each one's."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    per_level = {"codes_used_per_level": [int(n) for n in (counts.reshape(codebooks, -1) > 0).sum(1)]}
    if counts.sum() <= 0:
        raise ValueError("codebook_stats needs a histogram with at least one code chosen")
    p = counts[counts > 0] / counts.sum()
    codes_used = int((counts > 0).sum())
    return {
        "codes_used": codes_used,
        "dead_codes": int(counts.size - codes_used),
        "usage": codes_used / counts.size,
        "perplexity": float(np.exp(-(p * np.log(p)).sum())),
        **(per_level if codebooks > 1 else {}),
    }


def image_metrics(ref, out, masks=None):
    """Every image metric for a batch of inputs and their reconstructions, as one dict."""
    if ref.shape != out.shape:
        raise ValueError(f"inputs {ref.shape} and reconstructions {out.shape} differ in shape")
    metrics = {
        "mse": mse(ref, out),
        "ssim": ssim(ref, out),
        "psnr": psnr(ref, out),
        "exact_pixel_rate": exact_pixel_rate(ref, out),
    }
    if masks is not None:
        metrics["sprite_exact_pixel_rate"] = sprite_exact_pixel_rate(ref, out, masks)
        metrics.update(palette_metrics(ref, out, masks))
    metrics.update(
        input_colours=colours_per_image(ref),
        output_colours=colours_per_image(out),
        foreign_colour_rate=foreign_colour_rate(ref, out),
    )
    return metrics


def _png_names(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    names = {p.name for p in regular_files((p for p in folder.iterdir() if p.suffix.lower() == ".png"), warn)}
    if not names:
        raise UserError(f"{folder} holds no PNG files")
    return names


def _listing(names, shown=5):
    names = sorted(names)
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _paired_names(ref_dir, out_dir):
    ref_names, out_names = _png_names(ref_dir), _png_names(out_dir)
    if ref_names != out_names:
        problems = []
        if ref_names - out_names:
            problems.append(f"{len(ref_names - out_names)} only in {ref_dir}: "
                            f"{_listing(ref_names - out_names)}")
        if out_names - ref_names:
            problems.append(f"{len(out_names - ref_names)} only in {out_dir}: "
                            f"{_listing(out_names - ref_names)}")
        raise UserError("PNG names differ between the folders; " + "; ".join(problems))
    return sorted(ref_names)


def load_rgb(path):
    """The RGB colours of an image file, through the data pipeline's one guarded loader."""
    try:
        return np.ascontiguousarray(read_image_file(path)[..., :3])
    except SkipImage as why:
        raise UserError(f"cannot read {path}: {why}") from None


def load_rgb_and_mask(path):
    """(uint8 RGB, bool sprite mask or None): the mask is alpha > 0 when the PNG has alpha."""
    try:
        rgba = read_image_file(path)
        # Only the header, once the guarded loader has accepted the file.
        with Image.open(path) as image:
            alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    except (SkipImage, OSError) as why:
        raise UserError(f"cannot read {path}: {why}") from None
    return np.ascontiguousarray(rgba[..., :3]), (rgba[..., 3] > 0 if alpha else None)


def size_text(image):
    return f"{image.shape[1]}x{image.shape[0]}"


def load_pairs(ref_dir, out_dir):
    """Inputs and reconstructions paired by file name, as two uint8 [N, H, W, 3] arrays, and the
    inputs' sprite masks [N, H, W] (alpha > 0), or None unless every input PNG has alpha."""
    names = _paired_names(ref_dir, out_dir)
    refs, outs, masks = [], [], []
    for name in names:
        (ref, mask), out = load_rgb_and_mask(Path(ref_dir) / name), load_rgb(Path(out_dir) / name)
        if ref.shape != out.shape:
            raise UserError(f"{name} is {size_text(ref)} in {ref_dir} but {size_text(out)} in {out_dir}")
        if refs and ref.shape != refs[0].shape:
            raise UserError(f"{name} is {size_text(ref)} but {names[0]} is {size_text(refs[0])}; "
                            "every image must have the same size")
        refs.append(ref)
        outs.append(out)
        masks.append(mask)
    if min(refs[0].shape[:2]) < 11:
        raise UserError(f"images are {size_text(refs[0])}; SSIM's 11-pixel window needs 11x11 or more")
    masks = None if any(m is None for m in masks) else np.stack(masks)
    return np.stack(refs), np.stack(outs), masks


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m utils.metrics",
        description="Score reconstructions against their inputs. PNGs pair by file name and "
                    "are read as RGB; an alpha channel is dropped, not composited, so compare "
                    "the dataset's opaque RGB copies rather than the transparent sprites. When "
                    "every input PNG has alpha (as utils.reconstruct writes OUT_DIR/inputs/), "
                    "alpha > 0 marks the sprite's pixels, and the sprite and palette-exact "
                    "shares are scored on them.")
    parser.add_argument("ref_dir", type=Path, help="folder of input PNGs")
    parser.add_argument("out_dir", type=Path, help="folder of reconstructed PNGs, same names")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the metrics (default: metrics_<OUT_DIR name>.json "
                             "beside OUT_DIR, e.g. outputs/exp/metrics_reconstructions.json)")
    return parser.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)

    def run():
        ref, out, masks = load_pairs(args.ref_dir, args.out_dir)
        metrics = {"images": len(ref), **image_metrics(ref, out, masks)}
        out_dir = args.out_dir.resolve()
        json_path = args.json or out_dir.parent / f"metrics_{out_dir.name}.json"
        write_json(json_path, {"ref_dir": str(args.ref_dir), "out_dir": str(args.out_dir),
                               **metrics})
        width = max(map(len, metrics))
        for key, value in metrics.items():
            print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else
                  f"{key:<{width}}  {value}")
        print(f"saved {json_path}")
        return 0
    return exit_on_user_error(run)


if __name__ == "__main__":
    sys.exit(main())
