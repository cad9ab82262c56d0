"""The tuning choices of models/fast: where each path is used, chosen by measurement (bench/README.md).
Changing one changes speed alone, which tests/test_fast_equivalence.py and the tests of each piece
keep honest; these tests pin the choices so that a change to one is a decision, not an accident."""
import pytest
import torch

from models import VAE, VQVAE
from models.fast import accelerate
from models.fast.batchnorm import runs_fused_with_relu
from tests.helpers import bn_relu_stack, counting_fused_calls, kernel_vqvae, needs_compiler, palette_batch, seeded_run
from utils.training.fast_path import uses_fast_path

CPU = torch.device("cpu")


def test_only_the_wide_and_the_per_pixel_models_run_distinct_blocks_in_training_unless_told():
    x = palette_batch()
    plain, wide, per_pixel = (accelerate(model, CPU) for model in (
        VQVAE(2, 16, 8), VQVAE(2, 16, 8, adapter_layer=True, pixelsight_filters=32),
        VQVAE(0, 16, 8, adapter_layer=True, pixelsight_filters=32)))
    assert [m._worth_running_distinct_blocks(x) for m in (plain, wide, per_pixel)] == [False, True, True]
    assert plain.eval()._worth_running_distinct_blocks(x)
    plain.train()
    plain.run_distinct_blocks, wide.run_distinct_blocks = True, False
    assert plain._worth_running_distinct_blocks(x) and not wide._worth_running_distinct_blocks(x)


def test_wide_adapters_before_a_2x2_layer_run_fused_and_narrow_ones_layer_by_layer():
    pixel_16x16 = VQVAE(num_layers=2, num_embeddings=16, embedding_dim=8, adapter_layer=True, pixelsight_filters=512)
    vae = VAE(num_layers=4, max_filters=512, latent_dim=8)
    assert pixel_16x16.encoder.layers[0].out_channels == 128 and accelerate(pixel_16x16, CPU).encoder.pointwise
    assert vae.encoder.layers[0].out_channels == 32 and not accelerate(vae, CPU).encoder.pointwise


@needs_compiler
def test_batchnorm_relu_runs_fused_from_4096_rows_up_to_8_mib():
    bn, relu = bn_relu_stack(16)[:2]
    x = torch.randn(16, 16, 16, 16).to(memory_format=torch.channels_last)  # 4,096 rows
    assert runs_fused_with_relu(bn, relu, x)
    assert not runs_fused_with_relu(bn, relu, x[:8])  # 2,048 rows
    wide = torch.randn(64, 64, 32, 32).to(memory_format=torch.channels_last)  # 16 MiB
    assert not runs_fused_with_relu(bn_relu_stack(64)[0], relu, wide)


@needs_compiler
def test_the_plain_vqvaes_two_batchnorm_layers_run_fused_at_every_step(monkeypatch):
    model, images = kernel_vqvae()
    calls = counting_fused_calls(monkeypatch)
    seeded_run(model, images)
    assert len(calls) == 3 * 2  # the encoder's and the decoder's BatchNorm, each of 3 steps


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cpu", True), ("auto", "cuda", False),  # not yet measured on a GPU
    ("True", "cuda", True), ("False", "cpu", False), ("true", "cpu", True)])
def test_fast_auto_accelerates_on_the_cpu_alone_and_true_or_false_decide(setting, device, expected):
    assert uses_fast_path({"fast": setting}, torch.device(device)) is expected
