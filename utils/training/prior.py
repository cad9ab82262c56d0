"""The priors' loop: code grids of a frozen VQ model, cross-entropy training, new sprites.

`train_pixelcnn.py` (a gated PixelCNN) and `train_gpt.py` (a small GPT) are each a config block and
`run_prior(config, sys.argv[1:], model_type)`. Data choice, output folder, checkpoints and resume
are the VQ scripts' own (utils/training/)."""
import hashlib
import json
import math
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import build_model, negative_log_likelihood
from models.palette import sprite_palettes
from utils.config import parse_config, print_config
from utils.data.load import load_splits
from utils.data.sprites import BACKGROUND_COLOURS, background_of
from utils.device import choose_device
from utils.errors import UserError, exit_on_user_error, first_sentence
from utils.fid import fid, fid_statistics, load_fid_inception
from utils.fid_weights import resolve_fid_weights, weights_record
from utils.fusions import GUIDE_STRENGTH, PRIOR_METHODS, fuse_latents, fusion_pairs, palette_swap, prior_fusion, swap
from utils.images import from_batch, to_batch
from utils.io import atomic_path, write_json
from utils.metrics import cleanliness, palette_overlap, silhouette_overlap
from utils.plots import image_grid, save_png, upscale_nearest
from utils.training.checkpoints import load_model, resume_from, save_checkpoint
from utils.training.experiment import (ROOT, experiment_folder, experiment_lock, prepare_output_dir, start_output_dir,
                                       write_model_and_history)
from utils.training.fast_path import accelerated
from utils.training.loop import (LOG_EVERY, TrainingDiverged, batches, interrupted_message, make_optimizer,
                                 plain_background_set, refuse_a_model_beyond_memory, schedule_step,
                                 seed_everything, seeded_choice, training_subset)

CODES_FILE = "codes.npz"
# A decoder reproduces a copied code grid up to a few pixels, so an image duplicate is judged on
# nearly all pixels, not all; `code_duplicate_share` is the exact test on the codes themselves.
DUPLICATE_PIXEL_SHARE = 0.99
NEAREST_CHUNK = 1024  # training images per distance product: about 100 MB of float64 at 64x64
GRID_CHUNK = 64  # training code grids per comparison: 1,000 samples of 64x64 codes make 260 MB
GRID_COLUMNS = 8
# Samples the two figures show (every sample is saved as its own PNG): 1,000 of them made a figure
# 32,000 pixels tall.
FIGURE_SAMPLES = 64
# A conditioned prior's label is the index of the background its grid was encoded on.
BACKGROUNDS = list(BACKGROUND_COLOURS)


def load_vq_model(config, device):
    """The frozen VQ model of `vq_experiment`, in eval mode, and its saved config."""
    folder = ROOT / config["output_dir"] / config["vq_experiment"]
    # Accelerated once it is known to be a model the prior can use, so a refusal is its one line alone.
    model, model_type, vq_config = load_model(folder, device, fast=False)
    if model_type != "vqvae":
        raise UserError(f"vq_experiment {config['vq_experiment']!r} holds a {model_type}, not a VQ model; "
                        "a PixelCNN prior models the code grids of train_vqvae.py or train_pixel_vqvae.py")
    if vq_config.get("quantizer") == "residual":
        raise UserError(f"vq_experiment {config['vq_experiment']!r} has a residual quantiser, with "
                        f"{vq_config['residual_depth']} codes per cell; a PixelCNN prior models one code per cell "
                        "(train the VQ model with quantizer 'ema' or 'fsq')")
    model = accelerated(model, config, device)
    model.requires_grad_(False)
    return model, vq_config


def background_labels(names):
    """The label [N] (int64) of each image name: the index of its background in BACKGROUNDS."""
    return np.array([BACKGROUNDS.index(background_of(name)) for name in names], np.int64)


def sample_labels(config):
    """The background label of each sample that `sample_background` asks for."""
    if config["sample_background"] == "both":
        return np.arange(config["num_samples"]) % len(BACKGROUNDS)
    return np.full(config["num_samples"], BACKGROUNDS.index(config["sample_background"]), np.int64)


def prior_splits(train_set, val_set, test_set, config):
    """The sprites whose codes a prior learns, is validated and tested on. Conditioned on the
    background, it keeps the plain ones only: a noise background is random pixels no 16x16 code
    holds, the test split has none, and a user asks for white or black."""
    splits = {"train": training_subset(train_set, config["max_train_images"], config["seed"]),
              "val": val_set, "test": test_set}
    if config.get("condition_on_background"):
        plain = {"plain_backgrounds_only": True}
        splits = {split: plain_background_set(sprites, plain) for split, sprites in splits.items()}
    return splits


def codes_key(config, data_dir):
    """What cached code grids depend on: the VQ weights, the prepared data, the training subset."""
    def digest(path):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    plain = {"backgrounds": "plain"} if config.get("condition_on_background") else {}
    return json.dumps({"vq_model_sha256": digest(ROOT / config["output_dir"] / config["vq_experiment"] / "model.pt"),
                       "manifest_sha256": digest(Path(data_dir) / "manifest.json"),
                       "max_train_images": config["max_train_images"], "seed": config["seed"], **plain})


def encode_split(vq_model, sprites, batch_size, device, label):
    """Code grids [N, h, w] (int32) of every sprite of a split, in order."""
    grids = []
    steps = -(-len(sprites) // batch_size)
    with torch.inference_mode():
        for x, _ in tqdm(batches(sprites, batch_size, device, np.arange(len(sprites))), total=steps,
                         desc=f"encoding {label}", leave=False, dynamic_ncols=True, disable=None):
            grids.append(vq_model.encode(x).cpu().numpy().astype(np.int32))
    return np.concatenate(grids)


def code_grids(vq_model, splits, key, path, batch_size, device):
    """{split: code grids}, encoded once and cached in `path` under `key`.

    A cache made under another key is refused rather than re-encoded: a checkpoint resumed from
    it learnt other codes."""
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as saved:
                cached_key = str(saved["key"])
                grids = {split: saved[split] for split in splits} if cached_key == key else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise UserError(f"{path} is not a code cache this code can read ({first_sentence(err)}); "
                            "delete it, and its codes are encoded again") from None
        if grids is None:
            raise UserError(f"{path} holds the codes of another VQ model, data set or training subset "
                            "than this run's; start the prior again with --overwrite=True")
        codes = vq_model.quantizer.num_embeddings
        bad = [split for split, grid in grids.items() if grid.dtype.kind not in "iu" or grid.ndim != 3
               or (grid.size and not 0 <= grid.min() <= grid.max() < codes)]
        if bad:
            raise UserError(f"{path} holds {bad[0]} codes that are not grids of codes 0 to {codes - 1}; "
                            "delete it, and its codes are encoded again")
        return grids
    started = time.perf_counter()
    grids = {split: encode_split(vq_model, sprites, batch_size, device, split) for split, sprites in splits.items()}
    # A file object rather than the name, or numpy would append .npz to the temporary name.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, key=np.array(key), **grids)
    shape = "x".join(map(str, grids["train"].shape[1:]))
    print(f"encoded {', '.join(f'{len(g)} {s}' for s, g in grids.items())} sprites to {shape} code grids "
          f"in {time.perf_counter() - started:.0f} s")
    return grids


def run_prior_epoch(model, grids, config, device, epoch, optimizer=None, labels=None):
    """Mean bits per code over `grids` (each with its label of `labels`, for a conditioned prior):
    one training pass when an optimiser is given, else evaluation.

    The training order is a function of seed and epoch alone, as in the VQ scripts' loop, and so is
    the learning rate of each step (utils/training/schedule.py), so a resumed run continues both."""
    training = optimizer is not None
    model.train(training)
    count, batch_size = len(grids), config["batch_size"]
    order = np.random.default_rng([config["seed"], epoch]).permutation(count) if training else np.arange(count)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    steps = -(-count // batch_size)
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{config['epochs']} {'train' if training else 'eval'}",
               leave=False, dynamic_ncols=True, disable=None)
    with torch.set_grad_enabled(training), torch.inference_mode(not training):
        for step in bar:
            chosen = order[step * batch_size:(step + 1) * batch_size]
            codes = torch.from_numpy(grids[chosen]).to(device).long()
            label = None if labels is None else torch.from_numpy(labels[chosen]).to(device)
            loss = negative_log_likelihood(model(codes, label), codes)
            if training:
                schedule_step([optimizer], config, epoch * steps + step, config["epochs"] * steps)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.get("grad_clip", 0) > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
                optimizer.step()
            nats += loss.detach().double() * len(codes)
            if step % LOG_EVERY == LOG_EVERY - 1 or step == steps - 1:
                seen = min(count, (step + 1) * batch_size)
                bar.set_postfix(bits=f"{nats.item() / seen / math.log(2):.4f}")
    bits = nats.item() / count / math.log(2)
    if not math.isfinite(bits):
        raise TrainingDiverged(f"the {'training' if training else 'evaluation'} loss of epoch {epoch + 1} is not "
                               "finite; the last good checkpoint is kept (lower learning_rate, then --resume=True)")
    return bits


def decode_grids(vq_model, grids, batch_size, device, palette_images=None):
    """uint8 images [N, H, W, 3] of code grids [N, h, w], decoded by the VQ model; a palette-output
    model draws grid i with the colours of uint8 `palette_images[i]`."""
    images = []
    with torch.inference_mode():
        for start in range(0, len(grids), batch_size):
            codes = torch.from_numpy(grids[start:start + batch_size]).to(device).long()
            palettes = None if palette_images is None else sprite_palettes(
                to_batch(palette_images[start:start + batch_size], device), with_index=False)
            images.append(from_batch(vq_model.decode_indices(codes, palettes)))
    return np.concatenate(images)


def nearest_grids(grids, reference, with_shared=False):
    """For each code grid [N, h, w], the index of the `reference` grid with most codes in common
    (and, `with_shared`, how many codes it shares)."""
    flat = torch.from_numpy(grids.reshape(len(grids), -1))
    best = torch.full((len(grids),), -1, dtype=torch.long)
    index = torch.zeros(len(grids), dtype=torch.long)
    for start in range(0, len(reference), GRID_CHUNK):
        chunk = torch.from_numpy(reference[start:start + GRID_CHUNK].reshape(-1, flat.shape[1]))
        shared, where = (flat[:, None] == chunk[None]).sum(-1).max(1)
        closer = shared > best
        best, index = torch.where(closer, shared, best), torch.where(closer, where + start, index)
    return (index.numpy(), best.numpy()) if with_shared else index.numpy()


def nearest_images(samples, images):
    """(index, MSE on [0, 1] colours) of the nearest of uint8 `images` to each uint8 sample.

    Exact, not approximate: squared distances of 8-bit pixels are integer sums far below 2^53,
    which float64 products hold to the last unit."""
    pixels = samples[0].size
    flat = torch.from_numpy(samples.reshape(len(samples), pixels)).double()
    norms = (flat ** 2).sum(1, keepdim=True)
    best = torch.full((len(samples),), math.inf, dtype=torch.float64)
    index = torch.zeros(len(samples), dtype=torch.long)
    for start in range(0, len(images), NEAREST_CHUNK):
        chunk = torch.from_numpy(images[start:start + NEAREST_CHUNK].reshape(-1, pixels)).double()
        distances, where = (norms + (chunk ** 2).sum(1) - 2 * flat @ chunk.T).min(1)
        closer = distances < best
        best, index = torch.where(closer, distances, best), torch.where(closer, where + start, index)
    return index.numpy(), (best / (255.0 ** 2 * pixels)).numpy()


def paired_rows(top, bottom, columns):
    """Rows of `columns` images of `top`, each row over the matching row of `bottom`, white-padded."""
    blank = np.full(((-len(top)) % columns, *top.shape[1:]), 255, np.uint8)
    top, bottom = (np.concatenate([a, blank]).reshape(-1, columns, *top.shape[1:]) for a in (top, bottom))
    return np.stack([top, bottom], axis=1).reshape(-1, *top.shape[2:])


def fid_scorer(test_images, config, device):
    """A function of {name: uint8 images} giving ({name: FID against the test split},
    {"fid_weights": which weights}), or (None, {"fid_reason": why not}). The Inception network and
    the test split's statistics are made on its first call and kept: one pass over the test split
    for every FID of a run."""
    reference = []

    def score(image_sets):
        if not reference:
            try:
                weights = resolve_fid_weights(config["fid_weights"] or None)
                model = load_fid_inception(weights, config["fid_dims"], device)
                reference.append((model, fid_statistics(test_images, model), {"fid_weights": weights_record(weights)}))
            except UserError as err:
                reference.append((None, None, {"fid_reason": str(err)}))
        model, test, record = reference[0]
        if model is None:
            return None, record
        return {name: fid(images, test, model=model) for name, images in image_sets.items()}, record
    return score


def sample_fid(samples, real, score):
    """{"fid": FID of the samples against the test split, "floor_fid": that of as many `real`
    training sprites, the FID a perfect prior would reach at this count, "fid_weights": which
    weights gave them}, or {"fid": None, "fid_reason": why there is none}; `score` is `fid_scorer`'s."""
    values, record = score({"fid": samples, "floor_fid": real})
    return {"fid": None, **record} if values is None else {**values, **record}


def cleanliness_summary(images, labels):
    """Mean distinct colours, speckle rate and outline continuity of uint8 `images` on the
    backgrounds of `labels`, each with its 5th and 95th percentile; outline continuity on the white
    ones alone (utils.metrics.outline_continuities)."""
    backgrounds = np.array([BACKGROUND_COLOURS[BACKGROUNDS[label]] for label in labels], np.uint8)
    scores = cleanliness(images, backgrounds)
    scores["outline_continuity"] = scores["outline_continuity"][labels == BACKGROUNDS.index("white")]
    summary = {}
    for name, values in scores.items():
        values = values[np.isfinite(values)]
        if len(values):
            low, high = np.percentile(values, [5, 95])
            summary[name] = {"mean": float(values.mean()), "p5": float(low), "p95": float(high)}
    return summary


def distance_summary(distances, shared, cells):
    """Mean and range of nearest-image MSEs, and the mean share of codes a nearest grid shares."""
    return {"nearest_mse_mean": float(distances.mean()), "nearest_mse_min": float(distances.min()),
            "nearest_mse_max": float(distances.max()), "nearest_code_share_mean": float(shared.mean() / cells)}


def write_sample_figures(samples, nearest, out):
    """The first FIGURE_SAMPLES samples in a grid (sample_grid.png), and in rows over the rows of
    their nearest training images `nearest` (nearest_grid.png)."""
    samples, nearest = samples[:FIGURE_SAMPLES], nearest[:FIGURE_SAMPLES]
    columns = min(GRID_COLUMNS, len(samples))
    save_png(upscale_nearest(image_grid(samples, columns), 2), out / "sample_grid.png")
    save_png(upscale_nearest(image_grid(paired_rows(samples, nearest, columns), columns), 2), out / "nearest_grid.png")


def write_samples(prior, vq_model, grids, coded_sets, train_set, test_set, out, config, device, score):
    """New sprites, each beside its nearest training image, in `out`; returns their metrics beside
    the same measures of real sprites: test sprites against the training ones, and as many training
    sprites as samples for the FID floor. `grids` and `coded_sets` are the codes and images of the
    prior's splits; a palette-output VQ model draws each sample with the palette of the training
    sprite whose codes it shares most. `score` gives FIDs against the test split (`fid_scorer`)."""
    train_grids, coded_set = grids["train"], coded_sets["train"]
    conditioned = config.get("condition_on_background")
    labels = sample_labels(config)
    shape = (config["num_samples"], *train_grids.shape[1:])
    started = time.perf_counter()
    codes = prior.eval().sample(shape, config["temperature"], config["top_k"], config["top_p"],
                                generator=config["seed"], labels=torch.from_numpy(labels) if conditioned else None)
    codes = codes.cpu().numpy().astype(np.int32)
    palette_images, palette = None, {}
    if getattr(vq_model, "draws_with_palette", False):
        palette_images = coded_set.images[nearest_grids(codes, train_grids)]
        palette = {"sample_palette": "the training sprite with the most codes in common"}
    samples = decode_grids(vq_model, codes, config["batch_size"], device, palette_images)
    draw_seconds = time.perf_counter() - started
    names = [f"sample_{i:03d}.png" for i in range(len(samples))]
    for name, image in zip(names, samples):
        save_png(image, out / "samples" / name)
    with atomic_path(out / "samples" / "codes.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, codes)

    nearest, distances = nearest_images(samples, train_set.images)
    same_pixels = (samples == train_set.images[nearest]).all(-1).mean(axis=(1, 2))
    _, shared = nearest_grids(codes, train_grids, with_shared=True)
    write_json(out / "samples" / "nearest.json", [
        {"sample": name, "nearest_training_image": train_set.names[i], "mse": float(d),
         "exact_pixel_share": float(e), "shared_codes": int(c)}
        for name, i, d, e, c in zip(names, nearest, distances, same_pixels, shared)])
    write_sample_figures(samples, train_set.images[nearest], out)

    # The real reference: as many test sprites, measured against the training sprites the same way.
    cells = train_grids[0].size
    real_test = seeded_choice(len(coded_sets["test"]), len(samples), config["seed"])
    _, real_distances = nearest_images(coded_sets["test"].images[real_test], train_set.images)
    _, real_shared = nearest_grids(grids["test"][real_test], train_grids, with_shared=True)
    plain = plain_background_set(coded_set, {"plain_backgrounds_only": True})
    floor = plain.images[seeded_choice(len(plain), len(samples), config["seed"])]
    learnt = {grid.tobytes() for grid in train_grids}
    background = {"sample_background": config["sample_background"]} if conditioned else {}
    return {"num_samples": len(samples), "temperature": config["temperature"], "top_k": config["top_k"],
            "top_p": config["top_p"], **background, **palette, "draw_seconds": round(draw_seconds, 2),
            **distance_summary(distances, shared, cells),
            "real": {"what": f"{len(real_test)} test sprites against the training sprites",
                     **distance_summary(real_distances, real_shared, cells),
                     "cleanliness": cleanliness_summary(coded_sets["test"].images[real_test],
                                                        background_labels([coded_sets["test"].names[i]
                                                                           for i in real_test]))},
            "cleanliness": cleanliness_summary(samples, labels if conditioned else sample_backgrounds(samples)),
            "duplicate_share": float((same_pixels >= DUPLICATE_PIXEL_SHARE).mean()),
            "code_duplicate_share": float(np.mean([grid.tobytes() in learnt for grid in codes])),
            **sample_fid(samples, floor, score), "fid_dims": config["fid_dims"],
            "fid_reference": f"{len(test_set)} test images",
            "floor_reference": f"{len(floor)} training sprites, drawn at random"}


def sample_backgrounds(samples):
    """The label of the background an unconditioned sample came out on: the plain colour nearer
    its corner pixel (a prior over codes of every background may draw either, or noise)."""
    corners = samples[:, 0, 0].astype(np.int64)
    colours = np.array([BACKGROUND_COLOURS[name] for name in BACKGROUNDS], np.int64)
    return ((corners[:, None] - colours[None]) ** 2).sum(-1).argmin(1)


def fusion_methods(vq_model):
    """The fusions a prior run scores: the latent blend and code swap as baselines, the prior's own
    and, for a palette-output model, a's shape in b's palette."""
    return ["blend", "swap", *PRIOR_METHODS] + (["palette-swap"] if getattr(vq_model, "draws_with_palette", False)
                                                 else [])


def fuse_batch(method, prior, vq_model, xa, xb, labels, generator):
    if method == "blend":
        return fuse_latents(vq_model, "vqvae", xa, xb, [0.5])
    if method == "swap":
        return swap(vq_model, "vqvae", xa, xb)
    if method == "palette-swap":
        return palette_swap(vq_model, xa, xb)
    return prior_fusion(prior, vq_model, xa, xb, method, labels, generator)


def write_prior_fusions(prior, vq_model, test_set, data_dir, out, config, device, score):
    """Fusions of `num_fusion_scores` pairs of white test sprites by every method: a figure of the
    first pairs (fusion_grid.png: a, b, then each method) and, per method, FID against the test split
    and how much of each parent a fusion keeps; returns those scores."""
    species = json.loads((Path(data_dir) / "manifest.json").read_text())["sprite_species"]
    pairs = fusion_pairs(test_set.names, species, config["num_fusion_scores"], config["seed"])
    position = {name: i for i, name in enumerate(test_set.names)}
    a = test_set.images[[position[x] for x, _ in pairs]]
    b = test_set.images[[position[y] for _, y in pairs]]
    methods = fusion_methods(vq_model)
    fused = {method: [] for method in methods}
    white = BACKGROUNDS.index("white")
    generator = torch.Generator(device).manual_seed(config["seed"])
    with torch.inference_mode():
        for start in range(0, len(pairs), config["batch_size"]):
            xa, xb = (to_batch(images[start:start + config["batch_size"]], device) for images in (a, b))
            labels = torch.full((len(xa),), white, device=device) if config.get("condition_on_background") else None
            for method in methods:
                fused[method].append(from_batch(fuse_batch(method, prior, vq_model, xa, xb, labels, generator)))
    fused = {method: np.concatenate(images) for method, images in fused.items()}
    shown = min(FIGURE_SAMPLES // 8, len(pairs))
    rows = np.stack([a[:shown], b[:shown], *[fused[m][:shown] for m in methods]], 1).reshape(-1, *a.shape[1:])
    save_png(upscale_nearest(image_grid(rows, 2 + len(methods)), 2), out / "fusion_grid.png")
    colour = np.array(BACKGROUND_COLOURS["white"], np.uint8)
    values, record = score(fused)
    scores = {}
    for method, images in fused.items():
        scores[method] = {"fid": None if values is None else values[method],
                          "silhouette_overlap_a": float(np.nanmean(silhouette_overlap(images, a, colour))),
                          "silhouette_overlap_b": float(np.nanmean(silhouette_overlap(images, b, colour))),
                          "palette_overlap_a": float(np.nanmean(palette_overlap(images, a, colour))),
                          "palette_overlap_b": float(np.nanmean(palette_overlap(images, b, colour))),
                          "cleanliness": cleanliness_summary(images, np.full(len(images), white))}
    return {"fusion_pairs": len(pairs), "fusion_methods": methods, "fusion_guide_strength": GUIDE_STRENGTH,
            "fusions": scores, **record}


def check_sampling(config):
    """Refuse missing FID weights before training rather than after (the ranges of the other
    sampling keys are utils/config.py's)."""
    if config["fid_weights"]:
        resolve_fid_weights(config["fid_weights"])


def train_prior(config, model_type):
    """Encode, train, evaluate and sample one prior ('pixelcnn' or 'gpt'), writing every output;
    returns its metrics."""
    print_config(config)
    check_sampling(config)
    out = experiment_folder(config)
    device = choose_device(config["device"])
    vq_model, vq_config = load_vq_model(config, device)
    # The codebook size and grid come from the VQ model; saved with the weights, they rebuild the prior.
    cells = vq_model.code_grid_size(vq_config["image_size"]) ** 2
    conditioned = config.get("condition_on_background", False)
    model_config = dict(config, num_embeddings=vq_config["num_embeddings"], code_cells=cells,
                        num_classes=len(BACKGROUNDS) if conditioned else 0)
    refuse_a_model_beyond_memory(model_type, model_config, device, "the prior config")
    checkpoint_path = out / "checkpoint.pt"
    resume_path = prepare_output_dir(out, config)
    seed_everything(config["seed"])
    data_dir, train_set, val_set, test_set = load_splits(config["dataset"], vq_config["image_size"])
    splits = prior_splits(train_set, val_set, test_set, config)
    labels = {split: background_labels(sprites.names) if conditioned else None for split, sprites in splits.items()}
    try:
        model = build_model(model_type, model_config).to(device)
    except ValueError as err:
        raise UserError(f"the prior config does not fit: {err}") from None
    optimizer = make_optimizer(model, config, device)
    history, start_epoch = [], 0
    if resume_path:
        saved = resume_from(resume_path, model, optimizer, model_config, model_type)
        history, start_epoch = saved["history"], saved["epoch"] + 1
    start_output_dir(out, config, resume_path)
    grids = code_grids(vq_model, splits, codes_key(config, data_dir), out / CODES_FILE, config["batch_size"], device)

    for epoch in range(start_epoch, config["epochs"]):
        started = time.perf_counter()
        train_bits = run_prior_epoch(model, grids["train"], config, device, epoch, optimizer, labels["train"])
        seconds = time.perf_counter() - started
        val_bits = run_prior_epoch(model, grids["val"], config, device, epoch, labels=labels["val"])
        history.append({"epoch": epoch + 1, "train_seconds": seconds, "train_grids": len(grids["train"]),
                        "learning_rate": optimizer.param_groups[0]["lr"], "train_bits_per_code": train_bits,
                        "val_bits_per_code": val_bits})
        save_checkpoint(checkpoint_path, model, optimizer, epoch, history, model_config, model_type)
        print(f"epoch {epoch + 1}/{config['epochs']}: train {train_bits:.4f} bits/code, "
              f"val {val_bits:.4f} bits/code, {len(grids['train']) / seconds:.1f} grids/s")

    write_model_and_history(out, model, model_config, model_type, history)
    train_seconds = sum(row["train_seconds"] for row in history)
    metrics = {
        "test_bits_per_code": run_prior_epoch(model, grids["test"], config, device, config["epochs"],
                                              labels=labels["test"]),
        "val_bits_per_code": history[-1]["val_bits_per_code"] if history else None,
        "uniform_bits_per_code": math.log2(vq_config["num_embeddings"]),
        "code_grid": list(grids["train"].shape[1:]),
        "epochs": len(history),
        "train_grids": len(grids["train"]),
        "train_seconds": round(train_seconds, 2),
        "train_grids_per_second": sum(r["train_grids"] for r in history) / train_seconds if train_seconds else 0.0,
        "device": str(device),
        "prior": model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    started = time.perf_counter()
    score = fid_scorer(test_set.images, config, device)
    metrics.update(write_samples(model, vq_model, grids, splits, train_set, test_set, out, config, device, score))
    metrics["sample_seconds"] = round(time.perf_counter() - started, 2)
    if config.get("num_fusion_scores"):
        started = time.perf_counter()
        metrics.update(write_prior_fusions(model, vq_model, test_set, data_dir, out, config, device, score))
        metrics["fusion_seconds"] = round(time.perf_counter() - started, 2)
    write_json(out / "metrics.json", metrics)
    print(f"test {metrics['test_bits_per_code']:.4f} bits/code (uniform: {metrics['uniform_bits_per_code']:.1f}); "
          f"{metrics['num_samples']} samples in {out / 'samples'}, nearest training image MSE "
          f"{metrics['nearest_mse_mean']:.5f} on average; written to {out}")
    return metrics


def run_prior(defaults, argv, model_type="pixelcnn"):
    """Entry point of train_pixelcnn.py and train_gpt.py: a user's mistake ends in one line, not a traceback."""
    config = exit_on_user_error(lambda: parse_config(defaults, argv))

    def locked():
        with experiment_lock(experiment_folder(config)):
            return train_prior(config, model_type)
    return exit_on_user_error(locked, interrupted=interrupted_message(config))
