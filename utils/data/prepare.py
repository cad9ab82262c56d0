"""Preparing a set as the paper does: every sprite cropped and centred on its canvas, augmented,
put on its backgrounds and split by species, packed, and moved into place in one rename.

`python -m utils.data prepare --help` lists the options; data/README.md tells the whole story."""
import contextlib
import ctypes
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from utils.data.fetch import ROOT, fetch_pokemon
from utils.data.sources import _pokemon_files, _safe_key, _user_files
from utils.data.sprites import (BACKGROUND_COLOURS, SkipImage, augment, background, composite, crop_to_canvas,
                                decode_rgba, image_name)
from utils.device import refuse_beyond_memory
from utils.errors import UserError, printable
from utils.io import make_folder, write_json

DATA = ROOT / "data"

SPLITS = ("train", "val", "test")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
