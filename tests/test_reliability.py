"""A run killed at any moment resumes exactly; a bad input is one clear line and loses nothing.

Every run here is a real training subprocess on tiny settings; tests/fail_at.py kills it, or
fills its disk, at a chosen point without any hook in the code under test."""
import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, files, refusal, train, train_command
from tests.sprites import write_species_folders
from utils.data.load import prepared_folder

SCRIPT = "train_vae.py"
STEPS_PER_EPOCH = 6
RUN = ["--epochs=3", f"--max_train_images={STEPS_PER_EPOCH * 8}"]  # batches of 8
TIMINGS = {"train_seconds", "train_images_per_second"}


def run(output_dir, data_dir, *extra, fail_at=None):
    return train(SCRIPT, output_dir, data_dir, *RUN, *extra, fail_at=fail_at)


def results(folder):
    """A finished run's weights, and its metrics, history and reconstructions less wall-clock times."""
    weights = torch.load(folder / "model.pt", weights_only=True)["model"]
    metrics = {k: v for k, v in json.loads((folder / "metrics.json").read_text()).items() if k not in TIMINGS}
    history = [{k: v for k, v in row.items() if k not in TIMINGS}
               for row in json.loads((folder / "history.json").read_text())]
    return weights, metrics, history, files(folder / "reconstructions")


def assert_same_results(folder, reference):
    weights, *rest = results(folder)
    expected, *expected_rest = results(reference)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert rest == expected_rest


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = run(out, tiny_data)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "run"


@pytest.fixture
def experiment(tmp_path, uninterrupted):
    """A copy of a finished experiment to be refused and left unchanged."""
    shutil.copytree(uninterrupted, tmp_path / "run")
    return tmp_path / "run"


KILLS = {  # where the run dies: (fail_at point, what the resumed run says)
    "in_epoch_1_before_any_checkpoint": (
        "kill:step:3", ["holds no complete checkpoint (the run stopped during its first epoch); starting at epoch 1"]),
    "while_writing_the_first_checkpoint": (
        "kill:save:checkpoint.pt:1", ["removed 1 half-written file(s) left by an interrupted run: .checkpoint.pt.",
                                      "starting at epoch 1"]),
    "in_epoch_2": (
        f"kill:step:{STEPS_PER_EPOCH + 3}", ["checkpoint.pt after epoch 1"]),
    "while_writing_the_second_checkpoint": (
        "kill:save:checkpoint.pt:2", ["removed 1 half-written file(s) left by an interrupted run: .checkpoint.pt.",
                                      "checkpoint.pt after epoch 1"]),
    "while_writing_model_pt_after_the_last_checkpoint": (
        "kill:save:model.pt:1", ["removed 1 half-written file(s) left by an interrupted run: .model.pt.",
                                 "checkpoint.pt after epoch 3"]),
    "before_metrics_json_is_renamed_into_place": (
        "kill:rename:metrics.json:1", ["removed 1 half-written file(s) left by an interrupted run: .metrics.json.",
                                       "checkpoint.pt after epoch 3"]),
}


@pytest.mark.parametrize("point, told", list(KILLS.values()), ids=list(KILLS))
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_data, uninterrupted, point, told):
    killed = run(tmp_path, tiny_data, fail_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "run/metrics.json").exists()
    resumed = run(tmp_path, tiny_data, "--resume=True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for line in told:
        assert line in resumed.stdout
    assert not list(tmp_path.rglob("*.tmp"))
    assert_same_results(tmp_path / "run", uninterrupted)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_last_checkpoint_resumes(
        tmp_path, tiny_data, uninterrupted):
    full = run(tmp_path, tiny_data, fail_at="full:save:checkpoint.pt:2")
    checkpoint = (tmp_path / "run/checkpoint.pt").resolve()
    assert refusal(full) == (f"error: cannot write {checkpoint}: No space left on device; "
                             "the checkpoint.pt there before, if any, is unchanged")
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0
    assert not list(tmp_path.rglob("*.tmp"))
    resumed = run(tmp_path, tiny_data, "--resume=True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_results(tmp_path / "run", uninterrupted)


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data):
    assert run(tmp_path, tiny_data, "--epochs=1").returncode == 0
    kept = {name: data for name, data in files(tmp_path / "run").items() if name != "config.json"}
    # One Adam step at this rate moves every weight by about 1e30, so the next step's loss overflows.
    diverged = run(tmp_path, tiny_data, "--epochs=2", "--resume=True", "--learning_rate=1e30")
    assert refusal(diverged) == ("error: the training loss became non-finite at step 2 of epoch 2; stopped, and "
                                 "the last good checkpoint is kept (lower learning_rate, then --resume=True)")
    assert {name: files(tmp_path / "run")[name] for name in kept} == kept
    resumed = run(tmp_path, tiny_data, "--epochs=2", "--resume=True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["epochs"] == 2 and np.isfinite(metrics["mse"])


def test_a_source_folder_of_only_unreadable_files_is_refused_naming_each(tmp_path):
    source = tmp_path / f"unreadable-{tmp_path.name}"
    write_species_folders(tmp_path / "good", species=1, per_species=1)
    png = (tmp_path / "good/sp00/0.png").read_bytes()
    half = len(png) // 2
    bad = {"a/empty.png": b"", "b/truncated.png": png[:half],
           "c/corrupt.png": png[:half] + bytes(255 - byte for byte in png[half:]), "d/notes.txt": b"not an image"}
    for name, data in bad.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    done = run(tmp_path, source)
    assert refusal(done) == f"error: none of the 4 files in {source} is a usable sprite"
    skipped = [line for line in done.stdout.splitlines() if line.startswith("skipped ")]
    said = ["skipped a/empty.png: empty file", "skipped b/truncated.png: unreadable image (",
            "skipped c/corrupt.png: unreadable image (", "skipped d/notes.txt: not an image"]
    assert len(skipped) == len(said) and all(line.startswith(s) for line, s in zip(skipped, said))
    assert not prepared_folder(str(source)).exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_an_empty_or_missing_data_folder_is_refused(tmp_path, case):
    source = tmp_path / "sprites" if case == "empty" else tmp_path / "no/such/path"
    if case == "empty":
        source.mkdir()
    message = {"empty": f"no files found in sprite source {source}",
               "missing": f"sprite source {source} does not exist"}[case]
    assert refusal(run(tmp_path, source)) == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_a_data_set_prepared_at_another_size_is_refused(tmp_path, tiny_data):
    done = run(tmp_path, tiny_data, "--image_size=24")
    assert refusal(done) == f"error: {tiny_data} was prepared at 16x16, but image_size is 24"
    assert not (tmp_path / "run").exists()


def test_resume_from_a_truncated_checkpoint_is_refused_and_touches_nothing(experiment, tiny_data):
    checkpoint = experiment / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    before = files(experiment)
    line = refusal(run(experiment.parent, tiny_data, "--resume=True"))
    assert line == (f"error: checkpoint {checkpoint.resolve()} cannot be loaded safely: "
                    "PytorchStreamReader failed reading zip archive: failed finding central directory")
    assert files(experiment) == before


def test_resume_from_a_weights_only_model_file_is_refused_naming_what_it_lacks(experiment, tiny_data):
    shutil.copy(experiment / "model.pt", experiment / "checkpoint.pt")
    before = files(experiment)
    line = refusal(run(experiment.parent, tiny_data, "--resume=True"))
    assert line == (f"error: {(experiment / 'checkpoint.pt').resolve()} is not a training checkpoint "
                    "(it lacks optimizer, epoch, history, rng); start without --resume")
    assert files(experiment) == before


def test_a_folder_that_is_not_an_experiment_is_never_written_or_deleted(tmp_path, tiny_data):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite=True"]):
        line = refusal(run(tmp_path, tiny_data, *extra))
        assert line == (f"error: {(tmp_path / 'run').resolve()} holds 1 file(s) that are not an experiment's, "
                        "such as thesis.tex; choose another --experiment_name or --output_dir")
    assert files(tmp_path / "run") == {"thesis.tex": b"years of work"}


def test_overwrite_with_a_mistake_in_the_new_config_keeps_the_old_experiment(experiment, tiny_data):
    before = files(experiment)
    done = run(experiment.parent, tiny_data, "--overwrite=True", "--image_size=24")
    assert refusal(done) == f"error: {tiny_data} was prepared at 16x16, but image_size is 24"
    assert files(experiment) == before


def test_a_users_folder_holding_a_config_json_is_not_taken_for_an_experiment(tmp_path, tiny_data):
    mine = {"config.json": b'{"mine": true}', "notes.txt": b"notes", "src/model.py": b"print()"}
    for name, data in mine.items():
        (tmp_path / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / name).write_bytes(data)
    for extra in (["--overwrite=True"], ["--resume=True"]):
        line = refusal(run(tmp_path, tiny_data, *extra))
        assert line == (f"error: {(tmp_path / 'run').resolve()} holds a config.json but no .experiment, the mark "
                        "of a folder this project's training made, so it is left alone; choose another "
                        "--experiment_name or --output_dir (an experiment made before the mark existed: "
                        "create an empty .experiment in it)")
    assert files(tmp_path / "run") == mine


def test_a_folder_of_hidden_files_is_not_an_experiment_either(tmp_path, tiny_data):
    (tmp_path / "run/.git").mkdir(parents=True)
    (tmp_path / "run/.git/HEAD").write_text("ref: main")
    line = refusal(run(tmp_path, tiny_data, "--overwrite=True"))
    assert line.endswith("holds 1 file(s) that are not an experiment's, such as .git; "
                         "choose another --experiment_name or --output_dir")
    assert files(tmp_path / "run") == {".git/HEAD": b"ref: main"}


@pytest.mark.parametrize("mistake", ["--batch_size=0", "--latent_dim=0", "--seed=-1"])
def test_overwrite_with_a_config_that_would_fail_keeps_the_old_experiment_whole(experiment, tiny_data, mistake):
    before = files(experiment)
    assert refusal(run(experiment.parent, tiny_data, "--overwrite=True", mistake)).startswith(
        f"error: {mistake.partition('=')[0]} must be")
    assert files(experiment) == before


def test_a_run_on_an_experiment_that_another_run_holds_is_refused_naming_it(tmp_path, tiny_data):
    from utils.io import exclusive_lock
    with exclusive_lock(tmp_path / ".run.lock", "experiment run"):
        line = refusal(run(tmp_path, tiny_data))
    assert line == (f"error: experiment run is in use by another run (process {os.getpid()}); wait for it "
                    "to end, or choose another --experiment_name")
    assert not (tmp_path / "run").exists()


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path, tiny_data):
    (tmp_path / ".run.lock").write_text("999999999\n")
    done = run(tmp_path, tiny_data, "--epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / ".run.lock").exists()


def test_two_runs_started_together_on_one_experiment_leave_one_runs_outputs(tmp_path, tiny_data):
    commands = [train_command(SCRIPT, tmp_path, tiny_data, *RUN, "--epochs=1", f"--seed={seed}") for seed in (1, 2)]
    started = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for c in commands]
    done = [(p.wait(300), p.stderr.read()) for p in started]
    assert sorted(status for status, _ in done) == [0, 2], done
    winner = 1 + [status for status, _ in done].index(0)
    loser_said = done[2 - winner][1].strip().splitlines()[-1]
    assert "is in use by another run" in loser_said or "already holds an experiment" in loser_said
    saved = torch.load(tmp_path / "run/model.pt", weights_only=True)["config"]
    assert json.loads((tmp_path / "run/config.json").read_text())["seed"] == saved["seed"] == winner


def test_ctrl_c_mid_epoch_is_one_line_and_the_checkpoint_resumes_exactly(tmp_path, tiny_data, uninterrupted):
    stopped = run(tmp_path, tiny_data, fail_at=f"interrupt:step:{STEPS_PER_EPOCH + 3}")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"interrupted: {(tmp_path / 'run/checkpoint.pt').resolve()} holds every finished epoch, intact; "
        "run the same command with --resume=True to continue")
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["epoch"] == 0
    resumed = run(tmp_path, tiny_data, "--resume=True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_results(tmp_path / "run", uninterrupted)


def test_resume_with_another_dataset_or_seed_is_refused_naming_them(experiment, tiny_data, tmp_path):
    before = files(experiment)
    other = tmp_path / "other_data"
    shutil.copytree(tiny_data, other)
    line = refusal(run(experiment.parent, other, "--resume=True", "--seed=7"))
    assert line == (f"error: checkpoint {(experiment / 'checkpoint.pt').resolve()} was trained with other settings: "
                    f"dataset (checkpoint {str(tiny_data)!r}, config {str(other)!r}), seed (checkpoint 42, config 7); "
                    "a resume may change only epochs, learning_rate, device, fast, output_dir, experiment_name, "
                    "num_fusions, fusion_steps, num_samples, temperature, fid_weights; start a new experiment for them")
    assert files(experiment) == before


def test_a_learning_rate_changed_on_resume_is_recorded_per_epoch(tmp_path, tiny_data):
    assert run(tmp_path, tiny_data, "--epochs=1").returncode == 0
    resumed = run(tmp_path, tiny_data, "--epochs=2", "--resume=True", "--learning_rate=0.001")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "learning_rate is 0.001 from epoch 2 on (it was 0.003)" in resumed.stdout
    history = json.loads((tmp_path / "run/history.json").read_text())
    assert [row["learning_rate"] for row in history] == [0.003, 0.001]


def test_a_resume_with_fewer_fusions_leaves_only_its_own(tmp_path, tiny_data):
    assert run(tmp_path, tiny_data, "--epochs=1", "--num_fusions=2").returncode == 0
    resumed = run(tmp_path, tiny_data, "--epochs=1", "--resume=True", "--num_fusions=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    pairs = json.loads((tmp_path / "run/fusions/pairs.json").read_text())
    folders = sorted(p.name for p in (tmp_path / "run/fusions").iterdir() if p.is_dir())
    assert len(pairs) == 1 and len(folders) == 1 and folders[0].startswith("00_")
