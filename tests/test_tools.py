"""Using a trained model on the user's own sprites: utils.reconstruct and utils.fuse."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models import GPTPrior

from tests.helpers import exit_status
from tests.sprites import sprite_rgba, write_species_folders
from utils import fuse, metrics, reconstruct
from utils.data.load import load_split
from utils.data.prepare import PrepareOptions, prepare
from utils.training.checkpoints import save_model


@pytest.fixture
def own_sprites(tmp_path):
    """A folder of sprites in several PNG modes and sizes, and one file that is not an image."""
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray(sprite_rgba(1), "RGBA").save(folder / "knight.png")
    Image.fromarray(sprite_rgba(2, height=6, width=6), "RGBA").convert("P").save(folder / "slime.png")
    Image.fromarray(sprite_rgba(3)[..., :3], "RGB").save(folder / "block.png")
    (folder / "notes.txt").write_text("not a sprite")
    return folder


def test_reconstruct_writes_prepared_inputs_beside_reconstructions(tiny_experiment, own_sprites, tmp_path, capsys):
    out = tmp_path / "out"
    assert reconstruct.main([str(tiny_experiment), str(own_sprites), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped notes.txt: not an image" in printed
    names = ["block.png", "knight.png", "slime.png"]
    assert sorted(p.name for p in (out / "inputs").iterdir()) == names
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == names
    knight = np.asarray(Image.open(out / "inputs/knight.png"))
    rgba = sprite_rgba(1)
    opaque_colours = {tuple(c) for c in rgba[rgba[..., 3] > 0][:, :3]}
    # The sprite on white as RGB, and the source's alpha as the mask: opaque exactly where the sprite is.
    assert knight.shape == (16, 16, 4)
    assert {tuple(c) for c in knight[..., :3].reshape(-1, 3)} <= opaque_colours | {(255, 255, 255)}
    assert (knight[..., 3] == 255).sum() == (rgba[..., 3] > 0).sum() and set(np.unique(knight[..., 3])) == {0, 255}
    assert metrics.main([str(out / "inputs"), str(out / "reconstructions"), "--json", str(tmp_path / "m.json")]) == 0
    scored = json.loads((tmp_path / "m.json").read_text())
    # utils.metrics reads the same masks back from the inputs' alpha and scores what reconstruct printed.
    assert scored == {"ref_dir": str(out / "inputs"), "out_dir": str(out / "reconstructions"),
                      **json.loads((out / "metrics.json").read_text())}
    assert f"{100 * scored['sprite_exact_pixel_rate']:.1f}% of sprite pixels exact" in printed
    assert f"{100 * scored['palette_exact_pixel_rate']:.1f}% once snapped" in printed


def test_reconstruct_on_a_black_background_puts_sprites_on_black(tiny_experiment, own_sprites, tmp_path):
    assert reconstruct.main([str(tiny_experiment), str(own_sprites), str(tmp_path / "out"), "--background", "black"]) == 0
    corner = np.asarray(Image.open(tmp_path / "out/inputs/knight.png"))[0, 0]
    assert corner.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("problem", ["no_experiment", "no_folder"])
def test_reconstruct_refuses_a_missing_experiment_or_folder_in_one_line(tiny_experiment, own_sprites, tmp_path, capsys, problem):
    experiment = tmp_path / "nothing" if problem == "no_experiment" else tiny_experiment
    folder = tmp_path / "nowhere" if problem == "no_folder" else own_sprites
    assert exit_status(reconstruct.main, [str(experiment), str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and ("nothing" in err[0] or "nowhere" in err[0])
    assert not (tmp_path / "out").exists()


def test_fuse_writes_blend_swap_and_interpolation_of_two_named_sprites(tiny_experiment, own_sprites, tmp_path):
    out = tmp_path / "fused"
    assert fuse.main([str(tiny_experiment), str(own_sprites / "knight.png"), str(own_sprites / "slime.png"), str(out),
                      "--steps", "4"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["blend.png", "inputs.png", "interpolation.gif",
                                                      "interpolation.png", "swap.png"]
    assert Image.open(out / "interpolation.png").size == (4 * 16, 16)
    assert Image.open(out / "inputs.png").size == (2 * 16, 16)


def test_fuse_refuses_a_file_that_is_not_a_sprite(tiny_experiment, own_sprites, tmp_path, capsys):
    assert exit_status(fuse.main, [str(tiny_experiment), str(own_sprites / "knight.png"), str(own_sprites / "notes.txt"),
                                   str(tmp_path / "fused")]) == 2
    assert "notes.txt cannot be used: not an image" in capsys.readouterr().err


def test_reconstruct_refuses_two_sprites_that_would_be_written_under_one_name(tiny_experiment, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray(sprite_rgba(1), "RGBA").save(folder / "a.png")
    Image.fromarray(sprite_rgba(2), "RGBA").save(folder / "a.gif")
    assert exit_status(reconstruct.main, [str(tiny_experiment), str(folder), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: a.gif and a.png in {folder} would both be written as a.png; rename one of them"]
    assert not (tmp_path / "out").exists()


def test_reconstruct_scores_a_prepared_test_only_set_on_its_own_backgrounds_and_masks(tiny_experiment, tmp_path, capsys):
    write_species_folders(tmp_path / "src", species=2, per_species=2)
    prepare(tmp_path / "src", tmp_path / "eval", PrepareOptions(image_size=16, flip=False, rotations=(), test_only=True),
            log=lambda _: None, workers=1)
    test = load_split(tmp_path / "eval", "test")
    out = tmp_path / "out"
    assert reconstruct.main([str(tiny_experiment), str(tmp_path / "eval"), str(out)]) == 0
    assert sorted(p.name for p in (out / "inputs").iterdir()) == sorted(test.names)
    assert len(test.names) == 8 and json.loads((out / "metrics.json").read_text())["images"] == 8
    for name, image, mask in zip(test.names, test.images, test.masks):
        written = np.asarray(Image.open(out / "inputs" / name))
        # The prepared image itself, black background included, and the source's alpha as its mask.
        assert np.array_equal(written[..., :3], image) and np.array_equal(written[..., 3] == 255, mask)
    assert metrics.main([str(out / "inputs"), str(out / "reconstructions"), "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["sprite_exact_pixel_rate"] == \
        json.loads((out / "metrics.json").read_text())["sprite_exact_pixel_rate"]


def test_reconstruct_refuses_a_prepared_set_of_another_image_size_in_one_line(tiny_experiment, tmp_path, capsys):
    write_species_folders(tmp_path / "src", species=2, per_species=1)
    prepare(tmp_path / "src", tmp_path / "eval", PrepareOptions(image_size=24, flip=False, rotations=(), test_only=True),
            log=lambda _: None, workers=1)
    assert exit_status(reconstruct.main, [str(tiny_experiment), str(tmp_path / "eval"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'eval'} was prepared at 24x24, but the model takes 16x16; prepare it again with --image-size 16"]
    assert not (tmp_path / "out").exists()


def prior_over(experiment, folder, num_classes=2):
    """A small untrained GPT prior saved as an experiment over `experiment`'s 16x16 grid of 16 codes."""
    config = {"vq_experiment": experiment.name, "num_embeddings": 16, "code_cells": 256, "width": 16,
              "num_layers": 1, "num_heads": 2, "num_classes": num_classes}
    torch.manual_seed(0)
    model = GPTPrior(**{key: value for key, value in config.items() if key != "vq_experiment"})
    save_model(folder / "model.pt", model, config, "gpt")
    return folder


def test_fuse_draws_the_prior_fusions_asked_for(tiny_experiment, own_sprites, tmp_path):
    prior = prior_over(tiny_experiment, tmp_path / "gpt")
    out = tmp_path / "fused"
    assert fuse.main([str(tiny_experiment), str(own_sprites / "knight.png"), str(own_sprites / "slime.png"), str(out),
                      "--prior", str(prior), "--method", "prior-swap", "--method", "prior-blend"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["blend.png", "inputs.png", "interpolation.gif",
                                                      "interpolation.png", "prior-blend.png", "prior-swap.png", "swap.png"]
    assert Image.open(out / "prior-swap.png").size == (16, 16)


@pytest.mark.parametrize("problem", ["no_prior", "other_model", "palette"])
def test_fuse_refuses_a_method_the_models_cannot_do_before_writing_anything(tiny_experiment, own_sprites, tmp_path,
                                                                            capsys, problem):
    args = [str(tiny_experiment), str(own_sprites / "knight.png"), str(own_sprites / "slime.png"), str(tmp_path / "fused")]
    if problem == "no_prior":
        args += ["--method", "prior-swap"]
    elif problem == "other_model":
        (tmp_path / "elsewhere").mkdir()
        args += ["--method", "prior-blend", "--prior", str(prior_over(tmp_path / "elsewhere", tmp_path / "gpt"))]
    else:
        args += ["--method", "palette-swap"]
    assert exit_status(fuse.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"no_prior": "need --prior", "other_model": "models the codes of 'elsewhere'",
                "palette": "draws with a palette"}[problem]
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "fused").exists()
