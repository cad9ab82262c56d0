"""Fuse two sprites of your own with a trained model: blend, swap and interpolation.

    python -m utils.fuse EXPERIMENT SPRITE_A SPRITE_B OUT_DIR [--background white|black] [--steps 8]

Writes OUT_DIR/inputs.png (the two prepared sprites), blend.png, swap.png, interpolation.png and
interpolation.gif, as the training scripts do for their test pairs (see utils/fusions.py).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from utils.data.sprites import BACKGROUND_COLOURS, SkipImage, sprite_image
from utils.device import choose_device
from utils.errors import UserError, exit_on_user_error
from utils.fusions import write_pair
from utils.plots import image_grid, save_png
from utils.reconstruct import experiment_dir
from utils.training.checkpoints import load_model


def prepared(path, size, background):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    try:
        return sprite_image(path, size, background)[0]
    except SkipImage as why:
        raise UserError(f"{path} cannot be used: {why}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m utils.fuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("sprite_a")
    parser.add_argument("sprite_b")
    parser.add_argument("out_dir")
    parser.add_argument("--background", choices=sorted(BACKGROUND_COLOURS), default="white")
    parser.add_argument("--steps", type=int, default=8, help="images in the interpolation strip")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    def run():
        if args.steps < 2:
            raise UserError("--steps needs at least 2 images, the two ends")
        device = choose_device(args.device)
        model, model_type, config = load_model(experiment_dir(args.experiment), device)
        images = np.stack([prepared(p, config["image_size"], args.background) for p in (args.sprite_a, args.sprite_b)])
        out = Path(args.out_dir)
        save_png(image_grid(images, 2, pad=0), out / "inputs.png")
        write_pair(model, model_type, images, out, args.steps, device)
        print(f"fusions of {args.sprite_a} and {args.sprite_b} written to {out}")
        return 0
    return exit_on_user_error(run)


if __name__ == "__main__":
    sys.exit(main())
