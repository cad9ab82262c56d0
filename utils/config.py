"""Command-line and JSON overrides for the config block at the top of a training script.

    config = dict(epochs=100, learning_rate=1e-4, use_ssim_loss=False)
    config = parse_config(config, sys.argv[1:])

`python train_vqvae.py run.json --epochs=3 --use_ssim_loss true`: defaults, then the JSON file,
then the command line. The type of each default is the key's type, so a typo or a wrong type
stops the run before any work instead of training with a silently ignored setting.
"""
import difflib
import json
import math
import sys
from pathlib import Path

from models.quantizer import DEAD_CODE_SAMPLING
from models.vqvae import ARCHITECTURES, QUANTIZERS
from utils.errors import UserError
from utils.io import write_json
from utils.training.schedule import LR_SCHEDULES

_TRUE_WORDS = {"true", "1", "yes"}
_FALSE_WORDS = {"false", "0", "no"}
_NONE_WORDS = {"none", "null"}


PRECISIONS = ("fp32", "bf16")
FID_DIMS = (64, 192, 768, 2048)
# What a prior draws its samples on: "both" alternates white and black, as the test split has each sprite on both.
SAMPLE_BACKGROUNDS = ("both", "white", "black")


def _at_least(low):
    return lambda value, config: None if value >= low else f"at least {low}"


# NumPy's legacy seeding, which the data pipeline and the priors use, takes 32-bit seeds.
LARGEST_SEED = 2**32 - 1


def seed_problem(value):
    """What is wrong with `value` as a seed, or None."""
    return None if 0 <= value <= LARGEST_SEED else f"from 0 to {LARGEST_SEED} (2**32 - 1)"


def _above(low):
    return lambda value, config: None if value > low else f"above {low}"


def _one_of(choices):
    return lambda value, config: None if value in choices else f"one of {', '.join(map(str, choices))}"


def _plain_name(value, config):
    """A folder name alone: a path would put the experiment outside output_dir."""
    if value in ("", ".", "..") or "/" in value or "\\" in value or Path(value).is_absolute():
        return "a plain folder name (no '/', not '.' or '..'), as outputs go to <output_dir>/<name>/"
    return None


def _num_layers(value, config):
    # A PixelCNN prior's layers are gated layers, the first of which hides the code it predicts.
    return _at_least(1 if "vq_experiment" in config else 0)(value, config)


def _image_size(value, config):
    if value < 4:
        return "at least 4"
    layers = config.get("num_layers", 0) if "vq_experiment" not in config else 0
    if layers >= 0 and value % 2 ** layers:
        return f"a multiple of 2^num_layers = {2 ** layers}"
    return None


def _odd_kernel(value, config):
    return None if value >= 3 and value % 2 else "odd and at least 3"


def _ema_decay(value, config):
    return None if 0 <= value < 1 else "at least 0 and below 1"


def _palette_context(value, config):
    if value < 0:
        return "at least 0"
    return None if value == 0 or config.get("palette_output") else "0 unless palette_output=True (it describes palette entries)"


def _fsq_levels(value, config):
    """Integers of at least 2; under quantizer 'fsq', their product is the codebook size."""
    from models.fsq import parse_levels  # the one parser, so that config and model agree on the format
    try:
        levels = parse_levels(value)
    except ValueError as error:
        return str(error).removeprefix("fsq_levels must be ").split(", got")[0]
    codes = math.prod(levels)
    if config.get("quantizer") == "fsq" and codes != config.get("num_embeddings"):
        return (f"levels whose product is num_embeddings = {config.get('num_embeddings')}, for every "
                f"combination of levels is a code ({'*'.join(map(str, levels))} = {codes})")
    return None


# What each key must be, by name, for every script (a script checks only the keys it has).
# num_layers precedes image_size, which depends on it.
RULES = {
    "experiment_name": _plain_name,
    "vq_experiment": _plain_name,
    "output_dir": lambda value, config: None if value else "a folder",
    "dataset": lambda value, config: None if value else "'pokemon' or a folder or zip of sprites",
    "num_layers": _num_layers,
    "image_size": _image_size,
    "pixelsight_filters": _at_least(0),
    "num_embeddings": _at_least(1),
    "embedding_dim": _at_least(1),
    "commitment_cost": _at_least(0),
    "ema_decay": _ema_decay,
    "dead_code_threshold": _at_least(0),
    "dead_code_sampling": _one_of(DEAD_CODE_SAMPLING),
    "quantizer": _one_of(QUANTIZERS),
    "residual_depth": _at_least(1),
    "fsq_levels": _fsq_levels,
    "ssim_weight": _at_least(0),
    "palette_features": _at_least(1),
    "palette_max_colours": _at_least(2),
    "palette_context": _palette_context,
    "max_filters": _at_least(1),
    "latent_dim": _at_least(1),
    "kl_weight": _at_least(0),
    "batch_size": _at_least(1),
    "epochs": _at_least(1),
    "learning_rate": _above(0),
    "precision": _one_of(PRECISIONS),
    "fast": lambda value, config: None if str(value).lower() in ("auto", "true", "false") else "one of auto, True, False",
    "seed": lambda value, config: seed_problem(value),
    "max_train_images": _at_least(0),
    "num_fusions": _at_least(0),
    "fusion_steps": _at_least(2),
    "hidden_channels": _at_least(1),
    "kernel_size": _odd_kernel,
    "num_samples": _at_least(2),
    "temperature": _above(0),
    "top_k": _at_least(0),
    "num_fusion_scores": _at_least(0),
    "top_p": lambda value, config: None if 0 < value <= 1 else "above 0 and at most 1",
    "sample_background": _one_of(SAMPLE_BACKGROUNDS),
    "width": _at_least(1),
    "num_heads": lambda value, config: (_at_least(1)(value, config)
                                        or (None if config.get("width", value) % value == 0 else "a divisor of width")),
    "dropout": lambda value, config: None if 0 <= value < 1 else "at least 0 and below 1",
    "fid_dims": _one_of(FID_DIMS),
    "architecture": _one_of(ARCHITECTURES),
    "residual_channels": _at_least(1),
    "residual_blocks": _at_least(0),
    "codebook_dim": _at_least(1),
    "l1_weight": _at_least(0),
    "adversarial_weight": _at_least(0),
    "adversarial_start": _at_least(0),
    "discriminator_channels": _at_least(1),
    "discriminator_layers": _at_least(1),
    "lr_schedule": _one_of(LR_SCHEDULES),
    "warmup_steps": _at_least(0),
    "grad_clip": _at_least(0),
}


def check_values(config):
    """Refuse, before any work, a value outside its key's range: NaN or infinite floats anywhere,
    and what RULES says for the keys it names."""
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{key} must be a finite number, got {value}")
    for key, rule in RULES.items():
        if key in config and config[key] is not None:
            wanted = rule(config[key], config)
            if wanted:
                raise UserError(f"--{key} must be {wanted}, got {config[key]!r}")


def _type_name(default):
    return "optional (int, float or str)" if default is None else type(default).__name__


def _parse_none_default(text):
    """A None default is a setting that is off until given: read what the text looks like."""
    if text.lower() in _NONE_WORDS:
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _parse_value(key, text, default):
    """The command-line text as the type of the default, or a UserError."""
    if default is None:
        return _parse_none_default(text)
    kind = type(default)
    if kind is bool:
        if text.lower() in _TRUE_WORDS:
            return True
        if text.lower() in _FALSE_WORDS:
            return False
    elif kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    else:
        return text
    raise UserError(f"--{key} expects {kind.__name__} (default {default!r}), got {text!r}")


def _check_defaults(defaults):
    for key, value in defaults.items():
        if value is not None and type(value) not in (bool, int, float, str):
            raise TypeError(f"config key {key!r}: defaults must be bool, int, float, str or None "
                            f"so that a command line can set them, not {type(value).__name__}")


def _check_json_value(key, value, default, source):
    """A value from a JSON file, which must already have the default's type."""
    if default is None or type(value) is type(default):
        return value
    # JSON writes 3.0 as 3, so an int must be welcome where a float is expected.
    if type(default) is float and type(value) is int:
        return float(value)
    raise UserError(f"{source}: {key!r} expects {type(default).__name__} "
                    f"(default {default!r}), got {value!r}")


def _check_known(key, defaults, source):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"{source}: unknown config key {key!r}{hint}; "
                        f"valid keys: {', '.join(defaults)}")


def _read_json_config(path, defaults):
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, or a FIFO that reading would wait on for ever
        raise UserError(f"config file {path} is not a file")
    try:
        overrides = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start} is not)") from None
    except OSError as e:
        raise UserError(f"config file {path} cannot be read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(overrides, dict):
        raise UserError(f"config file {path} must hold a JSON object of key: value")
    for key, value in overrides.items():
        _check_known(key, defaults, path)
        overrides[key] = _check_json_value(key, value, defaults[key], path)
    return overrides


def _split_argv(argv):
    """(config file or None, [(key, text)]) from `--key=value`, `--key value` and one path."""
    paths, pairs = [], []
    args = iter(argv)
    for arg in args:
        if not arg.startswith("--"):
            paths.append(arg)
            continue
        key, has_value, text = arg[2:].partition("=")
        if not has_value:
            text = next(args, None)
            if text is None or text.startswith("--"):
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
        pairs.append((key, text))
    if len(paths) > 1:
        raise UserError(f"at most one config file, got {', '.join(paths)}")
    return (paths[0] if paths else None), pairs


def _usage(defaults):
    """The --help text: how to call the script and every key with its type and default."""
    rows = [(key, _type_name(value), repr(value)) for key, value in defaults.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"usage: python {Path(sys.argv[0]).name} [CONFIG.json] [--key=value ...]",
             "JSON keys override the defaults; command-line keys override both.", ""]
    lines += [f"  --{key:<{widths[0]}}  {kind:<{widths[1]}}  default {value}"
              for key, kind, value in rows]
    return "\n".join(lines)


def parse_config(defaults, argv):
    """A new config: `defaults`, overridden by a JSON file path in argv, then by --key=value.

    Unknown keys, values that do not parse as the default's type and values outside their
    key's range (check_values) raise UserError; --help prints the keys and exits."""
    _check_defaults(defaults)
    if "--help" in argv or "-h" in argv:
        print(_usage(defaults))
        sys.exit(0)
    path, pairs = _split_argv(argv)
    config = dict(defaults)
    if path is not None:
        config.update(_read_json_config(path, defaults))
    for key, text in pairs:
        _check_known(key, defaults, "command line")
        config[key] = _parse_value(key, text, defaults[key])
    check_values(config)
    return config


def print_config(config):
    """One aligned `key = value` line per setting, so a log shows exactly what ran."""
    width = max(map(len, config), default=0)
    for key, value in config.items():
        print(f"{key:<{width}} = {value!r}")


def save_config(config, path):
    write_json(path, config)
