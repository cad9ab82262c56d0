"""Train the Pixel VQ-VAE: a VQ-VAE with an adapter layer, a wide PixelSight stage and an optional
SSIM loss term (Saravanan & Guzdial, EXAG 2022).

    python train_pixel_vqvae.py                                  # the paper's configuration
    python train_pixel_vqvae.py --epochs=3 --use_ssim_loss=True  # any key below can be overridden
"""
import sys

from utils.train import run_experiment

config = dict(
    experiment_name="pixel_vqvae",  # outputs go to <output_dir>/<experiment_name>/
    output_dir="outputs",
    dataset="pokemon",  # 'pokemon', a prepared data folder, or a folder or zip of your own sprites
    image_size=64,
    # The paper's Pixel VQ-VAE: every layer 1x1, so one code per pixel (a 64x64 code grid).
    num_layers=0,
    adapter_layer=True,  # 1x1 convolution as the first encoder and last decoder layer
    pixelsight_filters=512,  # widest layer, then a 1x1 convolution to embedding_dim; 0 = off
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
    quantizer="ema",
    residual_depth=4,  # 'residual': quantisers in turn, each coding what the ones before it left
    fsq_levels="8,8,4",  # 'fsq': levels of each channel; their product must be num_embeddings
    use_ssim_loss=False,  # the paper's optional SSIM term
    ssim_weight=1.0,
    # Not in the paper: each pixel's colour chosen from the sprite's own palette, which is carried
    # beside the codes (models/palette.py), so every output colour is one the sprite has.
    palette_output=False,
    palette_features=16,  # per-pixel features the choice compares with each palette colour's embedding
    palette_context=0,  # > 0: the encoder also sees this many channels describing each pixel's palette entry
    palette_max_colours=256,  # training images with more colours (noise backgrounds) are left out
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
    run_experiment("vqvae", config, sys.argv[1:])
