"""evaluate.ipynb: committed without outputs, and runs headless on whichever experiments exist."""
import shutil
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import install
from nbclient import NotebookClient

from tests.helpers import outputs_with, trained_outputs

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "evaluate.ipynb"
KERNEL = "pixel-vqvae-tests"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_data):
    return trained_outputs(tmp_path_factory, tiny_data)


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A kernel spec for this very interpreter, so that no other installed python3 kernel runs
    the notebook with packages of its own."""
    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name=KERNEL, prefix=str(prefix))
    return prefix / "share" / "jupyter"


def run_notebook(outputs_dir, jupyter_path, monkeypatch):
    """The notebook executed on `outputs_dir` from the repository root, as Jupyter would run it."""
    monkeypatch.setenv("PIXEL_VQVAE_OUTPUTS", str(outputs_dir))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    # A headless machine may set MPLBACKEND=Agg, under which plt.show() displays nothing.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(ROOT)}}).execute()
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def text_of(cells):
    """Everything the cells printed or displayed as text or markdown."""
    parts = []
    for cell in cells:
        for output in cell.outputs:
            if output.output_type == "stream":
                parts.append(output.text)
            elif "data" in output:
                parts.append(output.data.get("text/markdown", output.data.get("text/plain", "")))
    return "\n".join(parts)


def shows_image(cell):
    return any("image/png" in output.get("data", {}) for output in cell.outputs)


def test_committed_notebook_has_no_outputs():
    cells = [cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]
    assert cells
    assert all(cell.outputs == [] and cell.execution_count is None for cell in cells)


def test_notebook_compares_all_three_models_and_writes_nothing(outputs, jupyter_path, monkeypatch):
    before = {path: path.stat().st_mtime_ns for path in outputs.rglob("*")}
    cells = run_notebook(outputs, jupyter_path, monkeypatch)
    text = text_of(cells)
    for name, model in [("vae", "VAE, 8-d latent"), ("vqvae", "VQ-VAE, 8x8 codes"),
                        ("pixel_vqvae", "Pixel VQ-VAE, 16x16 codes")]:
        assert f"| {name} | {model} | 2 |" in text  # its row of the metrics table
    assert "missing" not in text and "skipped" not in text
    # Setup prints, the metrics are a table, and every later section draws.
    assert not shows_image(cells[0]) and not shows_image(cells[1])
    assert all(shows_image(cell) for cell in cells[2:])
    assert {path: path.stat().st_mtime_ns for path in outputs.rglob("*")} == before


def test_notebook_runs_on_one_experiment_and_names_the_missing_ones(tmp_path, outputs, jupyter_path, monkeypatch):
    text = text_of(run_notebook(outputs_with(tmp_path, outputs, "pixel_vqvae"), jupyter_path, monkeypatch))
    assert "missing: vae (python train_vae.py)" in text
    assert "missing: vqvae (python train_vqvae.py)" in text
    assert "missing: pixel_vqvae" not in text
    assert "| pixel_vqvae | Pixel VQ-VAE, 16x16 codes |" in text


def test_notebook_skips_what_an_experiment_lacks_with_a_note(tmp_path, outputs, jupyter_path, monkeypatch):
    folder = outputs_with(tmp_path, outputs, "vae")
    (folder / "bare").mkdir()
    for file in ("config.json", "metrics.json", "history.json"):
        shutil.copy(outputs / "vqvae" / file, folder / "bare" / file)
    cells = run_notebook(folder, jupyter_path, monkeypatch)
    text = text_of(cells)
    assert "skipped bare: no reconstructions/" in text
    assert "skipped bare: no fusions/overview.png" in text
    assert "| bare | VQ-VAE, 8x8 codes | 2 |" in text
    # The VAE is still compared with its inputs, and the bare VQ-VAE's history still plotted.
    assert all(shows_image(cell) for cell in cells[2:])
