"""Inputs made to hurt: a folder that is not ours, huge or damaged files, links out of a source,
image modes with no 8-bit colours. Each is a skipped file with its reason or one `error:` line,
and nothing of the user's is replaced."""
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import ROOT, exit_status, files
from tests.sprites import sprite_rgba, write_species_folders
from utils import fuse, metrics, reconstruct
from utils.data import prepare as preparing
from utils.data.__main__ import main as data_main
from utils.data.load import resolve_dataset
from utils.data.prepare import PrepareOptions, load_manifest, prepare
from utils.data.sprites import MAX_FILE_BYTES, MAX_IMAGE_PIXELS, SkipImage, decode_rgba
from utils.errors import UserError
from utils.fid import main as fid_main

SMALL = PrepareOptions(image_size=24, seed=3)


@pytest.fixture
def source(tmp_path):
    write_species_folders(tmp_path / "src", species=10, per_species=2)
    return tmp_path / "src"


def png_bytes(rgba):
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def png_declaring(width, height):
    """A few bytes of PNG whose header declares width x height RGBA pixels."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def float_tiff():
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16), 0.5, np.float32)).save(buffer, "TIFF")
    return buffer.getvalue()


def skipped(manifest):
    return {entry["file"]: entry["reason"] for entry in manifest["skipped"]}


# ---------------------------------------------------------------- prepare never replaces what is not its own


def test_prepare_refuses_an_existing_folder_that_is_not_a_prepared_set(tmp_path, source, capsys):
    out = tmp_path / "thesis"
    (out / "sub").mkdir(parents=True)
    (out / "precious.txt").write_text("years")
    (out / "sub/thesis.tex").write_text("of work")
    before = files(out)
    assert exit_status(data_main, ["prepare", "--source", str(source), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out} exists and is not a data set this project prepared (it holds no manifest.json); "
        "it is left alone: choose another --out"]
    assert files(out) == before


def test_a_users_folder_named_like_the_default_does_not_replace_the_default_set(tmp_path, monkeypatch):
    monkeypatch.setattr(preparing, "DATA", tmp_path / "data")
    (tmp_path / "data/pokemon").mkdir(parents=True)
    (tmp_path / "data/pokemon/manifest.json").write_text('{"the": "real set"}')
    made = {}
    for owner in ("alice", "bob"):
        write_species_folders(tmp_path / owner / "pokemon", species=10, per_species=1, seed=len(owner))
        made[owner] = resolve_dataset(str(tmp_path / owner / "pokemon"), 16, log=lambda _: None)
    assert (tmp_path / "data/pokemon/manifest.json").read_text() == '{"the": "real set"}'
    assert made["alice"] != made["bob"] and made["alice"].parent == made["bob"].parent == tmp_path / "data"
    for owner, folder in made.items():
        manifest = load_manifest(folder)
        assert manifest["source"]["path"] == str((tmp_path / owner / "pokemon").resolve())


# ---------------------------------------------------------------- a prepare killed with SIGKILL

KILLED_PREPARE = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from utils.data import prepare as preparing

def render_slowly(job):
    open(os.path.join(sys.argv[4], str(os.getpid())), "w").close()
    time.sleep(120)

preparing._render_sprite = render_slowly
preparing.prepare(sys.argv[2], sys.argv[3], preparing.PrepareOptions(image_size=24), workers=2)
"""


def alive(pid):
    """True while `pid` runs; a zombie waiting for a parent to reap it has ended."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_prepare_takes_its_workers_along_and_its_staging_folder_goes_next_time(tmp_path, source):
    pids = tmp_path / "pids"
    pids.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", KILLED_PREPARE, str(ROOT), str(source), str(tmp_path / "out"),
                               str(pids)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(os.listdir(pids)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = [int(name) for name in os.listdir(pids)]
    assert len(workers) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers))
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(left) == 1
    logs = []
    prepare(source, tmp_path / "out", SMALL, log=logs.append, workers=2)
    assert f"removed 1 staging folder(s) left by an interrupted prepare: {left[0]}" in logs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# ---------------------------------------------------------------- huge, damaged and locked files


def test_a_huge_zip_member_is_skipped_reading_no_more_than_the_limit(tmp_path, source, monkeypatch):
    archive = tmp_path / "sprites.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(source.rglob("*.png")):
            z.write(path, str(path.relative_to(source)))
        z.writestr("sp00/huge.png", b"\0" * (MAX_FILE_BYTES + 1))
    reads = []
    real_open = zipfile.ZipFile.open

    def counting_open(self, name, *args, **kwargs):
        member = real_open(self, name, *args, **kwargs)
        real_read = member.read
        member.read = lambda n=-1: reads.append(n) or real_read(n)
        return member
    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    manifest = prepare(archive, tmp_path / "out", SMALL, log=lambda _: None, workers=1)
    assert skipped(manifest)["sp00/huge.png"] == "larger than 8 MiB, more than any sprite needs"
    assert all(0 <= n <= MAX_FILE_BYTES + 1 for n in reads)
    assert manifest["sprites"] == 20


def test_a_huge_file_in_a_folder_is_skipped_unread(tmp_path, source):
    with open(source / "sp00/huge.png", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    manifest = prepare(source, tmp_path / "out", SMALL, log=lambda _: None, workers=1)
    assert skipped(manifest)["sp00/huge.png"] == "larger than 8 MiB, more than any sprite needs"


@pytest.mark.parametrize("width, height", [(20000, 20000), (3000, 3000)])
def test_an_image_declaring_too_many_pixels_is_skipped_before_decoding(tmp_path, source, width, height):
    (source / "sp00/bomb.png").write_bytes(png_declaring(width, height))
    manifest = prepare(source, tmp_path / "out", SMALL, log=lambda _: None, workers=1)
    reason = skipped(manifest)["sp00/bomb.png"]
    assert reason.startswith(f"too many pixels for a sprite (the limit is {MAX_IMAGE_PIXELS}): ")
    # Pillow's own, larger limit stops 20000x20000 as it opens the file, before naming the size.
    assert reason.endswith("3000x3000" if width == 3000 else "exceeds limit of 178956970 pixels, could be "
                           "decompression bomb DOS attack.")


def damaged_zip(tmp_path, source, damage):
    """A zip of the source whose member sp00/0.png has a bad CRC or claims to be encrypted."""
    archive = tmp_path / "sprites.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for path in sorted(source.rglob("*.png")):
            z.write(path, str(path.relative_to(source)))
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        member = z.getinfo("sp00/0.png")
    if damage == "bad_crc":
        name_length, extra_length = struct.unpack("<HH", raw[member.header_offset + 26:member.header_offset + 30])
        raw[member.header_offset + 30 + name_length + extra_length + 40] ^= 0xFF
    else:
        raw[member.header_offset + 6] |= 1  # the encrypted bit, in the local header
        central = raw.index(b"PK\x01\x02")
        while raw[central + 46:central + 56] != b"sp00/0.png":
            central = raw.index(b"PK\x01\x02", central + 4)
        raw[central + 8] |= 1  # and in the central directory
    archive.write_bytes(bytes(raw))
    return archive


@pytest.mark.parametrize("damage, reason", [("bad_crc", "damaged zip member (Bad CRC-32 for file 'sp00/0.png')"),
                                            ("encrypted", "encrypted zip member; a password is needed")])
def test_a_damaged_or_encrypted_zip_member_is_skipped_with_its_reason(tmp_path, source, damage, reason):
    manifest = prepare(damaged_zip(tmp_path, source, damage), tmp_path / "out", SMALL, log=lambda _: None, workers=1)
    assert skipped(manifest)["sp00/0.png"] == reason
    assert manifest["sprites"] == 19


def test_links_leading_out_of_the_source_are_skipped_and_said(tmp_path, source):
    outside = tmp_path / "private"
    (outside / "more").mkdir(parents=True)
    (outside / "secret.png").write_bytes(png_bytes(sprite_rgba(99)))
    (outside / "more/secret.png").write_bytes(png_bytes(sprite_rgba(98)))
    (source / "sp00/link.png").symlink_to(outside / "secret.png")
    (source / "sp01/folder").symlink_to(outside / "more")
    (source / "sp02/inside.png").symlink_to(source / "sp03/0.png")
    logs = []
    manifest = prepare(source, tmp_path / "out", SMALL, log=logs.append, workers=1)
    reasons = skipped(manifest)
    assert reasons["sp00/link.png"] == f"a link to {(outside / 'secret.png').resolve()}, outside the source folder"
    assert reasons["sp01/folder"] == f"a link to {(outside / 'more').resolve()}, outside the source folder"
    assert reasons["sp03/0.png"] == "duplicate of sp02/inside.png"  # a link inside the source is a file
    assert f"skipped sp00/link.png: a link to {(outside / 'secret.png').resolve()}, outside the source folder" in logs
    assert manifest["sprites"] == 20


@pytest.mark.parametrize("mode, name", [("F", "32-bit floating point"), ("I", "32-bit integer")])
def test_an_image_mode_without_8_bit_colours_is_refused_by_name(mode, name):
    values = np.full((16, 16), 0.5 if mode == "F" else 70000, np.float32 if mode == "F" else np.int32)
    buffer = io.BytesIO()
    Image.fromarray(values, mode).save(buffer, "TIFF")
    with pytest.raises(SkipImage, match=f"^unsupported image mode {mode} \\({name}\\)"):
        decode_rgba(buffer.getvalue())


# ---------------------------------------------------------------- the same guards in every tool


BAD_IMAGES = {"bomb": (png_declaring(20000, 20000), "too many pixels for a sprite"),
              "float": (float_tiff(), "unsupported image mode F (32-bit floating point)")}


@pytest.mark.parametrize("bad", list(BAD_IMAGES))
def test_reconstruct_and_fuse_refuse_a_hostile_image_in_one_line(tiny_experiment, tmp_path, capsys, bad):
    content, reason = BAD_IMAGES[bad]
    (tmp_path / "in").mkdir()
    (tmp_path / "in/bad.png").write_bytes(content)
    Image.fromarray(sprite_rgba(1), "RGBA").save(tmp_path / "in/good.png")
    assert reconstruct.main([str(tiny_experiment), str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    assert f"skipped bad.png: {reason}" in capsys.readouterr().out
    assert exit_status(fuse.main, [str(tiny_experiment), str(tmp_path / "in/good.png"), str(tmp_path / "in/bad.png"),
                                   str(tmp_path / "fused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'in/bad.png'} cannot be used: {reason}")


@pytest.mark.parametrize("bad", list(BAD_IMAGES))
def test_metrics_and_fid_refuse_a_hostile_image_in_one_line(tmp_path, capsys, bad, random_weights):
    content, reason = BAD_IMAGES[bad]
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / side / f"{i}.png")
    (tmp_path / "b/1.png").write_bytes(content)
    assert exit_status(metrics.main, [str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert exit_status(fid_main, [str(tmp_path / "a"), str(tmp_path / "b"), "--weights", str(random_weights),
                                  "--dims", "64", "--device", "cpu"]) == 2
    # utils.fid also warns, in a line of its own, that two images are fewer than 64 dimensions.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(err) == 2 and all(line.startswith(f"error: cannot read {tmp_path / 'b/1.png'}: {reason}") for line in err)


def test_fid_weights_that_hold_a_pickled_program_are_refused_without_torchs_advice(tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    torch.save({"model": UserError("a pickled object")}, weights)
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / side / f"{i}.png")
    assert exit_status(fid_main, [str(tmp_path / "a"), str(tmp_path / "b"), "--weights", str(weights)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {weights} holds pickled objects other than tensors")
    assert "weights_only" not in err[0]
