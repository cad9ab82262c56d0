"""What exact codes are up against, against a floor and what simple codes allow, on a prepared sprite set.

    python bench/exact_bounds.py --out=docs/results/bounds/pokemon.json
    python bench/exact_bounds.py --dataset=data/angband --codes= --out=docs/results/bounds/angband.json
    python bench/exact_bounds.py --codes=256 --limit=500     # a quick look, written nowhere

With `--out`, the figures are also written to that JSON file with the command, the processor and
the date; docs/results/results.md quotes them from there (utils.reproduce.results).

1. Codes of the colour alone. A per-pixel model whose every layer is 1x1 maps each colour to a code
   whatever the sprite around it; decoded into the sprite's own palette, each code can stand for one
   of the colours that share it. Here the codes are a k-means of training sprite pixels in RGB, and
   each code of a test image is credited with its commonest colour there: the sprite-exact share
   that such codes keep at best (for these cells; a learnt encoder draws other cells, but any
   colour-only code meets the same limit of colours closer than its cells).
0. One colour everywhere. Every sprite pixel drawn in the split's commonest sprite colour (on these
   sprites, the black of the outlines): the share exact that needs no code at all, the floor below
   which a sprite-exact figure says nothing.
2. A lossless coder. The bits of each test image as an optimised indexed PNG and as lossless WebP
   (headers and palette included), the smaller of the two, beside the issue's 16x16 budget
   (twice the paper's 16x16 grid of 256 codes x 10 bits) and a fixed-rate 16x16 grid of 1024 codes with its palette.
3. Indexed colour. Each pixel the index of its colour in the sprite's own palette, ceil(log2
   colours) bits a pixel, and the palette beside it: exact by construction, nothing learnt. The
   rate at which the per-pixel grid is met without any model, against which a per-pixel code's
   bits are to be read.
"""
import datetime
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.quantizer import kmeans, nearest_code  # noqa: E402
from utils.config import parse_config  # noqa: E402
from utils.data.load import SpriteSet, load_split, resolve_dataset  # noqa: E402
from utils.device import describe_machine  # noqa: E402
from utils.io import write_json  # noqa: E402
from utils.metrics import BITS_PER_COLOUR, colour_counts, colour_keys  # noqa: E402

config = dict(
    dataset="pokemon",  # 'pokemon' or a prepared data folder (an evaluation set's k-means needs a train split)
    codes="256,1024",  # codebook sizes of the colour-only bound ('' = none: a set without a train split)
    sample_pixels=200_000,  # training sprite pixels the k-means sees
    limit=0,  # test images scored, evenly spread through the split; 0 = all
    seed=0,
    out="",  # a JSON file the figures are also written to ('' = print only)
)
BUDGET_16X16 = 2 * 256 * 10  # twice the paper's 16x16 Pixel VQ-VAE, side information counted


def training_pixels(train, count, rng):
    """`count` sprite pixels drawn evenly from the training split, as floats [N, 3] in [0, 1]."""
    pixels = train.images[train.masks]
    chosen = rng.choice(len(pixels), min(count, len(pixels)), replace=False)
    return torch.from_numpy(pixels[chosen].astype(np.float32) / 255)


def commonest_colour(test):
    """(the commonest colour of the split's sprite pixels as 0xRRGGBB, its share of them)."""
    colours, counts = np.unique(colour_keys(test.images[test.masks]), return_counts=True)
    return int(colours[counts.argmax()]), counts.max() / counts.sum()


def colour_code_bound(test, centroids):
    """Share of test sprite pixels exact when each (image, code) keeps only its commonest colour."""
    image = np.repeat(np.arange(len(test.images)), test.masks.reshape(len(test.images), -1).sum(1))
    pixels = test.images[test.masks]
    cells = np.concatenate([nearest_code(torch.from_numpy(part.astype(np.float32) / 255), centroids).numpy()
                            for part in np.array_split(pixels, max(1, len(pixels) // 65536))])
    # (image, cell) pairs, then the colour within each: the commonest colour's count per pair.
    pair = image.astype(np.int64) * len(centroids) + cells
    triples, counts = np.unique((pair << 24) | colour_keys(pixels), return_counts=True)
    best = np.zeros(pair.max() + 1, np.int64)
    np.maximum.at(best, triples >> 24, counts)
    return best.sum() / len(pixels)


def indexed_bits(images):
    """Bits of each uint8 [N, H, W, 3] image as a palette index a pixel plus its palette."""
    colours = colour_counts(images)
    pixels = images.shape[1] * images.shape[2]
    # One colour still needs its palette entry; its index takes no bits.
    return pixels * np.ceil(np.log2(colours)) + BITS_PER_COLOUR * colours


def lossless_bits(image):
    """Bits of the smaller of an optimised indexed PNG (when the image has at most 256 colours) and
    a lossless WebP of a uint8 [H, W, 3] image; each is decoded and checked exact."""
    picture = Image.fromarray(image)
    files = []
    colours = int(colour_counts(image[None])[0])
    if colours <= 256:
        indexed = picture.quantize(colors=colours, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
        files.append(("PNG", indexed, {"optimize": True}))
    files.append(("WEBP", picture, {"lossless": True, "quality": 100, "method": 6}))
    sizes = []
    for kind, picture_to_save, options in files:
        buffer = io.BytesIO()
        picture_to_save.save(buffer, kind, **options)
        if np.array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")), image):
            sizes.append(8 * buffer.tell())
    return min(sizes)


def main(argv):
    cfg = parse_config(config, argv)
    folder = resolve_dataset(cfg["dataset"], 64) if cfg["dataset"] == "pokemon" else Path(cfg["dataset"])
    test = load_split(folder, "test")
    if cfg["limit"]:
        # Evenly through the split, which is sorted by name: the first images are all one species.
        keep = np.unique(np.linspace(0, len(test) - 1, cfg["limit"]).round().astype(int))
        test = SpriteSet(test.images[keep], test.masks[keep], [test.names[i] for i in keep])
    rng = np.random.default_rng(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    print(f"{len(test)} test images of {folder}")
    colour, share = commonest_colour(test)
    figures = {"test_images": len(test), "floor_colour": f"#{colour:06x}", "floor_sprite_exact": share}
    print(f"one colour everywhere: {100 * share:.1f}% of sprite pixels are #{colour:06x}, the commonest")
    indexed = indexed_bits(test.images)
    figures.update(indexed_bits_mean=indexed.mean(), indexed_bits_median=np.median(indexed))
    print(f"indexed colour, a palette index a pixel: 100% exact at mean {indexed.mean():.0f} bits, median "
          f"{np.median(indexed):.0f}")
    figures["colour_code_bound"] = {}
    sizes = [int(part) for part in str(cfg["codes"]).split(",") if part]
    # An evaluation set has no train split to draw the k-means from: --codes= leaves the bound out.
    sample = training_pixels(load_split(folder, "train"), cfg["sample_pixels"], rng) if sizes else None
    for k in sizes:
        start = time.perf_counter()
        share = colour_code_bound(test, kmeans(sample, k))
        figures["colour_code_bound"][str(k)] = share
        print(f"colour-only codes, {k}: at most {100 * share:.1f}% of sprite pixels exact "
              f"({time.perf_counter() - start:.0f} s)")
    start = time.perf_counter()
    bits = np.array([lossless_bits(image) for image in test.images])
    palette = BITS_PER_COLOUR * colour_counts(test.images)
    grid = 256 * 10 + palette
    figures.update(budget_16x16=BUDGET_16X16, lossless_bits_mean=bits.mean(), lossless_bits_median=np.median(bits),
                   lossless_within_budget=(bits <= BUDGET_16X16).mean(), palette_bits_mean=palette.mean(),
                   grid_16x16_bits_mean=grid.mean(), grid_16x16_within_budget=(grid <= BUDGET_16X16).mean())
    print(f"lossless (best of indexed PNG and WebP): median {np.median(bits):.0f} bits, mean {bits.mean():.0f}; "
          f"{100 * (bits <= BUDGET_16X16).mean():.1f}% of images fit the 16x16 budget of {BUDGET_16X16} "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"palette at {BITS_PER_COLOUR} bits a colour: mean {palette.mean():.0f} bits; a 16x16 grid of 1024 "
          f"codes with it: mean {grid.mean():.0f} bits, {100 * (grid <= BUDGET_16X16).mean():.1f}% within the budget")
    if cfg["out"]:
        write_json(Path(cfg["out"]), {
            "command": " ".join(["python bench/exact_bounds.py", *argv]), "dataset": Path(folder).name,
            "machine": describe_machine(torch.device("cpu")), "date": datetime.date.today().isoformat(),
            **{key: value if isinstance(value, (str, dict, int)) else float(value) for key, value in figures.items()}})
        print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
