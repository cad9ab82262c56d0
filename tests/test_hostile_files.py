"""Nothing of the user's is lost or mixed in (issue 38): each case, by family, leaves the user's
files byte for byte as they were and says why in one `error:` line, exit status 2.

Every case runs in-process on tiny synthetic sprites or on a copy of conftest's tiny experiment."""
import json
import os
import shutil

import pytest
import torch

from tests.helpers import exit_status, files
from tests.sprites import write_species_folders
from utils import reconstruct
from utils.data.__main__ import main as data_main
from utils.data.prepare import PrepareOptions, prepare, source_fingerprint
from utils.errors import UserError
from utils.training.checkpoints import load_training_checkpoint, record_resume_changes
from utils.training.experiment import experiment_lock, prepare_output_dir

QUIET = dict(log=lambda _: None, workers=1)
OPTIONS = PrepareOptions(image_size=16, rotations=())


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------- prepare replaces only what it made


def web_app(folder):
    (folder / "icons").mkdir(parents=True)
    (folder / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    (folder / "index.html").write_text("<html>years of work</html>")
    (folder / "icons/app.png").write_bytes(b"\x89PNG not really")


def lone_manifest(folder):
    folder.mkdir()
    (folder / "manifest.json").write_text('{"name": "a browser extension"}')


def a_prepared_set_with_a_users_file(folder):
    prepare(folder.parent / "src", folder, OPTIONS, **QUIET)
    (folder / "notes.txt").write_text("mine")


NOT_PREPARED_HERE = {  # what is at --out: (how to make it, the reason the line gives)
    "a_web_app_holding_a_manifest_json": (web_app, "it holds icons, index.html"),
    "a_manifest_json_alone": (lone_manifest, "it holds a manifest.json alone"),
    "a_prepared_set_with_a_users_file_added": (a_prepared_set_with_a_users_file, "it holds notes.txt"),
}


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("case", NOT_PREPARED_HERE)
def test_prepare_even_forced_replaces_only_a_folder_it_made(tmp_path, capsys, case, force):
    write_species_folders(tmp_path / "src", species=10)
    make, reason = NOT_PREPARED_HERE[case]
    out = tmp_path / "out"
    make(out)
    before = files(out)
    argv = ["prepare", "--source", str(tmp_path / "src"), "--out", str(out), "--image-size", "16"]
    assert exit_status(data_main, argv + (["--force"] if force else [])) == 2
    assert one_error_line(capsys) == (f"error: {out} exists and is not a data set this project prepared ({reason}); "
                                      "it is left alone: choose another --out")
    assert files(out) == before


def add_sprite(src):
    shutil.copy(src / "sp00/0.png", src / "sp00/9.png")


def delete_sprite(src):
    (src / "sp01/1.png").unlink()


def edit_sprite(src):
    path = src / "sp02/0.png"
    path.write_bytes(path.read_bytes() + b"\0")


@pytest.mark.parametrize("change", [add_sprite, delete_sprite, edit_sprite])
def test_a_prepared_set_whose_source_changed_is_not_reused_silently(tmp_path, change):
    src, out = tmp_path / "src", tmp_path / "out"
    write_species_folders(src, species=10)
    prepare(src, out, OPTIONS, **QUIET)
    before = files(out)
    change(src)
    with pytest.raises(UserError) as refused:
        prepare(src, out, OPTIONS, **QUIET)
    assert str(refused.value) == (f"{src} changed since {out} was prepared from it (sprites added, removed or edited); "
                                  f"prepare it again with `python -m utils.data prepare --source {src} --force`")
    assert files(out) == before
    assert prepare(src, out, OPTIONS, force=True, **QUIET)["source"]["fingerprint"] == source_fingerprint(src)


def test_a_manifest_from_before_the_fingerprint_is_reused_silently(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_species_folders(src, species=10)
    manifest = prepare(src, out, OPTIONS, **QUIET)
    del manifest["source"]["fingerprint"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    add_sprite(src)
    assert prepare(src, out, OPTIONS, **QUIET) == manifest


@pytest.mark.parametrize("species", [1, 5])
def test_too_few_species_for_the_splits_is_refused_saying_how_many_are_needed(tmp_path, capsys, species):
    write_species_folders(tmp_path / "src", species=species, per_species=1)
    out = tmp_path / "out"
    assert exit_status(data_main, ["prepare", "--source", str(tmp_path / "src"), "--out", str(out)]) == 2
    assert one_error_line(capsys) == (
        f"error: only {species} species: too few to split into train, val and test (with val fraction 0.1 and "
        "test fraction 0.1 a split of at least one species each needs 6 species; a species is a sprite's first folder)")
    assert not out.exists()


# ---------------------------------------------------------------- an experiment folder holds only a run's files

NEW_RUN = {"resume": False, "overwrite": False}


def test_a_folder_of_the_users_tmp_files_is_not_taken_for_an_empty_one(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "draft.tmp").write_text("mine")
    (out / ".model.pt.abcd1234.tmp").write_text("named like a half-written file, yet mine")
    before = files(out)
    with pytest.raises(UserError, match="holds 2 file.s. that are not an experiment's"):
        prepare_output_dir(out, NEW_RUN)
    assert files(out) == before


def test_only_the_half_written_copies_of_a_runs_own_files_are_removed(tiny_experiment, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_experiment, out)
    (out / ".checkpoint.pt.abcd1234.tmp").write_bytes(b"half")
    (out / ".reconstructions.abcd1234.tmp").mkdir()  # a folder is no half-written file
    (out / ".notes.txt.abcd1234.tmp").write_text("mine")
    (out / "draft.tmp").write_text("mine")
    prepare_output_dir(out, {"resume": False, "overwrite": True})
    assert not (out / ".checkpoint.pt.abcd1234.tmp").exists()
    assert (out / ".reconstructions.abcd1234.tmp").is_dir()
    assert (out / ".notes.txt.abcd1234.tmp").read_text() == (out / "draft.tmp").read_text() == "mine"


def users_file(path):
    path.write_text("my notes, not a pid\n")


def fifo(path):
    os.mkfifo(path)


def link(path):
    (path.parent / "elsewhere").write_text("12\n")
    path.symlink_to(path.parent / "elsewhere")


def folder(path):
    path.mkdir()
    (path / "kept").write_text("mine")


@pytest.mark.parametrize("make", [users_file, fifo, link, folder])
def test_something_of_the_users_at_the_locks_name_is_refused_untouched(tmp_path, make):
    make(tmp_path / ".run.lock")
    before = {p.name: os.lstat(p).st_mode for p in tmp_path.rglob("*")}
    contents = files(tmp_path)
    with pytest.raises(UserError, match=r"\.run\.lock is not a lock file this project made, so it is left alone"):
        with experiment_lock(tmp_path / "run"):
            pass
    assert {p.name: os.lstat(p).st_mode for p in tmp_path.rglob("*")} == before
    assert files(tmp_path) == contents


def test_a_lock_left_by_a_killed_run_is_still_taken(tmp_path):
    (tmp_path / ".run.lock").write_text("4242\n")
    with experiment_lock(tmp_path / "run"):
        assert (tmp_path / ".run.lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / ".run.lock").exists()


# ---------------------------------------------------------------- reconstruct writes apart from its inputs


@pytest.fixture
def art(tmp_path, tiny_experiment):
    write_species_folders(tmp_path / "art/inputs", species=1, per_species=1)
    shutil.copytree(tiny_experiment, tmp_path / "outputs/exp")
    return tmp_path


OUTSIDE = {  # the output folder, relative to `art`, and the start of the reason
    "the_input_folder": ("art/inputs/sp00", "would be written in or around the input folder"),
    "inside_the_input_folder": ("art/inputs/sp00/out", "would be written in or around the input folder"),
    "around_the_input_folder": ("art/inputs", "would be written in or around the input folder"),
    "an_experiment": ("outputs/exp", "is inside the experiment"),
    "inside_an_experiment": ("outputs/exp/reconstructions", "is inside the experiment"),
}


@pytest.mark.parametrize("case", OUTSIDE)
def test_reconstruct_never_writes_into_its_inputs_or_an_experiment(art, capsys, case):
    out, reason = OUTSIDE[case]
    before = files(art)
    assert exit_status(reconstruct.main, [str(art / "outputs/exp"), str(art / "art/inputs/sp00"), str(art / out)]) == 2
    assert reason in one_error_line(capsys)
    assert files(art) == before


# ---------------------------------------------------------------- resume continues only what it can


def test_resume_of_a_finished_run_without_its_checkpoint_is_refused_truthfully(tiny_experiment, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_experiment, out)
    (out / "checkpoint.pt").unlink()
    before = files(out)
    with pytest.raises(UserError) as refused:
        prepare_output_dir(out, {"resume": True, "overwrite": False})
    assert str(refused.value) == (f"{out} holds a finished run (model.pt, metrics.json) but no checkpoint.pt to "
                                  "continue it from, so it is left as it is; train longer under another "
                                  "--experiment_name, or replace it with --overwrite=True")
    assert files(out) == before


@pytest.fixture(scope="module")
def checkpoint(tiny_experiment):
    return torch.load(tiny_experiment / "checkpoint.pt", weights_only=True)


REFUSED_ON_RESUME = {"batch_size": 4, "ssim_weight": 0.5, "commitment_cost": 0.5, "max_train_images": 3,
                     "precision": "bf16"}


@pytest.mark.parametrize("key", REFUSED_ON_RESUME)
def test_resume_refuses_a_setting_that_would_make_another_experiment(tiny_experiment, checkpoint, key):
    config = dict(checkpoint["config"], **{key: REFUSED_ON_RESUME[key]})
    with pytest.raises(UserError) as refused:
        load_training_checkpoint(tiny_experiment / "checkpoint.pt", config, checkpoint["model_type"])
    # A loss weight that the architecture check names is refused by it; either way the key is named.
    assert f"{key} (checkpoint {checkpoint['config'][key]!r}, config {REFUSED_ON_RESUME[key]!r})" in str(refused.value)


def test_an_allowed_change_on_resume_is_printed_and_kept_in_the_history(tiny_experiment, checkpoint, capsys):
    config = dict(checkpoint["config"], epochs=5, num_fusions=1, resume=True)
    saved = load_training_checkpoint(tiny_experiment / "checkpoint.pt", config, checkpoint["model_type"])
    record_resume_changes(saved, config, checkpoint["model_type"])
    assert saved["history"][-1]["changed_after"] == {"epochs": [2, 5], "num_fusions": [2, 1]}
    assert capsys.readouterr().out == "changed on resume after epoch 2: epochs 2 -> 5, num_fusions 2 -> 1\n"


def test_a_checkpoint_holding_nans_is_refused_not_blamed_on_the_learning_rate(checkpoint, tmp_path):
    damaged = dict(checkpoint, model=dict(checkpoint["model"]))
    name = next(k for k, v in damaged["model"].items() if v.is_floating_point())
    damaged["model"][name] = torch.full_like(damaged["model"][name], float("nan"))
    torch.save(damaged, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match=f"holds non-finite weights \\({name}"):
        load_training_checkpoint(tmp_path / "checkpoint.pt", checkpoint["config"], checkpoint["model_type"])
