"""The three training scripts, end to end on tiny synthetic sprites, through their real command line."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import ROOT, TINY, files, refusal, train

EVERY_OUTPUT = ["config.json", "model.pt", "checkpoint.pt", "history.json", "losses.png", "samples.gif",
                "metrics.json", "reconstruction_grid.png", "fusions/pairs.json", "fusions/overview.png"]


@pytest.mark.parametrize("script", sorted(set(TINY) - {"train_tokenizer.py"}))  # tests/test_tokenizer.py: its own
def test_each_script_trains_end_to_end_and_writes_every_output(script, tmp_path, tiny_data):
    done = train(script, tmp_path, tiny_data)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    for name in EVERY_OUTPUT + (["codebook_usage.png"] if script != "train_vae.py" else []):
        assert (out / name).is_file(), name
    test_names = json.loads((tiny_data / "test_names.json").read_text())
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == sorted(test_names)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["test_images"] == len(test_names)
    for key in ["mse", "ssim", "psnr", "exact_pixel_rate", "sprite_exact_pixel_rate", "palette_exact_pixel_rate",
                "palette_colours", "palette_bits", "input_colours", "output_colours", "foreign_colour_rate",
                "train_seconds", "train_images_per_second"]:
        assert np.isfinite(metrics[key]), key
    # Snapping to the sprite's own palette keeps every exact pixel exact.
    assert metrics["palette_exact_pixel_rate"] >= metrics["sprite_exact_pixel_rate"]
    # 16 codes are 4 bits; the tiny Pixel VQ-VAE keeps a 16x16 grid, the tiny VQ-VAE halves it.
    assert metrics["bits_per_sprite"] == {"train_pixel_vqvae.py": 16 * 16 * 4, "train_vqvae.py": 8 * 8 * 4,
                                          "train_vae.py": None}[script]
    if script != "train_vae.py":
        assert 1 <= metrics["codes_used"] <= 16
    pairs = json.loads((out / "fusions/pairs.json").read_text())
    assert len(pairs) == 2 and all(p["species_a"] != p["species_b"] for p in pairs)
    for folder in (out / "fusions").glob("*+*"):
        assert sorted(p.name for p in folder.iterdir()) == ["blend.png", "interpolation.gif", "interpolation.png", "swap.png"]
    assert Image.open(out / "samples.gif").n_frames == 2
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["fast"] == "auto"
    # On the CPU, "auto" trains on models/fast: no module stops it, and torch's notice of a CUDA
    # toolkit without a GPU is not shown either.
    assert "fast path is off" not in done.stderr and "No CUDA runtime" not in done.stderr
    assert any(line.split() == ["fast", "=", "'auto'"] for line in done.stdout.splitlines())


def test_an_unknown_fast_setting_is_refused_in_one_line_before_any_work(tmp_path, tiny_data):
    line = refusal(train("train_vae.py", tmp_path, tiny_data, "--fast=sometimes"))
    assert line == "error: --fast must be one of auto, True, False, got 'sometimes'"
    assert not (tmp_path / "run").exists()


def test_saved_reconstructions_are_exactly_what_the_model_outputs(tiny_experiment, tiny_data):
    from models import build_model

    saved = torch.load(tiny_experiment / "model.pt", weights_only=True)
    model = build_model(saved["model_type"], saved["config"])
    model.load_state_dict(saved["model"])
    model.eval()
    names = json.loads((tiny_data / "test_names.json").read_text())
    images = np.load(tiny_data / "test_images.npy")
    with torch.inference_mode():
        out = model(torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 255).reconstruction
    expected = np.floor(out.permute(0, 2, 3, 1).clamp(0, 1).numpy().astype(np.float64) * 255 + 0.5).astype(np.uint8)
    for name, image in zip(names[:4], expected):
        assert np.array_equal(np.asarray(Image.open(tiny_experiment / "reconstructions" / name)), image)


def test_resume_continues_to_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_data):
    assert train("train_vqvae.py", tmp_path, tiny_data, name="whole").returncode == 0
    assert train("train_vqvae.py", tmp_path, tiny_data, "--epochs=1", name="halves").returncode == 0
    resumed = train("train_vqvae.py", tmp_path, tiny_data, "--resume=True", name="halves")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = torch.load(tmp_path / "whole/model.pt", weights_only=True)["model"]
    halves = torch.load(tmp_path / "halves/model.pt", weights_only=True)["model"]
    assert all(torch.equal(whole[k], halves[k]) for k in whole)
    assert json.loads((tmp_path / "halves/metrics.json").read_text())["mse"] == \
        json.loads((tmp_path / "whole/metrics.json").read_text())["mse"]


@pytest.mark.parametrize("extra, message", [
    (["--epoch=3"], "unknown config key 'epoch' (did you mean epochs"),
    (["--epochs=three"], "--epochs expects int"),
    (["--resume=True"], "nothing to resume in"),
])
def test_user_mistakes_end_in_one_line_not_a_traceback(tmp_path, tiny_data, extra, message):
    assert message in refusal(train("train_vae.py", tmp_path, tiny_data, *extra))


def test_an_existing_experiment_is_not_overwritten_unless_asked(tmp_path, tiny_data):
    assert train("train_vae.py", tmp_path, tiny_data, "--epochs=1").returncode == 0
    before = files(tmp_path / "run")
    again = train("train_vae.py", tmp_path, tiny_data, "--epochs=1")
    assert refusal(again) == (
        f"error: {(tmp_path / 'run').resolve()} already holds an experiment; continue it with --resume=True, "
        "replace it with --overwrite=True, or choose another --experiment_name")
    assert files(tmp_path / "run") == before
    assert train("train_vae.py", tmp_path, tiny_data, "--epochs=1", "--overwrite=True").returncode == 0


def test_resume_refuses_a_checkpoint_of_another_architecture_naming_what_differs(tmp_path, tiny_data):
    assert train("train_vqvae.py", tmp_path, tiny_data, "--epochs=1").returncode == 0
    before = files(tmp_path / "run")
    checkpoint = (tmp_path / "run/checkpoint.pt").resolve()
    wider = train("train_vqvae.py", tmp_path, tiny_data, "--resume=True", "--num_embeddings=32")
    assert refusal(wider) == (
        f"error: checkpoint {checkpoint} was made with a different architecture: "
        "num_embeddings (checkpoint 16, config 32)")
    other_model = train("train_vae.py", tmp_path, tiny_data, "--resume=True")
    assert refusal(other_model) == (
        f"error: checkpoint {checkpoint} is of a 'vqvae' model, but this script trains a 'vae'")
    assert files(tmp_path / "run") == before


@pytest.mark.e2e
def test_a_short_run_on_the_real_sprites_writes_every_output(tmp_path):
    """The default VQ-VAE on 6,400 real training images; data is fetched and prepared if missing."""
    done = subprocess.run([sys.executable, "train_vqvae.py", f"--output_dir={tmp_path}", "--epochs=1",
                           "--max_train_images=6400", "--learning_rate=0.003", "--device=cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "vqvae"
    for name in EVERY_OUTPUT + ["codebook_usage.png"]:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((ROOT / "data/pokemon/manifest.json").read_text())
    assert metrics["test_images"] == manifest["splits"]["test"]["images"]
    assert len(list((out / "reconstructions").iterdir())) == metrics["test_images"]
    # A constant grey output scores about 0.25 on white and black backgrounds; this run, 0.014.
    assert metrics["mse"] < 0.05 and metrics["codes_used"] > 100
