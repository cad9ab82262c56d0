"""Train the convolutional VAE baseline of the paper.

    python train_vae.py
    python train_vae.py --epochs=3 --kl_weight=0.1
"""
import sys

from utils.training.loop import TRAINING, run_experiment

config = dict(
    experiment_name="vae",  # outputs go to <output_dir>/<experiment_name>/
    # The paper's VAE: adapter plus four 2x2 stride-2 layers up to 512 filters, a 256-d latent.
    num_layers=4,
    adapter_layer=True,
    max_filters=512,
    latent_dim=256,
    kl_weight=1.0,  # beta
    **TRAINING,  # data, outputs, batch size, epochs, learning rate, ...: utils/training/loop.py
)

if __name__ == "__main__":
    run_experiment("vae", config, sys.argv[1:])
