import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import exit_status
from tests.sprites import sprite_rgba, write_species_folders
from utils.data import fetch, ood
from utils.data.__main__ import main as data_main
from utils.data.fetch import POKESPRITE_INTEGRITY, _integrity, fetch_pokemon, pokemon_species_of_files
from utils.data.load import load_split, resolve_dataset
from utils.data.prepare import SPLITS, PrepareOptions, prepare
from utils.data.sources import _safe_key, species_of
from utils.data.sprites import background, crop_to_canvas, decode_rgba
from utils.errors import UserError

SMALL = PrepareOptions(image_size=24, seed=3)


@pytest.fixture
def source(tmp_path):
    made = write_species_folders(tmp_path / "src", species=10, per_species=2)
    return tmp_path / "src", made


def prepared(tmp_path, src, options=SMALL, name="out"):
    logs = []
    manifest = prepare(src, tmp_path / name, options, log=logs.append, workers=2)
    return manifest, tmp_path / name, logs


def test_split_keeps_every_species_in_one_split(tmp_path, source):
    manifest, out, _ = prepared(tmp_path, source[0])
    species = {s: set(manifest["splits"][s]["species"]) for s in SPLITS}
    assert not species["train"] & species["val"]
    assert not species["train"] & species["test"]
    assert not species["val"] & species["test"]
    assert set().union(*species.values()) == {f"sp{i:02d}" for i in range(10)}
    assert [len(species[s]) for s in SPLITS] == [8, 1, 1]
    for split in SPLITS:
        for name in load_split(out, split).names:
            key = name.split("__")[0]
            assert manifest["sprite_species"][key] in species[split]


def test_counts_per_split_follow_backgrounds_and_augmentations(tmp_path, source):
    manifest, out, _ = prepared(tmp_path, source[0])
    per_sprite = {"train": 6 * 4, "val": 6 * 2, "test": 6 * 2}
    for split in SPLITS:
        entry = manifest["splits"][split]
        assert entry["images"] == entry["sprites"] * per_sprite[split]
        assert len(list((out / split).glob("*.png"))) == entry["images"]
        assert len(load_split(out, split)) == entry["images"]
    assert sum(manifest["splits"][s]["sprites"] for s in SPLITS) == 20


def test_packed_arrays_equal_the_png_files(tmp_path, source):
    _, out, _ = prepared(tmp_path, source[0])
    val = load_split(out, "val")
    for i, name in enumerate(val.names):
        assert np.array_equal(np.asarray(Image.open(out / "val" / name)), val.images[i])


def test_every_output_pixel_is_a_source_colour_or_the_background(tmp_path, source):
    src, made = source
    manifest, out, _ = prepared(tmp_path, src)
    key_to_rgba = {_safe_key(str(Path(rel).with_suffix("")).replace("/", "-")): rgba for rel, rgba in made.items()}
    for split in SPLITS:
        sprites = load_split(out, split)
        for image, mask, name in zip(sprites.images, sprites.masks, sprites.names):
            key, bg, aug = name[:-4].split("__")
            rgba = key_to_rgba[key]
            colours = {tuple(c) for c in rgba[rgba[..., 3] > 0][:, :3]}
            back = background(bg, SMALL.image_size, SMALL.seed, name)
            assert all(tuple(c) in colours for c in image[mask])
            assert np.array_equal(image[~mask], back[~mask])
            assert mask.sum() == (rgba[..., 3] > 0).sum() or aug.startswith("rot")


def test_same_seed_gives_byte_identical_output(tmp_path, source):
    _, a, _ = prepared(tmp_path, source[0], name="a")
    _, b, _ = prepared(tmp_path, source[0], name="b")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "manifest.json")
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files_a == files_b
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    other, _, _ = prepared(tmp_path, source[0], PrepareOptions(image_size=24, seed=4), name="c")
    assert other["splits"]["train"]["species"] != json.loads((a / "manifest.json").read_text())["splits"]["train"]["species"]


def test_a_second_prepare_reuses_the_data_and_a_new_option_rebuilds_it(tmp_path, source):
    first, out, _ = prepared(tmp_path, source[0])
    stamp = (out / "train_images.npy").stat().st_mtime_ns
    again, _, _ = prepared(tmp_path, source[0])
    assert again == first and (out / "train_images.npy").stat().st_mtime_ns == stamp
    changed, _, _ = prepared(tmp_path, source[0], PrepareOptions(image_size=24, seed=3, rotations=()))
    assert changed["splits"]["train"]["images"] == changed["splits"]["train"]["sprites"] * 2 * 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def rgba_in_mode(mode):
    rgba = sprite_rgba(7)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        # a palette image whose index 0 is transparent
        opaque = rgba[..., 3] > 0
        colours = sorted({tuple(c) for c in rgba[opaque][:, :3]})
        index = np.zeros(rgba.shape[:2], np.uint8)
        for i, c in enumerate(colours, start=1):
            index[(rgba[..., :3] == c).all(-1) & opaque] = i
        image = Image.fromarray(index, "P")
        image.putpalette([0, 0, 0] + [v for c in colours for v in c])
        image.info["transparency"] = 0
        return image, rgba
    if mode == "LA":
        grey = rgba[..., :3].mean(-1).astype(np.uint8)
        la = np.stack([grey, rgba[..., 3]], -1)
        expected = np.concatenate([np.repeat(grey[..., None], 3, -1), rgba[..., 3:]], -1)
        return Image.fromarray(la, "LA"), expected
    if mode == "RGB":
        expected = rgba.copy()
        expected[..., 3] = 255
        return Image.fromarray(rgba[..., :3], "RGB"), expected
    return image, rgba


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "RGB"])
def test_every_png_mode_decodes_to_its_exact_colours(mode):
    image, expected = rgba_in_mode(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0) if mode == "P" else image.save(buffer, "PNG")
    got = decode_rgba(buffer.getvalue())
    assert np.array_equal(got[..., 3] > 0, expected[..., 3] > 0)
    opaque = expected[..., 3] > 0
    assert np.array_equal(got[opaque][:, :3], expected[opaque][:, :3])


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = np.array([[0, 32896, 65535]], np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "PNG")
    got = decode_rgba(buffer.getvalue())
    assert got[0, :, 0].tolist() == [0, 128, 255]
    assert got[0, :, 3].tolist() == [255, 255, 255]


def test_bad_files_are_skipped_with_their_names_and_reasons(tmp_path, source):
    src = source[0]
    (src / "sp00" / "empty.png").write_bytes(b"")
    (src / "sp01" / "notes.txt").write_text("not an image")
    good = (src / "sp02" / "0.png").read_bytes()
    (src / "sp02" / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGBA", (8, 8)).save(src / "sp03" / "clear.png")
    manifest, _, logs = prepared(tmp_path, src)
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert reasons["sp00/empty.png"] == "empty file"
    assert reasons["sp01/notes.txt"] == "not an image"
    assert reasons["sp02/truncated.png"].startswith("unreadable image")
    assert reasons["sp03/clear.png"] == "fully transparent"
    assert all(any(f in line for line in logs) for f in reasons)
    assert manifest["sprites"] == 20


def test_duplicate_sprites_are_dropped_before_the_split(tmp_path, source):
    src = source[0]
    (src / "sp09" / "copy.png").write_bytes((src / "sp00" / "0.png").read_bytes())
    manifest, _, _ = prepared(tmp_path, src)
    assert {"file": "sp09/copy.png", "reason": "duplicate of sp00/0.png"} in manifest["skipped"]
    assert "sp09-copy" not in manifest["sprite_species"]


def test_a_sprite_larger_than_the_canvas_is_centre_cropped_and_counted(tmp_path, source):
    src = source[0]
    big = np.zeros((40, 30, 4), np.uint8)
    big[..., 0], big[..., 3] = np.arange(40)[:, None] * 5, 255
    Image.fromarray(big, "RGBA").save(src / "sp04" / "big.png")
    manifest, out, logs = prepared(tmp_path, src)
    assert manifest["centre_cropped"] == ["sp04/big.png"]
    assert "centre-cropped 1 sprite(s) larger than the 24x24 canvas; manifest.json lists them under centre_cropped" in logs
    canvas, cropped = crop_to_canvas(big, 24)
    assert cropped and canvas.shape == (24, 24, 4)
    assert canvas[0, 3, 0] == 8 * 5 and (canvas[..., 3] > 0).sum() == 24 * 24


@pytest.mark.parametrize("bad", ["missing", "empty", "only_junk", "not_a_zip"])
def test_unusable_sources_are_refused_with_a_clear_error(tmp_path, bad):
    src = tmp_path / "src"
    if bad == "empty":
        src.mkdir()
    elif bad == "only_junk":
        src.mkdir()
        (src / "a.png").write_bytes(b"junk")
    elif bad == "not_a_zip":
        src = tmp_path / "src.bin"
        src.write_bytes(b"junk")
    with pytest.raises(UserError, match=str(src.name)):
        prepare(src, tmp_path / "out", SMALL, log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_an_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, source, monkeypatch):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(source[0], tmp_path / "out", SMALL, log=lambda _: None, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_zip_of_sprites_groups_top_level_files_by_the_name_before_double_underscore(tmp_path):
    archive = tmp_path / "sprites.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(12):
            buffer = io.BytesIO()
            Image.fromarray(sprite_rgba(i), "RGBA").save(buffer, "PNG")
            z.writestr(f"hero{i % 6}__{i}.png", buffer.getvalue())
    manifest = prepare(archive, tmp_path / "out", SMALL, log=lambda _: None, workers=2)
    assert manifest["sprite_species"]["hero1--7"] == "hero1"
    assert sum(len(manifest["splits"][s]["species"]) for s in SPLITS) == 6
    assert species_of("mario/walk1.png") == "mario"
    assert species_of("link.png") == "link"


def test_pokemon_files_map_to_species_from_the_package_data(tmp_path):
    entries = {
        "122": {"slug": {"eng": "mr-mime"}, "gen-8": {"forms": {"$": {}, "galar": {}}}},
        "250": {"slug": {"eng": "ho-oh"}, "gen-8": {"forms": {"$": {}}}},
        "474": {"slug": {"eng": "porygon-z"}, "gen-8": {"forms": {"$": {}}}},
        "785": {"slug": {"eng": "tapu-koko"}, "gen-8": {"forms": {"$": {}}}},
    }
    path = tmp_path / "pokemon.json"
    path.write_text(json.dumps(entries))
    stems = pokemon_species_of_files(path)
    assert stems == {"mr-mime": "122", "mr-mime-galar": "122", "ho-oh": "250", "porygon-z": "474", "tapu-koko": "785"}


def fake_package(folder, sprite_names=("bulbasaur",)):
    tarball = Path(folder) / "fake.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        add("data/pokemon.json", b"{}")
        add("license.md", b"MIT")
        add("unused/readme.md", b"not kept")
        for stem in sprite_names:
            buffer = io.BytesIO()
            Image.fromarray(sprite_rgba(1), "RGBA").save(buffer, "PNG")
            add(f"pokemon-gen8/regular/{stem}.png", buffer.getvalue())
    return tarball


def _not_the_pinned_deb(folder):
    deb = Path(folder) / "angband-data_3.5.1-2.5_all.deb"
    deb.write_bytes(b"!<arch>\nnot the pinned package")
    return deb


# Each fetcher, and a download that is well formed but not the file its pin names.
FETCHERS = {"pokemon": (lambda root, fake: fetch_pokemon(root, pack=fake), fake_package),
            "angband": (lambda root, fake: ood.fetch_angband(root, download=fake), _not_the_pinned_deb)}


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_a_tampered_download_is_refused_and_leaves_no_data(tmp_path, fetcher):
    fetch, tampered = FETCHERS[fetcher]
    with pytest.raises(UserError, match="does not match its published (integrity|SHA256)"):
        fetch(tmp_path / "original" / fetcher, tampered)
    assert list((tmp_path / "original").iterdir()) == []


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_a_failed_download_leaves_no_data(tmp_path, fetcher):
    def broken(folder):
        (Path(folder) / "partial.tgz").write_bytes(b"\x1f\x8b")
        raise UserError("download failed: network down")

    with pytest.raises(UserError, match="network down"):
        FETCHERS[fetcher][0](tmp_path / fetcher, broken)
    assert list(tmp_path.iterdir()) == []


def test_a_verified_download_unpacks_only_what_is_used_and_is_not_fetched_twice(tmp_path, monkeypatch):
    calls = []

    # One tarball, copied for each fetch: gzip stamps the time into its header, so two built a
    # second apart differ.
    built = fake_package(tmp_path)

    def pack(folder):
        calls.append(folder)
        return Path(shutil.copy(built, folder))

    expected = _integrity(built)
    monkeypatch.setattr(fetch, "POKESPRITE_INTEGRITY", expected)
    root = fetch_pokemon(tmp_path / "pokemon", pack=pack)
    kept = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert kept == ["SOURCE.json", "data/pokemon.json", "license.md", "pokemon-gen8/regular/bulbasaur.png"]
    fetch_pokemon(tmp_path / "pokemon", pack=pack)
    assert len(calls) == 1


def test_a_packed_array_holding_pickled_objects_is_refused_not_unpickled(tmp_path, source):
    _, out, _ = prepared(tmp_path, source[0])
    np.save(out / "val_images.npy", np.array([object()] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match=f"the packed val split in {out} cannot be read .*Object arrays cannot be loaded"):
        load_split(out, "val")


@pytest.mark.parametrize("damage", ["{not json", '{"parameters": {}}'])
def test_a_damaged_manifest_is_a_clear_error(tmp_path, source, damage):
    _, out, _ = prepared(tmp_path, source[0])
    (out / "manifest.json").write_text(damage)
    with pytest.raises(UserError, match="manifest.json is damaged; prepare the data set again with --force"):
        resolve_dataset(str(out), SMALL.image_size)


def test_the_command_line_reports_a_bad_source_in_one_line(tmp_path, capsys):
    assert exit_status(data_main, ["prepare", "--source", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and err[0].startswith("error:")


@pytest.mark.e2e
def test_real_pokemon_sprites_prepare_with_no_species_shared():
    manifest = prepare(log=print)
    species = {s: set(manifest["splits"][s]["species"]) for s in SPLITS}
    assert not (species["train"] & species["val"] or species["train"] & species["test"] or species["val"] & species["test"])
    assert sum(map(len, species.values())) == 905
    assert manifest["sprite_species"]["mr-mime-galar_regular"] == manifest["sprite_species"]["mr-mime_shiny"] == "122"
    train = manifest["splits"]["train"]
    assert train["images"] == 24 * train["sprites"] and 0.75 < len(species["train"]) / 905 < 0.85
    assert manifest["source"]["integrity"] == POKESPRITE_INTEGRITY
