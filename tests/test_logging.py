"""Library messages go through the ``lorank`` logger (silent by default, ``-v`` on the CLI);
a conversion that leaves every layer dense warns."""

import logging

import pytest
from torch import nn

import lorank
from lorank.errors import LowRankWarning


def test_a_conversion_that_converts_nothing_warns():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(LowRankWarning, match="left all 2 candidate layers dense"):
        lorank.convert(model, lorank.LowRankConfig(rank=1.0))


def test_the_logger_is_silent_by_default_and_reports_each_layer(caplog):
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("lorank").handlers)
    with caplog.at_level(logging.INFO, logger="lorank"):
        lorank.convert(
            nn.Sequential(nn.Linear(64, 64)), lorank.LowRankConfig(rank=4, keep_last_dense=False)
        )
    assert "convert 0 (64, 64): converted" in caplog.text


def test_verbose_cli_prints_log_messages(tmp_path, capsys):
    from lorank.cli import main

    config = tmp_path / "c.toml"
    config.write_text(
        '[data]\nname = "synthetic"\nsynthetic_train = 64\nsynthetic_test = 32\n'
        '[model]\nname = "mlp"\nhidden = [8]\n[train]\nepochs = 1\nthreads = 1\n'
    )
    assert main(["-v", "train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "lorank: run directory" in capsys.readouterr().err
    logging.getLogger("lorank").handlers[:] = [
        h for h in logging.getLogger("lorank").handlers if isinstance(h, logging.NullHandler)
    ]
    logging.getLogger("lorank").setLevel(logging.NOTSET)
