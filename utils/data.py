"""Pixel-art data: fetch the Pokemon box sprites, prepare them as the paper does, split by species.

`python -m utils.data prepare --help` lists the options; data/README.md tells the whole story.
"""
import argparse
import base64
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.errors import UserError, exit_on_user_error
from utils.io import write_json

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL_DATA = ROOT / "original_data"
DATA = ROOT / "data"

POKESPRITE_PACKAGE = "pokesprite-images@2.7.0"
# The integrity the registry publishes for this version; a download that hashes otherwise is refused.
POKESPRITE_INTEGRITY = (
    "sha512-LQuzyaEDl4ow75fPzrVuJB0cIRmxVq4XBecDFajA0WrZI1xHCmXn5OSBul44D+24tA1kMT7GSROmct5FRg8dtQ=="
)
# Gen 8 box sprites; the female folders only hold species whose female icon differs.
POKESPRITE_FOLDERS = {
    "pokemon-gen8/regular": "regular",
    "pokemon-gen8/shiny": "shiny",
    "pokemon-gen8/regular/female": "regular-female",
    "pokemon-gen8/shiny/female": "shiny-female",
}
POKESPRITE_KEEP = ("data/pokemon.json", "license.md")
SPLITS = ("train", "val", "test")
BACKGROUND_COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0)}


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Every choice that shapes the prepared set; saved in manifest.json."""

    image_size: int = 64
    seed: int = 42
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    backgrounds: tuple = ("white", "black")  # every split
    train_noise_backgrounds: int = 2  # random-noise backgrounds, training sprites only
    flip: bool = True
    rotations: tuple = (15, -15, 30, -30)  # degrees, positive = counter-clockwise

    def __post_init__(self):
        if self.image_size < 4:
            raise UserError(f"image size must be at least 4 pixels, got {self.image_size}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise UserError("val and test fractions must be in [0, 1) and sum to less than 1, got "
                            f"{self.val_fraction} and {self.test_fraction}")
        unknown = [b for b in self.backgrounds if b not in BACKGROUND_COLOURS]
        if unknown or not self.backgrounds:
            raise UserError(f"backgrounds must be some of {sorted(BACKGROUND_COLOURS)}, got {list(self.backgrounds)}")
        if self.train_noise_backgrounds < 0:
            raise UserError("the number of noise backgrounds cannot be negative")

    def augmentations(self):
        augs = ["orig"] + (["flip"] if self.flip else [])
        return augs + [f"rot{angle:+d}" for angle in self.rotations]

    def backgrounds_for(self, split):
        noise = [f"noise{i}" for i in range(self.train_noise_backgrounds)] if split == "train" else []
        return list(self.backgrounds) + noise


@dataclasses.dataclass
class SourceFile:
    name: str  # path inside the source, for messages and the manifest
    species: str
    key: str  # file-name-safe sprite id, unique in the source
    read: callable


# ---------------------------------------------------------------- fetching the Pokemon sprites


def _npm_pack(dest):
    """Download the package tarball into `dest` with the machine's own npm and registry settings."""
    if shutil.which("npm") is None:
        raise UserError("npm is needed to fetch the Pokemon sprites and was not found on PATH; "
                        "install Node.js, or prepare your own sprites with --source")
    proc = subprocess.run(["npm", "pack", POKESPRITE_PACKAGE, "--pack-destination", str(dest), "--silent"],
                          capture_output=True, text=True, timeout=600)
    tarballs = sorted(Path(dest).glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"npm pack {POKESPRITE_PACKAGE} failed: {detail}")
    return tarballs[0]


def _integrity(path):
    digest = hashlib.sha512(Path(path).read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def fetch_pokemon(root=ORIGINAL_DATA / "pokemon", pack=_npm_pack):
    """Return the folder of unpacked Pokemon sprites, fetching them once.

    The folder is assembled beside its final place and renamed in one step, so a failed or
    tampered download leaves nothing that looks like data."""
    root = Path(root)
    marker = root / "SOURCE.json"
    if marker.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.") as tmp:
        tarball = pack(Path(tmp))
        got = _integrity(tarball)
        if got != POKESPRITE_INTEGRITY:
            raise UserError(f"{POKESPRITE_PACKAGE} does not match its published integrity "
                            f"(expected {POKESPRITE_INTEGRITY}, got {got}); refusing to unpack it")
        staging = Path(tmp) / "unpacked"
        with tarfile.open(tarball) as tar:
            for member in tar.getmembers():
                rel = member.name.removeprefix("package/")
                wanted = rel in POKESPRITE_KEEP or (
                    rel.endswith(".png") and str(Path(rel).parent) in POKESPRITE_FOLDERS)
                if wanted and member.isfile():
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
        missing = [p for p in POKESPRITE_KEEP if not (staging / p).exists()]
        if missing:
            raise UserError(f"{POKESPRITE_PACKAGE} lacks {missing}; refusing to use it")
        write_json(staging / "SOURCE.json", {"package": POKESPRITE_PACKAGE, "integrity": got})
        if root.exists():  # a leftover without SOURCE.json is an old partial copy
            shutil.rmtree(root)
        os.replace(staging, root)
    return root


def pokemon_species_of_files(species_json):
    """Map every Gen 8 file stem to its national dex number, from the package's own data.

    Cutting names at the first '-' would split mr-mime, ho-oh, porygon-z or tapu-koko."""
    entries = json.loads(Path(species_json).read_text())
    stems = {}
    for dex, entry in entries.items():
        slug = entry["slug"]["eng"]
        for form in entry.get("gen-8", {}).get("forms", {}):
            stems[slug if form == "$" else f"{slug}-{form}"] = dex
    return stems


def _pokemon_files(root):
    stems = pokemon_species_of_files(root / "data/pokemon.json")
    files, skipped = [], []
    for folder, variant in POKESPRITE_FOLDERS.items():
        for path in sorted((root / folder).glob("*.png")):
            rel = str(path.relative_to(root))
            if path.stem not in stems:
                skipped.append({"file": rel, "reason": "not named in data/pokemon.json"})
                continue
            files.append(SourceFile(rel, stems[path.stem], f"{path.stem}_{variant}", path.read_bytes))
    return files, skipped


# ---------------------------------------------------------------- a user's own sprites


def _safe_key(text):
    return "".join(c if c.isalnum() or c in "-+." else "-" for c in text).strip("-.") or "sprite"


def species_of(rel_path):
    """The grouping rule for a user's own sprites (documented in data/README.md): the first folder
    under the source, or for files at its top level the part of the name before '__'."""
    parts = Path(rel_path).parts
    if len(parts) > 1:
        return parts[0]
    return Path(rel_path).stem.split("__")[0]


def _user_files(source):
    source = Path(source)
    if not source.exists():
        raise UserError(f"sprite source {source} does not exist")
    if source.is_file() and not zipfile.is_zipfile(source):
        raise UserError(f"sprite source {source} is neither a folder nor a zip file")
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        entries = [(str(p.relative_to(source)), p.read_bytes) for p in paths]
    else:
        archive = zipfile.ZipFile(source)
        names = sorted(n for n in archive.namelist() if not n.endswith("/") and not Path(n).name.startswith("."))
        entries = [(n, (lambda n=n: archive.read(n))) for n in names]
    files, used = [], set()
    for rel, read in entries:
        key = _safe_key(str(Path(rel).with_suffix("")).replace(os.sep, "-"))
        while key in used:
            key += "+"
        used.add(key)
        files.append(SourceFile(rel, species_of(rel), key, read))
    return files, []


# ---------------------------------------------------------------- turning files into canvases


class SkipImage(Exception):
    """An input file that cannot become a sprite; it is skipped and listed with the reason."""


def decode_rgba(data):
    """Any PNG (or other Pillow-readable image) as an RGBA uint8 array, colours untouched."""
    if not data:
        raise SkipImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise SkipImage("not an image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise SkipImage(f"unreadable image ({err})") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's convert() clips 16-bit grey to 255 instead of scaling it.
        grey = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or grey.max() > 255 else 255.0
        image = Image.fromarray(np.round(grey * 255.0 / peak).clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" not in image.info:
        image = image.convert("RGB")
    # P with a transparent index, LA, L, RGB, 1, CMYK: Pillow keeps the exact palette colours.
    return np.asarray(image.convert("RGBA"))


def crop_to_canvas(rgba, size):
    """Crop to the alpha bounding box and centre on a transparent size x size canvas, without
    resampling. Returns (canvas, was_centre_cropped)."""
    opaque = rgba[..., 3] > 0
    if not opaque.any():
        raise SkipImage("fully transparent")
    rows, cols = np.flatnonzero(opaque.any(1)), np.flatnonzero(opaque.any(0))
    sprite = rgba[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = sprite.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    sprite = sprite[top:top + size, left:left + size]
    h2, w2 = sprite.shape[:2]
    canvas = np.zeros((size, size, 4), np.uint8)
    y, x = (size - h2) // 2, (size - w2) // 2
    canvas[y:y + h2, x:x + w2] = sprite
    return canvas, (h, w) != (h2, w2)


def augment(canvas, name):
    if name == "orig":
        return canvas
    if name == "flip":
        return canvas[:, ::-1]
    angle = int(name.removeprefix("rot"))
    # Nearest neighbour keeps every pixel one of the sprite's own colours.
    return np.asarray(Image.fromarray(canvas, "RGBA").rotate(angle, resample=Image.NEAREST, fillcolor=(0, 0, 0, 0)))


def background(name, size, seed, tag):
    if name in BACKGROUND_COLOURS:
        return np.broadcast_to(np.array(BACKGROUND_COLOURS[name], np.uint8), (size, size, 3))
    # Seeded by the image's own name, so the output does not depend on processing order.
    rng = np.random.default_rng([seed, zlib.crc32(tag.encode())])
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def composite(rgba, back):
    alpha = rgba[..., 3:4].astype(np.uint16)
    mixed = (rgba[..., :3] * alpha + back.astype(np.uint16) * (255 - alpha) + 127) // 255
    return mixed.astype(np.uint8)


def sprite_image(data, size, background_name):
    """One file's bytes as a model input exactly as preparation makes a test image: cropped,
    centred, no augmentation, on a plain background. Returns (uint8 RGB, bool mask)."""
    canvas, _ = crop_to_canvas(decode_rgba(data), size)
    return composite(canvas, background(background_name, size, 0, "")), canvas[..., 3] > 0


def image_name(key, bg, aug):
    return f"{key}__{bg}__{aug}.png"


def _render_sprite(job):
    """All images of one sprite: (names, images, masks). Writes the PNGs into `folder`."""
    key, canvas, split, folder, options = job
    names, images, masks = [], [], []
    for aug in options.augmentations():
        rgba = augment(canvas, aug)
        for bg in options.backgrounds_for(split):
            name = image_name(key, bg, aug)
            rgb = composite(rgba, background(bg, options.image_size, options.seed, name))
            Image.fromarray(rgb, "RGB").save(Path(folder) / name, compress_level=1)
            names.append(name)
            images.append(rgb)
            masks.append(rgba[..., 3] > 0)
    return names, images, masks


# ---------------------------------------------------------------- the split and the whole job


def split_species(species, options):
    """Seeded split of the sorted species ids into train/val/test, about 80/10/10 by default."""
    species = sorted(set(species))
    order = np.random.default_rng(options.seed).permutation(len(species))
    n_val = round(len(species) * options.val_fraction)
    n_test = round(len(species) * options.test_fraction)
    if len(species) - n_val - n_test < 1:
        raise UserError(f"only {len(species)} species: too few to split into train, val and test")
    shuffled = [species[i] for i in order]
    return {"val": sorted(shuffled[:n_val]), "test": sorted(shuffled[n_val:n_val + n_test]),
            "train": sorted(shuffled[n_val + n_test:])}


def _collect(files, options, log):
    """Decode, crop and deduplicate. Returns (sprites, skipped, centre_cropped)."""
    sprites, skipped, centre_cropped, seen = [], [], [], {}
    for f in files:
        try:
            canvas, cropped = crop_to_canvas(decode_rgba(f.read()), options.image_size)
        except SkipImage as why:
            skipped.append({"file": f.name, "reason": str(why)})
            log(f"skipped {f.name}: {why}")
            continue
        digest = hashlib.sha256(canvas.tobytes()).hexdigest()
        if digest in seen:
            skipped.append({"file": f.name, "reason": f"duplicate of {seen[digest]}"})
            continue
        seen[digest] = f.name
        if cropped:
            centre_cropped.append(f.name)
        sprites.append((f, canvas))
    return sprites, skipped, centre_cropped


def _source_record(source, root):
    if source is None:
        return json.loads((root / "SOURCE.json").read_text())
    return {"path": str(Path(source).resolve())}


def prepare(source=None, out_dir=None, options=PrepareOptions(), force=False, log=print, workers=None):
    """Prepare a split data set and return its manifest; reuse it if already prepared alike.

    source None means the Pokemon box sprites (fetched once with npm), else a folder or zip of
    the user's own sprites. Everything is built in a temporary folder beside `out_dir` and moved
    into place in one rename, so an interrupted run never leaves a set that looks complete."""
    out_dir = Path(out_dir) if out_dir else DATA / ("pokemon" if source is None else _safe_key(Path(source).stem))
    params = json.loads(json.dumps(dataclasses.asdict(options)))  # as it reads back from the manifest
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists() and not force:
        old = json.loads(manifest_path.read_text())
        wanted_source = str(Path(source).resolve()) if source is not None else None
        if old.get("parameters") == params and old["source"].get("path") == wanted_source:
            return old
    start = time.perf_counter()
    root = fetch_pokemon() if source is None else None
    files, skipped = _pokemon_files(root) if source is None else _user_files(source)
    if not files:
        raise UserError(f"no files found in sprite source {source}")
    sprites, bad, centre_cropped = _collect(files, options, log)
    skipped += bad
    if centre_cropped:
        log(f"centre-cropped {len(centre_cropped)} sprite(s) larger than the {options.image_size}x"
            f"{options.image_size} canvas; manifest.json lists them under centre_cropped")
    if not sprites:
        raise UserError(f"none of the {len(files)} files in {source} is a usable sprite")
    splits = split_species([f.species for f, _ in sprites], options)
    split_of = {s: name for name, members in splits.items() for s in members}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        jobs = []
        for f, canvas in sprites:
            split = split_of[f.species]
            jobs.append((f.key, canvas, split, staging / split, options))
        for split in SPLITS:
            (staging / split).mkdir()
        # fork, not spawn: a training script has no __main__ guard for a child to re-run.
        with ProcessPoolExecutor(workers or os.cpu_count(), mp_context=multiprocessing.get_context("fork")) as pool:
            rendered = list(pool.map(_render_sprite, jobs, chunksize=16))
        summary = {}
        size = options.image_size
        for split in SPLITS:
            mine = [r for job, r in zip(jobs, rendered) if job[2] == split]
            names = [n for r in mine for n in r[0]]
            images = np.array([i for r in mine for i in r[1]], np.uint8).reshape(-1, size, size, 3)
            masks = np.array([m for r in mine for m in r[2]], bool).reshape(-1, size, size)
            np.save(staging / f"{split}_images.npy", images)
            np.save(staging / f"{split}_masks.npy", masks)
            (staging / f"{split}_names.json").write_text(json.dumps(names))
            summary[split] = {"species": splits[split], "sprites": len(mine), "images": len(names)}
        manifest = {
            "source": _source_record(source, root),
            "parameters": params,
            "files_found": len(files),
            "sprites": len(sprites),
            "skipped": skipped,
            "centre_cropped": centre_cropped,
            "sprite_species": {f.key: f.species for f, _ in sprites},
            "splits": summary,
            "prepare_seconds": round(time.perf_counter() - start, 2),
        }
        write_json(staging / "manifest.json", manifest)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old."))
            os.replace(out_dir, old / "data")
            os.replace(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------- reading a prepared set


@dataclasses.dataclass
class SpriteSet:
    """One split, packed: uint8 images [N,H,W,3], bool sprite masks [N,H,W], names."""

    images: np.ndarray
    masks: np.ndarray
    names: list

    def __len__(self):
        return len(self.names)

    def subset(self, count):
        return SpriteSet(self.images[:count], self.masks[:count], self.names[:count])


def load_split(data_dir, split):
    """Load a prepared split in one read per array, with no PNG decoding."""
    data_dir = Path(data_dir)
    if not (data_dir / "manifest.json").exists():
        raise UserError(f"{data_dir} holds no prepared data set (no manifest.json); "
                        "run `python -m utils.data prepare` or point `dataset` elsewhere")
    try:
        images = np.load(data_dir / f"{split}_images.npy", allow_pickle=False)
        masks = np.load(data_dir / f"{split}_masks.npy", allow_pickle=False)
        names = json.loads((data_dir / f"{split}_names.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"the packed {split} split in {data_dir} cannot be read ({err}); "
                        "prepare it again with --force") from None
    if not (len(images) == len(masks) == len(names)):
        raise UserError(f"the packed {split} split in {data_dir} is inconsistent; prepare it again with --force")
    if len(names) == 0:
        raise UserError(f"the {split} split in {data_dir} is empty; it needs more species")
    return SpriteSet(images, masks, names)


def resolve_dataset(dataset, image_size, log=print):
    """The prepared folder for a training script's `dataset` key, preparing it when missing.

    'pokemon' is the default set; a folder that holds manifest.json is used as it is; any other
    folder or zip is taken as the user's own sprites."""
    options = PrepareOptions(image_size=image_size)
    if dataset == "pokemon":
        prepare(None, DATA / "pokemon", options, log=log)
        return DATA / "pokemon"
    path = Path(dataset)
    if (path / "manifest.json").exists():
        try:
            size = json.loads((path / "manifest.json").read_text())["parameters"]["image_size"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path / 'manifest.json'} is damaged; prepare the data set again with --force") from None
        if size != image_size:
            raise UserError(f"{path} was prepared at {size}x{size}, but image_size is {image_size}")
        return path
    out = DATA / _safe_key(path.stem)
    prepare(path, out, options, log=log)
    return out


# ---------------------------------------------------------------- command line


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
    p.add_argument("--out", help="output folder (default: data/pokemon or data/<source name>)")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--backgrounds", default=",".join(d.backgrounds), help="comma list of: white, black")
    p.add_argument("--train-noise-backgrounds", type=int, default=d.train_noise_backgrounds)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--rotations", default=",".join(f"{a:+d}" for a in d.rotations),
                   help="comma list of degrees, positive = counter-clockwise; empty for none")
    p.add_argument("--force", action="store_true", help="prepare again even if the output is up to date")
    args = parser.parse_args(argv)
    try:
        rotations = tuple(int(a) for a in args.rotations.split(",") if a.strip())
    except ValueError:
        parser.error(f"--rotations takes whole degrees, got {args.rotations!r}")

    def run():
        options = PrepareOptions(args.image_size, args.seed, args.val_fraction, args.test_fraction,
                                 tuple(b.strip() for b in args.backgrounds.split(",") if b.strip()),
                                 args.train_noise_backgrounds, not args.no_flip, rotations)
        print(_summary(prepare(args.source, args.out, options, force=args.force)))
        return 0
    return exit_on_user_error(run)


if __name__ == "__main__":
    sys.exit(main())
