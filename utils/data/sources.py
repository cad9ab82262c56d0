"""What a prepare reads: the fetched Pokemon package's files, or a user's own folder or zip of
sprites; each file with its species and a file-name-safe key."""
import dataclasses
import os
import zipfile
from pathlib import Path

from utils.data.fetch import POKESPRITE_FOLDERS, pokemon_species_of_files
from utils.data.sprites import _read_file, _read_member, entry_problem, image_name
from utils.errors import UserError, printable

NAME_MAX = 255  # bytes in one file name, on every file system Linux commonly mounts


@dataclasses.dataclass
class SourceFile:
    name: str  # path inside the source, for messages and the manifest
    species: str
    key: str  # file-name-safe sprite id, unique in the source
    read: callable


# ---------------------------------------------------------------- the Pokemon sprites


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
