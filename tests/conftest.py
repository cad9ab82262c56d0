"""Shared fixtures: a tiny prepared sprite set, one tiny trained experiment, FID weights."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_fid import inception
from torchvision.models.inception import Inception3

from tests.sprites import write_species_folders
from utils.data import PrepareOptions, prepare

ROOT = Path(__file__).resolve().parent.parent
TINY_VQ = ["--pixelsight_filters=16", "--num_embeddings=16", "--embedding_dim=8"]
TINY = {
    "train_pixel_vqvae.py": TINY_VQ,
    "train_vqvae.py": ["--num_layers=1"] + TINY_VQ,
    "train_vae.py": ["--num_layers=2", "--max_filters=16", "--latent_dim=8"],
}


def train_command(script, output_dir, data_dir, *extra, name="run"):
    """The command line of a training script on tiny settings; later keys override earlier ones."""
    return [sys.executable, script, f"--dataset={data_dir}", f"--output_dir={output_dir}", f"--experiment_name={name}",
            "--image_size=16", "--batch_size=8", "--epochs=2", "--learning_rate=0.003", "--num_fusions=2",
            "--fusion_steps=3", "--device=cpu", *TINY[script], *extra]


def train(script, output_dir, data_dir, *extra, name="run", fail_at=None):
    """Run a training script through its real command line on tiny settings; with `fail_at`,
    through tests/fail_at.py, which makes it fail at that point."""
    python, *args = train_command(script, output_dir, data_dir, *extra, name=name)
    wrapper = ["tests/fail_at.py", fail_at] if fail_at else []
    return subprocess.run([python, *wrapper, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def refusal(done):
    """The line a user sees for a refused run, after checking it is not a traceback."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


def exit_status(main, argv):
    """The exit status of a command-line `main`, whether it returns it or exits with it."""
    try:
        return main(argv)
    except SystemExit as end:
        return end.code


def files(folder):
    """Every file under `folder` and its bytes, to show that nothing in it changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """20 synthetic species at 16x16, one rotation: 16/2/2 species per split."""
    root = tmp_path_factory.mktemp("tiny")
    write_species_folders(root / "src", species=20, per_species=2)
    prepare(root / "src", root / "data", PrepareOptions(image_size=16, rotations=(15,)), log=lambda _: None, workers=1)
    return root / "data"


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory, tiny_data):
    """A Pixel VQ-VAE trained for two epochs on tiny_data; its outputs folder."""
    out = tmp_path_factory.mktemp("experiments")
    done = train("train_pixel_vqvae.py", out, tiny_data, name="pixel")
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "pixel"


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """pytorch-fid's FID Inception state dict with seeded random weights, as a .pth file."""
    built = []
    with pytest.MonkeyPatch.context() as patch:
        # fid_inception_v3 builds the network, then loads the downloaded weights into it;
        # keeping the network and skipping the load leaves PyTorch's seeded initialisation.
        patch.setattr(inception, "load_state_dict_from_url", lambda *_, **__: None)
        patch.setattr(Inception3, "load_state_dict", lambda network, _: built.append(network))
        torch.manual_seed(0)
        inception.fid_inception_v3()
    path = tmp_path_factory.mktemp("weights") / "random_fid_inception.pth"
    torch.save(built[0].state_dict(), path)
    return path
