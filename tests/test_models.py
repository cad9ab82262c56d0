"""Specifications of the models: layer stacks, shapes, codes both ways, the EMA codebook, the VAE."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import VAE, VQVAE, Decoder, Encoder, VectorQuantizerEMA, build_model
from models import quantizer as quantizer_module
from models.decoder import StretchedSigmoid
from models.quantizer import nearest_code
from models.losses import commitment_loss, ssim
from models.vae import kl_divergence
from models.vqvae import VQVAEOutput

# A pixel-art palette with the pure black and white that outlines and backgrounds use.
PALETTE = torch.tensor([[0, 0, 0], [255, 255, 255], [200, 40, 40], [40, 120, 200]]) / 255


def sprites(n: int, size: int = 16) -> torch.Tensor:
    """n sprites of hard-edged palette rectangles on an outline-coloured ground, [n, 3, size, size]."""
    colours = torch.zeros(n, size, size, dtype=torch.long)
    for sprite in colours:
        for _ in range(3):
            top, left = torch.randint(0, size - 2, (2,)).tolist()
            height, width = torch.randint(2, size // 2, (2,)).tolist()
            sprite[top:top + height, left:left + width] = torch.randint(1, len(PALETTE), ()).item()
    return PALETTE[colours].permute(0, 3, 1, 2).contiguous()


def exact_pixel_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.clamp(0, 1) * 255).round() == (b * 255).round()).all(1).float().mean().item()


def conv_shapes(module: nn.Module) -> list[tuple[int, int, int]]:
    """(in channels, out channels, kernel size) of each convolution, in order."""
    return [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in module.modules()
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def set_codebook(quantizer: VectorQuantizerEMA, codes: list[list[float]]) -> None:
    with torch.no_grad():
        quantizer.embedding.copy_(torch.tensor(codes))
        quantizer.embed_sum.copy_(torch.tensor(codes))


def latents_from_vectors(vectors: list[list[float]], height: int, width: int) -> torch.Tensor:
    """Row-major list of D-vectors -> [1, D, height, width]."""
    return torch.tensor(vectors).t().reshape(1, -1, height, width)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


# Layer stacks


def test_plain_encoder_doubles_filters_up_to_a_linear_embedding_layer():
    encoder = Encoder(num_layers=2, out_channels=32)
    assert conv_shapes(encoder) == [(3, 16, 2), (16, 32, 2)]
    assert isinstance(encoder.layers[-1], nn.Conv2d)


def test_pixel_vqvae_16x16_variant_has_adapter_then_pixelsight_projection():
    encoder = Encoder(num_layers=2, out_channels=64, adapter_layer=True, pixelsight_filters=512)
    assert conv_shapes(encoder) == [(3, 128, 1), (128, 256, 2), (256, 512, 2), (512, 64, 1)]
    assert isinstance(encoder.layers[-1], nn.Conv2d)


def test_decoder_output_reaches_black_and_white_at_finite_pre_activations():
    squash = StretchedSigmoid()
    assert squash(torch.tensor(-3.05)).item() < 0 < squash(torch.tensor(-2.9)).item()
    assert squash(torch.tensor(2.9)).item() < 1 < squash(torch.tensor(3.05)).item()
    assert squash(torch.tensor(0.0)).item() == pytest.approx(0.5)


def test_decoder_mirrors_the_encoder_and_ends_in_a_sigmoid():
    decoder = Decoder(num_layers=2, in_channels=64, adapter_layer=True, pixelsight_filters=512)
    assert conv_shapes(decoder) == [(64, 512, 1), (512, 256, 2), (256, 128, 2), (128, 3, 1)]
    transposed = [m for m in decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.stride for m in transposed] == [(2, 2), (2, 2)]
    assert isinstance(decoder.layers[-1], StretchedSigmoid)


def test_default_pixel_vqvae_encoder_is_the_adapter_alone():
    encoder = Encoder(num_layers=0, out_channels=64, adapter_layer=True, pixelsight_filters=512)
    assert conv_shapes(encoder) == [(3, 512, 1), (512, 64, 1)]


def test_vae_encoder_keeps_its_last_activation_for_the_linear_layer():
    vae = VAE()
    assert conv_shapes(vae.encoder) == [(3, 32, 1), (32, 64, 2), (64, 128, 2), (128, 256, 2),
                                        (256, 512, 2)]
    assert isinstance(vae.encoder.layers[-1], nn.ReLU)
    assert vae.to_gaussian.in_features == 512 * 4 * 4


def test_num_layers_zero_without_adapter_layer_is_refused():
    with pytest.raises(ValueError, match="adapter_layer"):
        VQVAE(num_layers=0, num_embeddings=8, embedding_dim=4)


def test_image_size_must_be_a_multiple_of_the_downsampling():
    with pytest.raises(ValueError, match="multiple"):
        VQVAE(num_layers=3, num_embeddings=8, embedding_dim=4).code_grid_size(20)
    with pytest.raises(ValueError, match="multiple"):
        VAE(num_layers=3, max_filters=16, latent_dim=4, image_size=20)


# VQ-VAE both ways


@pytest.mark.parametrize("num_layers, adapter_layer, pixelsight_filters", [
    (n, adapter, pixelsight) for n in range(4) for adapter in (False, True) for pixelsight in (0, 32)
    if n or adapter])
def test_vqvae_shapes_at_every_depth(num_layers, adapter_layer, pixelsight_filters):
    model = VQVAE(num_layers, num_embeddings=8, embedding_dim=16, adapter_layer=adapter_layer,
                  pixelsight_filters=pixelsight_filters)
    x = sprites(2)
    grid = 16 // 2 ** num_layers
    out = model(x)
    assert model.code_grid_size(16) == grid
    assert model.encode_latents(x).shape == (2, 16, grid, grid)
    assert out.indices.shape == (2, grid, grid)
    assert out.reconstruction.shape == x.shape
    margin = 0.05  # the decoder's stretched sigmoid
    assert -margin <= out.reconstruction.min() and out.reconstruction.max() <= 1 + margin


def test_decoding_the_indices_gives_the_reconstruction():
    model = VQVAE(num_layers=1, num_embeddings=8, embedding_dim=16, adapter_layer=True).eval()
    x = sprites(2)
    indices = model.encode(x)
    quantized = model.quantize(model.encode_latents(x)).quantized
    assert indices.dtype == torch.long and indices.max() < 8
    assert torch.allclose(model.quantizer.embed_indices(indices), quantized, atol=1e-6)
    assert torch.allclose(model.decode_indices(indices), model.decode(quantized), atol=1e-6)
    assert torch.allclose(model.decode_indices(indices), model(x).reconstruction, atol=1e-6)


def test_channels_last_input_gives_the_same_codes_and_image():
    model = VQVAE(num_layers=2, num_embeddings=8, embedding_dim=16, pixelsight_filters=32).eval()
    x = sprites(2)
    out = model(x)
    out_channels_last = model(x.to(memory_format=torch.channels_last))
    assert torch.equal(out.indices, out_channels_last.indices)
    assert torch.allclose(out.reconstruction, out_channels_last.reconstruction, atol=1e-6)


def test_straight_through_gradient_reaches_the_encoder():
    model = VQVAE(num_layers=1, num_embeddings=8, embedding_dim=16, adapter_layer=True)
    x = sprites(2)
    # Reconstruction loss alone: without the straight-through estimator it stops at the codes.
    F.mse_loss(model(x).reconstruction, x).backward()
    first_conv = model.encoder.layers[0]
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("training", [False, True])
def test_quantized_latents_are_the_codes_and_pass_the_gradient_straight_through(training):
    quantizer = VectorQuantizerEMA(8, 4, commitment_cost=0.25, dead_code_threshold=0.5).train(training)
    codebook = quantizer.embedding.clone()
    z_e = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = quantizer(z_e)
    # The codes compared, before this step moves the codebook; z + (codes - z) rounds to them.
    codes = F.embedding(out.indices, codebook).permute(0, 3, 1, 2)
    assert torch.allclose(out.quantized, codes, rtol=0, atol=1e-6)
    assert out.loss.item() == pytest.approx(0.25 * F.mse_loss(z_e, codes).item(), rel=1e-6)
    upstream = torch.randn_like(codes)
    ((out.quantized * upstream).sum() + 3 * out.loss).backward()
    # The upstream gradient unchanged, plus the commitment loss's pull of z_e towards its code.
    expected = upstream + 3 * 0.25 * 2 * (z_e.detach() - codes) / codes.numel()
    assert torch.allclose(z_e.grad, expected, rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip_gives_identical_outputs():
    model = VQVAE(num_layers=1, num_embeddings=8, embedding_dim=16, adapter_layer=True)
    x = sprites(4)
    for _ in range(3):
        model(x)  # moves the EMA codebook and BatchNorm statistics away from their initial values
    model.eval()
    copy = VQVAE(num_layers=1, num_embeddings=8, embedding_dim=16, adapter_layer=True).eval()
    assert not torch.equal(copy(x).reconstruction, model(x).reconstruction)
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy(x).reconstruction, model(x).reconstruction)
    assert torch.equal(copy(x).indices, model(x).indices)


# The EMA quantiser


def test_ema_update_matches_a_hand_computation():
    quantizer = VectorQuantizerEMA(3, 2, commitment_cost=0.25, decay=0.5, epsilon=1e-5)
    set_codebook(quantizer, [[0, 0], [10, 0], [0, 10]])
    out = quantizer(latents_from_vectors([[1, 0], [0, 1], [9, 1], [1, 1]], 2, 2))

    assert out.indices.tolist() == [[[0, 0], [1, 0]]]
    assert out.quantized[0, :, 1, 0].tolist() == [10, 0]  # the codebook before the update
    # Squared distances to the codes: 1, 1, 2, 2 over 8 values.
    assert out.loss.item() == pytest.approx(0.25 * 6 / 8)
    # Counts 3, 1, 0 and sums (2, 2), (9, 1), (0, 0), each halved and added to half the old stats
    # (every code starts as seen once, at its own position).
    cluster_size = [0.5 * 1 + 0.5 * 3, 0.5 * 1 + 0.5 * 1, 0.5 * 1]
    embed_sum = [[0.5 * 0 + 0.5 * 2, 0.5 * 0 + 0.5 * 2], [0.5 * 10 + 0.5 * 9, 0.5 * 0 + 0.5 * 1],
                 [0.5 * 0, 0.5 * 10]]
    assert quantizer.cluster_size.tolist() == cluster_size
    assert quantizer.embed_sum.tolist() == embed_sum
    total = sum(cluster_size)
    smoothed = [(n + 1e-5) / (total + 3 * 1e-5) * total for n in cluster_size]
    expected = [[s / n for s in sums] for sums, n in zip(embed_sum, smoothed)]
    assert quantizer.embedding.tolist() == [pytest.approx(row, rel=1e-6) for row in expected]
    # The unused code stays where it was instead of jumping.
    assert quantizer.embedding[2].tolist() == pytest.approx([0, 10], abs=1e-3)


def test_codebook_statistics_are_buffers_not_parameters():
    model = VQVAE(num_layers=1, num_embeddings=8, embedding_dim=4, adapter_layer=True)
    state = model.state_dict()
    parameters = dict(model.named_parameters())
    for name in ["embedding", "cluster_size", "embed_sum", "initialized"]:
        assert f"quantizer.{name}" in state
        assert f"quantizer.{name}" not in parameters
    assert list(model.quantizer.parameters()) == []


def test_eval_mode_leaves_the_codebook_untouched_and_training_moves_it():
    quantizer = VectorQuantizerEMA(8, 4, kmeans_init=True)
    z = torch.randn(2, 4, 8, 8)
    before = {name: buffer.clone() for name, buffer in quantizer.named_buffers()}
    quantizer.eval()(z)
    assert all(torch.equal(buffer, before[name]) for name, buffer in quantizer.named_buffers())
    quantizer.train()(z)
    assert not torch.equal(quantizer.embedding, before["embedding"])
    assert quantizer.initialized


def test_quantizer_computes_in_float32_under_autocast():
    quantizer = VectorQuantizerEMA(64, 8).eval()
    z = torch.randn(2, 8, 16, 16)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    codebook = quantizer.embedding
    # The input has near ties that bfloat16 distances would settle differently.
    assert not torch.equal(nearest_code(flat.bfloat16(), codebook.bfloat16()),
                           nearest_code(flat, codebook))
    expected = quantizer(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = quantizer(z)
    assert torch.equal(autocast.indices, expected.indices)
    assert autocast.quantized.dtype == torch.float32 and autocast.loss.dtype == torch.float32

    half_input = quantizer(z.bfloat16())
    assert half_input.quantized.dtype == torch.bfloat16
    assert torch.equal(half_input.indices, quantizer(z.bfloat16().float()).indices)


def palette_latents(centres: list[list[float]], counts: list[int]) -> torch.Tensor:
    """counts[i] copies of centres[i], as [1, D, 1, sum(counts)]: in pixel art every pixel of one
    colour can have the very same latent."""
    vectors = torch.cat([torch.tensor([c] * n) for c, n in zip(centres, counts)])
    return vectors.t().reshape(1, len(centres[0]), 1, -1)


CENTRES = [[20.0, 0, 0, 0], [0, 20.0, 0, 0], [0, 0, 20.0, 0]]


def distance_from_each_centre_to_its_nearest_code(quantizer, centres):
    return torch.cdist(torch.tensor(centres), quantizer.embedding).min(1).values


@pytest.mark.parametrize("kmeans_init", [False, True])
def test_kmeans_init_places_a_code_on_every_latent_even_rare_ones(kmeans_init):
    quantizer = VectorQuantizerEMA(4, 4, kmeans_init=kmeans_init)
    quantizer(palette_latents(CENTRES, [180, 10, 10]))
    distances = distance_from_each_centre_to_its_nearest_code(quantizer, CENTRES)
    if kmeans_init:
        assert distances.max() < 1e-4
    else:  # the random codes nearest the common cluster take it, leaving a rare one uncovered
        assert distances.max() > 10


def test_kmeans_init_runs_once_and_not_again_after_a_reload(monkeypatch):
    calls = []
    real_kmeans = quantizer_module.kmeans

    def counting_kmeans(x, k):
        calls.append(k)
        return real_kmeans(x, k)

    monkeypatch.setattr(quantizer_module, "kmeans", counting_kmeans)
    quantizer = VectorQuantizerEMA(3, 4, kmeans_init=True)
    for _ in range(3):
        quantizer(palette_latents(CENTRES, [20, 20, 20]))
    assert calls == [3]
    reloaded = VectorQuantizerEMA(3, 4, kmeans_init=True)
    reloaded.load_state_dict(quantizer.state_dict())
    reloaded(palette_latents(CENTRES, [20, 20, 20]))
    assert calls == [3]


def test_dead_codes_restart_on_batch_latents_with_fresh_statistics():
    quantizer = VectorQuantizerEMA(4, 2, decay=0.5, dead_code_threshold=0.6)
    set_codebook(quantizer, [[0, 0], [50, 50], [-50, 50], [50, -50]])
    z = 0.1 * torch.randn(1, 2, 4, 4)  # every latent picks code 0
    quantizer(z)
    latents = z.permute(0, 2, 3, 1).reshape(-1, 2)
    # Codes 1-3 decayed to a count of 0.5 < 0.6, so each now sits exactly on a latent of the batch.
    restarted = quantizer.embedding[1:]
    assert torch.cdist(restarted, latents).min(1).values.tolist() == [0, 0, 0]
    assert torch.equal(quantizer.embed_sum[1:], restarted)
    assert quantizer.cluster_size.tolist() == [0.5 + 0.5 * 16, 1, 1, 1]


@pytest.mark.parametrize("sampling", ["uniform", "error"])
def test_restarts_drawn_by_error_land_on_the_latents_that_share_a_code_far_from_it(sampling):
    # 1,020 latents sit on code 0 (the background); 4 sit 5 away from it in two places (two colours
    # that share it). Uniform draws of 3 codes pick among the background nearly always; draws by
    # error, never.
    torch.manual_seed(0)
    quantizer = VectorQuantizerEMA(4, 2, decay=0.5, dead_code_threshold=0.6, dead_code_sampling=sampling)
    set_codebook(quantizer, [[0, 0], [50, 50], [-50, 50], [50, -50]])
    latents = torch.zeros(1024, 2)
    latents[:2], latents[2:4] = torch.tensor([3.0, 4]), torch.tensor([-3.0, 4])
    quantizer(latents.t().reshape(1, 2, 32, 32))
    on_far = (torch.cdist(quantizer.embedding[1:], latents[:4]).min(1).values == 0).sum().item()
    assert on_far == (3 if sampling == "error" else 0)


def test_error_draws_keep_to_the_batch_when_every_latent_is_on_its_code():
    quantizer = VectorQuantizerEMA(4, 2, dead_code_threshold=0.5, dead_code_sampling="error")
    rows = quantizer.restart_rows(7, torch.zeros(7))
    assert rows.shape == (4,) and 0 <= rows.min() and rows.max() < 7
    with pytest.raises(ValueError, match="dead_code_sampling 'far' is not one of uniform, error"):
        VectorQuantizerEMA(4, 2, dead_code_sampling="far")


def test_without_a_threshold_dead_codes_stay_put():
    quantizer = VectorQuantizerEMA(4, 2, decay=0.5)
    set_codebook(quantizer, [[0, 0], [50, 50], [-50, 50], [50, -50]])
    quantizer(0.1 * torch.randn(1, 2, 4, 4))
    assert quantizer.cluster_size.tolist() == [0.5 + 0.5 * 16, 0.5, 0.5, 0.5]
    assert torch.allclose(quantizer.embedding[1:], torch.tensor([[50.0, 50], [-50, 50], [50, -50]]),
                          rtol=1e-3)


# VAE


def test_kl_is_zero_at_the_prior_and_matches_the_closed_form_elsewhere():
    zeros = torch.zeros(4, 8)
    assert kl_divergence(zeros, zeros).item() == 0
    assert kl_divergence(torch.ones(4, 8), zeros).item() == pytest.approx(0.5 * 8)
    logvar = torch.full((4, 8), math.log(2))
    assert kl_divergence(zeros, logvar).item() == pytest.approx(8 * 0.5 * (1 - math.log(2)))


def test_vae_shapes_and_kl_loss_per_pixel_channel():
    vae = VAE(num_layers=2, max_filters=32, latent_dim=8, kl_weight=0.5, image_size=16)
    x = sprites(2)
    out = vae(x)
    assert out.reconstruction.shape == x.shape
    assert out.mu.shape == out.logvar.shape == (2, 8)
    terms = vae.loss_terms(x, out)
    assert list(terms) == ["recon", "kl", "loss"]
    assert terms["kl"].item() == pytest.approx(kl_divergence(out.mu, out.logvar).item()) and terms["kl"].item() > 0
    assert terms["recon"].item() == pytest.approx(((out.reconstruction - x) ** 2).mean().item())
    assert terms["loss"].item() == pytest.approx(terms["recon"].item() + 0.5 * terms["kl"].item() / (3 * 16 * 16))
    decoded = vae.decode(torch.randn(5, 8))
    assert decoded.shape == (5, 3, 16, 16)
    assert 0 <= decoded.min() and decoded.max() <= 1


def test_vae_samples_while_training_and_uses_the_mean_in_eval():
    vae = VAE(num_layers=1, max_filters=16, latent_dim=4, image_size=16)
    x = sprites(2)
    assert not torch.equal(vae(x).reconstruction, vae(x).reconstruction)
    vae.eval()
    assert torch.equal(vae(x).reconstruction, vae(x).reconstruction)
    assert torch.equal(vae(x).reconstruction, vae.decode(vae.encode(x)[0]))


# build_model


def test_build_model_takes_model_keys_and_ignores_the_rest():
    config = {"num_layers": 0, "num_embeddings": 16, "embedding_dim": 8, "adapter_layer": True,
              "pixelsight_filters": 32, "ema_decay": 0.9, "epochs": 3, "learning_rate": 1e-3}
    model = build_model("vqvae", config)
    assert isinstance(model, VQVAE)
    assert model.quantizer.embedding.shape == (16, 8) and model.quantizer.decay == 0.9
    assert conv_shapes(model.encoder) == [(3, 32, 1), (32, 8, 1)]
    vae = build_model("vae", {"latent_dim": 8, "max_filters": 32, "num_layers": 2,
                              "image_size": 16, "batch_size": 4})
    assert isinstance(vae, VAE) and vae.from_latent.in_features == 8


def test_build_model_names_what_is_wrong():
    with pytest.raises(ValueError, match="unknown model_type 'gan'"):
        build_model("gan", {})
    with pytest.raises(ValueError, match="num_embeddings"):
        build_model("vqvae", {"num_layers": 1, "embedding_dim": 8})


# Training


def test_pixel_vqvae_learns_to_reproduce_sprites_pixel_exactly():
    model = VQVAE(num_layers=0, num_embeddings=16, embedding_dim=8, adapter_layer=True,
                  pixelsight_filters=32, kmeans_init=True)
    train, held_out = sprites(32), sprites(16)
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(300):
        out = model(train)
        loss = F.mse_loss(out.reconstruction, train) + out.vq_loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        assert exact_pixel_rate(model(held_out).reconstruction, held_out) > 0.95


@pytest.mark.parametrize("num_layers", [0, 2])
def test_reconstructions_stay_float32_under_a_bfloat16_autocast(num_layers):
    # bfloat16 steps of 1/256 near 1 could not land on every one of the 255 levels of a colour.
    torch.manual_seed(0)
    model = VQVAE(num_layers, 16, 8, adapter_layer=True, pixelsight_filters=32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 16, 16).contiguous(memory_format=torch.channels_last))
    assert out.reconstruction.dtype == torch.float32


def test_the_vqvae_objective_names_each_term_and_sums_them_by_their_weights():
    model = VQVAE(num_layers=1, num_embeddings=8, embedding_dim=4, use_ssim_loss=True, ssim_weight=0.5)
    x = torch.ones(1, 3, 16, 16)
    stripes = torch.arange(16.0).remainder(2).expand(1, 3, 16, 16)
    output = VQVAEOutput(0.5 * stripes, torch.tensor(0.1), torch.zeros(1, 8, 8, dtype=torch.long))
    terms = model.loss_terms(x, output)
    assert list(terms) == ["recon", "vq", "ssim", "loss"]
    # Half the pixels 0.5 from 1, half 1 away: a mean squared error of (0.25 + 1) / 2.
    assert terms["recon"].item() == pytest.approx(0.625)
    assert terms["vq"].item() == pytest.approx(0.1)
    assert terms["ssim"].item() == pytest.approx(1 - ssim(0.5 * stripes, x).item()) and terms["ssim"].item() > 0.5
    assert terms["loss"].item() == pytest.approx(0.625 + 0.1 + 0.5 * terms["ssim"].item())
    assert list(VQVAE(num_layers=1, num_embeddings=8, embedding_dim=4).loss_terms(x, output)) == ["recon", "vq", "loss"]


def test_the_commitment_loss_of_counted_rows_is_that_of_the_rows_repeated():
    z, codes = torch.randn(3, 4, 1, 1), torch.randn(3, 4, 1, 1)
    counts = torch.tensor([1.0, 3.0, 2.0])
    repeated = torch.repeat_interleave(torch.arange(3), counts.long())
    assert commitment_loss(z, codes, 0.25, counts).item() == pytest.approx(
        0.25 * F.mse_loss(z[repeated], codes[repeated]).item(), rel=1e-6)


def test_a_vq_model_reports_its_code_grid_codes_per_cell_and_bits_per_sprite():
    residual = VQVAE(num_layers=2, num_embeddings=16, embedding_dim=4, quantizer="residual", residual_depth=3)
    assert (residual.code_grid_size(64), residual.codes_per_cell, residual.code_histogram_size) == (16, 3, 48)
    assert residual.bits_per_sprite(64) == 16 * 16 * 3 * 4
    palette = VQVAE(num_layers=1, num_embeddings=256, embedding_dim=4, palette_output=True)
    assert palette.bits_per_sprite(16, palette_colours=5.5) == 8 * 8 * 8 + 24 * 5.5
    assert VAE(num_layers=2, max_filters=16, latent_dim=4, image_size=16).bits_per_sprite(16) is None
