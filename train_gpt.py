"""Train a small GPT prior over the code grids of a trained VQ model, then draw new sprites.

    python train_tokenizer.py
    python train_gpt.py --vq_experiment=tokenizer --experiment_name=gpt_tokenizer

Its config is train_pixelcnn.py's with what differs below; `--help` lists every key.
"""
import sys

from train_pixelcnn import config as pixelcnn_config
from utils.training.prior import run_prior

PIXELCNN_ONLY = ("hidden_channels", "kernel_size")

config = {
    **{key: value for key, value in pixelcnn_config.items() if key not in PIXELCNN_ONLY},
    "experiment_name": "gpt",
    "vq_experiment": "tokenizer",  # train_tokenizer.py's 16x16 grid of 1,024 codes
    # nanoGPT's small CPU model: 4 layers of 4 heads, 128 wide, over the 256 codes in raster order.
    "width": 128,
    "num_layers": 4,
    "num_heads": 4,
    "dropout": 0.1,
    "condition_on_background": True,
    "epochs": 3,
    "learning_rate": 1e-3,
    "lr_schedule": "cosine",
    "warmup_steps": 100,
    "grad_clip": 1.0,
    "num_samples": 1000,  # as many as the FID floor's real sprites (see the README)
    "num_fusion_scores": 1000,  # fusions by every method, scored at the FID floor's count
}

if __name__ == "__main__":
    run_prior(config, sys.argv[1:], "gpt")
