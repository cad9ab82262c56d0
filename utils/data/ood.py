"""An out-of-domain test set: the roguelike tiles of Debian's angband-data, cut on their grid.

Not Pokemon, not creatures only: items, weapons, monsters and people of a dungeon game, by two
artists, on 16x16 and 32x32 grids. It is kept out of training; `python -m utils.data prepare
--set angband` fetches it and prepares every sprite into the test split. original_data/README.md
and data/README.md tell the whole story.
"""
import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import UserError
from utils.io import verified_download, write_json

ROOT = Path(__file__).resolve().parent.parent.parent

ANGBAND_PACKAGE = "angband-data"
ANGBAND_VERSION = "1:3.5.1-2.5"
# The SHA256 that Debian's Packages index publishes for this .deb; a download that hashes otherwise is refused.
ANGBAND_SHA256 = "b0fd778c0824cc2fb684b95d8483a74f7806cfb0ee66955b40eae6473ae29a9f"
ANGBAND_COPYRIGHT = "usr/share/doc/angband-data/copyright"
# Only the two sheets whose license is permissive; the package's other tiles are GPL-2 or Angband's own.
ANGBAND_TILESETS = {
    "bolt16": {"file": "usr/share/angband/xtra/graf/16x16.png", "tile_size": 16,
               "author": "Adam Bolt, 1998",
               "license": "public domain: 'Adam Bolt's (16x16) graphics may be redistributed and used for "
                          "any purpose, with or without modification.' (debian/copyright)"},
    "gervais32": {"file": "usr/share/angband/xtra/graf/32x32.png", "tile_size": 32,
                  "author": "David Gervais, 1999", "license": "CC-BY-3.0 (debian/copyright)"},
}
# The sheets' round rune stones are rendered, not drawn: 70 to 780 colours each, where every drawn
# tile has 48 or fewer.
MAX_TILE_COLOURS = 64
LEFT_OUT = {
    "empty": "fully transparent",
    "terrain": "no transparent pixel (a floor or wall tile: sprite and background cannot be told apart)",
    "partly_transparent": "a pixel neither transparent nor opaque (a blended shadow)",
    "too_many_colours": f"more than {MAX_TILE_COLOURS} colours (rendered, not drawn)",
}


def _apt_download(dest):
    """Download the pinned .deb into `dest` with the machine's own apt and its sources."""
    if shutil.which("apt-get") is None:
        raise UserError(f"apt-get is needed to fetch {ANGBAND_PACKAGE} (a Debian package) and was not found on PATH")
    proc = subprocess.run(["apt-get", "download", f"{ANGBAND_PACKAGE}={ANGBAND_VERSION}"], cwd=dest,
                          capture_output=True, text=True, timeout=600)
    debs = sorted(Path(dest).glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        detail = ([line for line in proc.stderr.strip().splitlines() if not line.startswith("W:")] or ["no output"])[-1]
        raise UserError(f"apt-get download {ANGBAND_PACKAGE}={ANGBAND_VERSION} failed: {detail} "
                        "(run `apt-get update` first if the version is not found)")
    return debs[0]


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def deb_data_files(deb, wanted):
    """{path: bytes} of the `wanted` paths in a .deb's data archive (an ar archive holding data.tar.*)."""
    blob = Path(deb).read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise UserError(f"{deb} is not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        name, size = blob[pos:pos + 16].decode().strip().rstrip("/"), int(blob[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(blob[pos + 60:pos + 60 + size])) as tar:
                found = {}
                for member in tar.getmembers():
                    path = member.name.removeprefix("./")
                    if path in wanted and member.isfile():
                        found[path] = tar.extractfile(member).read()
                return found
        pos += 60 + size + (size & 1)
    raise UserError(f"{deb} holds no data archive")


def cut_tiles(sheet, tile_size):
    """Cut an RGBA sheet on its grid, exactly: ({(row, col): tile}, {reason: count of tiles left out})."""
    rows, cols = sheet.shape[0] // tile_size, sheet.shape[1] // tile_size
    kept, left_out = {}, dict.fromkeys(LEFT_OUT, 0)
    for row in range(rows):
        for col in range(cols):
            tile = sheet[row * tile_size:(row + 1) * tile_size, col * tile_size:(col + 1) * tile_size]
            alpha = tile[..., 3]
            if not alpha.any():
                why = "empty"
            elif alpha.all():
                why = "terrain"
            elif ((alpha > 0) & (alpha < 255)).any():
                why = "partly_transparent"
            elif len(np.unique(tile[alpha > 0][:, :3], axis=0)) > MAX_TILE_COLOURS:
                why = "too_many_colours"
            else:
                kept[row, col] = tile
                continue
            left_out[why] += 1
    return kept, left_out


def fetch_angband(root=ROOT / "original_data" / "angband", download=_apt_download):
    """Return the folder of Angband tiles, fetching the package once.

    It holds tiles/<tileset>__r<row>c<col>.png (one per kept grid cell), sheets/<tileset>.png
    (the package's own files), copyright (the package's license text) and SOURCE.json. The
    folder is assembled beside its final place and renamed in one step, so a failed or tampered
    download leaves nothing that looks like data."""
    root = Path(root)
    if (root / "SOURCE.json").exists():
        return root
    with verified_download(root, download, sha256_of, ANGBAND_SHA256,
                           f"{ANGBAND_PACKAGE} {ANGBAND_VERSION} does not match its published SHA256") as (deb, got, staging):
        wanted = [ANGBAND_COPYRIGHT] + [t["file"] for t in ANGBAND_TILESETS.values()]
        files = deb_data_files(deb, wanted)
        missing = [p for p in wanted if p not in files]
        if missing:
            raise UserError(f"{ANGBAND_PACKAGE} {ANGBAND_VERSION} lacks {missing}; refusing to use it")
        (staging / "tiles").mkdir()
        (staging / "sheets").mkdir()
        (staging / "copyright").write_bytes(files[ANGBAND_COPYRIGHT])
        tilesets = {}
        for name, info in ANGBAND_TILESETS.items():
            (staging / "sheets" / f"{name}.png").write_bytes(files[info["file"]])
            sheet = np.asarray(Image.open(io.BytesIO(files[info["file"]])).convert("RGBA"))
            kept, left_out = cut_tiles(sheet, info["tile_size"])
            for (row, col), tile in kept.items():
                Image.fromarray(tile, "RGBA").save(staging / "tiles" / f"{name}__r{row:02d}c{col:03d}.png")
            tilesets[name] = {**info, "cells": len(kept) + sum(left_out.values()), "kept": len(kept),
                              "left_out": left_out}
        write_json(staging / "SOURCE.json", {
            "package": ANGBAND_PACKAGE, "version": ANGBAND_VERSION, "registry": "Debian (apt-get download)",
            "sha256": got, "tilesets": tilesets,
            "left_out_rules": LEFT_OUT})
    return root
