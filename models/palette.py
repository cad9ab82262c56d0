"""Palette-exact output: the decoder chooses, for each pixel, one colour of the sprite's own palette.

The palette (every distinct colour of the image, 24 bits each) is side information carried beside
the codes, so an output colour is always one the sprite has. Each palette colour is embedded by a
small network; a pixel's logits are the dot products of the decoder's features there with those
embeddings. Training minimises the cross-entropy of the right entry (a differentiable choice);
decoding takes the likeliest entry.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

COLOUR_LEVELS = 255


class Palettes(NamedTuple):
    colours: Tensor  # [B, K, 3] in [0, 1]; K is the largest palette of the batch
    valid: Tensor  # [B, K] bool: False on the padding of smaller palettes
    index: Tensor | None  # [B, H, W]: each pixel's entry in its image's palette; None for a borrowed palette


def sprite_palettes(x: Tensor, with_index: bool = True) -> Palettes:
    """The distinct colours of each image of x [B, 3, H, W] in [0, 1] (exact 8-bit colours)."""
    b = x.shape[0]
    levels = (x.detach().float() * COLOUR_LEVELS).round().long()
    keys = (levels[:, 0] << 16) | (levels[:, 1] << 8) | levels[:, 2]
    # One sort for the whole batch: tagging each key with its image keeps every image's colours
    # contiguous and in order, so an entry's place is its rank among its image's colours.
    tagged = keys + (torch.arange(b, device=x.device) << 24).view(b, 1, 1)
    distinct, inverse = torch.unique(tagged, return_inverse=True)
    image = distinct >> 24
    sizes = torch.bincount(image, minlength=b)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(len(distinct), device=x.device) - starts[image]
    colour = distinct & 0xFFFFFF
    rgb = torch.stack([colour >> 16, (colour >> 8) & 255, colour & 255], -1).float() / COLOUR_LEVELS
    width = int(sizes.max())
    colours = rgb.new_zeros(b, width, 3).index_put_((image, slot), rgb)
    valid = torch.zeros(b, width, dtype=torch.bool, device=x.device).index_put_((image, slot), torch.ones_like(slot, dtype=torch.bool))
    index = inverse - starts.view(b, 1, 1) if with_index else None
    return Palettes(colours.to(x.dtype), valid, index)


def palette_union(*images: Tensor) -> Palettes:
    """One palette per row holding every colour of the matching rows of all `images`: what a fusion
    of two sprites draws with."""
    return sprite_palettes(torch.cat(images, dim=-1), with_index=False)


class PaletteHead(nn.Module):
    """Decoder features [B, F, H, W] and palettes -> logits [B, K, H, W] over each image's entries."""

    def __init__(self, features: int, hidden: int = 64):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, features))

    def forward(self, features: Tensor, palettes: Palettes) -> Tensor:
        embedded = self.embed(palettes.colours.to(features.dtype))
        if embedded.shape[0] == 1 and features.shape[0] > 1:
            embedded = embedded.expand(features.shape[0], -1, -1)
            valid = palettes.valid.expand(features.shape[0], -1)
        else:
            valid = palettes.valid
        logits = torch.einsum("bfhw,bkf->bkhw", features, embedded).float()
        return logits.masked_fill(~valid[:, :, None, None], float("-inf"))


# Logits held at once: a training image on a noise background has a palette of thousands of
# colours, so a whole batch's [B, K, H, W] logits (and their gradients) would take gigabytes.
LOGIT_BUDGET = 1 << 24


def _rows(palettes: Palettes, start: int, stop: int) -> Palettes:
    if palettes.colours.shape[0] == 1:  # one palette for every image
        return palettes
    index = None if palettes.index is None else palettes.index[start:stop]
    return Palettes(palettes.colours[start:stop], palettes.valid[start:stop], index)


class PaletteChoice:
    """The choice of each pixel's colour among its palette's entries, computed a few images at a
    time (LOGIT_BUDGET); with gradients, each chunk's logits are recomputed in the backward pass
    instead of kept."""

    def __init__(self, head: PaletteHead, features: Tensor, palettes: Palettes):
        self.head, self.features, self.palettes = head, features, palettes
        per_image = palettes.colours.shape[1] * features.shape[2] * features.shape[3]
        step = max(1, LOGIT_BUDGET // per_image)
        self.chunks = [(i, min(i + step, len(features))) for i in range(0, len(features), step)]

    def _each_chunk(self, term):
        """term(logits, palettes of the chunk) for each chunk of images, checkpointed when it
        needs gradients."""
        def chunk(features, start, stop):
            rows = _rows(self.palettes, start, stop)
            return term(self.head(features, rows), rows)
        grad = torch.is_grad_enabled() and self.features.requires_grad
        return [checkpoint(chunk, self.features[a:b], a, b, use_reentrant=False) if grad
                else chunk(self.features[a:b], a, b) for a, b in self.chunks]

    def chosen_colours(self) -> Tensor:
        """The likeliest entry of each pixel's palette, as an image [B, 3, H, W]; no gradient."""
        with torch.no_grad():
            return torch.cat(self._each_chunk(chosen_colours))

    def cross_entropy(self) -> Tensor:
        """Mean cross-entropy of each pixel's own entry: the input's palettes must index it."""
        if self.palettes.index is None:
            raise ValueError("the cross-entropy needs the input's own palettes, with their index")
        total = sum(self._each_chunk(lambda logits, rows: F.cross_entropy(logits, rows.index, reduction="sum")))
        return total / self.palettes.index.numel()

    def expected_colours(self) -> Tensor:
        """The softmax-weighted mean colour of each pixel [B, 3, H, W]: a differentiable stand-in
        for the chosen colour, for terms such as SSIM that need an image."""
        return torch.cat(self._each_chunk(expected_colours))


def chosen_colours(logits: Tensor, palettes: Palettes) -> Tensor:
    """The likeliest entry of each pixel's palette, as an image [B, 3, H, W]."""
    choice = logits.argmax(1)
    colours = palettes.colours.expand(len(choice), -1, -1)
    return torch.gather(colours, 1, choice.flatten(1)[:, :, None].expand(-1, -1, 3)).view(
        *choice.shape, 3).permute(0, 3, 1, 2)


def expected_colours(logits: Tensor, palettes: Palettes) -> Tensor:
    """The softmax-weighted mean colour of each pixel [B, 3, H, W]."""
    colours = palettes.colours.expand(len(logits), -1, -1).float()
    return torch.einsum("bkhw,bkc->bchw", F.softmax(logits, 1), colours)
