"""Train the 16x16 tokenizer: a VQ-VAE whose codes see their neighbours and whose losses punish
blur, so that a 16x16 grid of 1,024 codes gives sprites back as pixel art.

    python train_tokenizer.py
    python train_tokenizer.py --adapter_layer=True --pixelsight_filters=512  # the paper's additions on it

Its config is train_vqvae.py's with what differs below; `--help` lists every key.
"""
import sys

from train_vqvae import config as vqvae_config
from utils.training.loop import run_experiment

config = {
    **vqvae_config,
    "experiment_name": "tokenizer",
    # A 16x16 grid of 1,024 codes: 2,560 bits a sprite, the paper's 16x16 Pixel VQ-VAE's rate.
    "num_layers": 2,
    "num_embeddings": 1024,
    "embedding_dim": 64,
    # Residual blocks at every resolution and overlapping 4x4 downsampling (models/resnet.py).
    "architecture": "residual",
    "residual_channels": 32,  # filters at full size, doubled at each downsampling
    "residual_blocks": 1,  # at each resolution
    # l2-normalised codes of 8 channels (models/factorized.py): a low-dimensional sphere keeps codes alive.
    "quantizer": "factorized",
    "codebook_dim": 8,
    "l1_weight": 1.0,  # beside the MSE: a sharper optimum than the mean of what a code could be
    # A patch discriminator (models/discriminator.py), its term balanced by gradient norms, switched
    # on after two epochs of reconstruction alone (375 steps an epoch at batch 64).
    "adversarial_weight": 0.5,
    "adversarial_start": 750,
    # Each pixel snapped to the sprite's own palette, which travels beside the codes (counted in bits).
    "palette_snap": True,
    "plain_backgrounds_only": True,  # the test split has no noise backgrounds, and a code cannot hold one
    "epochs": 10,
    "learning_rate": 4e-4,
    "lr_schedule": "cosine",
    "warmup_steps": 200,
    "grad_clip": 1.0,
    "fast": False,  # models/fast runs the paper's stack alone: this trains on the reference path either way
}

if __name__ == "__main__":
    run_experiment("vqvae", config, sys.argv[1:])
