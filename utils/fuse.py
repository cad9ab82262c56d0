"""Fuse two sprites of your own with a trained model: blend, swap and interpolation, and with a
prior over its codes, fusions the prior draws.

    python -m utils.fuse EXPERIMENT SPRITE_A SPRITE_B OUT_DIR [--background white|black] [--steps 8]
    python -m utils.fuse EXPERIMENT A B OUT_DIR --prior PRIOR --method prior-swap --method prior-blend

Writes OUT_DIR/inputs.png (the two prepared sprites), blend.png, swap.png, interpolation.png and
interpolation.gif, as the training scripts do for their test pairs (see utils/fusions.py), and one
PNG per --method beyond those: prior-swap (a's top half, the rest drawn by the prior towards b's
codes), prior-blend (every cell drawn towards both parents' codes), palette-swap (a's shape in b's
colours, for a model that draws with a palette).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from models import PRIORS
from utils.data.sprites import BACKGROUND_COLOURS, SkipImage, sprite_image
from utils.device import choose_device
from utils.errors import UserError, exit_on_user_error
from utils.fusions import PRIOR_METHODS, palette_swap, prior_fusion, write_pair
from utils.images import from_batch, to_batch
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


def fusion_prior(args, model_type, device):
    """The prior of --prior, checked to model EXPERIMENT's codes, and the background's label for it."""
    if args.prior is None:
        raise UserError("--method prior-swap and prior-blend need --prior, a prior trained over EXPERIMENT's codes")
    if model_type != "vqvae":
        raise UserError(f"{args.experiment} holds a {model_type}; a prior models a VQ model's codes")
    prior, prior_type, prior_config = load_model(experiment_dir(args.prior), device)
    if prior_type not in PRIORS:
        raise UserError(f"{args.prior} holds a {prior_type}, not a prior (train_gpt.py or train_pixelcnn.py)")
    if prior_config["vq_experiment"] != experiment_dir(args.experiment).name:
        raise UserError(f"{args.prior} models the codes of {prior_config['vq_experiment']!r}, not of "
                        f"{experiment_dir(args.experiment).name!r}")
    label = None
    if prior_config.get("num_classes"):
        label = torch.full((1,), list(BACKGROUND_COLOURS).index(args.background), device=device)
    return prior, label


def method_prior(args, model, model_type, device):
    """(prior, label) for the --methods asked, or (None, None); refuses a method the models cannot
    do before anything is written."""
    if "palette-swap" in args.method and not getattr(model, "draws_with_palette", False):
        raise UserError(f"--method palette-swap needs a model that draws with a palette; {args.experiment} does not")
    if any(method in PRIOR_METHODS for method in args.method):
        return fusion_prior(args, model_type, device)
    return None, None


def write_methods(args, model, images, out, prior, label, device):
    """One PNG per --method."""
    with torch.inference_mode():
        x = to_batch(images, device)
        for method in dict.fromkeys(args.method):
            fused = (palette_swap(model, x[:1], x[1:]) if method == "palette-swap"
                     else prior_fusion(prior, model, x[:1], x[1:], method, label, args.seed))
            save_png(from_batch(fused)[0], out / f"{method}.png")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m utils.fuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("sprite_a")
    parser.add_argument("sprite_b")
    parser.add_argument("out_dir")
    parser.add_argument("--background", choices=sorted(BACKGROUND_COLOURS), default="white")
    parser.add_argument("--steps", type=int, default=8, help="images in the interpolation strip")
    parser.add_argument("--method", action="append", choices=[*PRIOR_METHODS, "palette-swap"], default=[],
                        help="a fusion beyond blend, swap and interpolation; repeat for more")
    parser.add_argument("--prior", default=None, metavar="PRIOR",
                        help="a prior experiment (train_gpt.py, train_pixelcnn.py) over EXPERIMENT's codes")
    parser.add_argument("--seed", type=int, default=0, help="of the prior's draws")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    def run():
        if args.steps < 2:
            raise UserError("--steps needs at least 2 images, the two ends")
        device = choose_device(args.device)
        model, model_type, config = load_model(experiment_dir(args.experiment), device)
        images = np.stack([prepared(p, config["image_size"], args.background) for p in (args.sprite_a, args.sprite_b)])
        prior, label = method_prior(args, model, model_type, device)
        out = Path(args.out_dir)
        save_png(image_grid(images, 2, pad=0), out / "inputs.png")
        write_pair(model, model_type, images, out, args.steps, device)
        write_methods(args, model, images, out, prior, label, device)
        print(f"fusions of {args.sprite_a} and {args.sprite_b} written to {out}")
        return 0
    return exit_on_user_error(run)


if __name__ == "__main__":
    sys.exit(main())
