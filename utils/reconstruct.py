"""Reconstruct a folder of your own sprites with a trained model.

    python -m utils.reconstruct EXPERIMENT IN_DIR OUT_DIR [--background white|black]

EXPERIMENT is a folder under outputs/ (or a path to one). Every image in IN_DIR (any PNG mode and
size) is prepared exactly as the data pipeline prepares a test sprite; a prepared set (a folder
holding manifest.json, such as data/angband) gives its test split as it is, every background it
was prepared on, with its sprite masks. Each is written as
OUT_DIR/inputs/<name>.png beside OUT_DIR/reconstructions/<name>.png, so that
`python -m utils.metrics OUT_DIR/inputs OUT_DIR/reconstructions` compares them. An input PNG holds
the sprite on its background as RGB and the source's alpha (0 or 255) as its sprite mask, so the
sprite-pixel and palette-exact shares are scored on the sprite alone; they are printed, and every
metric is written to OUT_DIR/metrics.json.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from utils.data.load import load_split
from utils.data.prepare import load_manifest
from utils.data.sprites import BACKGROUND_COLOURS, SkipImage, regular_files, sprite_image
from utils.device import choose_device
from utils.errors import UserError, exit_on_user_error, printable
from utils.images import from_batch, to_batch
from utils.io import write_json
from utils.metrics import image_metrics
from utils.plots import save_png
from utils.training.checkpoints import load_model
from utils.training.experiment import EXPERIMENT_MARK, ROOT

BATCH = 256


def experiment_dir(name):
    """An experiment by name under outputs/, or by path."""
    path = Path(name)
    return path if path.is_dir() else ROOT / "outputs" / name


def read_sprites(folder, size, background, log=print):
    """(names, uint8 images [N,H,W,3], bool sprite masks [N,H,W]) of every usable image in `folder`;
    the rest are named and skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of sprites")
    images, masks, written_from = [], [], {}
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())
    for path in regular_files(entries, lambda line: log(printable(line))):
        try:
            image, mask = sprite_image(path, size, background)
        except SkipImage as why:
            log(printable(f"skipped {path.name}: {why}"))
            continue
        name = path.stem + ".png"
        if name in written_from:
            raise UserError(f"{written_from[name]} and {path.name} in {folder} would both be written as {name}; "
                            "rename one of them")
        written_from[name] = path.name
        images.append(image)
        masks.append(mask)
    if not images:
        raise UserError(f"no usable sprite in {folder}")
    return list(written_from), np.stack(images), np.stack(masks)


def read_prepared_test_split(folder, size):
    """(names, images, masks) of a prepared set's test split, refused at another image size."""
    prepared_size = load_manifest(folder)["parameters"]["image_size"]
    if prepared_size != size:
        raise UserError(f"{folder} was prepared at {prepared_size}x{prepared_size}, but the model takes "
                        f"{size}x{size}; prepare it again with --image-size {size}")
    test = load_split(folder, "test")
    return test.names, test.images, test.masks


def check_out_dir(out_dir, in_dir):
    """A UserError unless `out_dir` is apart from the sprites it is made from and from every
    experiment: writing into either would replace the user's sprites or an experiment's outputs."""
    out, source = Path(out_dir).resolve(), Path(in_dir).resolve()
    if out == source or out.is_relative_to(source) or source.is_relative_to(out):
        raise UserError(f"{out_dir} would be written in or around the input folder {in_dir}, whose sprites it "
                        "would replace or mix with; choose an output folder apart from it")
    for folder in (out, *out.parents):
        if (folder / EXPERIMENT_MARK).exists() or (folder / "model.pt").exists():
            raise UserError(f"{out_dir} is inside the experiment {folder}, whose metrics.json and reconstructions "
                            "it would replace or mix with; choose an output folder outside every experiment")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder; choose another output folder")


def reconstruct(model, images, device):
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), BATCH):
            outputs.append(from_batch(model(to_batch(images[start:start + BATCH], device)).reconstruction))
    return np.concatenate(outputs)


def score_prepared_set(experiment, prepared, device):
    """Every metric of `experiment`'s reconstructions of a prepared set's test split, with the bits
    per sprite that set costs (a palette model's palettes are that set's own)."""
    model, _, config = load_model(Path(experiment), device)
    names, images, masks = read_prepared_test_split(prepared, config["image_size"])
    rebuilt = reconstruct(model, images, device)
    metrics = image_metrics(images, rebuilt, masks)
    return {"set": Path(prepared).name, "images": len(names), **metrics,
            "bits_per_sprite": model.bits_per_sprite(config["image_size"], metrics["input_colours"])}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m utils.reconstruct", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("in_dir", help="a folder of sprites, or a prepared set (its test split)")
    parser.add_argument("out_dir")
    parser.add_argument("--background", choices=sorted(BACKGROUND_COLOURS), default="white",
                        help="for a folder of sprites; a prepared set keeps its own backgrounds")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    def run():
        check_out_dir(args.out_dir, args.in_dir)
        device = choose_device(args.device)
        model, _, config = load_model(experiment_dir(args.experiment), device)
        if (Path(args.in_dir) / "manifest.json").is_file():
            names, images, masks = read_prepared_test_split(args.in_dir, config["image_size"])
        else:
            names, images, masks = read_sprites(args.in_dir, config["image_size"], args.background)
        out = Path(args.out_dir)
        rebuilt = reconstruct(model, images, device)
        for name, given, mask, output in zip(names, images, masks, rebuilt):
            save_png(np.dstack([given, np.where(mask, 255, 0).astype(np.uint8)]), out / "inputs" / name)
            save_png(output, out / "reconstructions" / name)
        metrics = {"images": len(names), **image_metrics(images, rebuilt, masks)}
        write_json(out / "metrics.json", metrics)
        print(f"{len(names)} sprites reconstructed into {out}: {100 * metrics['sprite_exact_pixel_rate']:.1f}% of "
              f"sprite pixels exact, {100 * metrics['palette_exact_pixel_rate']:.1f}% once snapped to each "
              f"sprite's own palette ({metrics['palette_colours']:.1f} colours on average); all metrics in "
              f"{out / 'metrics.json'}")
        return 0
    return exit_on_user_error(run)


if __name__ == "__main__":
    sys.exit(main())
