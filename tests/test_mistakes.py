"""Every config key's bad values: one `error:` line, exit status 2, and nothing written.

The scripts run in this process through their real entry points, so a hundred refusals take a
second; the ranges are checked in one place (utils/config.py) before any work."""
import runpy

import pytest

from tests.helpers import ROOT, TINY
from utils.training.prior import run_prior
from utils.training.loop import run_experiment

PRIOR_SCRIPTS = {"train_pixelcnn.py": "pixelcnn", "train_gpt.py": "gpt"}
SCRIPTS = {"train_vae.py": "vae", "train_vqvae.py": "vqvae", "train_pixel_vqvae.py": "vqvae",
           **{script: None for script in PRIOR_SCRIPTS}}
DEFAULTS = {script: runpy.run_path(str(ROOT / script))["config"] for script in SCRIPTS}

# (key, bad value as typed, what the message says the key must be)
BAD_VALUES = [
    ("experiment_name", "../../x", "a plain folder name"),
    ("experiment_name", "/abs/path", "a plain folder name"),
    ("experiment_name", "a/b", "a plain folder name"),
    ("experiment_name", "..", "a plain folder name"),
    ("experiment_name", "", "a plain folder name"),
    ("vq_experiment", "../elsewhere", "a plain folder name"),
    ("output_dir", "", "a folder"),
    ("dataset", "", "'pokemon' or a folder or zip"),
    ("image_size", "0", "at least 4"),
    ("num_layers", "-1", "must be at least"),  # 0 for the autoencoders, 1 for a prior
    ("adapter_layer", "maybe", "expects bool"),
    ("pixelsight_filters", "-1", "at least 0"),
    ("num_embeddings", "0", "at least 1"),
    ("embedding_dim", "0", "at least 1"),
    ("commitment_cost", "-0.25", "at least 0"),
    ("commitment_cost", "nan", "a finite number"),
    ("ema_decay", "1.0", "at least 0 and below 1"),
    ("ema_decay", "-0.1", "at least 0 and below 1"),
    ("dead_code_threshold", "-1", "at least 0"),
    ("quantizer", "gumbel", "one of ema, residual, fsq"),
    ("dead_code_sampling", "far", "one of uniform, error"),
    ("residual_depth", "0", "at least 1"),
    ("fsq_levels", "8,x,4", "integers separated by commas"),
    ("fsq_levels", "8,1", "levels of at least 2 each"),
    ("ssim_weight", "-1", "at least 0"),
    ("ssim_weight", "inf", "a finite number"),
    ("palette_features", "0", "at least 1"),
    ("palette_max_colours", "1", "at least 2"),
    ("palette_context", "-1", "at least 0"),
    ("palette_context", "8", "0 unless palette_output=True"),
    ("max_filters", "0", "at least 1"),
    ("latent_dim", "0", "at least 1"),
    ("kl_weight", "-1", "at least 0"),
    ("kl_weight", "nan", "a finite number"),
    ("batch_size", "0", "at least 1"),
    ("batch_size", "-8", "at least 1"),
    ("epochs", "0", "at least 1"),
    ("epochs", "-1", "at least 1"),
    ("learning_rate", "0", "above 0"),
    ("learning_rate", "-0.001", "above 0"),
    ("learning_rate", "nan", "a finite number"),
    ("precision", "fp16", "one of fp32, bf16"),
    ("fast", "sometimes", "one of auto, True, False"),
    ("seed", "-1", "from 0 to 4294967295"),
    ("max_train_images", "-1", "at least 0"),
    ("num_fusions", "-1", "at least 0"),
    ("fusion_steps", "0", "at least 2"),
    ("fusion_steps", "1", "at least 2"),
    ("hidden_channels", "0", "at least 1"),
    ("kernel_size", "4", "odd and at least 3"),
    ("kernel_size", "1", "odd and at least 3"),
    ("num_samples", "1", "at least 2"),
    ("temperature", "0", "above 0"),
    ("temperature", "nan", "a finite number"),
    ("top_k", "-1", "at least 0"),
    ("num_fusion_scores", "-1", "at least 0"),
    ("top_p", "0", "above 0 and at most 1"),
    ("top_p", "1.5", "above 0 and at most 1"),
    ("condition_on_background", "maybe", "expects bool"),
    ("sample_background", "grey", "one of both, white, black"),
    ("width", "0", "at least 1"),
    ("num_heads", "0", "at least 1"),
    ("num_heads", "3", "a divisor of width"),
    ("dropout", "1.0", "at least 0 and below 1"),
    ("dropout", "-0.1", "at least 0 and below 1"),
    ("fid_dims", "100", "one of 64, 192, 768, 2048"),
    ("architecture", "unet", "one of paper, residual"),
    ("residual_channels", "0", "at least 1"),
    ("residual_blocks", "-1", "at least 0"),
    ("codebook_dim", "0", "at least 1"),
    ("rotation_trick", "maybe", "expects bool"),
    ("palette_snap", "maybe", "expects bool"),
    ("l1_weight", "-1", "at least 0"),
    ("l1_weight", "nan", "a finite number"),
    ("adversarial_weight", "-0.1", "at least 0"),
    ("adversarial_start", "-1", "at least 0"),
    ("discriminator_channels", "0", "at least 1"),
    ("discriminator_layers", "0", "at least 1"),
    ("lr_schedule", "step", "one of constant, cosine"),
    ("warmup_steps", "-1", "at least 0"),
    ("grad_clip", "-1", "at least 0"),
    ("plain_backgrounds_only", "maybe", "expects bool"),
]
CASES = [(script, key, value, expected) for script in SCRIPTS for key, value, expected in BAD_VALUES
         if key in DEFAULTS[script]]


def run_script(script, argv):
    """The script's own entry point on `argv`, in this process; returns its exit status."""
    with pytest.raises(SystemExit) as end:
        if SCRIPTS[script] is None:
            run_prior(DEFAULTS[script], argv, PRIOR_SCRIPTS[script])
        else:
            run_experiment(SCRIPTS[script], DEFAULTS[script], argv)
    return end.value.code


def assert_refused(script, argv, tmp_path, capsys):
    """The one line said; exit status 2; nothing at all under the output folder. Keys of `argv`
    that the script lacks are left out."""
    out = tmp_path / "outputs"
    # Tiny settings first, so that a value let through fails fast rather than trains for long.
    quick = ["--epochs=1", "--batch_size=8", "--max_train_images=8", "--num_samples=2"]
    argv = [arg for arg in [f"--output_dir={out}", "--device=cpu", *quick, *argv]
            if arg[2:].partition("=")[0] in DEFAULTS[script]]
    status = run_script(script, argv)
    said = capsys.readouterr()
    lines = said.err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), said.err
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("script, key, value, expected", CASES,
                         ids=[f"{s.removesuffix('.py')}-{k}={v}" for s, k, v, _ in CASES])
def test_every_bad_config_value_is_one_line_exit_2_and_nothing_written(script, key, value, expected, tmp_path,
                                                                       capsys, tiny_data):
    argv = [f"--dataset={tiny_data}", "--image_size=16", *TINY.get(script, []), f"--{key}={value}"]
    line = assert_refused(script, argv, tmp_path, capsys)
    assert key in line and expected in line, line


def test_every_key_of_every_script_has_a_bad_value_in_the_table():
    """A new key must say what its bad values are, so that none ends in a traceback."""
    tabled = {key for key, _, _ in BAD_VALUES}
    ignored = {"resume", "overwrite", "use_ssim_loss", "palette_output", "kmeans_init", "sync_batchnorm", "device", "fid_weights"}
    assert {key for config in DEFAULTS.values() for key in config} - tabled - ignored == set()


@pytest.mark.parametrize("script", ["train_vqvae.py", "train_pixel_vqvae.py", "train_vae.py"])
def test_an_image_size_that_is_not_a_multiple_of_two_to_the_num_layers_is_refused(script, tmp_path, capsys, tiny_data):
    line = assert_refused(script, [f"--dataset={tiny_data}", "--image_size=17", "--num_layers=2"], tmp_path, capsys)
    assert line == "error: --image_size must be a multiple of 2^num_layers = 4, got 17"


@pytest.mark.parametrize("script", ["train_vqvae.py", "train_pixel_vqvae.py"])
def test_fsq_levels_whose_product_is_not_the_codebook_size_are_refused(script, tmp_path, capsys, tiny_data):
    argv = [f"--dataset={tiny_data}", "--image_size=16", *TINY[script], "--quantizer=fsq", "--fsq_levels=8,8,4"]
    assert assert_refused(script, argv, tmp_path, capsys) == (
        "error: --fsq_levels must be levels whose product is num_embeddings = 16, for every combination of "
        "levels is a code (8*8*4 = 256), got '8,8,4'")


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_device_this_machine_lacks_is_refused(script, tmp_path, capsys, tiny_data, monkeypatch):
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: False)
    line = assert_refused(script, [f"--dataset={tiny_data}", "--image_size=16", "--device=mps"], tmp_path, capsys)
    assert line == "error: device 'mps' was asked for, but this PyTorch has no MPS (Apple GPU) support here"


def test_a_nan_in_a_config_file_is_refused_before_training_not_blamed_on_the_learning_rate(tmp_path, capsys,
                                                                                            tiny_data):
    (tmp_path / "run.json").write_text('{"kl_weight": NaN}')
    out = tmp_path / "outputs"
    status = run_script("train_vae.py", [str(tmp_path / "run.json"), f"--output_dir={out}", f"--dataset={tiny_data}"])
    line = capsys.readouterr().err.strip()
    assert status == 2 and line == "error: --kl_weight must be a finite number, got nan" and not out.exists()
