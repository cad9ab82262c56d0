"""Specifications on CUDA: every model trains there as on the CPU, the EMA codebook is updated on
the device, and the training scripts' `fast` switch trains alike there.

Skipped where CUDA is absent. `bench/gpu_check.py` runs this module on a GPU; its CPU rehearsal
sets PIXEL_VQVAE_TEST_DEVICE=cpu, where the comparisons with the CPU hold by construction and only
the plumbing is exercised."""
import copy
import json
import os

import numpy as np
import pytest
import torch

from bench.gpu_check import lists_key
from models import VectorQuantizerEMA, build_model
from tests.helpers import train
from tests.sprites import sprite_rgba

DEVICE = torch.device(os.environ.get("PIXEL_VQVAE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="CUDA is not available here")

# Tiny versions of the four configurations of bench/throughput.py, at 16x16 pixels.
TINY_VQ = dict(num_embeddings=16, embedding_dim=8, commitment_cost=0.25, ema_decay=0.99)
CONFIGURATIONS = {
    "pixel_vqvae": ("vqvae", dict(TINY_VQ, num_layers=0, adapter_layer=True, pixelsight_filters=16)),
    "pixel_vqvae_16x16": ("vqvae", dict(TINY_VQ, num_layers=2, adapter_layer=True, pixelsight_filters=16)),
    "vqvae": ("vqvae", dict(TINY_VQ, num_layers=2)),
    "vae": ("vae", dict(num_layers=2, max_filters=16, latent_dim=8, image_size=16)),
}


@pytest.fixture(autouse=True)
def float32_matmuls():
    """TF32 rounds products to 10 bits of mantissa; the comparisons here are of float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sprite_batch(count=8):
    """[count, 3, 16, 16] synthetic sprites on black, in [0, 1]."""
    rgb = np.stack([sprite_rgba(seed)[..., :3] for seed in range(count)])
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255


def assert_close_to_scale(actual, expected, tolerance=1e-3):
    """Equal up to `tolerance` of the largest magnitude of `expected`: float32 sums in another order."""
    scale = expected.abs().max().clamp_min(1e-12)
    assert (actual.cpu() - expected).abs().max() <= tolerance * scale


def train_step(model, model_type, x, noise):
    output = model(x, noise) if model_type == "vae" else model(x)
    loss = model.loss_terms(x, output)["loss"]
    loss.backward()
    return output, loss


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_a_training_step_on_the_device_computes_what_it_computes_on_the_cpu(name):
    model_type, keys = CONFIGURATIONS[name]
    torch.manual_seed(0)
    on_cpu = build_model(model_type, keys).train()
    on_device = copy.deepcopy(on_cpu).to(DEVICE)
    x = sprite_batch()
    noise = torch.randn(len(x), keys.get("latent_dim", 1))
    expected, expected_loss = train_step(on_cpu, model_type, x, noise)
    output, loss = train_step(on_device, model_type, x.to(DEVICE), noise.to(DEVICE))
    assert output.reconstruction.device.type == DEVICE.type
    assert abs(loss.item() - expected_loss.item()) <= 1e-4 * expected_loss.item()
    assert_close_to_scale(output.reconstruction.detach(), expected.reconstruction.detach())
    if model_type == "vqvae":
        assert torch.equal(output.indices.cpu(), expected.indices)
    for (key, parameter), reference in zip(on_device.named_parameters(), on_cpu.parameters()):
        assert parameter.grad is not None and parameter.grad.device.type == DEVICE.type, key
        assert_close_to_scale(parameter.grad, reference.grad)
    for (key, buffer), reference in zip(on_device.named_buffers(), on_cpu.buffers()):
        assert buffer.device.type == DEVICE.type, key
        if buffer.is_floating_point():
            assert_close_to_scale(buffer, reference)


def test_the_pixelcnn_prior_trains_on_the_device_as_on_the_cpu():
    torch.manual_seed(0)
    on_cpu = build_model("pixelcnn", dict(num_embeddings=16, hidden_channels=16, num_layers=3, kernel_size=3))
    on_device = copy.deepcopy(on_cpu).to(DEVICE)
    codes = torch.randint(16, (4, 8, 8))
    losses = []
    for model, grid in ((on_cpu, codes), (on_device, codes.to(DEVICE))):
        loss = torch.nn.functional.cross_entropy(model(grid), grid)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) <= 1e-5 * losses[0]
    for parameter, reference in zip(on_device.parameters(), on_cpu.parameters()):
        assert_close_to_scale(parameter.grad, reference.grad)


def test_kmeans_places_the_codebook_on_the_device_and_a_dead_code_restarts_on_a_batch_latent():
    torch.manual_seed(0)
    quantizer = VectorQuantizerEMA(8, 4, kmeans_init=True, dead_code_threshold=0.5).to(DEVICE).train()
    centres = torch.cat([3 * torch.eye(4), -3 * torch.eye(4)]).to(DEVICE)
    rows = centres.repeat(8, 1) + 0.01 * torch.randn(64, 4, device=DEVICE)
    latents = rows.reshape(1, 8, 8, 4).permute(0, 3, 1, 2)  # [B, D, H, W], as an encoder gives them
    quantizer(latents)
    assert bool(quantizer.initialized)
    nearest_code_distance = torch.cdist(centres, quantizer.embedding).min(1).values
    assert nearest_code_distance.max() < 0.1  # k-means put a code on each of the 8 clusters

    quantizer.embedding[3] = quantizer.embed_sum[3] = 1e3  # never the nearest code, so its count decays to 0
    quantizer.cluster_size[3] = 0.0
    quantizer(latents)
    assert (rows == quantizer.embedding[3]).all(1).any()
    assert quantizer.cluster_size[3].item() == 1.0


def test_the_ema_update_on_the_device_matches_the_cpu():
    torch.manual_seed(0)
    on_cpu = VectorQuantizerEMA(16, 8).train()
    on_device = copy.deepcopy(on_cpu).to(DEVICE)
    latents = torch.randn(4, 8, 6, 6)
    for _ in range(3):
        expected, output = on_cpu(latents), on_device(latents.to(DEVICE))
        assert torch.equal(output.indices.cpu(), expected.indices)
    for buffer in ("embedding", "cluster_size", "embed_sum"):
        assert_close_to_scale(getattr(on_device, buffer), getattr(on_cpu, buffer), 1e-5)


def test_fast_and_reference_train_alike_on_the_device(tmp_path, tiny_data):
    if not lists_key("train_pixel_vqvae.py", "fast"):
        pytest.skip("the training scripts of this tree have no `fast` key")
    metrics, losses = {}, {}
    for fast in ("False", "True"):
        done = train("train_pixel_vqvae.py", tmp_path, tiny_data, f"--device={DEVICE.type}", "--epochs=1",
                     f"--fast={fast}", name=f"fast_{fast}")
        # On a device where the acceleration is not allowed, fast=True falls back with a warning;
        # either way the run trains and writes its outputs.
        assert done.returncode == 0, done.stderr[-3000:]
        metrics[fast] = json.loads((tmp_path / f"fast_{fast}" / "metrics.json").read_text())
        losses[fast] = json.loads((tmp_path / f"fast_{fast}" / "history.json").read_text())[0]["train_loss"]
    assert abs(losses["True"] - losses["False"]) <= 1e-2 * losses["False"]
    assert abs(metrics["True"]["mse"] - metrics["False"]["mse"]) <= 5e-2 * metrics["False"]["mse"]
    assert metrics["True"]["device"].startswith(DEVICE.type)
