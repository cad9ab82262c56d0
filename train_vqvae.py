"""Train the standard VQ-VAE baseline of the paper (no adapter, no PixelSight).

    python train_vqvae.py
    python train_vqvae.py --epochs=3 --num_embeddings=1024 --embedding_dim=64
"""
import sys

from utils.training.loop import TRAINING, run_experiment

config = dict(
    experiment_name="vqvae",  # outputs go to <output_dir>/<experiment_name>/
    # The paper's VQ-VAE: two 2x2 stride-2 layers, a 16x16 code grid.
    num_layers=2,
    adapter_layer=False,
    pixelsight_filters=0,  # 0 = off: the widest layer is embedding_dim
    num_embeddings=256,
    embedding_dim=32,
    commitment_cost=0.25,
    ema_decay=0.99,
    # Not in the paper: without these two the codebook collapses to a dozen codes (as the
    # reference does); --kmeans_init=False --dead_code_threshold=0 gives the paper's quantiser.
    kmeans_init=True,  # place the codebook by k-means++ on the first batch
    dead_code_threshold=0.5,  # restart codes whose EMA use falls below this; 0 = off
    # 'error': restart them on latents drawn in proportion to their quantisation error, where
    # colours share a code, not uniformly (mostly background); 'uniform' is what the results used.
    dead_code_sampling="uniform",
    # Not in the paper: 'ema' is its quantiser; 'residual' codes each latent as the sum of
    # residual_depth codes, one per EMA codebook; 'fsq' rounds len(fsq_levels) channels to a grid.
    quantizer="ema",  # or 'factorized': l2-normalised low-dimensional codes (models/factorized.py)
    residual_depth=4,  # 'residual': quantisers in turn, each coding what the ones before it left
    fsq_levels="8,8,4",  # 'fsq': levels of each channel; their product must be num_embeddings
    use_ssim_loss=False,  # the Pixel VQ-VAE's optional SSIM term, ssim_weight * (1 - SSIM)
    ssim_weight=1.0,
    # Not in the paper: each pixel's colour chosen from the sprite's own palette, which is carried
    # beside the codes (models/palette.py), so every output colour is one the sprite has.
    palette_output=False,
    palette_features=16,  # per-pixel features the choice compares with each palette colour's embedding
    palette_context=0,  # > 0: the encoder also sees this many channels describing each pixel's palette entry
    palette_max_colours=256,  # training images with more colours (noise backgrounds) are left out
    # Not in the paper: the 16x16 tokenizer's parts (train_tokenizer.py uses them). 'residual': residual
    # blocks of 3x3 convolutions at every resolution and overlapping downsampling (models/resnet.py).
    architecture="paper",
    residual_channels=32,  # 'residual': filters at full size, doubled at each downsampling
    residual_blocks=1,  # 'residual': blocks at each resolution
    codebook_dim=8,  # 'factorized': channels of the l2-normalised codes
    rotation_trick=False,  # 'factorized': gradients by the rotation trick instead of straight through
    palette_snap=False,  # snap decoded colours to the sprite's own palette, counted in bits per sprite
    l1_weight=0.0,  # weight of an L1 term beside the MSE
    adversarial_weight=0.0,  # > 0: a patch discriminator's term, balanced by gradient norms (models/discriminator.py)
    adversarial_start=0,  # training steps of reconstruction alone before the discriminator trains
    discriminator_channels=64,
    discriminator_layers=2,  # 4x4 stride-2 layers: each logit judges a patch of about 34 pixels
    **TRAINING,  # data, outputs, batch size, epochs, learning rate, ...: utils/training/loop.py
)

if __name__ == "__main__":
    run_experiment("vqvae", config, sys.argv[1:])
