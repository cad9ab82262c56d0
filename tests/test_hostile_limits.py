"""Issue 38's remaining traceback families, table-driven: output folders that cannot be made,
seeds out of range, sizes that ask for more memory than there is, a damaged code cache, and Ctrl-C
in prepare and FID. Each ends in one line (exit 2, or 130 for Ctrl-C) and leaves the user's files
as they were."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from models import build_model
from tests.helpers import ROOT, files, refusal, train
from tests.sprites import write_species_folders
from utils import device as device_module
from utils.config import LARGEST_SEED, parse_config
from utils.data.prepare import PrepareOptions, prepare
from utils.device import refuse_beyond_memory
from utils.errors import EXIT_INTERRUPTED, UserError
from utils.io import make_folder
from utils.training.prior import code_grids

PYTHON = sys.executable


def a_file(tmp_path):
    (tmp_path / "taken").write_text("mine")
    return tmp_path / "taken"


def under_a_file(tmp_path):
    return a_file(tmp_path) / "outputs"


def in_proc(tmp_path):
    return "/proc/pixel-vqvae-test"


@pytest.mark.parametrize("where, said", [(a_file, "is a file, not a folder"), (under_a_file, "is a file, not a folder"),
                                         (in_proc, "does not let folders be made")])
def test_a_folder_that_cannot_be_made_is_named_in_one_line(tmp_path, where, said):
    path = where(tmp_path)
    before = files(tmp_path)
    with pytest.raises(UserError, match=said):
        make_folder(path)
    assert files(tmp_path) == before


@pytest.mark.parametrize("where", [a_file, under_a_file])
def test_training_into_an_output_folder_that_is_a_file_is_refused(tmp_path, tiny_data, where):
    output = where(tmp_path)
    done = train("train_vqvae.py", output, tiny_data)
    assert "is a file, not a folder" in refusal(done)
    assert (tmp_path / "taken").read_text() == "mine"


SEEDS = [(2**32, False), (-1, False), (LARGEST_SEED, True), (0, True)]


@pytest.mark.parametrize("seed, fine", SEEDS)
def test_a_config_seed_must_be_32_bits(seed, fine):
    argv = [f"--seed={seed}"]
    if fine:
        assert parse_config({"seed": 42}, argv)["seed"] == seed
    else:
        with pytest.raises(UserError, match=r"from 0 to 4294967295"):
            parse_config({"seed": 42}, argv)


@pytest.mark.parametrize("command", [
    lambda seed, tmp: ["-m", "utils.reproduce", f"--seeds={seed}", "--dry-run", f"--outputs={tmp / 'outputs'}"],
    lambda seed, tmp: ["-m", "utils.data", "prepare", f"--source={tmp}", f"--out={tmp / 'out'}", f"--seed={seed}"],
])
@pytest.mark.parametrize("seed", [2**32, -5])
def test_commands_refuse_a_seed_out_of_range_before_they_plan_or_write(tmp_path, command, seed):
    done = subprocess.run([PYTHON, *command(seed, tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(f"from 0 to 4294967295 (2**32 - 1), got {seed}")
    assert "Traceback" not in done.stderr and files(tmp_path) == {}


def test_a_dry_run_plans_the_largest_seed():
    done = subprocess.run([PYTHON, "-m", "utils.reproduce", f"--seeds={LARGEST_SEED}", "--dry-run", "--only=paper"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"_s{LARGEST_SEED}" in done.stdout


@pytest.mark.parametrize("extra", ["--num_embeddings=2000000000", "--embedding_dim=1000000000"])
def test_a_model_too_big_for_memory_is_refused_before_anything_is_allocated(tmp_path, tiny_data, extra):
    done = train("train_vqvae.py", tmp_path / "outputs", tiny_data, extra)
    line = refusal(done)
    assert "GiB free" in line and "lower num_embeddings" in line
    assert not (tmp_path / "outputs" / "run").exists()


def test_preparing_at_a_size_beyond_memory_is_refused(tmp_path):
    source = tmp_path / "sprites"
    write_species_folders(source, 12, per_species=1)
    with pytest.raises(UserError, match=r"preparing 12 sprites at 100000x100000 needs at least .* GiB"):
        prepare(source, tmp_path / "out", PrepareOptions(image_size=100000, rotations=()), log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_the_memory_check_uses_what_the_device_has_free(monkeypatch):
    monkeypatch.setattr(device_module, "free_memory", lambda device: 1000)
    refuse_beyond_memory(1000, "this", "cpu", "do less")
    with pytest.raises(UserError, match="this needs at least 0.0 GiB, but cpu has 0.0 GiB free; do less"):
        refuse_beyond_memory(1001, "this", "cpu", "do less")
    monkeypatch.setattr(device_module, "free_memory", lambda device: None)
    refuse_beyond_memory(10**18, "this", "cpu", "do less")  # unknown: not refused on a guess


# ---------------------------------------------------------------- a damaged code cache

def truncated(path, grids):
    np.savez_compressed(path, key=np.array("k"), **grids)
    path.write_bytes(path.read_bytes()[:200])


def object_typed(path, grids):
    with open(path, "wb") as f:
        np.savez(f, key=np.array("k"), **{s: np.array([object()] * 2, dtype=object) for s in grids})


def float_codes(path, grids):
    with open(path, "wb") as f:
        np.savez(f, key=np.array("k"), **{s: g.astype(np.float32) + 0.5 for s, g in grids.items()})


def codes_out_of_range(path, grids):
    with open(path, "wb") as f:
        np.savez(f, key=np.array("k"), **{s: g + 1000 for s, g in grids.items()})


def a_split_missing(path, grids):
    with open(path, "wb") as f:
        np.savez(f, key=np.array("k"), train=grids["train"])


@pytest.mark.parametrize("damage, said", [(truncated, "is not a code cache"), (object_typed, "is not a code cache"),
                                          (a_split_missing, "is not a code cache"),
                                          (float_codes, "not grids of codes 0 to 15"),
                                          (codes_out_of_range, "not grids of codes 0 to 15")])
def test_a_damaged_code_cache_is_refused_in_one_line_and_left_alone(tmp_path, damage, said):
    model = build_model("vqvae", {"num_layers": 2, "num_embeddings": 16, "embedding_dim": 4})
    grids = {s: np.zeros((2, 4, 4), np.int32) for s in ("train", "val", "test")}
    path = tmp_path / "codes.npz"
    damage(path, grids)
    before = path.read_bytes()
    with pytest.raises(UserError, match=said) as refused:
        code_grids(model, {s: None for s in grids}, "k", path, 2, torch.device("cpu"))
    assert "\n" not in str(refused.value) and path.read_bytes() == before


# ---------------------------------------------------------------- Ctrl-C

def interrupted(command, busy):
    """Run `command` in its own process group and press Ctrl-C (SIGINT to the group, as a
    terminal does) once `busy()` says it is in the middle of its work; its (exit status, stderr)."""
    # A terminal's program starts with SIGINT at its default, even where the tests run in the
    # background (which ignores it, and an ignored signal stays ignored across exec).
    started = subprocess.Popen([PYTHON, *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not busy(started) and started.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(started.pid, signal.SIGINT)
    _, err = started.communicate(timeout=120)
    return started.returncode, err


def test_ctrl_c_in_prepare_is_one_true_line_and_leaves_the_old_set(tmp_path):
    source = tmp_path / "sprites"
    write_species_folders(source, 40)
    out = tmp_path / "out"
    prepare(source, out, PrepareOptions(image_size=16, rotations=()), log=lambda _: None)
    kept = files(out)
    manifest = (out / "manifest.json").read_bytes()
    # Many rotations: the second prepare is still rendering when the first PNG is in its staging folder.
    rotations = ",".join(str(a) for a in range(1, 90))
    status, err = interrupted(["-m", "utils.data", "prepare", f"--source={source}", f"--out={out}", "--image-size=64",
                               f"--rotations={rotations}", "--force"],
                              lambda _: any(tmp_path.glob(".out.staging-*/*/*.png")))
    assert status == EXIT_INTERRUPTED, err
    assert err.strip().splitlines() == ["interrupted: prepare stopped before its last step; the output folder is as "
                                        "it was before, and nothing half-prepared is left beside it"]
    assert files(out) == kept and (out / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sprites"]


def test_ctrl_c_in_fid_is_one_true_line(tmp_path, random_weights):
    folders = [tmp_path / name for name in ("a", "b")]
    for seed, folder in enumerate(folders):
        folder.mkdir()
        for path, rgba in write_species_folders(tmp_path / "sprites", 15, seed=seed).items():
            Image.fromarray(rgba[..., :3], "RGB").save(folder / path.replace("/", "_"))
    stats = tmp_path / "a.npz"
    status, err = interrupted(["-m", "utils.fid", *map(str, folders), f"--weights={random_weights}", "--dims=64",
                               "--device=cpu", "--batch-size=1", f"--save-stats={stats}"],
                              lambda run: "FID Inception weights" in run.stdout.readline())
    assert status == EXIT_INTERRUPTED, err
    assert err.strip().splitlines()[-1] == ("interrupted: FID stopped; each file it printed as saved is complete, "
                                            "and it wrote no other")
    assert "Traceback" not in err and not stats.exists()
