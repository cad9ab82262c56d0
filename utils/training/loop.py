"""The one training loop every script uses: data, model, epochs, checkpoints and outputs.

A script is its config block and `run_experiment(model_type, config, sys.argv[1:])`."""
import collections
import contextlib
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from models import build_model, described_model
from models.collectives import all_reduce_sum
from models.fast.threads import cpu_has_bfloat16
from utils.config import parse_config, print_config
from utils.data.load import SpriteSet, read_splits, resolve_dataset
from utils.data.sprites import BACKGROUND_COLOURS, background_of
from utils.data_parallel import (agreed, barrier, batch_shares, data_parallel, earliest_over_ranks,
                                 gathered_on_first_rank, is_first_rank, process_device, process_group,
                                 same_buffers_as_first_rank, summed_over_ranks, world_size)
from utils.device import refuse_beyond_memory, training_bytes
from utils.errors import UserError, exit_on_user_error
from utils.fusions import write_fusions
from utils.images import from_batch, to_batch
from utils.io import write_json
from utils.metrics import codebook_stats, colour_counts, image_metrics
from utils.plots import image_grid, plot_codebook_usage, save_gif, save_png, upscale_nearest
from utils.training.checkpoints import resume_from, save_checkpoint
from utils.training.experiment import (experiment_folder, experiment_lock, prepare_output_dir, start_output_dir,
                                       summary_table, write_model_and_history, write_reconstructions)
from utils.training.fast_path import accelerated, uses_fast_path
from utils.training.schedule import learning_rate_at

SAMPLE_COUNT = 8  # validation sprites shown in samples.gif
LOG_EVERY = 10  # steps between progress-bar updates; each one reads the loss back from the device
COUNT_CHUNK = 4096  # images whose colours are counted at once: a sort of all 48,000 takes GBs


# The keys every autoencoder script shares, with their defaults: where data and outputs are, and
# how training runs. A script's config block is its model's keys and `**TRAINING`.
TRAINING = dict(
    output_dir="outputs",  # outputs go to <output_dir>/<experiment_name>/
    dataset="pokemon",  # 'pokemon', a prepared data folder, or a folder or zip of your own sprites
    image_size=64,
    batch_size=64,  # per process: torchrun --nproc_per_node=N steps on N * batch_size images
    sync_batchnorm=True,  # under torchrun, BatchNorm statistics of the global batch, not each process's
    epochs=25,
    learning_rate=1e-4,
    lr_schedule="constant",  # or 'cosine': decay to a tenth of learning_rate over the run (utils/training/schedule.py)
    warmup_steps=0,  # optimiser steps of linear warm-up to learning_rate
    grad_clip=0.0,  # > 0: clip the autoencoder's gradient norm to this
    plain_backgrounds_only=False,  # train on the white and black backgrounds alone, as the test split has
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


class TrainingDiverged(UserError):
    """The loss stopped being finite; the last good checkpoint is kept."""


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batches(sprites, batch_size, device, order):
    """Float image batches [B,3,H,W] in [0,1], cut from the packed uint8 array by indexing."""
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield to_batch(sprites.images[index], device), index


def training_precision(config, device, training):
    """The autocast of a training step. Evaluation always runs in float32, so metrics and saved
    reconstructions do not depend on how the model was trained, and the tools reproduce them."""
    bf16 = training and config.get("precision", "fp32") == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def adversary(model):
    """The model's adversarial loss module (models/discriminator.py), or None."""
    return getattr(getattr(model, "module", model), "adversarial", None)


def make_optimizer(model, config, device):
    """Adam over the autoencoder's parameters; a discriminator has its own (`make_discriminator_optimizer`)."""
    # The fused step updates every parameter in one kernel instead of a dozen passes per tensor.
    fused = device.type in ("cpu", "cuda")
    judge = adversary(model)
    judged = set() if judge is None else {id(p) for p in judge.parameters()}
    parameters = [p for p in model.parameters() if id(p) not in judged]
    return torch.optim.Adam(parameters, lr=config["learning_rate"], fused=fused)


def make_discriminator_optimizer(model, config, device):
    """The discriminator's Adam, with VQGAN's betas (0.5, 0.9) for the adversarial game; None without one."""
    judge = adversary(model)
    if judge is None:
        return None
    return torch.optim.Adam(judge.parameters(), lr=config["learning_rate"], betas=(0.5, 0.9),
                            fused=device.type in ("cpu", "cuda"))


def schedule_step(optimizers, config, step, total_steps):
    """Set each optimiser's rate for global training `step` of `total_steps` (utils/training/schedule.py)."""
    rate = learning_rate_at(step, total_steps, config["learning_rate"], config.get("lr_schedule", "constant"),
                            config.get("warmup_steps", 0))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = rate


def run_epoch(model, model_type, sprites, config, device, epoch, optimizer=None, keep_outputs=False,
              discriminator_optimizer=None):
    """One pass over `sprites`: training when an optimiser is given, else evaluation.

    Returns (mean loss terms, dataset-wide code histogram or None, uint8 reconstructions or None),
    over the images of every rank; the reconstructions, in dataset order, on rank 0 alone.
    The data order is a function of seed and epoch alone, so a resumed run sees what an
    uninterrupted one would have."""
    training = optimizer is not None
    model.train(training)
    count = len(sprites)
    order = np.random.default_rng([config["seed"], epoch]).permutation(count) if training else np.arange(count)
    # The model itself, where `model` is its data-parallel wrapper: it holds the objective.
    core = getattr(model, "module", model)
    vq = model_type == "vqvae"
    codes = torch.zeros(core.code_histogram_size, dtype=torch.long, device=device) if vq else None
    sums = collections.defaultdict(lambda: torch.zeros((), device=device))
    shares = list(batch_shares(order, config["batch_size"], training))
    first_bad_step = torch.full((), len(shares), device=device)
    outputs, kept, seen = [], [], 0
    label = f"epoch {epoch + 1}/{config['epochs']} {'train' if training else 'eval'}"
    bar = tqdm(shares, desc=label, leave=False, dynamic_ncols=True, disable=None if is_first_rank() else True)
    with torch.set_grad_enabled(training), torch.inference_mode(not training):
        for step, (index, start, size) in enumerate(bar):
            # Only in evaluation can a rank's share be empty (see batch_shares); it then waits.
            if len(index):
                x = to_batch(sprites.images[index], device)
                if training:
                    # Before the forward pass, so the last step's gradients are not held beside
                    # this step's activations (the VAE's are 31 MB).
                    optimizer.zero_grad(set_to_none=True)
                with training_precision(config, device, training):
                    if training and model_type == "vae":
                        output = model(x, noise=vae_noise(size, config, device)[start:start + len(x)])
                    else:
                        output = model(x)
                    terms = core.loss_terms(x, output)
                if training:
                    # Ranks average their gradients: weighted by its share, each rank's batch mean
                    # makes the mean over the global batch even when the shares are unequal.
                    schedule_step([o for o in (optimizer, discriminator_optimizer) if o is not None], config,
                                  epoch * len(shares) + step, config["epochs"] * len(shares))
                    (terms["loss"] * (len(x) * world_size() / size)).backward()
                    if config.get("grad_clip"):
                        torch.nn.utils.clip_grad_norm_(
                            [p for group in optimizer.param_groups for p in group["params"]], config["grad_clip"])
                    optimizer.step()
                    if discriminator_optimizer is not None and adversary(model).active:
                        terms["discriminator"] = train_discriminator(adversary(model), discriminator_optimizer, x,
                                                                     output.reconstruction, config, device)
                for key, value in terms.items():
                    sums[key] += value.detach().float() * len(x)
                bad = ~torch.isfinite(terms["loss"].detach())
                first_bad_step = torch.where(bad & (first_bad_step == len(shares)), step, first_bad_step)
                if vq:
                    codes += torch.bincount(histogram_bins(output.indices, core.quantizer.num_embeddings),
                                            minlength=len(codes))
                if keep_outputs:
                    outputs.append(from_batch(output.reconstruction))
                    kept.append(index)
                seen += len(x)
            if step % LOG_EVERY == LOG_EVERY - 1 or step == len(shares) - 1:
                # Every rank stops together, even when only one has seen the loss go.
                bad_step = earliest_over_ranks(first_bad_step)
                if bad_step < len(shares):
                    raise TrainingDiverged(
                        f"the {'training' if training else 'evaluation'} loss became non-finite at step "
                        f"{bad_step + 1} of epoch {epoch + 1}; stopped, and the last "
                        "good checkpoint is kept (lower learning_rate, then --resume=True)")
                shown = {"loss": f"{sums['loss'].item() / max(seen, 1):.4f}"}
                if vq:
                    shown["codes"] = int((codes > 0).sum())
                bar.set_postfix(shown)
    totals = summed_over_ranks({key: value.item() for key, value in sums.items()})
    means = {key: value / count for key, value in totals.items()}
    if vq:
        all_reduce_sum(codes)
    reconstructions = None
    if keep_outputs:
        images = np.concatenate(outputs) if outputs else np.empty((0, *sprites.images.shape[1:]), np.uint8)
        index = np.concatenate(kept) if kept else np.empty(0, np.int64)
        reconstructions = gathered_on_first_rank(count, index, images)
    return means, (codes.cpu().numpy() if vq else None), reconstructions


def train_discriminator(judge, optimizer, x, reconstruction, config, device):
    """One step of the discriminator on real sprites against their reconstructions; its loss."""
    optimizer.zero_grad(set_to_none=True)
    with training_precision(config, device, True):
        loss = judge.discriminator_term(x, reconstruction)
    loss.backward()
    optimizer.step()
    return loss.detach()


def histogram_bins(indices, num_embeddings):
    """The bins of the code histogram that `indices` fill, flat: a residual quantiser's [B, depth,
    h, w] counts each level in its own `num_embeddings` bins, one level after another."""
    if indices.dim() == 3:
        return indices.flatten()
    levels = torch.arange(indices.shape[1], device=indices.device).reshape(1, -1, 1, 1)
    return (indices + levels * num_embeddings).flatten()


def vae_noise(size, config, device):
    """The reparameterisation noise of a global batch of `size` images, from the CPU generator:
    every rank draws the same and takes its own rows, so no two ranks share noise, N processes
    draw what one would, and the checkpoint's RNG state carries it on resume."""
    return torch.randn(size, config["latent_dim"]).to(device)


def pick_samples(sprites, seed, count=SAMPLE_COUNT):
    """A fixed, seeded choice of sprites on white with no augmentation, when there are enough."""
    plain = [i for i, name in enumerate(sprites.names) if name.endswith("__white__orig.png")]
    pool = plain if len(plain) >= count else list(range(len(sprites)))
    chosen = np.random.default_rng(seed).choice(len(pool), min(count, len(pool)), replace=False)
    return np.array(sorted(pool[i] for i in chosen))


def sample_frame(model, sprites, index, device):
    """Inputs over their reconstructions, one row each, as a uint8 grid."""
    model.eval()
    with torch.inference_mode():
        x, _ = next(batches(sprites, len(index), device, index))
        out = from_batch(model(x).reconstruction)
    return image_grid(np.concatenate([sprites.images[index], out]), ncols=len(index))


def seeded_choice(total, count, seed):
    """The indices, in order, of a seeded choice of `count` of `total` items (all of them when
    `count` is 0 or not below `total`)."""
    if not 0 < count < total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, count, replace=False))


def training_subset(train_set, max_images, seed):
    """A seeded choice of `max_images` training sprites (0: all), the same for every script."""
    if not 0 < max_images < len(train_set):
        return train_set
    keep = seeded_choice(len(train_set), max_images, seed)
    return SpriteSet(train_set.images[keep], train_set.masks[keep], [train_set.names[i] for i in keep])


def palette_training_set(train_set, config):
    """The training images a palette-output model learns from: those with at most
    `palette_max_colours` colours. On a noise background an image has thousands, one per pixel,
    and choosing among them costs a hundred times the rest of a step while teaching nothing the
    test split asks (it is on plain backgrounds)."""
    if not config.get("palette_output"):
        return train_set
    counts = np.concatenate([colour_counts(train_set.images[i:i + COUNT_CHUNK])
                             for i in range(0, len(train_set), COUNT_CHUNK)])
    keep = np.flatnonzero(counts <= config["palette_max_colours"])
    if len(keep) == 0:
        raise UserError(f"every training image has more than palette_max_colours = {config['palette_max_colours']} "
                        "colours; raise it, or prepare the data without noise backgrounds")
    if len(keep) < len(train_set) and is_first_rank():
        print(f"palette_output: {len(train_set) - len(keep)} of {len(train_set)} training images have more than "
              f"{config['palette_max_colours']} colours (noise backgrounds) and are left out")
    return SpriteSet(train_set.images[keep], train_set.masks[keep], [train_set.names[i] for i in keep])


def plain_background_set(train_set, config):
    """With `plain_backgrounds_only`, the training images on the plain backgrounds the test split
    has: a 16x16 code cannot hold a noise background's random pixels, and rebuilding them would
    take the loss of half the training images."""
    if not config.get("plain_backgrounds_only"):
        return train_set
    keep = [i for i, name in enumerate(train_set.names) if background_of(name) in BACKGROUND_COLOURS]
    if not keep:
        raise UserError("plain_backgrounds_only: no training image is on a plain background")
    return SpriteSet(train_set.images[keep], train_set.masks[keep], [train_set.names[i] for i in keep])


def train(model_type, config, device):
    """Train, evaluate and write every output of one experiment; returns its metrics on rank 0,
    None on the other ranks (see utils/data_parallel.py)."""
    with contextlib.ExitStack() as held:
        # Rank 0 alone holds the lock; when it cannot, every rank stops with its line.
        agreed(lambda: held.enter_context(experiment_lock(experiment_folder(config))), first_rank_only=True)
        return train_unlocked(model_type, config, device)


def refuse_a_model_beyond_memory(model_type, config, device, what="the model config"):
    """A UserError for a config that does not build, or whose model could not be trained in the
    memory `device` has free; checked on weightless copies before any data or weight is made."""
    try:
        described = described_model(model_type, config)
    except ValueError as err:
        raise UserError(f"{what} does not fit: {err}") from None
    numbers = sum(t.numel() for t in (*described.parameters(), *described.buffers()))
    refuse_beyond_memory(training_bytes(described), f"training this {model_type} ({numbers:,} weights)", device,
                         "lower num_embeddings, embedding_dim or the filter counts")


def train_unlocked(model_type, config, device):
    """`train` once rank 0 holds the experiment's lock."""
    print_config(config)
    refuse_a_model_beyond_memory(model_type, config, device)
    uses_fast_path(config, device)
    if config.get("precision") == "bf16" and device.type == "cpu" and not cpu_has_bfloat16() and is_first_rank():
        print("warning: this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX), so precision 'bf16' "
              "runs its matrix products in slow scalar code, far slower than 'fp32'", file=sys.stderr)
    out = experiment_folder(config)
    checkpoint_path = out / "checkpoint.pt"
    # Rank 0 alone checks the folder and prepares the data; the others read what it made.
    resume_path, data_dir = agreed(lambda: (prepare_output_dir(out, config), resolve_dataset(
        config["dataset"], config["image_size"])), first_rank_only=True)
    seed_everything(config["seed"])
    train_set, val_set, test_set = agreed(lambda: read_splits(data_dir, config["image_size"]))
    train_set = training_subset(plain_background_set(palette_training_set(train_set, config), config),
                                config["max_train_images"], config["seed"])

    try:
        model = build_model(model_type, config).to(device, memory_format=torch.channels_last)
    except ValueError as err:
        raise UserError(f"the model config does not fit: {err}") from None
    optimizer = make_optimizer(model, config, device)
    discriminator_optimizer = make_discriminator_optimizer(model, config, device)
    if discriminator_optimizer is not None and world_size() > 1:
        # Its parameters sit in the data-parallel module yet take no part in its forward pass.
        raise UserError("adversarial_weight > 0 trains on one process only; run it without torchrun")
    history, frames, start_epoch = [], [], 0
    if resume_path:
        saved = resume_from(resume_path, model, optimizer, config, model_type)
        history, start_epoch = saved["history"], saved["epoch"] + 1
        frames = list(saved["frames"].numpy())
        if discriminator_optimizer is not None:
            discriminator_optimizer.load_state_dict(saved["discriminator_optimizer"])
    # `runner` holds `model`'s own parameters and buffers: checkpoints and outputs save `model`.
    runner = accelerated(model, config, device)
    trained = data_parallel(runner, device, config["sync_batchnorm"])
    if is_first_rank():
        start_output_dir(out, config, resume_path)

    samples = pick_samples(val_set, config["seed"])
    for epoch in range(start_epoch, config["epochs"]):
        started = time.perf_counter()
        train_terms, _, _ = run_epoch(trained, model_type, train_set, config, device, epoch, optimizer,
                                      discriminator_optimizer=discriminator_optimizer)
        seconds = time.perf_counter() - started
        same_buffers_as_first_rank(model)
        val_terms, val_codes, _ = run_epoch(runner, model_type, val_set, config, device, epoch)
        row = {"epoch": epoch + 1, "train_seconds": seconds, "train_images": len(train_set),
               "learning_rate": config["learning_rate"], "last_learning_rate": optimizer.param_groups[0]["lr"]}
        row.update({f"train_{k}": v for k, v in train_terms.items()})
        row.update({f"val_{k}": v for k, v in val_terms.items()})
        if val_codes is not None:
            row.update({f"val_{k}": v for k, v in codebook_stats(val_codes, model.codes_per_cell).items()})
        history.append(row)
        if is_first_rank():
            frames.append(sample_frame(runner, val_set, samples, device))
            extra = {} if discriminator_optimizer is None else {"discriminator_optimizer": discriminator_optimizer.state_dict()}
            save_checkpoint(checkpoint_path, model, optimizer, epoch, history, config, model_type,
                            frames=torch.from_numpy(np.stack(frames)), **extra)
        codes = f" codes {row['val_codes_used']}/{len(val_codes)}" if val_codes is not None else ""
        print(f"epoch {epoch + 1}/{config['epochs']}: train loss {train_terms['loss']:.5f}, "
              f"val loss {val_terms['loss']:.5f}{codes}, {len(train_set) / seconds:.1f} images/s")

    _, test_codes, reconstructions = run_epoch(runner, model_type, test_set, config, device,
                                               config["epochs"], keep_outputs=True)
    if not is_first_rank():
        return None
    write_model_and_history(out, model, config, model_type, history)
    if history:
        save_gif(frames, out / "samples.gif")

    write_reconstructions(out / "reconstructions", test_set.names, reconstructions)
    metrics = image_metrics(test_set.images, reconstructions, test_set.masks)
    metrics["bits_per_sprite"] = model.bits_per_sprite(config["image_size"], metrics["input_colours"])
    if test_codes is not None:
        metrics.update(codebook_stats(test_codes, model.codes_per_cell))
        plot_codebook_usage(history, test_codes, out / "codebook_usage.png")
    train_seconds = sum(row["train_seconds"] for row in history)
    metrics.update({
        "epochs": len(history),
        "test_images": len(test_set),
        "train_seconds": round(train_seconds, 2),
        "train_images_per_second": sum(r["train_images"] for r in history) / train_seconds if train_seconds else 0.0,
        "device": str(device),
    })
    write_fusions(model, model_type, test_set, data_dir, out / "fusions", config, device)
    shown = pick_samples(test_set, config["seed"], count=16)
    comparison = upscale_nearest(image_grid(np.concatenate([test_set.images[shown], reconstructions[shown]]), len(shown)), 2)
    save_png(comparison, out / "reconstruction_grid.png")
    write_json(out / "metrics.json", metrics)
    print(f"test metrics ({len(test_set)} images), written to {out}:")
    print(summary_table(metrics))
    return metrics


def interrupted_message(config):
    return (f"{experiment_folder(config) / 'checkpoint.pt'} holds every finished epoch, intact; "
            "run the same command with --resume=True to continue")


def run_experiment(model_type, defaults, argv):
    """Entry point of the training scripts, run alone or by torchrun: a user's mistake ends every
    process, with one line from rank 0 and no traceback; so does Ctrl-C."""
    with process_group():
        # Every rank meets a mistake at the same point (see utils.data_parallel.agreed); the others
        # wait for rank 0 to say it, for torchrun stops all processes once one has ended.
        ending = dict(say=is_first_rank(), before_exit=barrier)
        config = exit_on_user_error(lambda: parse_config(defaults, argv), **ending)
        metrics = exit_on_user_error(lambda: train(model_type, config, process_device(config["device"])),
                                     interrupted=interrupted_message(config), **ending)
        barrier()  # the other ranks end when rank 0 has written the outputs
        return metrics
