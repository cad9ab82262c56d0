"""The comparison report: one row per experiment, numbers from its own files, clear errors."""
import json
import re
import shutil

import numpy as np
import pytest

from tests.helpers import exit_status, outputs_with, trained_outputs
from utils.errors import UserError
from utils.plots import save_png
from utils import report
from utils.fid import fid
from utils.report import (FID_FILE, HEADER, PRIOR_HEADER, cached_fid, load_experiments, main, prior_table,
                          reference_dir, report_table, shared_sprites, update_fids, worst_window)

@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_data):
    return trained_outputs(tmp_path_factory, tiny_data)


def table_rows(table):
    """{experiment: {column: cell}} from a markdown table."""
    lines = table.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_table_has_one_row_per_experiment_with_the_numbers_of_its_metrics(tmp_path, outputs, tiny_data):
    rows = table_rows(report_table(outputs_with(tmp_path, outputs, "pixel_vqvae", "vae")))
    assert list(rows) == ["vae", "pixel_vqvae"]  # the paper's order, not the folder listing's
    assert all(list(row) == list(HEADER) for row in rows.values())
    for name, row in rows.items():
        metrics = json.loads((outputs / name / "metrics.json").read_text())
        assert row["test MSE"] == f"{metrics['mse']:.5f}"
        assert row["SSIM"] == f"{metrics['ssim']:.4f}"
        assert row["colours out / in"] == f"{metrics['output_colours']:.1f} / {metrics['input_colours']:.1f}"
        assert row["epochs"] == "2"
        # Two epochs over the whole training split: no max_train_images in the tiny runs.
        train_images = len(json.loads((tiny_data / "train_names.json").read_text()))
        assert row["training images seen"] == str(2 * train_images)
    pixel = json.loads((outputs / "pixel_vqvae" / "metrics.json").read_text())
    assert rows["pixel_vqvae"]["codes used"] == f"{pixel['codes_used']}/16"
    assert rows["vae"]["codes used"] == "-"


def test_model_column_names_the_model_and_its_code_grid(tmp_path, outputs):
    rows = table_rows(report_table(outputs))
    # 16x16 images: num_layers 0 keeps one code per pixel, num_layers 1 halves the side.
    assert rows["pixel_vqvae"]["model"] == "Pixel VQ-VAE, 16x16 codes"
    assert rows["vqvae"]["model"] == "VQ-VAE, 8x8 codes"
    assert rows["vae"]["model"] == "VAE, 8-d latent"


def test_a_folder_without_metrics_is_listed_as_unfinished(tmp_path, outputs):
    folder = outputs_with(tmp_path, outputs, "vqvae")
    (folder / "interrupted").mkdir()
    shutil.copy(outputs / "vqvae" / "config.json", folder / "interrupted" / "config.json")
    rows = table_rows(report_table(folder))
    assert rows["interrupted"]["model"] == "VQ-VAE, 8x8 codes"
    assert rows["interrupted"]["epochs"] == "unfinished"
    assert rows["interrupted"]["test MSE"] == ""
    assert rows["vqvae"]["epochs"] == "2"


def test_command_line_writes_report_md_whose_links_resolve(tmp_path, outputs, capsys):
    folder = outputs_with(tmp_path, outputs, "vae", "vqvae", "pixel_vqvae")
    (folder / "interrupted").mkdir()
    assert main(["--outputs", str(folder), "--no-fid"]) == 0
    report = (folder / "report.md").read_text()
    printed = capsys.readouterr().out
    assert report_table(folder) in report and report_table(folder) in printed
    figures = report.split("## Figures")[1]
    links = re.findall(r"\]\(([^)]+)\)", figures)
    # Three figures for each finished experiment, none for the unfinished one.
    assert len(links) == 9 and "interrupted" not in figures
    assert all((folder / link).is_file() for link in links)


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_no_experiments_is_a_user_error_and_exit_2(tmp_path, capsys, make):
    folder = make(tmp_path)
    with pytest.raises(UserError, match="train a model first"):
        report_table(folder)
    assert exit_status(main, ["--outputs", str(folder)]) == 2
    assert str(folder) in capsys.readouterr().err
    assert not (folder / "report.md").exists()


def add_prior(folder, vq_experiment, **metrics):
    """A finished prior's folder as train_pixelcnn.py leaves it, with metrics of our choosing."""
    prior = folder / f"prior_{vq_experiment}"
    prior.mkdir()
    (prior / "config.json").write_text(json.dumps({"vq_experiment": vq_experiment, "epochs": 3}))
    (prior / "metrics.json").write_text(json.dumps({
        "epochs": 3, "train_grids": 120, "val_bits_per_code": 2.34567, "test_bits_per_code": 2.5,
        "uniform_bits_per_code": 4.0, "nearest_mse_mean": 0.0123456, "duplicate_share": 0.25,
        "code_duplicate_share": 0.0, "fid": None, "train_seconds": 61.26, **metrics}))
    for name in ("sample_grid.png", "nearest_grid.png"):
        save_png(np.zeros((2, 2, 3), np.uint8), prior / name)
    return prior


def test_priors_get_their_own_table_naming_the_vq_model_they_model(tmp_path, outputs):
    folder = outputs_with(tmp_path, outputs, "pixel_vqvae", "vqvae")
    add_prior(folder, "pixel_vqvae")
    add_prior(folder, "vqvae", fid=12.345)
    assert list(table_rows(report_table(folder))) == ["vqvae", "pixel_vqvae"]
    assert [e.name for e in load_experiments(folder)] == ["vqvae", "pixel_vqvae"]
    rows = table_rows(prior_table(folder))
    assert list(rows) == ["prior_pixel_vqvae", "prior_vqvae"]
    assert all(list(row) == list(PRIOR_HEADER) for row in rows.values())
    pixel = rows["prior_pixel_vqvae"]
    assert pixel["codes of"] == "pixel_vqvae (Pixel VQ-VAE, 16x16 codes)"
    assert (pixel["val bits/code"], pixel["test bits/code"], pixel["uniform bits/code"]) == ("2.346", "2.500", "4")
    assert pixel["duplicates: pixels / codes"] == "25.0% / 0.0%"
    assert (pixel["FID"], rows["prior_vqvae"]["FID"]) == ("-", "12.3")
    assert rows["prior_vqvae"]["codes of"] == "vqvae (VQ-VAE, 8x8 codes)"


def test_report_md_holds_the_prior_table_and_links_to_its_samples(tmp_path, outputs):
    folder = outputs_with(tmp_path, outputs, "vqvae")
    add_prior(folder, "vqvae")
    assert main(["--outputs", str(folder), "--no-fid"]) == 0
    report = (folder / "report.md").read_text()
    assert prior_table(folder) in report
    links = re.findall(r"\]\(([^)]+)\)", report.split("## Figures")[1])
    assert "prior_vqvae/sample_grid.png" in links and "prior_vqvae/nearest_grid.png" in links
    assert all((folder / link).is_file() for link in links)


def test_shared_sprites_are_the_fusion_pairs_that_every_experiment_reconstructed(outputs):
    experiments = load_experiments(outputs)
    pairs = json.loads((outputs / "vae" / "fusions" / "pairs.json").read_text())
    paired = list(dict.fromkeys(name for pair in pairs for name in (pair["a"], pair["b"])))
    assert shared_sprites(experiments, len(paired)) == paired
    more = shared_sprites(experiments, len(paired) + 2)
    rest = sorted(p.name for p in (outputs / "vae" / "reconstructions").glob("*.png") if p.name not in paired)
    assert more == paired + rest[:2]


def test_worst_window_finds_the_block_of_largest_error_even_in_a_corner():
    error = np.zeros((16, 16))
    error[5:9, 2:6] = 1.0
    error[0, 15] = 3.0  # one bad pixel loses to a 4x4 block of smaller errors
    assert worst_window(error, 4) == (5, 2)
    error[12:, 12:] = 2.0
    assert worst_window(error, 4) == (12, 12)
    assert worst_window(error, 16) == (0, 0)


FID_DIMS = 64  # the first Inception block: the same code path as 2048, and cheap


def test_reconstruction_fid_is_computed_once_and_cached_until_the_run_changes(tmp_path, outputs, random_weights,
                                                                             monkeypatch):
    folder = tmp_path / "outputs"
    shutil.copytree(outputs / "pixel_vqvae", folder / "pixel_vqvae")
    (experiment,) = load_experiments(folder)
    assert cached_fid(experiment, dims=FID_DIMS) is None
    update_fids([experiment], folder, random_weights, dims=FID_DIMS, log=lambda _: None)
    record = cached_fid(experiment, dims=FID_DIMS)
    expected = fid(folder / "pixel_vqvae" / "reconstructions", reference_dir(experiment.config),
                   weights=random_weights, dims=FID_DIMS)
    assert record["fid"] == pytest.approx(expected, rel=1e-9) and record["fid"] > 0
    assert record["reconstructions"] == record["reference_images"] == len(list(reference_dir(
        experiment.config).glob("*.png")))
    assert [p.suffix for p in (folder / ".fid").iterdir()] == [".npz"]

    monkeypatch.setattr(report, "fid_statistics", pytest.fail)
    update_fids(load_experiments(folder), folder, random_weights, dims=FID_DIMS)  # nothing to compute
    metrics = folder / "pixel_vqvae" / "metrics.json"
    metrics.write_text(metrics.read_text().replace("{", '{"rerun": 1, ', 1))  # as a new run rewrites it
    assert cached_fid(load_experiments(folder)[0], dims=FID_DIMS) is None


def test_a_report_without_fid_weights_is_written_with_one_warning(tmp_path, outputs, monkeypatch, capsys):
    def offline(_):
        raise UserError("offline")

    folder = tmp_path / "outputs"
    shutil.copytree(outputs / "vae", folder / "vae")
    monkeypatch.setattr(report, "resolve_fid_weights", offline)
    assert main(["--outputs", str(folder)]) == 0
    assert "warning: no FID for 1 experiment(s): offline" in capsys.readouterr().out
    assert table_rows(report_table(folder))["vae"]["FID"] == "-"
    assert not (folder / "vae" / FID_FILE).exists()
DAMAGE = {  # file, what is written into it, what the line names
    "config_not_json": ("config.json", b"{oops", "is not valid JSON"),
    "config_a_list": ("config.json", b"[1, 2]", "holds a list, not a JSON object"),
    "config_not_utf8": ("config.json", b"\xff\xfe{}", "is not valid JSON"),
    "metrics_a_string": ("metrics.json", b'"done"', "holds a str, not a JSON object"),
    "metrics_lacking_mse": ("metrics.json", None, "lacks or mangles 'mse'"),
    "metrics_mse_text": ("metrics.json", "mse", "lacks or mangles 'mse'"),
    "history_an_object": ("history.json", b'{"epoch": 1}', "holds a dict, not a JSON list"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_hand_damaged_experiment_file_is_one_line_naming_it(tmp_path, outputs, capsys, damage):
    name, written, said = DAMAGE[damage]
    folder = tmp_path / "outputs"
    shutil.copytree(outputs / "vae", folder / "vae")
    path = folder / "vae" / name
    if not isinstance(written, bytes):
        metrics = json.loads(path.read_text())
        if written is None:
            del metrics["mse"]
        else:
            metrics[written] = "small"
        written = json.dumps(metrics).encode()
    path.write_bytes(written)
    assert exit_status(main, ["--outputs", str(folder), "--no-fid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path} ") and said in err[0], err
