"""The objective lives with the model: a term added there is trained, logged and plotted by its name."""
import json

import torch

import train_vqvae
from models import VQVAE
from tests.helpers import TINY
from utils.config import parse_config
from utils.plots import plot_losses
from utils.training.loop import train

ORIGINAL_LOSS_TERMS = VQVAE.loss_terms


def with_a_sharpness_term(self, x, output):
    """The model's own terms and one more, weighted into the loss: the one edit a new term needs."""
    terms = ORIGINAL_LOSS_TERMS(self, x, output)
    terms["sharpness"] = (output.reconstruction - 0.5).abs().mean()
    terms["loss"] = terms["loss"] - 0.1 * terms["sharpness"]
    return terms


def test_a_term_added_to_the_models_objective_is_trained_logged_and_plotted_by_name(monkeypatch, tmp_path, tiny_data):
    monkeypatch.setattr(VQVAE, "loss_terms", with_a_sharpness_term)
    argv = [f"--dataset={tiny_data}", f"--output_dir={tmp_path}", "--experiment_name=run", "--image_size=16",
            "--batch_size=8", "--epochs=1", "--num_fusions=0", "--device=cpu", "--fast=False", *TINY["train_vqvae.py"]]
    config = parse_config(train_vqvae.config, argv)
    train("vqvae", config, torch.device("cpu"))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[0]["train_sharpness"] > 0 and history[0]["val_sharpness"] > 0
    assert "sharpness" in plot_losses(history, tmp_path / "losses.png")
