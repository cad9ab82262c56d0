"""Finite scalar quantisation (FSQ, Mentzer et al. 2023): each of a few channels rounded to a fixed grid."""
import math

import torch
from torch import Tensor, nn

from .quantizer import QuantizerOutput

# The bound reaches a little past the outermost levels (vector-quantize-pytorch's 1 + eps; the paper's
# code shrinks it by 1 - eps): either way a channel rounds to exactly its L levels.
BOUND_EPSILON = 1e-3


def parse_levels(text: str) -> list[int]:
    """'8,8,4' -> [8, 8, 4]; a ValueError unless each is an integer of at least 2."""
    try:
        levels = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise ValueError(f"fsq_levels must be integers separated by commas, such as '8,8,4'") from None
    if any(level < 2 for level in levels):
        raise ValueError(f"fsq_levels must be levels of at least 2 each, got {text!r}")
    return levels


class FiniteScalarQuantizer(nn.Module):
    """A 1x1 convolution from `embedding_dim` to one channel per level, each bounded by tanh and
    rounded to one of its `levels[i]` integers (straight through), then a 1x1 convolution back.

    The code of a latent is its tuple of rounded values, numbered in mixed radix, so the codebook is
    every combination: prod(levels) codes, all of them reachable, none learnt or kept as state, so
    none dies as an EMA code can. There is no commitment loss: the bound keeps the latents on the grid.
    """

    def __init__(self, embedding_dim: int, levels: list[int]):
        super().__init__()
        self.levels = list(levels)
        self.num_embeddings = math.prod(self.levels)
        self.project_in = nn.Conv2d(embedding_dim, len(self.levels), 1)
        self.project_out = nn.Conv2d(len(self.levels), embedding_dim, 1)
        level = torch.tensor(self.levels, dtype=torch.float32).reshape(1, -1, 1, 1)
        # Constants of the grid, not state: rebuilt from `levels`, never saved.
        self.register_buffer("level", level, persistent=False)
        self.register_buffer("half_width", (level // 2), persistent=False)
        radix = torch.tensor([math.prod(self.levels[:i]) for i in range(len(self.levels))]).reshape(1, -1, 1, 1)
        self.register_buffer("radix", radix, persistent=False)

    def bound(self, z: Tensor) -> Tensor:
        """Each channel squashed into (-L/2, L/2) for its L levels, so that it rounds to one of L integers:
        -(L-1)/2 .. (L-1)/2 for odd L, -L/2 .. L/2 - 1 for even L (the half-offset of the paper)."""
        half_range = (self.level - 1) * (1 + BOUND_EPSILON) / 2
        offset = torch.where(self.level % 2 == 0, 0.5, 0.0)
        # The shift makes a latent of 0 land on the grid's 0 for even L too; for L = 2 that puts -1
        # below a latent of -3.8, which project_in's bias can move.
        shift = torch.atanh(offset / half_range)
        return torch.tanh(z + shift) * half_range - offset

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        # Rounding to a grid wants the weights' precision (float32), not autocast's bfloat16 of 8 bits.
        with torch.autocast(z_e.device.type, enabled=False):
            bounded = self.bound(self.project_in(z_e.to(self.project_in.weight.dtype)))
            # Clamped, since for L near 1 / BOUND_EPSILON the widened bound would round past the grid.
            rounded = bounded.round().clamp(-self.half_width, self.level - 1 - self.half_width)
            grid = bounded + (rounded - bounded).detach()
            quantized = self.project_out(grid / self.half_width)
        return QuantizerOutput(quantized.to(z_e.dtype), z_e.new_zeros((), dtype=torch.float32),
                               self.grid_indices(rounded))

    def grid_indices(self, points: Tensor) -> Tensor:
        """Grid points [B, len(levels), H, W] -> their code indices [B, H, W], in mixed radix."""
        return ((points + self.half_width).long() * self.radix).sum(1)

    def grid_points(self, indices: Tensor) -> Tensor:
        """Code indices [B, H, W] -> their grid points [B, len(levels), H, W]."""
        return (indices.unsqueeze(1) // self.radix % self.level.long()) - self.half_width

    def embed_indices(self, indices: Tensor) -> Tensor:
        """Code indices [B, H, W] -> the projected grid points [B, D, H, W]."""
        return self.project_out(self.grid_points(indices) / self.half_width)
