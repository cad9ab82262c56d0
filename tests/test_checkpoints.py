"""Checkpoints load safely: weights_only, and a clear error for damaged files."""
import os

import pytest
import torch

from utils.errors import UserError
import train_vqvae
from models import build_model
from utils.training.checkpoints import architecture, load_checkpoint, load_model


class RunsCode:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mknod, (str(self.marker),))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "trap": RunsCode(marker)}, path)
    with pytest.raises(UserError, match="cannot be loaded safely: it holds Python objects other than tensors "
                                         "and plain data, and is refused without running them"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "epoch": 3}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match=f"checkpoint {path} cannot be loaded safely"):
        load_checkpoint(path)


def test_a_model_file_without_a_rebuildable_model_is_a_clear_error(tmp_path):
    torch.save({"model": {}, "config": {}, "model_type": "gan"}, tmp_path / "model.pt")
    with pytest.raises(UserError, match="does not hold a model this code can rebuild"):
        load_model(tmp_path, "cpu")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """The bytes of a real model.pt (a tiny VAE with its config)."""
    from models import build_model
    config = {"num_layers": 2, "max_filters": 16, "latent_dim": 8, "image_size": 16}
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"model": build_model("vae", config).state_dict(), "config": config, "model_type": "vae"}, path)
    return path.read_bytes()


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5])
def test_a_model_file_cut_short_anywhere_is_a_clear_error(tmp_path, model_file, share):
    (tmp_path / "model.pt").write_bytes(model_file[:int(len(model_file) * share)])
    with pytest.raises(UserError, match=f"checkpoint {tmp_path / 'model.pt'} cannot be loaded safely: "):
        load_model(tmp_path, "cpu")


@pytest.mark.parametrize("held", [[1, 2, 3], "a string", {"model": {}, "model_type": "vae"}])
def test_a_model_file_holding_something_else_is_a_clear_error(tmp_path, held):
    torch.save(held, tmp_path / "model.pt")
    with pytest.raises(UserError, match=f"^{tmp_path / 'model.pt'} does not hold a model this code can rebuild: "):
        load_model(tmp_path, "cpu")


def test_a_model_file_whose_config_lacks_the_image_size_is_a_clear_error(tmp_path, model_file):
    saved = torch.load(__import__("io").BytesIO(model_file), weights_only=True)
    del saved["config"]["image_size"]
    torch.save(saved, tmp_path / "model.pt")
    with pytest.raises(UserError, match="does not hold a model this code can rebuild: its config lacks image_size"):
        load_model(tmp_path, "cpu")


def test_a_model_key_newer_than_the_checkpoint_counts_as_its_default():
    config = dict(train_vqvae.config)
    older = {key: value for key, value in config.items() if key not in ("palette_output", "palette_features")}
    assert architecture(older, "vqvae") == architecture(config, "vqvae")
    assert architecture(older, "vqvae") != architecture({**config, "palette_output": True}, "vqvae")


def test_a_checkpoint_from_before_the_quantizer_keys_is_one_of_the_ema_quantiser():
    config = dict(train_vqvae.config)
    older = {key: value for key, value in config.items() if key not in ("quantizer", "residual_depth", "fsq_levels")}
    assert architecture(older, "vqvae") == architecture(config, "vqvae")
    assert architecture(older, "vqvae")["quantizer"] == "ema"
    assert architecture(older, "vqvae") != architecture({**config, "quantizer": "residual"}, "vqvae")
    # Its state dict is the one the model builds today: the EMA quantiser's buffers, named as they were.
    keys = {key for key in build_model("vqvae", older).state_dict() if key.startswith("quantizer.")}
    assert keys == {"quantizer.embedding", "quantizer.cluster_size", "quantizer.embed_sum", "quantizer.initialized"}


def test_a_config_from_before_the_ssim_keys_were_the_models_builds_the_model_it_meant(tmp_path):
    # Saved configs held use_ssim_loss and ssim_weight as training keys of the VQ scripts, and
    # configs older still lacked them (no SSIM term): both rebuild the model they trained.
    config = {**train_vqvae.config, "num_embeddings": 8, "embedding_dim": 4, "image_size": 16}
    older = {key: value for key, value in config.items() if key not in ("use_ssim_loss", "ssim_weight")}
    for saved, ssim_term in [(older, False), ({**config, "use_ssim_loss": True, "ssim_weight": 0.5}, True)]:
        folder = tmp_path / str(ssim_term)
        folder.mkdir()
        torch.save({"model": build_model("vqvae", saved).state_dict(), "config": saved, "model_type": "vqvae"},
                   folder / "model.pt")
        model, _, _ = load_model(folder, "cpu", fast=False)
        x = torch.rand(2, 3, 16, 16)
        assert ("ssim" in model.loss_terms(x, model(x))) == ssim_term
        assert model.ssim_weight == (0.5 if ssim_term else 1.0)
    # The objective's weights shape no tensor: a run resumes under others.
    assert architecture(older, "vqvae") == architecture({**config, "use_ssim_loss": True}, "vqvae")
