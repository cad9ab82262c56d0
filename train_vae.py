"""Train the convolutional VAE baseline of the paper.

    python train_vae.py
    python train_vae.py --epochs=3 --kl_weight=0.1
"""
import sys

from utils.train import run_experiment

config = dict(
    experiment_name="vae",  # outputs go to <output_dir>/<experiment_name>/
    output_dir="outputs",
    dataset="pokemon",  # 'pokemon', a prepared data folder, or a folder or zip of your own sprites
    image_size=64,
    # The paper's VAE: adapter plus four 2x2 stride-2 layers up to 512 filters, a 256-d latent.
    num_layers=4,
    adapter_layer=True,
    max_filters=512,
    latent_dim=256,
    kl_weight=1.0,  # beta
    batch_size=64,  # per process: torchrun --nproc_per_node=N steps on N * batch_size images
    sync_batchnorm=True,  # under torchrun, BatchNorm statistics of the global batch, not each process's
    epochs=25,
    learning_rate=1e-4,
    precision="fp32",  # 'bf16': bfloat16 autocast in training steps; weights, quantiser, evaluation stay float32
    fast="auto",  # models/fast: True, False, or auto = on the CPU, where it was measured faster
    seed=42,
    device="auto",  # auto = cuda when present, else cpu
    max_train_images=0,  # 0 = all; fewer for quick runs
    resume=False,  # continue from <output_dir>/<experiment_name>/checkpoint.pt
    overwrite=False,  # replace an existing experiment of the same name
    num_fusions=8,  # pairs of test sprites mixed in latent space
    fusion_steps=8,  # images in each interpolation strip
)

if __name__ == "__main__":
    run_experiment("vae", config, sys.argv[1:])
