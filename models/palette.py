"""Palette-exact output: the decoder chooses, for each pixel, one colour of the sprite's own palette.

The palette (every distinct colour of the image, 24 bits each) is side information carried beside
the codes, so an output colour is always one the sprite has. Each palette colour is embedded by a
small network; a pixel's logits are the dot products of the decoder's features there with those
embeddings. Training minimises the cross-entropy of the right entry (a differentiable choice);
decoding takes the likeliest entry.

With `context_features`, each entry is also described by its place in its own palette (its ranks,
`palette_ranks`), and the encoder sees that description at every pixel of the colour: a code can
then name "the third-darkest red of this sprite" where a colour alone would do, so that colours
closer than the codebook's cells stay apart.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

COLOUR_LEVELS = 255
# A colour of 8 bits per channel: what a palette costs to send beside the codes.
BITS_PER_COLOUR = 24


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


# Finite, so that no product meets an infinity, yet exp() of it is 0 in float32 and bfloat16: a
# padding entry has probability 0 and is never the likeliest.
PADDING_LOGIT = -1e9


def palette_ranks(palettes: Palettes) -> Tensor:
    """Each entry's place in its own palette [B, K, RANK_FEATURES]: the dense rank of its red, green
    and blue levels and of its luminance among the palette's distinct values, both over the number
    of those values and over 255 (0 on padding). Two distinct colours differ in some channel, so
    their ranks differ however close the colours are."""
    colours = palettes.colours.float()
    luminance = colours @ colours.new_tensor([0.299, 0.587, 0.114])
    values = torch.cat([colours, luminance[..., None]], -1).masked_fill(~palettes.valid[..., None], float("inf"))
    ordered, order = values.sort(1)
    rises = torch.ones_like(ordered, dtype=torch.long)
    rises[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).long()
    dense = rises.cumsum(1) - 1
    ranks = torch.empty_like(dense).scatter_(1, order, dense).float()
    highest = torch.where(ordered.isfinite(), dense, 0).amax(1, keepdim=True).clamp(min=1).float()
    ranks = torch.cat([ranks / highest, ranks / COLOUR_LEVELS], -1)
    return ranks.masked_fill(~palettes.valid[..., None], 0.0)


RANK_FEATURES = 8


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, outputs))


class PaletteHead(nn.Module):
    """Decoder features [B, F, H, W] and palettes -> logits [B, H*W, K] over each image's entries.

    With `context_features`, entries are embedded from their colour and ranks, and `pixel_context`
    gives the encoder `context_features` channels describing each pixel's own entry."""

    def __init__(self, features: int, hidden: int = 64, context_features: int = 0):
        super().__init__()
        self.context_features = context_features
        inputs = 3 + (RANK_FEATURES if context_features else 0)
        self.embed = _mlp(inputs, hidden, features)
        self.context = _mlp(inputs, hidden, context_features) if context_features else None

    def entries(self, palettes: Palettes, dtype: torch.dtype) -> Tensor:
        """What the embeddings see of each entry [B, K, 3 (+ RANK_FEATURES)]."""
        if self.context is None:
            return palettes.colours.to(dtype)
        return torch.cat([palettes.colours.float(), palette_ranks(palettes)], -1).to(dtype)

    def pixel_context(self, palettes: Palettes, dtype: torch.dtype) -> Tensor:
        """[B, context_features, H, W]: the description of each pixel's entry, from the input's own
        palettes (which index it)."""
        described = self.context(self.entries(palettes, dtype))
        b, h, w = palettes.index.shape
        picked = torch.gather(described, 1, palettes.index.reshape(b, h * w, 1).expand(-1, -1, described.shape[-1]))
        # [B, H, W, C] seen as [B, C, H, W] is channels last, the layout the encoder runs in.
        return picked.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def forward(self, features: Tensor, palettes: Palettes) -> Tensor:
        embedded = self.embed(self.entries(palettes, features.dtype))
        # The padding of smaller palettes is pushed out of reach inside the product, as one more
        # feature of constant 1 against an entry of 0 or PADDING_LOGIT: a separate pass over the
        # logits to mask them cost as much as the product itself.
        padding = torch.zeros(palettes.valid.shape, dtype=embedded.dtype, device=embedded.device)
        embedded = torch.cat([embedded, padding.masked_fill(~palettes.valid, PADDING_LOGIT)[:, :, None]], -1)
        features = torch.cat([features.flatten(2), features.new_ones(len(features), 1, features[0, 0].numel())], 1)
        # Entries last and contiguous: the softmax, cross-entropy and argmax over them then run along
        # memory, where over dimension 1 of [B, K, H, W] they strode through it (several times slower
        # on a CPU). matmul broadcasts one borrowed palette over the batch.
        return torch.matmul(features.transpose(1, 2), embedded.transpose(1, 2)).float()


# Logits computed at once: a test image on a noise background has a palette of thousands of
# colours, so a whole batch's [B, H*W, K] logits (and their gradients) would take gigabytes.
LOGIT_BUDGET = 1 << 24
# With gradients, a batch with no more logits than this keeps them all for the backward pass (64
# images of 256 colours at 64x64; by arithmetic, 4 bytes x 3 tensors of them, about 0.8 GB), where a
# larger one recomputes each chunk's there: recomputing cost a fifth of a training step as measured.
KEPT_LOGITS = 1 << 26


def _rows(palettes: Palettes, start: int, stop: int) -> Palettes:
    if palettes.colours.shape[0] == 1:  # one palette for every image
        return palettes
    index = None if palettes.index is None else palettes.index[start:stop]
    return Palettes(palettes.colours[start:stop], palettes.valid[start:stop], index)


class PaletteChoice:
    """The choice of each pixel's colour among its palette's entries, computed a few images at a
    time (LOGIT_BUDGET); with gradients and more than KEPT_LOGITS of them, each chunk's logits are
    recomputed in the backward pass instead of kept. One pass gives both the chosen colours and,
    where the palettes index the input, the cross-entropy: a training step computes the logits
    once (twice when recomputed), where it took three passes before."""

    def __init__(self, head: PaletteHead, features: Tensor, palettes: Palettes):
        self.head, self.features, self.palettes = head, features, palettes
        self.size = features.shape[2:]
        per_image = palettes.colours.shape[1] * features.shape[2] * features.shape[3]
        step = max(1, LOGIT_BUDGET // per_image)
        self.chunks = [(i, min(i + step, len(features))) for i in range(0, len(features), step)]
        self.recompute = per_image * len(features) > KEPT_LOGITS
        self._choice = None

    def _each_chunk(self, term):
        """term(logits, palettes of the chunk) for each chunk of images, checkpointed when it
        needs gradients and the batch's logits are too many to keep."""
        def chunk(features, start, stop):
            rows = _rows(self.palettes, start, stop)
            return term(self.head(features, rows), rows)
        grad = torch.is_grad_enabled() and self.features.requires_grad
        return [checkpoint(chunk, self.features[a:b], a, b, use_reentrant=False) if grad and self.recompute
                else chunk(self.features[a:b], a, b) for a, b in self.chunks]

    def _choose(self):
        """(chosen colours [B, 3, H, W], summed cross-entropy or None), computed once."""
        if self._choice is None:
            def term(logits, rows):
                chosen = chosen_colours(logits.detach(), rows, self.size)
                if rows.index is None:
                    return chosen, logits.new_zeros(())
                return chosen, F.cross_entropy(logits.flatten(0, 1), rows.index.flatten(), reduction="sum")
            parts = self._each_chunk(term)
            total = sum(ce for _, ce in parts) if self.palettes.index is not None else None
            self._choice = (torch.cat([chosen for chosen, _ in parts]), total)
        return self._choice

    def chosen_colours(self) -> Tensor:
        """The likeliest entry of each pixel's palette, as an image [B, 3, H, W]; no gradient."""
        return self._choose()[0]

    def cross_entropy(self) -> Tensor:
        """Mean cross-entropy of each pixel's own entry: the input's palettes must index it."""
        if self.palettes.index is None:
            raise ValueError("the cross-entropy needs the input's own palettes, with their index")
        return self._choose()[1] / self.palettes.index.numel()

    def expected_colours(self) -> Tensor:
        """The softmax-weighted mean colour of each pixel [B, 3, H, W]: a differentiable stand-in
        for the chosen colour, for terms such as SSIM that need an image."""
        return torch.cat(self._each_chunk(lambda logits, rows: expected_colours(logits, rows, self.size)))


def _as_image(pixels: Tensor, size) -> Tensor:
    """[B, H*W, 3] -> [B, 3, H, W]."""
    return pixels.transpose(1, 2).reshape(len(pixels), 3, *size)


def chosen_colours(logits: Tensor, palettes: Palettes, size) -> Tensor:
    """The likeliest entry of each pixel's palette, as an image [B, 3, H, W] of height and width `size`."""
    choice = logits.argmax(-1)
    colours = palettes.colours.expand(len(choice), -1, -1)
    return _as_image(torch.gather(colours, 1, choice[:, :, None].expand(-1, -1, 3)), size)


def expected_colours(logits: Tensor, palettes: Palettes, size) -> Tensor:
    """The softmax-weighted mean colour of each pixel [B, 3, H, W]."""
    colours = palettes.colours.expand(len(logits), -1, -1).float()
    return _as_image(torch.bmm(F.softmax(logits, -1), colours), size)


def snap_to_palette(images: Tensor, palettes: Palettes) -> Tensor:
    """Each pixel of `images` [B, 3, H, W] replaced by the nearest colour (squared RGB distance) of
    its image's palette, or of one palette for all: flat colours by construction, once the palette
    travels beside the codes. Ties go to the first entry, the one of the smaller RGB key."""
    pixels = images.detach().float().flatten(2).transpose(1, 2)  # [B, H*W, 3]
    colours = palettes.colours.float().expand(len(images), -1, -1)
    valid = palettes.valid.expand(len(images), -1)
    snapped = []
    step = max(1, LOGIT_BUDGET // (colours.shape[1] * pixels.shape[1]))
    for start in range(0, len(images), step):
        rows = slice(start, start + step)
        distance = torch.cdist(pixels[rows], colours[rows]).masked_fill(~valid[rows, None, :], float("inf"))
        choice = distance.argmin(-1)
        snapped.append(torch.gather(colours[rows], 1, choice[:, :, None].expand(-1, -1, 3)))
    return _as_image(torch.cat(snapped), images.shape[2:]).to(images.dtype)
