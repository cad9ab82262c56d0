"""Helpers the test modules share: running the training scripts, tiny outputs folders, tiny models
and batches, and comparing tensors up to float summation order. Fixtures are conftest.py's."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import VAE, VQVAE
from models.fast import accelerate
from models.fast import batchnorm as fast_batchnorm

ROOT = Path(__file__).resolve().parent.parent
TINY_VQ = ["--pixelsight_filters=16", "--num_embeddings=16", "--embedding_dim=8"]
TINY = {
    "train_pixel_vqvae.py": TINY_VQ,
    "train_vqvae.py": ["--num_layers=1"] + TINY_VQ,
    "train_vae.py": ["--num_layers=2", "--max_filters=16", "--latent_dim=8"],
    "train_tokenizer.py": ["--num_embeddings=16", "--embedding_dim=8", "--residual_channels=8",
                           "--discriminator_channels=8"],
}


def train_command(script, output_dir, data_dir, *extra, name="run"):
    """The command line of a training script on tiny settings; later keys override earlier ones."""
    return [sys.executable, script, f"--dataset={data_dir}", f"--output_dir={output_dir}", f"--experiment_name={name}",
            "--image_size=16", "--batch_size=8", "--epochs=2", "--learning_rate=0.003", "--num_fusions=2",
            "--fusion_steps=3", "--device=cpu", *TINY[script], *extra]


def train(script, output_dir, data_dir, *extra, name="run", fail_at=None):
    """Run a training script through its real command line on tiny settings; with `fail_at`,
    through tests/fail_at.py, which makes it fail at that point."""
    python, *args = train_command(script, output_dir, data_dir, *extra, name=name)
    wrapper = ["tests/fail_at.py", fail_at] if fail_at else []
    return subprocess.run([python, *wrapper, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def refusal(done):
    """The line a user sees for a refused run, after checking it is not a traceback."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


def exit_status(main, argv):
    """The exit status of a command-line `main`, whether it returns it or exits with it."""
    try:
        return main(argv)
    except SystemExit as end:
        return end.code


def files(folder):
    """Every file under `folder` and its bytes, to show that nothing in it changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# The tiny VQ-VAE of conftest has a PixelSight stage; off here it is the plain VQ-VAE of the paper.
SCRIPTS = {"vae": ("train_vae.py",), "vqvae": ("train_vqvae.py", "--pixelsight_filters=0"),
           "pixel_vqvae": ("train_pixel_vqvae.py",)}


def trained_outputs(tmp_path_factory, data_dir):
    """An outputs folder with one tiny run of each training script, trained once per session
    however many test modules ask for it."""
    out = tmp_path_factory.getbasetemp() / "three_models"
    for name, (script, *extra) in SCRIPTS.items():
        if not (out / name / "metrics.json").exists():
            done = train(script, out, data_dir, *extra, name=name)
            assert done.returncode == 0, done.stderr[-3000:]
    return out


def outputs_with(tmp_path, outputs, *names):
    """A fresh outputs folder holding links to some of the trained experiments."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    for name in names:
        (folder / name).symlink_to(outputs / name, target_is_directory=True)
    return folder


def palette_batch(n=8, size=16, colours=40, seed=1):
    """Sprites of 2x2 cells in `colours` random colours under a white band: blocks repeat, as in
    pixel art, yet there are more distinct latents than a small codebook has codes."""
    generator = torch.Generator().manual_seed(seed)
    palette = torch.randint(0, 256, (colours, 3), generator=generator)
    cells = torch.randint(0, colours, (n, size // 2, size // 2), generator=generator)
    images = palette[cells].repeat_interleave(2, 1).repeat_interleave(2, 2).float() / 255
    images[:, :4] = 1.0
    return images.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, tolerance: float, name: str = ""):
    """Equal up to float summation order: differences small beside the tensor's own scale."""
    scale = b.float().abs().max().clamp(min=1e-6)
    gap = ((a.float() - b.float()).abs().max() / scale).item()
    assert gap <= tolerance, f"{name}: {gap:.3g} of its scale apart, allowed {tolerance:.3g}"


# The four configurations of bench/throughput.py at tiny widths, as (model class, keys). The 16x16
# model keeps the 128-wide adapter from which its front runs fused (models/fast/models.py); its
# codebook starts random, for k-means++ seeding on its 128 latents here is a draw that rounding in
# the last bits of a latent can change. The VQ-VAE's 16-wide layer is one the BatchNorm kernel runs.
CONFIGURATIONS = {
    "pixel_vqvae": (VQVAE, dict(num_layers=0, num_embeddings=16, embedding_dim=8, adapter_layer=True,
                                pixelsight_filters=32, kmeans_init=True, dead_code_threshold=0.5)),
    "pixel_vqvae_16x16": (VQVAE, dict(num_layers=2, num_embeddings=16, embedding_dim=8, adapter_layer=True,
                                      pixelsight_filters=512, dead_code_threshold=0.5)),
    "vqvae": (VQVAE, dict(num_layers=2, num_embeddings=16, embedding_dim=32)),
    "vae": (VAE, dict(num_layers=2, max_filters=16, latent_dim=8, image_size=16)),
}


def tiny_model(name, seed=0):
    """The model of configuration `name`, seeded, channels-last as the training loop keeps it."""
    cls, keys = CONFIGURATIONS[name]
    torch.manual_seed(seed)
    return cls(**keys).to(memory_format=torch.channels_last)


def seeded_run(model, x, steps=3, seed=5, learning_rate=0.1):
    """`steps` SGD steps on the training loss (MSE + VQ or KL loss): each step's loss, and the
    state after the last. k-means, code restarts and the VAE's float32 noise draw from the seeded
    stream, so a float64 copy of the model draws what a float32 one does."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    losses = []
    for _ in range(steps):
        if isinstance(model, VAE):
            output = model(x, noise=torch.randn(len(x), model.from_latent.in_features).to(x.dtype))
        else:
            output = model(x)
        loss = model.loss_terms(x, output)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {key: value.clone() for key, value in model.state_dict().items()}


# Without a compiler the kernels are not built and torch's ops do their work: the designed
# fallback, which the tests that need no kernels check.
needs_compiler = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                                    reason="no C++ compiler here, so the kernels fall back to torch's ops")


def bn_relu_stack(channels):
    """BatchNorm (affine parameters off 1 and 0), ReLU and a 1x1 convolution, channels-last, training."""
    stack = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1))
    with torch.no_grad():
        stack[0].weight.uniform_(0.5, 1.5)
        stack[0].bias.uniform_(-0.5, 0.5)
    return stack.to(memory_format=torch.channels_last).train()


def counting_fused_calls(monkeypatch) -> list:
    """A list that grows by one at each `_BatchNormReLU` the kernels run."""
    calls = []
    apply = fast_batchnorm._BatchNormReLU.apply
    monkeypatch.setattr(fast_batchnorm._BatchNormReLU, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


def kernel_vqvae():
    """The plain VQ-VAE accelerated on every block, at sizes where its BatchNorm layers run fused."""
    torch.manual_seed(0)
    model = accelerate(VQVAE(num_layers=2, num_embeddings=32, embedding_dim=32).to(memory_format=torch.channels_last), "cpu")
    model.run_distinct_blocks = False
    return model, torch.rand(16, 3, 64, 64).to(memory_format=torch.channels_last)
