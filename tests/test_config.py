import json

import pytest

from utils.config import parse_config, print_config, save_config
from utils.errors import UserError

DEFAULTS = dict(
    dataset="pokemon",
    epochs=100,
    learning_rate=2e-4,
    use_ssim_loss=False,
    resume=None,
)


def test_no_arguments_gives_the_defaults_in_a_new_dict():
    config = parse_config(DEFAULTS, [])
    assert config == DEFAULTS
    config["epochs"] = 1
    assert DEFAULTS["epochs"] == 100


def test_both_override_spellings_are_parsed_to_the_default_types():
    config = parse_config(DEFAULTS, ["--epochs=3", "--learning_rate", "1e-4",
                                     "--use_ssim_loss=True", "--dataset", "mine"])
    assert config == dict(DEFAULTS, epochs=3, learning_rate=1e-4, use_ssim_loss=True,
                          dataset="mine")
    assert type(config["epochs"]) is int and type(config["learning_rate"]) is float


@pytest.mark.parametrize("text, value", [
    ("true", True), ("True", True), ("1", True), ("yes", True),
    ("false", False), ("False", False), ("0", False), ("no", False),
])
def test_bool_accepts_the_usual_words(text, value):
    assert parse_config(DEFAULTS, [f"--use_ssim_loss={text}"])["use_ssim_loss"] is value


@pytest.mark.parametrize("arg", ["--use_ssim_loss=maybe", "--epochs=3.5", "--epochs=many",
                                 "--learning_rate=fast"])
def test_values_that_do_not_parse_as_the_default_type_are_refused(arg):
    key = arg[2:].partition("=")[0]
    with pytest.raises(UserError, match=f"--{key} expects"):
        parse_config(DEFAULTS, [arg])


def test_float_accepts_an_integer_written_plainly():
    config = parse_config(DEFAULTS, ["--learning_rate=3"])
    assert config["learning_rate"] == 3.0 and type(config["learning_rate"]) is float


@pytest.mark.parametrize("text, value", [("runs/a.pt", "runs/a.pt"), ("7", 7), ("0.5", 0.5),
                                         ("None", None)])
def test_a_none_default_takes_the_value_it_looks_like(text, value):
    assert parse_config(DEFAULTS, [f"--resume={text}"])["resume"] == value


def test_unknown_key_is_refused_naming_close_matches_and_valid_keys():
    with pytest.raises(UserError) as error:
        parse_config(DEFAULTS, ["--learning_rte=1e-3"])
    message = str(error.value)
    assert "'learning_rte'" in message
    assert "did you mean learning_rate?" in message
    assert "valid keys: dataset, epochs, learning_rate, use_ssim_loss, resume" in message
    assert "\n" not in message


def test_a_key_without_a_value_is_refused():
    with pytest.raises(UserError, match="--epochs needs a value"):
        parse_config(DEFAULTS, ["--epochs", "--use_ssim_loss=true"])


def test_json_file_overrides_defaults_and_command_line_overrides_both(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": 5, "learning_rate": 1, "dataset": "json"}))
    config = parse_config(DEFAULTS, ["--dataset=cli", str(path)])
    assert config == dict(DEFAULTS, epochs=5, learning_rate=1.0, dataset="cli")
    assert type(config["learning_rate"]) is float


def test_json_file_with_unknown_key_or_wrong_type_is_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epoch": 5}))
    with pytest.raises(UserError, match="did you mean epochs"):
        parse_config(DEFAULTS, [str(path)])
    path.write_text(json.dumps({"epochs": "5"}))
    with pytest.raises(UserError, match="'epochs' expects int"):
        parse_config(DEFAULTS, [str(path)])
    path.write_text(json.dumps({"epochs": True}))
    with pytest.raises(UserError, match="'epochs' expects int"):
        parse_config(DEFAULTS, [str(path)])


def test_missing_or_broken_json_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse_config(DEFAULTS, [str(tmp_path / "absent.json")])
    (tmp_path / "broken.json").write_text("{epochs: 5")
    with pytest.raises(UserError, match="not valid JSON"):
        parse_config(DEFAULTS, [str(tmp_path / "broken.json")])


def test_saved_config_reloads_to_the_same_config(tmp_path):
    config = parse_config(DEFAULTS, ["--epochs=7", "--resume=runs/last.pt"])
    save_config(config, tmp_path / "out" / "config.json")
    assert parse_config(DEFAULTS, [str(tmp_path / "out" / "config.json")]) == config


def test_help_lists_every_key_with_type_and_default_then_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(DEFAULTS, ["--epochs=3", "--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    epochs = next(line for line in lines if "--epochs" in line)
    assert epochs.split() == ["--epochs", "int", "default", "100"]
    assert sum(line.lstrip().startswith("--") for line in lines) == len(DEFAULTS)


def test_defaults_a_command_line_cannot_set_are_a_programming_error():
    with pytest.raises(TypeError, match="channels"):
        parse_config(dict(DEFAULTS, channels=[64, 128]), [])


def test_print_config_aligns_the_equals_signs(capsys):
    print_config(dict(epochs=3, dataset="pokemon"))
    assert capsys.readouterr().out.splitlines() == ["epochs  = 3", "dataset = 'pokemon'"]


def test_fsq_levels_must_multiply_to_the_codebook_size_only_when_fsq_quantises():
    defaults = {"num_embeddings": 16, "quantizer": "ema", "fsq_levels": "8,8,4"}
    assert parse_config(defaults, [])["fsq_levels"] == "8,8,4"  # unused by the EMA quantiser
    assert parse_config(defaults, ["--quantizer=fsq", "--fsq_levels=4,2,2"])["fsq_levels"] == "4,2,2"
    with pytest.raises(UserError, match=r"product is num_embeddings = 16.*\(8\*8\*4 = 256\)"):
        parse_config(defaults, ["--quantizer=fsq"])


def test_the_quantisers_the_config_accepts_are_the_ones_the_model_builds():
    from models.vqvae import QUANTIZERS as BUILT
    from utils.config import QUANTIZERS
    assert QUANTIZERS == BUILT


def test_the_restart_samplings_the_config_accepts_are_the_ones_the_quantiser_draws():
    from models.quantizer import DEAD_CODE_SAMPLING as BUILT
    from utils.config import DEAD_CODE_SAMPLING
    assert DEAD_CODE_SAMPLING == BUILT
