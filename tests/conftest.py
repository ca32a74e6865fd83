import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lorank.training.config import apply_override, load_config, validate_config
from lorank.training.rundir import SUMMARY, read_json, read_records
from lorank.training.trainer import train

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

# Tests read the real datasets from ../shared/datasets beside the checkout unless the user
# points LORANK_DATA elsewhere.
if "LORANK_DATA" not in os.environ and SHARED_DATASETS.is_dir():
    os.environ["LORANK_DATA"] = str(SHARED_DATASETS)


def _data_root() -> Path | None:
    root = os.environ.get("LORANK_DATA")
    return Path(root) if root else None


@pytest.fixture
def data_root() -> Path:
    root = _data_root()
    if root is None or not root.is_dir():
        pytest.skip("no dataset folder: set LORANK_DATA or place ../shared/datasets")
    return root


# ---------------------------------------------------------------------- shared test helpers
# Tiny models and the "config → train → read the run" round trip, so tests say only what
# they check.


#: A 16-feature, 4-class synthetic problem: trains in well under a second per epoch.
SYNTHETIC_DATA = {"name": "synthetic", "synthetic_shape": [16], "batch_size": 64}


def make_mlp(*sizes: int, seed: int | None = 0) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (none after the last)."""
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def make_cnn(seed: int | None = 0) -> nn.Sequential:
    """Two 3×3 convolutions and a classifier on 3×8×8 inputs (4 classes)."""
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 4),
    )


@pytest.fixture
def mlp_factory():
    return make_mlp


@pytest.fixture
def cnn_factory():
    return make_cnn


@dataclass
class TrainedRun:
    path: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]


@pytest.fixture
def run_config(tmp_path):
    """``run_config(config, *overrides, name="run")`` trains ``config`` (a dict of config
    tables, or the path of a TOML file) with ``key=value`` overrides into ``tmp_path/name``
    and returns the run directory with its summary and metrics records."""

    def run(config: dict[str, Any] | str | Path, *overrides: str, name: str = "run", **kw: Any):
        if isinstance(config, dict):
            raw = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
            for item in overrides:
                apply_override(raw, item)
            cfg = validate_config(raw)
        else:
            cfg = load_config(config, list(overrides))
        path = train(cfg, tmp_path / name, quiet=True, **kw)
        return TrainedRun(path, read_json(path / SUMMARY) or {}, read_records(path))

    return run


@pytest.fixture
def one_thread():
    """Tiny steps: extra threads only contend with each other on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def orth_error(factor: torch.Tensor) -> float:
    """max |QᵀQ − I| of a basis that should be orthonormal."""
    gram = factor.detach().T @ factor.detach()
    return float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max())
