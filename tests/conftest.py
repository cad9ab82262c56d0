"""Shared fixtures: a tiny prepared sprite set, one tiny trained experiment, FID weights."""
import pytest
import torch
from pytorch_fid import inception
from torchvision.models.inception import Inception3

from tests.helpers import train
from tests.sprites import write_species_folders
from utils.data.prepare import PrepareOptions, prepare


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
