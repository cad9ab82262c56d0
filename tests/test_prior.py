"""The PixelCNN prior over a trained VQ model's codes: train_pixelcnn.py end to end, resume, learning,
samples beside their nearest training images, and clear errors for a wrong vq_experiment."""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from models import GatedPixelCNN, build_model
from tests.helpers import ROOT
from utils.data.load import load_split
from utils.training import prior as prior_module
from utils.training.prior import encode_split, fid_scorer, nearest_images, paired_rows, run_prior_epoch, sample_fid
from utils.training.checkpoints import load_model, save_model

TINY_PRIOR = ["--hidden_channels=8", "--num_layers=2", "--kernel_size=3", "--batch_size=8", "--epochs=2",
              "--learning_rate=0.003", "--num_samples=4", "--fid_dims=64", "--device=cpu"]
EVERY_OUTPUT = ["config.json", "model.pt", "checkpoint.pt", "codes.npz", "history.json", "losses.png",
                "metrics.json", "sample_grid.png", "nearest_grid.png", "samples/nearest.json", "samples/codes.npy"]


def train_prior(output_dir, vq_experiment, data_dir, weights, *extra, name="prior"):
    """Run train_pixelcnn.py through its real command line on tiny settings."""
    args = [sys.executable, "train_pixelcnn.py", f"--output_dir={output_dir}", f"--vq_experiment={vq_experiment}",
            f"--dataset={data_dir}", f"--experiment_name={name}", f"--fid_weights={weights}", *TINY_PRIOR, *extra]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def vq_folder(tmp_path_factory, tiny_experiment):
    """An outputs folder holding a copy of the tiny Pixel VQ-VAE as `vq`, for priors to model."""
    out = tmp_path_factory.mktemp("priors")
    shutil.copytree(tiny_experiment, out / "vq")
    return out


@pytest.fixture(scope="module")
def prior(vq_folder, tiny_data, random_weights):
    done = train_prior(vq_folder, "vq", tiny_data, random_weights)
    assert done.returncode == 0, done.stderr[-3000:]
    return vq_folder / "prior"


def test_the_script_writes_every_output_of_a_prior(prior, tiny_data):
    for name in EVERY_OUTPUT:
        assert (prior / name).is_file(), name
    assert sorted(p.name for p in (prior / "samples").glob("*.png")) == [f"sample_{i:03d}.png" for i in range(4)]
    metrics = json.loads((prior / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["num_samples"] == 4
    assert metrics["uniform_bits_per_code"] == 4.0  # 16 codes
    assert 0 < metrics["test_bits_per_code"] and 0 < metrics["val_bits_per_code"]
    history = json.loads((prior / "history.json").read_text())
    assert metrics["val_bits_per_code"] == history[-1]["val_bits_per_code"]
    # The tiny Pixel VQ-VAE keeps one code per pixel of its 16x16 sprites.
    assert metrics["code_grid"] == [16, 16]
    train_names = json.loads((tiny_data / "train_names.json").read_text())
    assert metrics["train_grids"] == len(train_names)
    # Seeded random Inception weights: a real number, not the real FID.
    assert math.isfinite(metrics["fid"]) and metrics["fid_dims"] == 64 and "fid_reason" not in metrics
    assert metrics["fid_weights"]["source"] == "given file" and len(metrics["fid_weights"]["sha1"]) == 40


def test_cached_codes_are_the_vq_models_codes_of_every_split(prior, vq_folder, tiny_data):
    vq_model, _, _ = load_model(vq_folder / "vq", "cpu")
    with np.load(prior / "codes.npz") as saved:
        for split in ("train", "val", "test"):
            assert np.array_equal(saved[split], encode_split(vq_model, load_split(tiny_data, split), 8, "cpu", split))


def test_samples_are_their_codes_decoded_by_the_frozen_vq_model(prior, vq_folder):
    vq_model, _, _ = load_model(vq_folder / "vq", "cpu")
    codes = np.load(prior / "samples" / "codes.npy")
    assert codes.shape == (4, 16, 16) and codes.min() >= 0 and codes.max() < 16
    with torch.inference_mode():
        decoded = vq_model.decode_indices(torch.from_numpy(codes).long())
    expected = np.floor(decoded.permute(0, 2, 3, 1).clamp(0, 1).double().numpy() * 255 + 0.5).astype(np.uint8)
    for i, image in enumerate(expected):
        assert np.array_equal(np.asarray(Image.open(prior / "samples" / f"sample_{i:03d}.png")), image)


def test_each_sample_is_paired_with_its_nearest_training_image_and_duplicates_are_counted(prior, tiny_data):
    train = load_split(tiny_data, "train")
    images = train.images.astype(np.float64) / 255
    metrics = json.loads((prior / "metrics.json").read_text())
    nearest = json.loads((prior / "samples" / "nearest.json").read_text())
    for row in nearest:
        sample = np.asarray(Image.open(prior / "samples" / row["sample"])).astype(np.float64) / 255
        distances = ((images - sample) ** 2).mean(axis=(1, 2, 3))
        assert row["nearest_training_image"] == train.names[int(distances.argmin())]
        assert row["mse"] == pytest.approx(distances.min(), rel=1e-12, abs=1e-15)
    assert metrics["nearest_mse_mean"] == pytest.approx(np.mean([row["mse"] for row in nearest]))
    assert metrics["nearest_mse_min"] == pytest.approx(min(row["mse"] for row in nearest))
    assert metrics["duplicate_share"] == np.mean([row["exact_pixel_share"] >= 0.99 for row in nearest])
    with np.load(prior / "codes.npz") as saved:
        learnt = {grid.tobytes() for grid in saved["train"]}
    codes = np.load(prior / "samples" / "codes.npy")
    assert metrics["code_duplicate_share"] == np.mean([grid.tobytes() in learnt for grid in codes])


def test_resume_continues_to_the_same_prior_and_samples_as_an_uninterrupted_run(prior, vq_folder, tiny_data,
                                                                             random_weights):
    assert train_prior(vq_folder, "vq", tiny_data, random_weights, "--epochs=1", name="halves").returncode == 0
    resumed = train_prior(vq_folder, "vq", tiny_data, random_weights, "--resume=True", name="halves")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    whole = torch.load(prior / "model.pt", weights_only=True)["model"]
    halves = torch.load(vq_folder / "halves" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(whole[k], halves[k]) for k in whole)
    assert np.array_equal(np.load(prior / "samples" / "codes.npy"), np.load(vq_folder / "halves" / "samples" / "codes.npy"))
    assert json.loads((prior / "metrics.json").read_text())["test_bits_per_code"] == \
        json.loads((vq_folder / "halves" / "metrics.json").read_text())["test_bits_per_code"]


def test_the_saved_prior_rebuilds_with_the_vq_models_codebook_size(prior):
    model, model_type, config = load_model(prior, "cpu")
    assert model_type == "pixelcnn" and isinstance(model, GatedPixelCNN)
    assert model.num_embeddings == 16 and config["vq_experiment"] == "vq"


def test_resuming_on_codes_of_a_changed_vq_model_is_refused(tmp_path, tiny_experiment, tiny_data, random_weights):
    shutil.copytree(tiny_experiment, tmp_path / "vq")
    assert train_prior(tmp_path, "vq", tiny_data, random_weights, "--epochs=1").returncode == 0
    model, model_type, config = load_model(tmp_path / "vq", "cpu")
    with torch.no_grad():
        model.quantizer.embedding.add_(0.5)
    save_model(tmp_path / "vq" / "model.pt", model, config, model_type)
    done = train_prior(tmp_path, "vq", tiny_data, random_weights, "--resume=True")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "holds the codes of another VQ model" in done.stderr.strip().splitlines()[-1]


def vae_experiment(folder):
    config = {"num_layers": 2, "max_filters": 16, "latent_dim": 8, "image_size": 16}
    save_model(folder / "vae" / "model.pt", build_model("vae", config), config, "vae")


@pytest.mark.parametrize("make, vq_experiment, message", [
    (lambda folder: None, "missing", "missing/model.pt does not exist"),
    (lambda folder: (folder / "unfinished").mkdir(), "unfinished", "unfinished/model.pt does not exist"),
    (vae_experiment, "vae", "'vae' holds a vae, not a VQ model"),
])
def test_a_wrong_vq_experiment_ends_in_one_line_not_a_traceback(tmp_path, tiny_data, random_weights, make,
                                                                vq_experiment, message):
    make(tmp_path)
    done = train_prior(tmp_path, vq_experiment, tiny_data, random_weights)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "prior").exists()


def test_training_on_the_codes_of_tiny_sprites_lowers_the_held_out_bits_per_code(prior):
    # A few hundred steps on the cached codes of the tiny synthetic sprites, from a fresh prior.
    with np.load(prior / "codes.npz") as saved:
        train, val = saved["train"], saved["val"]
    torch.manual_seed(0)
    model = GatedPixelCNN(16, hidden_channels=16, num_layers=3, kernel_size=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    config = {"seed": 0, "batch_size": 8, "epochs": 1, "learning_rate": 3e-3}
    before = run_prior_epoch(model, val, config, "cpu", 0)
    steps, epoch = 0, 0
    while steps < 300:
        run_prior_epoch(model, train, config, "cpu", epoch, optimizer)
        steps, epoch = steps + math.ceil(len(train) / 8), epoch + 1
    after = run_prior_epoch(model, val, config, "cpu", epoch)
    assert before > 3.5  # about log2(16) = 4 bits untrained
    assert after < before - 2


def test_nearest_images_are_exact_even_when_a_sample_is_a_training_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2500, 8, 8, 3), dtype=np.uint8)  # more than one chunk of 1024
    samples = np.concatenate([images[[2049]], rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)])
    index, mse = nearest_images(samples, images)
    brute = ((samples[:, None].astype(np.int64) - images[None].astype(np.int64)) ** 2).sum(axis=(2, 3, 4))
    assert index.tolist() == brute.argmin(1).tolist() and index[0] == 2049
    assert mse.tolist() == (brute.min(1) / (255.0 ** 2 * 192)).tolist()


def test_paired_rows_put_each_row_of_samples_over_its_nearest_images_and_pad_the_last_with_white():
    top = np.arange(5).reshape(5, 1, 1, 1).repeat(3, axis=3).astype(np.uint8)
    rows = paired_rows(top, top + 100, columns=2)
    assert rows[:, 0, 0, 0].tolist() == [0, 1, 100, 101, 2, 3, 102, 103, 4, 255, 104, 255]


def test_without_fid_weights_the_fid_is_none_with_the_reason(tmp_path):
    images = np.zeros((2, 16, 16, 3), np.uint8)
    score = fid_scorer(images, {"fid_weights": str(tmp_path / "absent.pth"), "fid_dims": 64}, "cpu")
    result = sample_fid(images, images, score)
    assert result["fid"] is None and "absent.pth do not exist" in result["fid_reason"]


def test_sampling_settings_are_checked_before_any_training(tmp_path, tiny_data, random_weights, vq_folder):
    done = train_prior(vq_folder, "vq", tiny_data, random_weights, "--temperature=0", name="cold")
    assert done.returncode == 2 and "--temperature must be above 0, got 0.0" in done.stderr
    assert not (vq_folder / "cold").exists()


def test_sample_figures_show_the_first_samples_only(tmp_path):
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (prior_module.FIGURE_SAMPLES + 36, 4, 4, 3), dtype=np.uint8)
    nearest = rng.integers(0, 256, samples.shape, dtype=np.uint8)
    (tmp_path / "all").mkdir(), (tmp_path / "first").mkdir()
    prior_module.write_sample_figures(samples, nearest, tmp_path / "all")
    first = prior_module.FIGURE_SAMPLES
    prior_module.write_sample_figures(samples[:first], nearest[:first], tmp_path / "first")
    for name in ("sample_grid.png", "nearest_grid.png"):
        assert (tmp_path / "all" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()


TINY_GPT = ["--width=16", "--num_layers=1", "--num_heads=2", "--batch_size=8", "--epochs=1", "--warmup_steps=2",
            "--num_samples=4", "--num_fusion_scores=3", "--fid_dims=64", "--device=cpu"]


@pytest.fixture(scope="module")
def gpt_prior(vq_folder, tiny_data, random_weights):
    args = [sys.executable, "train_gpt.py", f"--output_dir={vq_folder}", "--vq_experiment=vq",
            f"--dataset={tiny_data}", "--experiment_name=gpt", f"--fid_weights={random_weights}", *TINY_GPT]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return vq_folder / "gpt"


def test_the_gpt_prior_learns_the_plain_background_codes_and_scores_its_samples_beside_real_sprites(
        gpt_prior, tiny_data):
    for name in EVERY_OUTPUT:
        assert (gpt_prior / name).is_file(), name
    metrics = json.loads((gpt_prior / "metrics.json").read_text())
    assert metrics["prior"] == "gpt" and metrics["code_grid"] == [16, 16]
    train_names = json.loads((tiny_data / "train_names.json").read_text())
    model, model_type, config = load_model(gpt_prior, "cpu")
    assert model_type == "gpt" and model.num_classes == 2 and model.code_cells == 256
    # Conditioned on the background: the noise backgrounds are left out.
    with np.load(gpt_prior / "codes.npz") as saved:
        assert metrics["train_grids"] == len(saved["train"]) < len(train_names)
    assert math.isfinite(metrics["fid"]) and math.isfinite(metrics["floor_fid"])
    assert metrics["floor_reference"] == "4 training sprites, drawn at random"
    assert metrics["sample_background"] == "both"
    for scores in (metrics["cleanliness"], metrics["real"]["cleanliness"]):
        assert set(scores) == {"colours", "speckle_rate", "outline_continuity"}
        assert all(s["p5"] <= s["mean"] <= s["p95"] for s in scores.values())
    assert 0 <= metrics["real"]["nearest_code_share_mean"] <= 1 and metrics["real"]["nearest_mse_mean"] >= 0
    nearest = json.loads((gpt_prior / "samples" / "nearest.json").read_text())
    assert all(0 <= row["shared_codes"] <= 256 for row in nearest)
    # Every fusion method on the same pairs, each scored against the test split and its parents.
    assert metrics["fusion_methods"] == ["blend", "swap", "prior-swap", "prior-blend"]
    assert metrics["fusion_pairs"] == 3 and (gpt_prior / "fusion_grid.png").is_file()
    for method, scores in metrics["fusions"].items():
        assert math.isfinite(scores["fid"]), method
        assert all(0 <= scores[k] <= 1 for k in ("silhouette_overlap_a", "silhouette_overlap_b",
                                                 "palette_overlap_a", "palette_overlap_b")), method


def test_sample_labels_follow_sample_background():
    config = {"num_samples": 5, "sample_background": "both"}
    assert prior_module.sample_labels(config).tolist() == [0, 1, 0, 1, 0]
    assert prior_module.sample_labels({**config, "sample_background": "black"}).tolist() == [1] * 5
    assert prior_module.BACKGROUNDS[:2] == ["white", "black"]


def test_an_unconditioned_samples_background_is_the_plain_colour_nearer_its_corner():
    samples = np.zeros((3, 4, 4, 3), np.uint8)
    samples[0] = 250
    samples[2] = 90
    assert prior_module.sample_backgrounds(samples).tolist() == [0, 1, 1]
