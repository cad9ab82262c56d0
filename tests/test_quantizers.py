"""Specifications of the residual (RVQ) and finite scalar (FSQ) quantisers beside the EMA one: shapes,
codes both ways, what each quantiser computes, codebook statistics, and a tiny run of each through
train_vqvae.py, resumed, with its fusions, report row and (FSQ) prior."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import VQVAE, FiniteScalarQuantizer, ResidualVectorQuantizer
from models.fsq import parse_levels
from tests.helpers import palette_batch, refusal, train
from tests.test_prior import train_prior
from utils.fusions import swap
from utils.metrics import bits_per_sprite, codebook_stats
from utils.report import _row, load_experiments
from utils.training.checkpoints import load_model
from utils.training.loop import histogram_bins

QUANTIZER_KEYS = {"residual": dict(quantizer="residual", residual_depth=3),
                  "fsq": dict(quantizer="fsq", fsq_levels="4,4")}  # 16 codes, as num_embeddings
RUNS = {"residual": ["--quantizer=residual", "--residual_depth=3"], "fsq": ["--quantizer=fsq", "--fsq_levels=4,4"]}


def tiny_vqvae(quantizer, num_layers=1, seed=0, **keys):
    torch.manual_seed(seed)
    return VQVAE(num_layers, num_embeddings=16, embedding_dim=8, adapter_layer=num_layers == 0,
                 pixelsight_filters=16, **{**QUANTIZER_KEYS.get(quantizer, {}), **keys})


# Both ways, at every num_layers


@pytest.mark.parametrize("quantizer", sorted(QUANTIZER_KEYS))
@pytest.mark.parametrize("num_layers", [0, 1, 2])
def test_shapes_at_every_num_layers(quantizer, num_layers):
    model = tiny_vqvae(quantizer, num_layers)
    x = palette_batch(n=2)
    grid = 16 // 2 ** num_layers
    out = model(x)
    levels = (3,) if quantizer == "residual" else ()
    assert out.indices.shape == (2, *levels, grid, grid) and out.indices.dtype == torch.long
    assert 0 <= out.indices.min() and out.indices.max() < 16
    assert out.reconstruction.shape == x.shape
    assert model.quantizer.embed_indices(out.indices).shape == (2, 8, grid, grid)
    assert model.decode_indices(out.indices).shape == x.shape


@pytest.mark.parametrize("quantizer", sorted(QUANTIZER_KEYS))
def test_image_to_codes_to_image_is_the_forward_reconstruction(quantizer):
    model = tiny_vqvae(quantizer)
    x = palette_batch()
    model(x)  # a training step moves the EMA codebooks and BatchNorm statistics off their start
    model.eval()
    indices = model.encode(x)
    quantized = model.quantize(model.encode_latents(x)).quantized
    assert torch.allclose(model.quantizer.embed_indices(indices), quantized, atol=1e-6)
    assert torch.allclose(model.decode_indices(indices), model(x).reconstruction, atol=1e-6)


@pytest.mark.parametrize("quantizer", sorted(QUANTIZER_KEYS))
def test_the_reconstruction_loss_reaches_the_encoder_through_the_quantiser(quantizer):
    model = tiny_vqvae(quantizer)
    x = palette_batch()
    # The reconstruction alone: without the straight-through estimator the gradient stops at the codes.
    F.mse_loss(model(x).reconstruction, x).backward()
    assert model.encoder.layers[0].weight.grad.abs().sum() > 0


def test_an_unknown_quantiser_or_fsq_levels_that_miss_the_codebook_size_are_refused():
    with pytest.raises(ValueError, match="quantizer 'gumbel' is not one of ema, residual, fsq"):
        VQVAE(1, num_embeddings=16, embedding_dim=8, quantizer="gumbel")
    with pytest.raises(ValueError, match="fsq_levels '8,8' make 64 codes, not num_embeddings = 16"):
        tiny_vqvae("fsq", fsq_levels="8,8")
    with pytest.raises(ValueError, match="at least 2"):
        parse_levels("16,1")


# Residual quantisation


def test_a_residual_quantiser_of_depth_1_trains_as_the_ema_quantiser():
    ema = tiny_vqvae("ema", kmeans_init=True, dead_code_threshold=0.5)
    residual = tiny_vqvae("residual", residual_depth=1, kmeans_init=True, dead_code_threshold=0.5)
    x = palette_batch()
    for model in (ema, residual):
        torch.manual_seed(1)  # k-means and restarts draw the same
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            out = model(x)
            optimizer.zero_grad()
            (F.mse_loss(out.reconstruction, x) + out.vq_loss).backward()
            optimizer.step()
    state = {key.replace("quantizers.0.", ""): value for key, value in residual.state_dict().items()}
    assert state.keys() == ema.state_dict().keys()
    assert all(torch.equal(value, state[key]) for key, value in ema.state_dict().items())
    assert torch.equal(residual.eval()(x).indices[:, 0], ema.eval()(x).indices)


def test_the_quantised_latent_is_the_sum_of_each_levels_code_of_the_residual_before_it():
    quantizer = ResidualVectorQuantizer(4, 2, depth=2, commitment_cost=0.25).eval()
    with torch.no_grad():
        quantizer.quantizers[0].embedding.copy_(torch.tensor([[0., 0], [4, 0], [0, 4], [4, 4]]))
        quantizer.quantizers[1].embedding.copy_(torch.tensor([[0., 0], [1, 0], [0, 1], [-1, -1]]))
    z = torch.tensor([[4.2, 1.1], [0.1, 3.2], [3.1, 3.0]]).t().reshape(1, 2, 1, 3).requires_grad_()
    out = quantizer(z)
    # (4.2, 1.1) -> (4, 0) + (0, 1); (0.1, 3.2) -> (0, 4) + (0, 0), for the residual (0.1, -0.8) is
    # nearer 0 than (-1, -1); (3.1, 3.0) -> (4, 4) + (-1, -1).
    assert out.indices.tolist() == [[[[1, 2, 3]], [[2, 0, 3]]]]
    expected = torch.tensor([[4., 1], [0, 4], [3, 3]]).t().reshape(1, 2, 1, 3)
    assert torch.allclose(out.quantized, expected)
    assert out.loss.item() == pytest.approx(0.25 * F.mse_loss(z, expected).item(), rel=1e-6)
    upstream = torch.randn_like(expected)
    ((out.quantized * upstream).sum() + out.loss).backward()
    # One commitment loss, on the sum, and the upstream gradient passed straight through.
    assert torch.allclose(z.grad, upstream + 0.25 * 2 * (z.detach() - expected) / expected.numel(), atol=1e-6)


def test_each_level_of_a_fitted_residual_quantiser_leaves_less_error():
    torch.manual_seed(0)
    quantizer = ResidualVectorQuantizer(8, 4, depth=4, kmeans_init=True)
    z = torch.randn(4, 4, 8, 8)
    for _ in range(20):  # k-means on each level's residuals, then EMA steps
        quantizer(z)
    indices = quantizer.eval()(z).indices
    rebuilt, errors = torch.zeros_like(z), [z.square().mean().item()]
    for level, codebook in enumerate(quantizer.quantizers):
        rebuilt = rebuilt + codebook.embed_indices(indices[:, level])
        errors.append((z - rebuilt).square().mean().item())
    assert errors == sorted(errors, reverse=True), errors
    # Four levels of 8 codes do far better than the one of 8: 4,096 sums of codes to choose from.
    assert errors[4] < 0.5 * errors[1]


def test_a_residual_quantisers_histogram_counts_each_level_in_its_own_bins():
    config = {"quantizer": "residual", "residual_depth": 2, "num_embeddings": 3, "embedding_dim": 4}
    indices = torch.tensor([[[[0, 0]], [[2, 1]]]])  # [B=1, depth=2, h=1, w=2]
    counts = torch.bincount(histogram_bins(indices, 3), minlength=6)
    assert counts.tolist() == [2, 0, 0, 0, 1, 1]
    stats = codebook_stats(counts.numpy(), codebooks=2)
    assert stats["codes_used"] == 3 and stats["codes_used_per_level"] == [1, 2]
    # exp(entropy) of the joint histogram: the depth times the geometric mean of the levels' perplexities.
    assert stats["perplexity"] == pytest.approx(2 * (1 * 2) ** 0.5, rel=1e-9)
    assert bits_per_sprite({**config, "image_size": 16, "num_layers": 1}) == 8 * 8 * 2 * math.log2(3)


# Finite scalar quantisation


def test_fsq_rounds_each_channel_to_its_own_number_of_levels_and_zero_to_zero():
    quantizer = FiniteScalarQuantizer(3, [2, 3, 4, 5, 8])
    z = torch.linspace(-20, 20, 2001).reshape(1, 1, 1, -1).expand(1, 5, 1, -1)
    rounded = quantizer.bound(z).round()
    assert [sorted(set(channel.flatten().tolist())) for channel in rounded[0]] == [
        [-1, 0], [-1, 0, 1], [-2, -1, 0, 1], [-2, -1, 0, 1, 2], [-4, -3, -2, -1, 0, 1, 2, 3]]
    assert quantizer.bound(torch.zeros(1, 5, 1, 1)).abs().max() < 1e-6


def test_fsq_indices_round_trip_and_number_every_grid_point_once():
    quantizer = FiniteScalarQuantizer(3, [3, 4, 2])
    indices = torch.arange(24).reshape(1, 4, 6)
    points = quantizer.grid_points(indices)
    assert torch.equal(quantizer.grid_indices(points), indices)
    assert len({tuple(p) for p in points.flatten(2)[0].t().tolist()}) == 24
    assert points.amin((0, 2, 3)).tolist() == [-1, -2, -1] and points.amax((0, 2, 3)).tolist() == [1, 1, 0]
    # Latents spread over the bound reach every code, from 0 to the product of the levels.
    with torch.no_grad():
        quantizer.project_in.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
        quantizer.project_in.bias.zero_()
        # Wide: for 2 levels the shift puts 0 at the grid's 0, and -1 below a latent of -3.8.
        steps = torch.linspace(-6, 6, 13)
        latents = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij")).reshape(1, 3, 1, -1)
        reached = quantizer(latents).indices
    assert reached.unique().tolist() == list(range(24))


def test_fsq_quantises_to_its_grid_with_no_loss_and_no_codebook_state():
    quantizer = FiniteScalarQuantizer(8, [4, 4])
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = quantizer(z)
    assert out.loss.item() == 0
    grid = quantizer.grid_points(out.indices) / quantizer.half_width
    assert torch.allclose(out.quantized, quantizer.project_out(grid), atol=1e-6)
    assert sorted(quantizer.state_dict()) == ["project_in.bias", "project_in.weight", "project_out.bias",
                                              "project_out.weight"]
    out.quantized.sum().backward()
    assert z.grad.abs().sum() > 0  # through the rounding, straight


def test_fsq_gives_the_same_codes_under_a_bfloat16_autocast():
    quantizer = FiniteScalarQuantizer(8, [8, 8, 4])
    z = torch.randn(2, 8, 8, 8) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = quantizer(z)
    assert torch.equal(autocast.indices, quantizer(z).indices)


# Through train_vqvae.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """For each quantiser: two epochs at once, and one epoch then --resume=True to the second."""
    out = tmp_path_factory.mktemp("quantizers")
    for name, keys in RUNS.items():
        for run, extra in ((f"{name}_whole", []), (f"{name}_halves", ["--epochs=1"]),
                           (f"{name}_halves", ["--resume=True"])):
            done = train("train_vqvae.py", out, tiny_data, *keys, *extra, name=run)
            assert done.returncode == 0, done.stderr[-3000:]
            # On the CPU, fast="auto" names the quantiser and trains on the reference path.
            assert "fast path is off: quantizer is a" in done.stderr
    return out


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_resumed_run_ends_with_the_weights_and_metrics_of_an_uninterrupted_one(runs, name):
    whole = torch.load(runs / f"{name}_whole/model.pt", weights_only=True)
    halves = torch.load(runs / f"{name}_halves/model.pt", weights_only=True)
    assert whole["config"]["quantizer"] == name
    assert all(torch.equal(value, halves["model"][key]) for key, value in whole["model"].items())
    metrics = [json.loads((runs / f"{run}/metrics.json").read_text()) for run in (f"{name}_whole", f"{name}_halves")]
    assert metrics[0]["mse"] == metrics[1]["mse"]


def test_a_residual_run_counts_three_codes_a_cell_in_its_metrics_and_report(runs):
    metrics = json.loads((runs / "residual_whole/metrics.json").read_text())
    assert metrics["bits_per_sprite"] == 8 * 8 * 3 * 4  # an 8x8 grid, 3 levels of 16 codes
    assert len(metrics["codes_used_per_level"]) == 3 and sum(metrics["codes_used_per_level"]) == metrics["codes_used"]
    assert 16 < metrics["codes_used"] <= 48  # more than one codebook's worth is in use
    history = json.loads((runs / "residual_whole/history.json").read_text())
    assert history[-1]["val_dead_codes"] + history[-1]["val_codes_used"] == 48
    experiment = next(e for e in load_experiments(runs) if e.name == "residual_whole")
    row = _row(experiment)
    assert row[1] == "Pixel VQ-VAE, 8x8 codes, residual x3" and f"{metrics['codes_used']}/48" in row


def test_an_fsq_run_counts_its_mixed_radix_codes(runs):
    metrics = json.loads((runs / "fsq_whole/metrics.json").read_text())
    assert metrics["bits_per_sprite"] == 8 * 8 * (2 + 2)
    assert 1 <= metrics["codes_used"] <= 16 and "codes_used_per_level" not in metrics
    experiment = next(e for e in load_experiments(runs) if e.name == "fsq_whole")
    assert _row(experiment)[1] == "Pixel VQ-VAE, 8x8 codes, FSQ 4,4"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_swap_takes_every_code_of_a_row_of_cells_from_one_parent(runs, name):
    model, _, _ = load_model(runs / f"{name}_whole", "cpu", fast=False)
    x = palette_batch(n=2)
    with torch.inference_mode():
        ia, ib = model.encode(x[:1]), model.encode(x[1:])
        assert not torch.equal(ia, ib)
        # Rows are the second-last axis; a residual quantiser's levels stay together.
        expected = model.decode_indices(torch.cat([ia[..., :4, :], ib[..., 4:, :]], -2))
        assert torch.equal(swap(model, "vqvae", x[:1], x[1:]), expected)
    assert len(list((runs / f"{name}_whole/fusions").glob("*+*/swap.png"))) == 2


def test_a_prior_over_fsq_codes_trains_and_samples_its_codes(runs, tiny_data, random_weights, tmp_path):
    shutil.copytree(runs / "fsq_whole", tmp_path / "vq")
    done = train_prior(tmp_path, "vq", tiny_data, random_weights, "--epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    codes = np.load(tmp_path / "prior/samples/codes.npy")
    assert codes.shape == (4, 8, 8) and 0 <= codes.min() and codes.max() < 16
    metrics = json.loads((tmp_path / "prior/metrics.json").read_text())
    assert metrics["uniform_bits_per_code"] == 4


def test_a_prior_over_residual_codes_is_refused_in_one_line(runs, tiny_data, random_weights, tmp_path):
    shutil.copytree(runs / "residual_whole", tmp_path / "vq")
    line = refusal(train_prior(tmp_path, "vq", tiny_data, random_weights))
    assert line == ("error: vq_experiment 'vq' has a residual quantiser, with 3 codes per cell; a PixelCNN prior "
                    "models one code per cell (train the VQ model with quantizer 'ema' or 'fsq')")
    assert not (tmp_path / "prior").exists()


def test_a_quantiser_other_than_the_checkpoints_is_refused_on_resume(runs, tiny_data, tmp_path):
    shutil.copytree(runs / "fsq_whole", tmp_path / "run")
    line = refusal(train("train_vqvae.py", tmp_path, tiny_data, "--resume=True"))
    assert "different architecture: quantizer (checkpoint 'fsq', config 'ema')" in line
