"""Command-line and JSON overrides for the config block at the top of a training script.

    config = dict(epochs=100, learning_rate=1e-4, use_ssim_loss=False)
    config = parse_config(config, sys.argv[1:])

`python train_vqvae.py run.json --epochs=3 --use_ssim_loss true`: defaults, then the JSON file,
then the command line. The type of each default is the key's type, so a typo or a wrong type
stops the run before any work instead of training with a silently ignored setting.
"""
import difflib
import json
import sys
from pathlib import Path

from utils.errors import UserError
from utils.io import write_json

_TRUE_WORDS = {"true", "1", "yes"}
_FALSE_WORDS = {"false", "0", "no"}
_NONE_WORDS = {"none", "null"}


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
    try:
        overrides = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
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

    Unknown keys and values that do not parse as the default's type raise UserError;
    --help prints the keys and exits."""
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
    return config


def print_config(config):
    """One aligned `key = value` line per setting, so a log shows exactly what ran."""
    width = max(map(len, config), default=0)
    for key, value in config.items():
        print(f"{key:<{width}} = {value!r}")


def save_config(config, path):
    write_json(path, config)
