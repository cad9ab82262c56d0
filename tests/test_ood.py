"""The out-of-domain test set: the pinned Debian package, its tiles cut on their grid, and
preparation with every sprite in the test split."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.sprites import write_species_folders
from utils.data import ood
from utils.data.__main__ import OOD_SETS, main as data_main
from utils.data.load import load_split
from utils.data.prepare import SPLITS, PrepareOptions, prepare, source_fingerprint
from utils.errors import UserError

TILE = 4  # the fake package's tile sizes are scaled down to this and twice this


def _png(rgba):
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def fake_sheet(tile):
    """A 2x4 sheet: two drawn sprites, an empty cell, a terrain tile, a shadowed sprite, a sprite of
    tile * tile - 1 colours (drawn at 4x4 and 8x8, rendered at 16x16) and two more empty cells."""
    sheet = np.zeros((2 * tile, 4 * tile, 4), np.uint8)

    def cell(row, col):
        return sheet[row * tile:(row + 1) * tile, col * tile:(col + 1) * tile]
    cell(0, 0)[1:3, 1:3] = [200, 40, 40, 255]
    cell(0, 1)[0, :] = [40, 160, 60, 255]
    cell(0, 1)[1, 0] = [30, 30, 120, 255]
    # (0, 2) stays empty
    cell(0, 3)[:] = [90, 60, 20, 255]
    cell(1, 0)[0, 0] = [250, 220, 90, 255]
    cell(1, 0)[1, 1] = [0, 0, 0, 128]
    shades = np.arange(tile * tile - 1, dtype=np.uint8)
    rendered = np.zeros((tile * tile, 4), np.uint8)
    rendered[1:] = np.stack([shades * 3, shades, 255 - shades, np.full_like(shades, 255)], 1)
    cell(1, 1)[:] = rendered.reshape(tile, tile, 4)
    return sheet


def _ar(members):
    out = b"!<arch>\n"
    for name, body in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        out += b"\n" if len(body) % 2 else b""
    return out


def fake_deb(folder, tile=TILE):
    """A .deb laid out as angband-data is, with small sheets, and a GPL sheet the fetch must leave."""
    files = {ood.ANGBAND_COPYRIGHT: b"License: CC-BY-3\n", "usr/share/angband/xtra/graf/8x8.png": b"GPL tiles"}
    sizes = {"bolt16": tile, "gervais32": 2 * tile}
    for name, info in ood.ANGBAND_TILESETS.items():
        files[info["file"]] = _png(fake_sheet(sizes[name]))
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for path, body in files.items():
            member = tarfile.TarInfo("./" + path)
            member.size = len(body)
            tar.addfile(member, io.BytesIO(body))
    deb = Path(folder) / "angband-data_3.5.1-2.5_all.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", tar_bytes.getvalue())]))
    return deb


@pytest.fixture
def pinned(monkeypatch, tmp_path):
    """The fake package's own SHA256 pinned in place of the real one."""
    (tmp_path / "deb").mkdir()
    monkeypatch.setattr(ood, "ANGBAND_SHA256", ood.sha256_of(fake_deb(tmp_path / "deb")))
    monkeypatch.setitem(ood.ANGBAND_TILESETS, "bolt16", {**ood.ANGBAND_TILESETS["bolt16"], "tile_size": TILE})
    monkeypatch.setitem(ood.ANGBAND_TILESETS, "gervais32", {**ood.ANGBAND_TILESETS["gervais32"], "tile_size": 2 * TILE})


def test_a_verified_package_is_cut_into_its_drawn_sprites_only_and_not_fetched_twice(tmp_path, pinned):
    calls = []

    def download(folder):
        calls.append(folder)
        return fake_deb(folder)

    root = ood.fetch_angband(tmp_path / "angband", download=download)
    kept = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert kept == ["SOURCE.json", "copyright", "sheets/bolt16.png", "sheets/gervais32.png",
                    "tiles/bolt16__r00c000.png", "tiles/bolt16__r00c001.png", "tiles/bolt16__r01c001.png",
                    "tiles/gervais32__r00c000.png", "tiles/gervais32__r00c001.png", "tiles/gervais32__r01c001.png"]
    sheet = fake_sheet(2 * TILE)
    # Cut on the grid, exactly: the tile is the sheet's cell, pixel for pixel, alpha included.
    assert np.array_equal(np.asarray(Image.open(root / "tiles/gervais32__r00c001.png")),
                          sheet[:2 * TILE, 2 * TILE:4 * TILE])
    source = json.loads((root / "SOURCE.json").read_text())
    assert source["version"] == "1:3.5.1-2.5" and source["sha256"] == ood.ANGBAND_SHA256
    assert source["tilesets"]["gervais32"]["cells"] == 8 and source["tilesets"]["gervais32"]["kept"] == 3
    assert source["tilesets"]["bolt16"]["left_out"] == {"empty": 3, "terrain": 1, "partly_transparent": 1,
                                                         "too_many_colours": 0}
    assert (root / "copyright").read_bytes() == b"License: CC-BY-3\n"
    ood.fetch_angband(tmp_path / "angband", download=download)
    assert len(calls) == 1


def test_a_tile_of_more_than_the_colour_limit_is_left_out():
    sheet = fake_sheet(16)  # 255 colours in the rendered cell at 16x16, one at 4x4
    kept, left_out = ood.cut_tiles(sheet, 16)
    assert sorted(kept) == [(0, 0), (0, 1)]
    assert left_out == {"empty": 3, "terrain": 1, "partly_transparent": 1, "too_many_colours": 1}


def test_a_package_lacking_a_sheet_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "deb").mkdir()
    deb = fake_deb(tmp_path / "deb")
    monkeypatch.setattr(ood, "ANGBAND_SHA256", ood.sha256_of(deb))
    monkeypatch.setitem(ood.ANGBAND_TILESETS, "bolt16", {**ood.ANGBAND_TILESETS["bolt16"],
                                                         "file": "usr/share/angband/xtra/graf/64x64.png"})
    with pytest.raises(UserError, match="lacks .*64x64.png"):
        ood.fetch_angband(tmp_path / "original" / "angband", download=lambda folder: deb)
    assert list((tmp_path / "original").iterdir()) == []


def test_test_only_puts_every_sprite_in_test_on_white_and_black_unaugmented(tmp_path):
    made = write_species_folders(tmp_path / "src", species=3, per_species=2)
    options = PrepareOptions(image_size=24, flip=False, rotations=(), test_only=True)
    manifest = prepare(tmp_path / "src", tmp_path / "out", options, log=lambda _: None, workers=1)
    assert [manifest["splits"][s]["sprites"] for s in SPLITS] == [0, 0, 6]
    assert manifest["splits"]["test"]["species"] == ["sp00", "sp01", "sp02"]
    test = load_split(tmp_path / "out", "test")
    assert len(test) == 12 and sorted({n.split("__", 1)[1] for n in test.names}) == ["black__orig.png", "white__orig.png"]
    i = test.names.index("sp01-1__black__orig.png")
    rgba = made["sp01/1.png"]
    assert test.masks[i].sum() == (rgba[..., 3] > 0).sum()
    assert (test.images[i][~test.masks[i]] == 0).all()
    with pytest.raises(UserError, match="is an evaluation set.* it has no train split"):
        load_split(tmp_path / "out", "train")


@pytest.mark.parametrize("flags, rotations", [([], []), (["--rotations=+15"], [15])])
def test_the_test_only_flag_turns_augmentation_off_unless_rotations_are_asked_for(tmp_path, flags, rotations, capsys):
    write_species_folders(tmp_path / "src", species=2, per_species=1)
    out = tmp_path / "out"
    assert data_main(["prepare", "--source", str(tmp_path / "src"), "--out", str(out), "--image-size", "24",
                      "--test-only", *flags]) == 0
    params = json.loads((out / "manifest.json").read_text())["parameters"]
    assert (params["test_only"], params["flip"], params["rotations"]) == (True, False, rotations)
    assert len(load_split(out, "test")) == 2 * 2 * (1 + len(rotations))


def test_prepare_set_fetches_the_pinned_package_and_records_it(tmp_path, pinned, monkeypatch, capsys):
    monkeypatch.setitem(OOD_SETS, "angband",
                        lambda: ood.fetch_angband(tmp_path / "original" / "angband", download=fake_deb))
    out = tmp_path / "prepared"
    assert data_main(["prepare", "--set", "angband", "--out", str(out), "--image-size", "16"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    tiles = tmp_path / "original/angband/tiles"
    assert manifest["source"] == {"path": str(tiles.resolve()), "package": "angband-data", "version": "1:3.5.1-2.5",
                                  "sha256": ood.ANGBAND_SHA256, "fingerprint": source_fingerprint(tiles)}
    # Six tiles, the red square the same at both sizes once cropped: five sprites, ten images.
    assert manifest["sprites"] == 5 and manifest["splits"]["test"]["images"] == 10
    assert manifest["skipped"] == [{"file": "gervais32__r00c000.png", "reason": "duplicate of bolt16__r00c000.png"}]
    assert manifest["parameters"]["test_only"] and manifest["parameters"]["rotations"] == []


def test_set_and_source_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        data_main(["prepare", "--set", "angband", "--source", str(tmp_path)])
    assert "--set and --source" in capsys.readouterr().err


def test_a_set_prepared_before_test_only_existed_is_still_reused(tmp_path):
    write_species_folders(tmp_path / "src", species=10, per_species=1)
    options = PrepareOptions(image_size=16, rotations=())
    prepare(tmp_path / "src", tmp_path / "out", options, log=lambda _: None, workers=1)
    manifest_path = tmp_path / "out" / "manifest.json"
    old = json.loads(manifest_path.read_text())
    del old["parameters"]["test_only"]
    old["prepare_seconds"] = -1.0  # a mark that survives only if the set is reused
    manifest_path.write_text(json.dumps(old))
    assert prepare(tmp_path / "src", tmp_path / "out", options, log=lambda _: None, workers=1)["prepare_seconds"] == -1.0
