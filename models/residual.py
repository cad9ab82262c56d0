"""Residual vector quantisation (SoundStream, Zeghidour et al. 2021; RQ-VAE, Lee et al. 2022)."""
import torch
from torch import Tensor, nn

from .losses import commitment_loss
from .quantizer import QuantizerOutput, VectorQuantizerEMA


class ResidualVectorQuantizer(nn.Module):
    """`depth` EMA quantisers in turn, each coding what the ones before it left of the latent.

    A latent's code is the sum of one code from each level, so `depth` levels of K codes name K^depth
    vectors for depth * log2(K) bits, where one codebook of K^depth codes could not be learnt. Each
    level is a VectorQuantizerEMA (its codebook, k-means, restarts and all-reduce under torchrun), fed
    the residual of the levels before it. The straight-through estimator and the one commitment loss
    are on the sum, the latent that the decoder sees.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, depth: int, commitment_cost: float = 0.25,
                 decay: float = 0.99, epsilon: float = 1e-5, kmeans_init: bool = False,
                 dead_code_threshold: float = 0.0, dead_code_sampling: str = "uniform"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"residual_depth must be at least 1, got {depth}")
        self.num_embeddings, self.embedding_dim, self.commitment_cost = num_embeddings, embedding_dim, commitment_cost
        # Each level's own commitment cost is unused: the loss is taken once, on the sum.
        self.quantizers = nn.ModuleList(
            VectorQuantizerEMA(num_embeddings, embedding_dim, commitment_cost, decay, epsilon, kmeans_init,
                               dead_code_threshold, dead_code_sampling) for _ in range(depth))

    @property
    def depth(self) -> int:
        return len(self.quantizers)

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Latents [B, D, H, W] -> the sum of the levels' codes [B, D, H, W], loss, indices [B, depth, H, W]."""
        with torch.autocast(z_e.device.type, enabled=False):
            z = z_e.float()
            residual, total, indices = z.detach(), torch.zeros_like(z), []
            for quantizer in self.quantizers:
                codes, level_indices = quantizer.nearest_codes(residual)
                total = total + codes
                residual = residual - codes
                indices.append(level_indices)
            loss = commitment_loss(z, total, self.commitment_cost)
            quantized = z + (total - z).detach()
        return QuantizerOutput(quantized.to(z_e.dtype), loss, torch.stack(indices, 1))

    def embed_indices(self, indices: Tensor) -> Tensor:
        """Code indices [B, depth, H, W] -> the sum of the levels' codes [B, D, H, W]."""
        if indices.dim() != 4 or indices.shape[1] != self.depth:
            raise ValueError(f"a residual quantiser of depth {self.depth} decodes indices [B, {self.depth}, h, w], "
                             f"got {list(indices.shape)}")
        return sum(quantizer.embed_indices(indices[:, i]) for i, quantizer in enumerate(self.quantizers))
