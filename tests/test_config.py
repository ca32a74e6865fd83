"""Config validation: every mistake is one line naming the key and what is allowed."""

import pytest

from lorank import LorankError
from lorank.training.config import apply_override, load_config


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, "[optim]\nlr = 0.01\n"),
        ["optim.lr=3e-4", "model.hidden=[64, 32]", "train.device=cpu"],
    )
    assert cfg.optim.lr == 3e-4
    assert cfg.model.hidden == [64, 32]
    assert cfg.train.device == "cpu"
    assert cfg.method.name == "dense" and cfg.data.name == "mnist"


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("[optim]\nlrr = 1\n", [], "unknown key 'optim.lrr' (allowed: betas"),
        ("[trian]\nepochs = 1\n", [], "unknown key 'trian' (allowed: data, log, method, model"),
        ("", ["model.widths=[3]"], "unknown key 'model.widths' (allowed: activation, dropout"),
        ("", ["optim.name=adamm"], "optim.name: Input should be 'sgd', 'adam' or 'adamw'"),
        ("", ["optim.lr=-1"], "optim.lr: Input should be greater than 0 (got -1)"),
        ("", ["train.epochs=ten"], "train.epochs: Input should be a valid integer"),
        ("", ["data.name=imagenet"], "data.name: Input should be 'mnist'"),
        ("", ["method.name=nope"], "method.name: Input tag 'nope'"),
        ("", ["optim"], "is not of the form section.key=value"),
        ("[data\n", [], "is not valid TOML"),
    ],
)
def test_errors_are_one_line_and_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(LorankError) as info:
        load_config(write(tmp_path, text), overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file():
    with pytest.raises(LorankError, match="does not exist"):
        load_config("no/such/file.toml")


def test_override_parses_toml_values_and_bare_strings():
    raw = {}
    apply_override(raw, "a.b=1")
    apply_override(raw, "a.c=true")
    apply_override(raw, "a.d=hello")
    apply_override(raw, "a.e=[1, 2]")
    assert raw == {"a": {"b": 1, "c": True, "d": "hello", "e": [1, 2]}}
