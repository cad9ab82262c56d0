"""The 16x16 tokenizer (train_tokenizer.py) end to end on tiny sprites: the adversarial term after its
warm-up, the schedule, snapping to the sprite's palette, and resume after a kill."""
import json
import signal

import pytest
import torch

from tests.helpers import files, train
from tests.test_reliability import assert_same_results

SCRIPT = "train_tokenizer.py"
STEPS_PER_EPOCH = 4
# Batches of 8, the discriminator on from the third step, the warm-up over the first two.
RUN = ["--epochs=2", f"--max_train_images={STEPS_PER_EPOCH * 8}", "--adversarial_start=2", "--warmup_steps=2"]


def run(output_dir, data_dir, *extra, fail_at=None):
    return train(SCRIPT, output_dir, data_dir, *RUN, *extra, fail_at=fail_at)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("tokenizer")
    done = run(out, tiny_data)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "run"


def test_the_tokenizer_trains_its_discriminator_after_the_warm_up_on_a_decaying_rate(uninterrupted):
    history = json.loads((uninterrupted / "history.json").read_text())
    # Two of the first epoch's four steps train the discriminator; its epoch mean is over all four.
    assert history[0]["train_discriminator"] > 0 and history[1]["train_discriminator"] > 0
    assert history[0]["train_adversarial"] != 0
    assert "val_adversarial" in history[0] and history[0]["val_adversarial"] == 0
    peak = history[0]["learning_rate"]
    assert history[1]["last_learning_rate"] < history[0]["last_learning_rate"] < peak
    saved = torch.load(uninterrupted / "model.pt", weights_only=True)["model"]
    assert int(saved["adversarial.step"]) == 2 * STEPS_PER_EPOCH


def test_snapped_reconstructions_draw_only_the_sprites_own_colours_and_count_them(uninterrupted):
    metrics = json.loads((uninterrupted / "metrics.json").read_text())
    assert metrics["foreign_colour_rate"] == 0.0
    assert metrics["output_colours"] <= metrics["input_colours"]
    # 16x16 images, two downsamplings: a 4x4 grid of codes of log2(16) bits, and the palette beside it.
    assert metrics["bits_per_sprite"] == pytest.approx(4 * 4 * 4 + 24 * metrics["input_colours"])


def test_a_killed_tokenizer_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_data, uninterrupted):
    killed = run(tmp_path, tiny_data, fail_at=f"kill:step:{STEPS_PER_EPOCH + 1}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run(tmp_path, tiny_data, "--resume=True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_results(tmp_path / "run", uninterrupted)
    assert files(tmp_path / "run" / "reconstructions") == files(uninterrupted / "reconstructions")


def test_the_tokenizers_own_terms_are_plotted_by_their_names(uninterrupted, tmp_path):
    from utils.plots import plot_losses
    history = json.loads((uninterrupted / "history.json").read_text())
    plotted = plot_losses(history, tmp_path / "losses.png")
    assert {"loss", "recon", "vq", "l1", "adversarial", "discriminator"} <= set(plotted)
