"""Fusions: two sprites mixed in latent space, the paper's qualitative test of a representation.

For each of a fixed, seeded list of pairs of test sprites (different species, white background,
no augmentation): a blend, a swap and an interpolation strip. A palette-output model draws them
with the union of the two parents' palettes."""
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from models.palette import palette_union, sprite_palettes
from utils.io import write_json
from utils.images import from_batch, to_batch
from utils.plots import image_grid, save_gif, save_png, upscale_nearest


def fusion_pairs(names, species_of_sprite, count, seed):
    """Up to `count` pairs of plain test sprites of different species, the same for every model."""
    plain = sorted(n for n in names if n.endswith("__white__orig.png"))
    species = [species_of_sprite[n.split("__")[0]] for n in plain]
    rng = np.random.default_rng(seed)
    pairs, tries = [], 0
    while len(pairs) < count and tries < 100 * count and len(set(species)) > 1:
        a, b = rng.choice(len(plain), 2, replace=False)
        tries += 1
        if species[a] != species[b] and (plain[a], plain[b]) not in pairs:
            pairs.append((plain[a], plain[b]))
    return pairs


def latents(model, model_type, x):
    """What fusions mix: the VAE's means, a VQ model's latents before quantisation."""
    return model.encode(x)[0] if model_type == "vae" else model.encode_latents(x)


def parents_palette(model, xa, xb):
    """What a palette-output model draws a fusion with: every colour of both parents."""
    return palette_union(xa, xb) if getattr(model, "draws_with_palette", False) else None


def decode_latents(model, model_type, z, palettes=None):
    return model.decode(z) if model_type == "vae" else model.decode(model.quantize(z).quantized, palettes)


def fuse_latents(model, model_type, xa, xb, weights):
    """Decode (1 - w) * latent(a) + w * latent(b) for every w in `weights`."""
    za, zb = latents(model, model_type, xa), latents(model, model_type, xb)
    mixed = torch.cat([(1 - w) * za + w * zb for w in weights])
    return decode_latents(model, model_type, mixed, parents_palette(model, xa, xb))


def swap(model, model_type, xa, xb):
    """VQ models: the top half of a's code grid over the bottom half of b's (each of a residual
    quantiser's levels alike).
    VAE: the first half of a's latent dimensions with the second half of b's."""
    if model_type == "vae":
        za, zb = model.encode(xa)[0], model.encode(xb)[0]
        half = za.shape[1] // 2
        return model.decode(torch.cat([za[:, :half], zb[:, half:]], 1))
    # Rows are the second-last axis of [B, h, w] and of a residual quantiser's [B, depth, h, w]:
    # a cell keeps all its levels' codes from one parent.
    ia, ib = model.encode(xa), model.encode(xb)
    half = ia.shape[-2] // 2
    return model.decode_indices(torch.cat([ia[..., :half, :], ib[..., half:, :]], -2), parents_palette(model, xa, xb))


# A prior fusion pulls each drawn cell towards a parent's code by this many nats of logit: strong
# enough that the prior keeps the parent's code wherever it fits what is drawn around it.
GUIDE_STRENGTH = 4.0
PRIOR_METHODS = ("prior-swap", "prior-blend")


def prior_fusion(prior, model, xa, xb, method, labels=None, generator=0, strength=GUIDE_STRENGTH):
    """A fusion that a prior draws over `model`'s code grids [B, h, w] of a and b:
    'prior-swap' keeps the top half of a's codes and draws the rest pulled towards b's, so the seam
    and b's half are redrawn to fit a's; 'prior-blend' draws every cell pulled towards both parents'
    codes, so the prior chooses, cell by cell, which parent's code continues what it has drawn."""
    ia, ib = model.encode(xa), model.encode(xb)
    if ia.dim() != 3:
        raise ValueError("a prior fusion needs one code per cell (not a residual quantiser's levels)")
    count, height, width = ia.shape
    bias = torch.zeros(count, height, width, prior.num_embeddings, device=ia.device)
    keep = None
    bias.scatter_add_(-1, ib[..., None], torch.full_like(ib[..., None], strength, dtype=bias.dtype))
    if method == "prior-swap":
        keep = torch.zeros_like(ia, dtype=torch.bool)
        keep[:, :height // 2] = True
    elif method == "prior-blend":
        bias.scatter_add_(-1, ia[..., None], torch.full_like(ia[..., None], strength, dtype=bias.dtype))
    else:
        raise ValueError(f"unknown prior fusion {method!r}; expected one of {PRIOR_METHODS}")
    codes = prior.sample((count, height, width), generator=generator, labels=labels,
                         prefix=None if keep is None else ia, keep=keep, bias=bias)
    return model.decode_indices(codes, parents_palette(model, xa, xb))


def palette_swap(model, xa, xb):
    """a's codes drawn with b's colours: a's shape in b's palette (a palette-output model only)."""
    return model.decode_indices(model.encode(xa), sprite_palettes(xb, with_index=False))


def write_pair(model, model_type, images, folder, steps, device):
    """Blend, swap and interpolation of two uint8 images [2,H,W,3] into `folder`;
    returns the blend and the swap."""
    model.eval()
    with torch.inference_mode():
        x = to_batch(images, device)
        blend = from_batch(fuse_latents(model, model_type, x[:1], x[1:], [0.5]))[0]
        swapped = from_batch(swap(model, model_type, x[:1], x[1:]))[0]
        strip = from_batch(fuse_latents(model, model_type, x[:1], x[1:], np.linspace(0, 1, steps)))
    save_png(blend, folder / "blend.png")
    save_png(swapped, folder / "swap.png")
    save_png(image_grid(strip, len(strip), pad=0), folder / "interpolation.png")
    save_gif(list(strip) + list(strip[::-1]), folder / "interpolation.gif", duration_ms=150)
    return blend, swapped


def write_fusions(model, model_type, sprites, data_dir, out, config, device):
    """Write fusions/pairs.json, one folder per pair and an overview grid; returns the pairs."""
    species = json.loads((Path(data_dir) / "manifest.json").read_text())["sprite_species"]
    pairs = fusion_pairs(sprites.names, species, config["num_fusions"], config["seed"])
    write_json(out / "pairs.json", [{"a": a, "b": b, "species_a": species[a.split("__")[0]],
                                     "species_b": species[b.split("__")[0]]} for a, b in pairs])
    position = {name: i for i, name in enumerate(sprites.names)}
    rows, folders = [], set()
    for i, (a, b) in enumerate(pairs):
        images = sprites.images[[position[a], position[b]]]
        folder = out / f"{i:02d}_{a.split('__')[0]}+{b.split('__')[0]}"
        blend, swapped = write_pair(model, model_type, images, folder, config["fusion_steps"], device)
        rows.extend([images[0], images[1], blend, swapped])
        folders.add(folder.name)
    # A resumed run with fewer fusions, or other pairs, leaves no folder of the earlier run's.
    for stale in out.glob("[0-9][0-9]_*"):
        if stale.is_dir() and stale.name not in folders:
            shutil.rmtree(stale)
    if rows:
        save_png(upscale_nearest(image_grid(np.stack(rows), 4), 3), out / "overview.png")
    return pairs
