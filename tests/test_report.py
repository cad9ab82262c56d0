"""The comparison report: one row per experiment, numbers from its own files, clear errors."""
import json
import re
import shutil

import numpy as np
import pytest

from tests.conftest import train
from utils.errors import UserError
from utils.report import HEADER, load_experiments, main, report_table, shared_sprites, worst_window

# The tiny VQ-VAE of conftest has a PixelSight stage; off here it is the plain VQ-VAE of the paper.
SCRIPTS = {"vae": ("train_vae.py",), "vqvae": ("train_vqvae.py", "--pixelsight_filters=0"),
           "pixel_vqvae": ("train_pixel_vqvae.py",)}


def trained_outputs(tmp_path_factory, data_dir):
    """An outputs folder with one tiny run of each training script, trained once per session
    however many test modules ask for it."""
    out = tmp_path_factory.getbasetemp() / "three_models"
    for name, (script, *extra) in SCRIPTS.items():
        if not (out / name / "metrics.json").exists():
            done = train(script, out, data_dir, *extra, name=name)
            assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_data):
    return trained_outputs(tmp_path_factory, tiny_data)


def outputs_with(tmp_path, outputs, *names):
    """A fresh outputs folder holding links to some of the trained experiments."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    for name in names:
        (folder / name).symlink_to(outputs / name, target_is_directory=True)
    return folder


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
    assert main(["--outputs", str(folder)]) == 0
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
    assert main(["--outputs", str(folder)]) == 2
    assert str(folder) in capsys.readouterr().err
    assert not (folder / "report.md").exists()


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
