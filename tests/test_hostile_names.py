"""Issue 38's traceback and hang families: a config file that is no file or no text, a FIFO among
the sprites, a file name that is not UTF-8 or too long to write. Each is refused or skipped in one
line, and never waits for ever or ends in a traceback."""
import os

import pytest

from tests.sprites import write_species_folders
from utils.config import parse_config
from utils.data.prepare import PrepareOptions, prepare
from utils.errors import UserError, printable

DEFAULTS = {"epochs": 1, "learning_rate": 1e-3}
OPTIONS = PrepareOptions(image_size=16, rotations=())


def a_folder(path):
    path.mkdir()


def a_fifo(path):
    os.mkfifo(path)  # reading it would wait for a writer that never comes


def latin1_text(path):
    path.write_bytes('{"epochs": 2, "note": "caf\xe9"}'.encode("latin-1"))


@pytest.mark.parametrize("make, said", [(a_folder, "is not a file"), (a_fifo, "is not a file"),
                                        (latin1_text, "is not UTF-8 text (byte 26 is not)")])
def test_a_config_file_that_is_no_file_or_no_text_is_refused_in_one_line(tmp_path, make, said):
    path = tmp_path / "run.json"
    make(path)
    with pytest.raises(UserError, match=said.replace("(", r"\(").replace(")", r"\)")):
        parse_config(DEFAULTS, [str(path)])


def test_a_name_that_is_not_utf8_prints_with_escapes():
    name = os.fsdecode(b"pikachu\xff.png")
    assert printable(name) == "pikachu\\xff.png"
    printable(name).encode("utf-8")  # what print would do to stderr


def test_prepare_skips_a_fifo_and_an_overlong_name_and_keeps_a_non_utf8_one(tmp_path):
    src = tmp_path / "src"
    write_species_folders(src, species=10)
    species = sorted(p for p in src.iterdir() if p.is_dir())
    os.mkfifo(species[0] / "waiting.png")
    long_name = species[1] / ("x" * 240 + ".png")
    (species[1] / os.listdir(species[1])[0]).rename(long_name)
    odd = os.fsencode(species[2]) + b"/caf\xe9.png"
    os.rename(os.fsencode(species[2] / os.listdir(species[2])[0]), odd)
    lines = []
    manifest = prepare(src, tmp_path / "out", OPTIONS, log=lines.append, workers=1)
    reasons = {entry["file"]: entry["reason"] for entry in manifest["skipped"]}
    assert reasons[f"{species[0].name}/waiting.png"] == "not a regular file (a FIFO)"
    assert "a name too long" in reasons[f"{species[1].name}/{long_name.name}"]
    assert all(line.encode("utf-8") for line in lines)
    assert f"{species[2].name}/caf\\xe9.png" not in reasons
