"""An experiment's folder, <output_dir>/<experiment_name>/: its lock, the checks before a run writes
into it, its mark and config, and what a finished run leaves there."""
import shutil
from pathlib import Path

from utils.config import save_config
from utils.errors import UserError
from utils.io import exclusive_lock, make_folder, remove_temp_files, temp_target, write_json
from utils.plots import plot_losses, save_png
from utils.training.checkpoints import save_model

ROOT = Path(__file__).resolve().parent.parent.parent
# Left in a folder by start_output_dir: only a folder holding it is an experiment to resume or replace.
EXPERIMENT_MARK = ".experiment"
# What a run writes at the top of its folder: only a half-written copy of one of these is its own.
RUN_OUTPUTS = (EXPERIMENT_MARK, "config.json", "checkpoint.pt", "model.pt", "history.json", "metrics.json",
               "losses.png", "samples.gif", "codebook_usage.png", "reconstruction_grid.png", "reconstructions",
               "fusions", "samples", "sample_grid.png", "nearest_grid.png", "codes.npz")
FINISHED = ("model.pt", "metrics.json")  # a run that wrote these ended


def experiment_folder(config):
    return (ROOT / config["output_dir"] / config["experiment_name"]).resolve()


def experiment_lock(out):
    """Held by a run for its whole length, beside its folder (which --overwrite deletes), so
    that a second run on the same experiment is refused instead of mixing its files in."""
    return exclusive_lock(out.parent / f".{out.name}.lock", f"experiment {out.name}")


def prepare_output_dir(out, config):
    """Refuse to mix two runs in one folder, and clear what a killed run left half-written.

    Returns the checkpoint to resume from, or None to start at epoch 1. Nothing is deleted here
    for --overwrite: that waits until the data and model are known to be good. Only a folder with
    the mark that start_output_dir leaves counts as an experiment: anything else, a user's own
    config.json included, is never written into or deleted."""
    checkpoint = out / "checkpoint.pt"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not an experiment folder; choose another --experiment_name")
    experiment = (out / EXPERIMENT_MARK).exists()
    # Before its mark, a run has written at most a half-written mark; a user's own .tmp files are others.
    others = sorted(p.name for p in out.iterdir() if temp_target(p) != EXPERIMENT_MARK) if out.is_dir() else []
    if others and not experiment:
        if "config.json" in others:
            raise UserError(f"{out} holds a config.json but no {EXPERIMENT_MARK}, the mark of a folder this "
                            "project's training made, so it is left alone; choose another --experiment_name or "
                            f"--output_dir (an experiment made before the mark existed: create an empty "
                            f"{EXPERIMENT_MARK} in it)")
        raise UserError(f"{out} holds {len(others)} file(s) that are not an experiment's, such as {others[0]}; "
                        "choose another --experiment_name or --output_dir")
    if config["resume"] and not experiment:
        raise UserError(f"nothing to resume in {out}: it holds no experiment; start without --resume")
    if not config["resume"] and experiment and not config["overwrite"]:
        raise UserError(f"{out} already holds an experiment; continue it with --resume=True, "
                        "replace it with --overwrite=True, or choose another --experiment_name")
    leftovers = remove_temp_files(out, lambda target: target.parts[0] in RUN_OUTPUTS)
    if leftovers:
        print(f"removed {len(leftovers)} half-written file(s) left by an interrupted run: "
              + ", ".join(str(p.relative_to(out)) for p in leftovers))
    if not config["resume"]:
        return None
    finished = [name for name in FINISHED if (out / name).exists()]
    if not checkpoint.exists() and finished:
        raise UserError(f"{out} holds a finished run ({', '.join(finished)}) but no checkpoint.pt to continue it "
                        "from, so it is left as it is; train longer under another --experiment_name, or "
                        "replace it with --overwrite=True")
    if not checkpoint.exists():
        print(f"{out} holds no complete checkpoint (the run stopped during its first epoch); starting at epoch 1")
        return None
    return checkpoint


def start_output_dir(out, config, resumed):
    """Mark the folder as an experiment and save the config; --overwrite deletes the old
    experiment only now, once the new run's config, data and model have been checked."""
    if not resumed and config["overwrite"] and (out / EXPERIMENT_MARK).exists():
        shutil.rmtree(out)
    write_json(out / EXPERIMENT_MARK, {"made_by": "utils/training/experiment.py", "meaning": (
        "this folder is an experiment: --resume=True continues it, --overwrite=True replaces it")})
    save_config(config, out / "config.json")


def write_model_and_history(out, model, config, model_type, history):
    """model.pt, history.json and, once an epoch has run, losses.png."""
    save_model(out / "model.pt", model, config, model_type)
    write_json(out / "history.json", history)
    if history:
        plot_losses(history, out / "losses.png")


def write_reconstructions(folder, names, images):
    make_folder(folder)
    for name, image in zip(names, images):
        save_png(image, folder / name)


def summary_table(metrics):
    keys = ["mse", "ssim", "psnr", "exact_pixel_rate", "sprite_exact_pixel_rate", "palette_exact_pixel_rate",
            "palette_colours", "bits_per_sprite", "input_colours",
            "output_colours", "foreign_colour_rate", "codes_used", "perplexity",
            "train_images_per_second"]
    rows = [(k, metrics[k]) for k in keys if k in metrics]
    return "\n".join(f"  {k:<24s} {v:.4f}" if isinstance(v, float) else f"  {k:<24s} {v}" for k, v in rows)
