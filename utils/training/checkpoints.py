"""Checkpoints: all that rebuilds and resumes a run (model, optimiser, epoch, RNG state, config),
loaded with weights_only=True and checked against the run that continues it; and a trained model."""
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from models import PRIORS, build_model, model_defaults, model_keys, objective_keys
from utils.data_parallel import agreed
from utils.errors import UserError, first_sentence
from utils.io import atomic_path
from utils.training.fast_path import accelerated

# What --resume=True may change: how long and where the run goes on, and its outputs; every other
# key (batch_size, a loss weight, dataset, seed, ...) would make the later epochs another experiment
# than the first ones, which config.json describes. A change is printed and kept in history.json.
RESUME_MAY_CHANGE = ("epochs", "learning_rate", "device", "fast", "resume", "overwrite", "output_dir",
                     "experiment_name", "num_fusions", "fusion_steps", "num_samples", "temperature", "fid_weights")
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "history", "config", "model_type", "rng")


def rng_state():
    """Every global RNG as plain types, so the checkpoint loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def architecture(config, model_type):
    """The config keys a checkpoint must agree on to be loaded into this model; a key newer than
    the checkpoint counts as its default. The objective's weights shape no tensor and are left to
    `resume_changes`, which refuses them as it refuses every setting outside RESUME_MAY_CHANGE."""
    defaults = model_defaults(model_type)
    keys = [key for key in model_keys(model_type) if key not in objective_keys(model_type)]
    return {key: config.get(key, defaults.get(key)) for key in keys + ["image_size"]}


def load_checkpoint(path):
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which would run whatever the file holds.
        raise UserError(f"checkpoint {path} cannot be loaded safely: it holds Python objects other than "
                        "tensors and plain data, and is refused without running them") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise UserError(f"checkpoint {path} cannot be loaded safely: {first_sentence(err)}") from None


def load_training_checkpoint(path, config, model_type):
    """A checkpoint this run can continue from, or a UserError naming what does not fit."""
    saved = load_checkpoint(path)
    missing = [key for key in CHECKPOINT_KEYS if key not in saved] if isinstance(saved, dict) else CHECKPOINT_KEYS
    if missing:
        raise UserError(f"{path} is not a training checkpoint (it lacks {', '.join(missing)}); "
                        "start without --resume")
    if saved["model_type"] != model_type:
        raise UserError(f"checkpoint {path} is of a {saved['model_type']!r} model, "
                        f"but this script trains a {model_type!r}")
    mine, theirs = architecture(config, model_type), architecture(saved["config"], model_type)
    differ = {key: (theirs[key], mine[key]) for key in mine if mine[key] != theirs[key]}
    if differ:
        listed = ", ".join(f"{k} (checkpoint {a!r}, config {b!r})" for k, (a, b) in differ.items())
        raise UserError(f"checkpoint {path} was made with a different architecture: {listed}")
    broken = non_finite_tensors(saved["model"])
    if broken:
        raise UserError(f"checkpoint {path} holds non-finite weights ({', '.join(broken[:3])}); it is damaged, "
                        "so resume is refused; start without --resume")
    changed = resume_changes(saved["config"], config, model_type)
    refused = [key for key in changed if key not in RESUME_MAY_CHANGE]
    if refused:
        listed = ", ".join(f"{k} (checkpoint {changed[k][0]!r}, config {changed[k][1]!r})" for k in refused)
        raise UserError(f"checkpoint {path} was trained with other settings: {listed}; a resume may change only "
                        + f"{', '.join(k for k in RESUME_MAY_CHANGE if k not in ('resume', 'overwrite'))}; "
                        "start a new experiment for them")
    return saved


def non_finite_tensors(state):
    """The names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    return [name for name, value in (state.items() if isinstance(state, dict) else []) if isinstance(value, torch.Tensor)
            and value.is_floating_point() and not torch.isfinite(value).all()]


def resume_changes(saved, config, model_type):
    """{key: (checkpoint's value, config's)} for every key the two configs hold and differ on,
    the architecture aside (load_training_checkpoint names that apart). A key newer than the
    checkpoint is no change."""
    skip = set(architecture(config, model_type))
    return {key: (saved[key], config[key]) for key in config
            if key in saved and key not in skip and saved[key] != config[key]}


def resume_from(path, model, optimizer, config, model_type):
    """Load the checkpoint at `path` into model, optimiser and the global RNGs; returns it.

    Every rank continues from rank 0's checkpoint, which only rank 0's machine need hold."""
    saved = agreed(lambda: load_training_checkpoint(path, config, model_type), first_rank_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    for group in optimizer.param_groups:
        # The config's rate, not the checkpoint's, so that a diverged run can resume slower;
        # history.json records each epoch's rate.
        group["lr"] = config["learning_rate"]
    for row in saved["history"]:  # a checkpoint from before the rate was recorded
        row.setdefault("learning_rate", saved["config"]["learning_rate"])
    if saved["history"] and saved["history"][-1]["learning_rate"] != config["learning_rate"]:
        print(f"learning_rate is {config['learning_rate']} from epoch {saved['epoch'] + 2} on "
              f"(it was {saved['history'][-1]['learning_rate']})")
    set_rng_state(saved["rng"])
    record_resume_changes(saved, config, model_type)
    print(f"resumed {path} after epoch {saved['epoch'] + 1}")
    return saved


def record_resume_changes(saved, config, model_type):
    """Print what this resume changes, and keep it in the last finished epoch's history row, so that
    history.json still says which settings made each epoch once config.json holds the new ones."""
    changed = {key: value for key, value in resume_changes(saved["config"], config, model_type).items()
               if key not in ("resume", "overwrite", "learning_rate")}  # the rate is recorded per epoch
    if not changed or not saved["history"]:
        return
    saved["history"][-1].setdefault("changed_after", {}).update({k: list(v) for k, v in changed.items()})
    print(f"changed on resume after epoch {saved['epoch'] + 1}: "
          + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))


def save_checkpoint(path, model, optimizer, epoch, history, config, model_type, **extra):
    """`extra` holds what one loop alone resumes from (the VQ scripts' sample frames)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "history": history, "config": config, "model_type": model_type, "rng": rng_state(), **extra}
    save_torch(path, state)


def save_torch(path, state):
    # Through a Python file, a full disk is an OSError naming its cause; torch's own writer
    # reports it only as an "unexpected pos" RuntimeError.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def save_model(path, model, config, model_type):
    save_torch(path, {"model": model.state_dict(), "config": config, "model_type": model_type})


def load_model(experiment, device, fast=None):
    """(model in eval mode, model_type, config) from an experiment folder's model.pt; accelerated as
    `fast` says (the config key), or, when None, as the experiment's config does."""
    path = Path(experiment) / "model.pt"
    if not path.exists():
        raise UserError(f"{path} does not exist; train the experiment first, or name another folder")
    saved = load_checkpoint(path)
    try:
        if not isinstance(saved, dict):
            raise ValueError(f"it holds a {type(saved).__name__}, not the dict that training saves")
        missing = [key for key in ("model", "config", "model_type") if key not in saved]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        # The autoencoders' inputs are image_size pixels wide; a prior's are code grids.
        if saved["model_type"] not in PRIORS and "image_size" not in saved["config"]:
            raise ValueError("its config lacks image_size")
        model = build_model(saved["model_type"], saved["config"])
        model.load_state_dict(saved["model"])
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise UserError(f"{path} does not hold a model this code can rebuild: {str(err).splitlines()[0]}") from None
    model = model.to(device, memory_format=torch.channels_last).eval()
    setting = saved["config"] if fast is None else {"fast": fast}
    if saved["model_type"] not in PRIORS:  # the priors have no fast path
        model = accelerated(model, setting, device)
    return model, saved["model_type"], saved["config"]
