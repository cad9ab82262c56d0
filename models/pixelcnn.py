"""Gated PixelCNN (van den Oord et al. 2016): the autoregressive prior over grids of VQ codes."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sampling import check_sampling, draw, seeded


def gate(x: Tensor) -> Tensor:
    """tanh of the first half of the channels times the sigmoid of the second half."""
    features, gates = x.chunk(2, dim=1)
    return torch.tanh(features) * torch.sigmoid(gates)


def shift_down(x: Tensor) -> Tensor:
    # The vertical stack at row r has seen row r itself; one row down it holds rows above only,
    # which is what the horizontal stack may take from it.
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


class GatedLayer(nn.Module):
    """One layer of vertical and horizontal stacks, built from padded unmasked convolutions.

    The vertical stack sees a (k//2 + 1) x k window, k//2 rows up to the current one and k//2
    columns either side, so together the stacks have no blind spot. The horizontal stack sees the
    k//2 + 1 codes ending at the current one (type "B") or just before it (type "A", the first
    layer).
    """

    def __init__(self, channels: int, kernel_size: int, mask_type: str, num_classes: int):
        super().__init__()
        self.half, self.mask_type = kernel_size // 2, mask_type
        self.vertical = nn.Conv2d(channels, 2 * channels, (self.half + 1, kernel_size))
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, self.half + 1))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.class_bias = nn.Embedding(num_classes, 2 * channels) if num_classes else None

    def forward(self, vertical: Tensor, horizontal: Tensor,
                labels: Tensor | None) -> tuple[Tensor, Tensor]:
        half = self.half
        vertical_pre = self.vertical(F.pad(vertical, (half, half, half, 0)))
        if self.mask_type == "A":
            # A column more in front and one fewer behind: the window stops short of the code.
            shifted = F.pad(horizontal, (half + 1, 0))[..., :-1]
        else:
            shifted = F.pad(horizontal, (half, 0))
        horizontal_pre = (self.horizontal(shifted)
                          + self.vertical_to_horizontal(shift_down(vertical_pre)))
        if self.class_bias is not None:
            bias = self.class_bias(labels)[:, :, None, None]
            vertical_pre, horizontal_pre = vertical_pre + bias, horizontal_pre + bias
        horizontal_out = self.horizontal_out(gate(horizontal_pre))
        # A residual in the type A layer would hand the current code's embedding to its own logits.
        if self.mask_type == "B":
            horizontal_out = horizontal_out + horizontal
        return gate(vertical_pre), horizontal_out


class GatedPixelCNN(nn.Module):
    """Codes [B, H, W] -> logits [B, num_embeddings, H, W] of each code given those before it.

    "Before" is raster order. With `num_classes` > 0, `forward` takes one label per grid and each
    layer adds its embedding to the gates (the paper's conditional PixelCNN).
    """

    def __init__(self, num_embeddings: int, hidden_channels: int = 128, num_layers: int = 12,
                 kernel_size: int = 5, num_classes: int = 0):
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and at least 3, got {kernel_size}")
        # Without a type A layer the logits would see the code they predict.
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.num_embeddings, self.num_classes = num_embeddings, num_classes
        self.embedding = nn.Embedding(num_embeddings, hidden_channels)
        self.layers = nn.ModuleList(
            GatedLayer(hidden_channels, kernel_size, "A" if i == 0 else "B", num_classes)
            for i in range(num_layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden_channels, hidden_channels, 1),
                                  nn.ReLU(), nn.Conv2d(hidden_channels, num_embeddings, 1))

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        if (labels is None) != (self.num_classes == 0):
            raise ValueError(f"labels are needed exactly when num_classes > 0 (num_classes="
                             f"{self.num_classes}, labels given: {labels is not None})")
        vertical = horizontal = self.embedding(codes).permute(0, 3, 1, 2)
        for layer in self.layers:
            vertical, horizontal = layer(vertical, horizontal, labels)
        return self.head(horizontal)

    def sample(self, shape: tuple[int, int, int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | int | None = None, labels: Tensor | None = None,
               prefix: Tensor | None = None, keep: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """`sample_codes` of this model: the priors' one sampling interface."""
        return sample_codes(self, shape, temperature, generator, labels, top_k=top_k, top_p=top_p,
                            prefix=prefix, keep=keep, bias=bias)


def negative_log_likelihood(logits: Tensor, codes: Tensor) -> Tensor:
    """Mean cross-entropy of `codes` [B, H, W] under `logits` [B, K, H, W], in nats per code."""
    return F.cross_entropy(logits, codes)


def bits_per_code(logits: Tensor, codes: Tensor) -> Tensor:
    """`negative_log_likelihood` in bits per code; log2(K) for a uniform prior over K codes."""
    return negative_log_likelihood(logits, codes) / math.log(2)


@torch.inference_mode()
def sample_codes(model: GatedPixelCNN, shape: tuple[int, int, int], temperature: float = 1.0,
           generator: torch.Generator | int | None = None, labels: Tensor | None = None,
           device: torch.device | str | None = None, top_k: int = 0, top_p: float = 1.0,
           prefix: Tensor | None = None, keep: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Codes [n, h, w] drawn one at a time in raster order (models/sampling.py's `draw`); `prefix`,
    `keep` and `bias` as in GPTPrior.sample.

    An int `generator` seeds a fresh generator on `device` (default: the model's device).
    """
    check_sampling(temperature, top_k, top_p)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = seeded(generator, device)
    if labels is not None:
        labels = labels.to(device)
    if (prefix is None) != (keep is None):
        raise ValueError("prefix and keep go together")
    _, height, width = shape
    codes = torch.zeros(shape, dtype=torch.long, device=device)
    for row in range(height):
        for col in range(width):
            # No convolution looks down, so the rows below `row` cannot change its logits.
            logits = model(codes[:, :row + 1], labels)[:, :, row, col]
            if bias is not None:
                logits = logits + bias[:, row, col].to(device)
            code = draw(logits, temperature, top_k, top_p, generator)
            if keep is not None:
                code = torch.where(keep[:, row, col].to(device), prefix[:, row, col].to(device).long(), code)
            codes[:, row, col] = code
    return codes
