"""Train the Pixel VQ-VAE: a VQ-VAE with an adapter layer, a wide PixelSight stage and an optional
SSIM loss term (Saravanan & Guzdial, EXAG 2022).

    python train_pixel_vqvae.py                                  # the paper's configuration
    python train_pixel_vqvae.py --epochs=3 --use_ssim_loss=True  # the paper's optional SSIM term

Its config is train_vqvae.py's with the paper's additions below; `--help` lists every key.
"""
import sys

from train_vqvae import config as vqvae_config
from utils.training.loop import run_experiment

config = {
    **vqvae_config,
    "experiment_name": "pixel_vqvae",  # outputs go to <output_dir>/<experiment_name>/
    # The paper's Pixel VQ-VAE: every layer 1x1, so one code per pixel (a 64x64 code grid).
    "num_layers": 0,
    "adapter_layer": True,  # 1x1 convolution as the first encoder and last decoder layer
    "pixelsight_filters": 512,  # widest layer, then a 1x1 convolution to embedding_dim; 0 = off
}

if __name__ == "__main__":
    run_experiment("vqvae", config, sys.argv[1:])
