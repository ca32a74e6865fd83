"""The method reference (``lorank methods``), ``help()`` on configs, ``lorank -V``, and a run's
``config.json`` given back to ``lorank train``."""

import json

import pytest
from conftest import SYNTHETIC_DATA

import lorank
from lorank.cli import main
from lorank.methods import METHODS


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(METHODS)


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_name_shows_every_option_of_the_schema(name, capsys):
    assert main(["methods", name]) == 0
    text = capsys.readouterr().out
    for key, field in METHODS[name].config_class.model_fields.items():
        if key != "name":
            assert key in text, key
            if field.description:
                assert field.description[:30] in text


def test_unknown_method_is_a_one_line_error(capsys):
    assert main(["methods", "dlrtt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'dlrtt'" in err[0]


def test_help_on_configs_shows_the_field_descriptions():
    from lorank.training.config import TrainConfig

    for cls in (lorank.LowRankConfig, TrainConfig, METHODS["dlrt"].config_class):
        doc = cls.__doc__ or ""
        for key, field in cls.model_fields.items():
            assert key in doc, (cls, key)
            if field.description:
                assert field.description[:30] in doc


def test_version_flag(capsys):
    for flag in ("-V", "--version"):
        assert main([flag]) == 0
        assert capsys.readouterr().out.strip() == f"lorank {lorank.__version__}"


def test_a_runs_config_json_reruns_it_exactly(tmp_path, run_config):
    first = run_config(
        {
            "data": SYNTHETIC_DATA,
            "model": {"name": "mlp", "hidden": [24]},
            "method": {"name": "factorized", "rank": 4},
            "train": {"epochs": 2, "threads": 1},
        }
    )
    again = tmp_path / "again"
    assert main(["train", str(first.path / "config.json"), "--out", str(again), "--quiet"]) == 0
    strip = lambda records: [  # noqa: E731
        {k: v for k, v in r.items() if not k.endswith("time_s") and k != "max_rss_mb"}
        for r in records
    ]
    rerun = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert strip(rerun) == strip(first.records)
