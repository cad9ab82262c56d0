"""Specifications of the 16x16 tokenizer's parts: residual encoder and decoder, factorised l2 codes,
the rotation trick, the patch discriminator and its losses."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.discriminator import PatchDiscriminator, adaptive_weight, generator_loss, hinge_discriminator_loss
from models.encoder import Encoder
from models.factorized import FactorizedQuantizer, rotate_onto, unit
from models.resnet import ResidualDecoder, ResidualEncoder


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("num_layers", [0, 1, 2, 3])
def test_residual_encoder_and_decoder_map_between_image_and_grid_at_every_depth(num_layers):
    encoder = ResidualEncoder(num_layers, 16, hidden_channels=8, residual_blocks=2)
    decoder = ResidualDecoder(num_layers, 16, hidden_channels=8, residual_blocks=2)
    x = torch.rand(2, 3, 32, 32)
    z = encoder(x)
    assert z.shape == (2, 16, 32 // 2 ** num_layers, 32 // 2 ** num_layers)
    y = decoder(z)
    assert y.shape == x.shape
    assert y.min() >= -0.05 and y.max() <= 1.05  # the stretched sigmoid's range


def test_adapter_layer_makes_the_first_and_last_layers_1x1_and_pixelsight_widens_the_grid():
    plain = ResidualEncoder(2, 16, hidden_channels=8)
    adapted = ResidualEncoder(2, 16, hidden_channels=8, adapter_layer=True, pixelsight_filters=64)
    assert plain.layers[0].kernel_size == (3, 3) and adapted.layers[0].kernel_size == (1, 1)
    widths = [m.out_channels for m in adapted.layers if isinstance(m, nn.Conv2d)]
    assert widths[-2:] == [64, 16]
    decoder = ResidualDecoder(2, 16, hidden_channels=8, adapter_layer=True, pixelsight_filters=64)
    assert decoder.layers[0].out_channels == 64 and decoder.layers[-1].kernel_size == (1, 1)
    assert decoder.last_layer is decoder.layers[-1].weight


def test_a_code_of_the_residual_encoder_sees_the_neighbouring_blocks_and_the_papers_does_not():
    x = torch.rand(1, 3, 16, 16)
    nudged = x.clone()
    nudged[0, :, 5, 5] += 0.5  # a pixel of the 4x4 block at grid cell (1, 1)
    residual = ResidualEncoder(2, 8, hidden_channels=8).eval()
    paper = Encoder(2, 8).eval()
    with torch.no_grad():
        for encoder, sees_neighbours in ((residual, True), (paper, False)):
            change = (encoder(nudged) - encoder(x)).abs().sum(1)[0]
            assert change[1, 1] > 0
            assert bool(change[0, 0] > 0) is sees_neighbours  # a neighbouring cell's code


def test_factorised_codes_are_the_unit_code_of_largest_cosine_projected_back():
    quantizer = FactorizedQuantizer(num_embeddings=3, embedding_dim=2, codebook_dim=2).eval()
    with torch.no_grad():
        quantizer.project_in.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
        quantizer.project_in.bias.zero_()
        quantizer.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 5.0], [-1.0, -1.0]]))
    # Latents of any length: only their direction picks a code.
    z = torch.tensor([[9.0, 1.0], [0.1, 3.0], [-0.2, -0.3]]).t().reshape(1, 2, 1, 3)
    out = quantizer(z)
    assert out.indices.tolist() == [[[0, 1, 2]]]
    codes = unit(quantizer.codebook)[out.indices.flatten()]
    expected = quantizer.project_out(codes.t().reshape(1, 2, 1, 3))
    torch.testing.assert_close(out.quantized, expected)
    torch.testing.assert_close(quantizer.embed_indices(out.indices), expected)


def test_factorised_loss_trains_the_codebook_and_passes_the_decoder_gradient_to_the_encoder():
    quantizer = FactorizedQuantizer(num_embeddings=4, embedding_dim=6, codebook_dim=3)
    z = torch.randn(2, 6, 3, 3, requires_grad=True)
    out = quantizer(z)
    (out.quantized.sum() + out.loss).backward()
    assert quantizer.codebook.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0
    assert out.loss > 0


def identity_projection(quantizer):
    with torch.no_grad():
        quantizer.project_in.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
        quantizer.project_in.bias.zero_()


def directions(*vectors, repeat=1):
    """Latents [1, 2, 1, N] pointing along `vectors`, each `repeat` times."""
    return torch.tensor([v for v in vectors for _ in range(repeat)]).t().reshape(1, 2, 1, -1)


def test_kmeans_init_places_the_factorised_codes_on_the_first_batchs_directions():
    quantizer = FactorizedQuantizer(3, 2, codebook_dim=2, kmeans_init=True)
    identity_projection(quantizer)
    out = quantizer(directions([2.0, 0.0], [0.0, 3.0], [-1.0, -1.0], repeat=5))
    placed = {tuple(round(x, 4) for x in row) for row in unit(quantizer.codebook).tolist()}
    assert placed == {(1.0, 0.0), (0.0, 1.0), (-0.7071, -0.7071)}
    assert sorted(out.indices.unique().tolist()) == [0, 1, 2]
    # Placed once: a later batch is looked up, not clustered.
    before = quantizer.codebook.detach().clone()
    quantizer(directions([1.0, 1.0], repeat=15))
    assert torch.equal(before, quantizer.codebook.detach())


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_a_factorised_code_no_latent_picks_restarts_on_a_latent_only_with_a_threshold(threshold):
    quantizer = FactorizedQuantizer(2, 2, codebook_dim=2, dead_code_threshold=threshold, decay=0.5)
    identity_projection(quantizer)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    batch = directions([1.0, 0.2], [1.0, -0.2], repeat=4)
    for _ in range(3):  # code 1's count halves each step: 0.5, 0.25, then it is dead
        out = quantizer(batch)
        out.loss.backward()  # a code moved in the step must leave the backward pass intact
    # Restarted on a latent, the code is that latent's nearest: picked, its count is no longer low.
    assert quantizer.cluster_size[1] < 0.5 if threshold == 0 else quantizer.cluster_size[1] > 1.0
    moved = unit(quantizer.codebook)[1].detach()
    if threshold == 0:
        assert moved.tolist() == [-1.0, 0.0]
    else:
        assert any(torch.allclose(moved, unit(v, dim=0), atol=1e-6) for v in batch.reshape(2, -1).t())


def test_rotation_trick_equals_the_code_forwards_and_rotates_the_gradient():
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0]], requires_grad=True)
    code = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])
    out = rotate_onto(z, code)
    torch.testing.assert_close(out, code)
    upstream = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out.backward(upstream)
    # The first row turns 90 degrees anticlockwise onto its code, scaled by 2/3: the gradient is
    # the transpose, a clockwise turn, scaled alike (straight through would pass [1, 0] itself).
    torch.testing.assert_close(z.grad[0], torch.tensor([0.0, -2 / 3]))


def test_rotation_trick_quantiser_gives_the_straight_through_output():
    straight = FactorizedQuantizer(8, 6, 3).eval()
    rotated = FactorizedQuantizer(8, 6, 3, rotation_trick=True).eval()
    rotated.load_state_dict(straight.state_dict())
    z = torch.randn(2, 6, 4, 4)
    a, b = straight(z), rotated(z)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.quantized, b.quantized)


def test_patch_discriminator_judges_overlapping_patches():
    disc = PatchDiscriminator(3, channels=8, layers=2)
    logits = disc(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 1, 14, 14)


def test_hinge_losses_are_zero_past_the_margins_and_linear_inside():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # Real: relu(1 - 2) = 0, relu(1 - 0.5) = 0.5; fake: relu(1 - 3) = 0, relu(1 + 0) = 1.
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert generator_loss(fake).item() == pytest.approx(1.5)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    weight = torch.ones(2, requires_grad=True)
    reconstruction = (weight * torch.tensor([3.0, 4.0])).sum()  # gradient norm 5
    adversarial = (weight * torch.tensor([0.5, 0.0])).sum()  # gradient norm 0.5
    balance = adaptive_weight(reconstruction, adversarial, weight)
    assert balance.item() == pytest.approx(5 / (0.5 + 1e-4))
    assert not balance.requires_grad


def test_snapping_gives_each_pixel_the_nearest_colour_of_its_own_palette():
    from models.palette import snap_to_palette, sprite_palettes
    sprite = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.8, 0.2, 0.2]])  # black, white, red
    index = torch.tensor([[0, 1], [2, 1]])
    x = sprite[index].permute(2, 0, 1)[None]
    blurred = x * 0.9 + 0.05  # every colour off by a little, none exact
    snapped = snap_to_palette(blurred, sprite_palettes(x))
    assert torch.equal((snapped * 255).round(), (x * 255).round())
    # Another image's palette is not used: a second sprite of blue alone snaps everything to blue.
    blue = torch.tensor([0.1, 0.2, 0.9])[:, None, None].expand(3, 2, 2)[None]
    both = snap_to_palette(torch.cat([blurred, blurred]), sprite_palettes(torch.cat([x, blue])))
    assert torch.equal((both[1] * 255).round(), (blue[0] * 255).round())
