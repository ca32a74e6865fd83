"""``lorank compare``: every method on the same model and data budget, then the report.

The flagship command. It trains ``dense``, ``factorized``, ``svd``, ``dlrt`` and ``oialr`` on
one MLP with the same data, optimizer (Adam, lr 1e-3, cosine schedule), batch size, epochs and
seeds, fits the gradient-free baselines ``pil`` and ``bipil`` to the same MLP, compresses each
dense run by truncated SVD with no retraining (``nnsvd``, via
:func:`lorank.compress.compress`), and writes :func:`~lorank.experiments.report.report` into
``OUT/``. Runs
go to ``OUT/runs/<method>,seed=<s>/`` and are resumable exactly like a sweep.

**The default budget** (chosen to finish in a few minutes on a 2-core laptop CPU with the
MNIST files embedded in the package): MNIST, all 60k training images, MLP 784-256-256-10,
batch 256, 5 epochs, seed 0, two worker processes with one torch thread each. One epoch of
the dense MLP takes about 2-5 s on one core; the low-rank methods cost 0.5-1.6× that.
Each method's settings are a preset, ``lorank/configs/compare/<method>.toml`` (its
``[method]`` table, with the reasons in its comments); values written ``"= expression"`` are
scaled to the budget from ``epochs`` and ``steps_per_epoch`` (e.g. OIALR's dense phase is the
first third of the epochs). A preset with ``compress = "RULE"`` instead of a ``[method]``
compresses each dense run with ``lorank compress`` and no retraining (``nnsvd``). The presets
cover every registered method (a test keeps it so); ``default = false`` leaves one out of
the default set.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import operator
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorank.core.io import atomic_write_json
from lorank.errors import LorankError
from lorank.experiments.sweep import RunSpec, plan_workers, run_specs
from lorank.training.config import apply_override, validate_config
from lorank.training.rundir import run_status

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "compare"
DATASETS = ("mnist", "fashion-mnist", "synthetic")
DEFAULT_EPOCHS = 5
DEFAULT_HIDDEN = (256, 256)


def parse_hidden(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.replace("x", ",").split(",") if w.strip()]
    except ValueError:
        widths = []
    if not widths or any(w < 1 for w in widths):
        raise LorankError(f"--hidden {text!r}: give layer widths like 256,256")
    return widths


def base_config(
    dataset: str,
    epochs: int,
    hidden: Sequence[int],
    train_subset: int | None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """The shared run config every method starts from."""
    raw: dict[str, Any] = {
        "data": {"name": dataset, "batch_size": 256},
        "model": {"name": "mlp", "hidden": list(hidden)},
        "method": {"name": "dense"},
        "optim": {"name": "adam", "lr": 1e-3, "schedule": "cosine"},
        "train": {"epochs": epochs, "seed": 0},
    }
    if train_subset:
        raw["data"]["train_subset"] = train_subset
    for item in overrides:
        apply_override(raw, item)
    return raw


def presets() -> dict[str, dict[str, Any]]:
    """``{method: preset}`` for every preset file, in the registry's order of methods."""
    from lorank.methods import METHODS

    found = {p.stem: p for p in PRESETS.glob("*.toml")}
    order = [m for m in METHODS if m in found] + sorted(set(found) - set(METHODS))
    return {m: tomllib.loads(found[m].read_text()) for m in order}


def default_methods() -> list[str]:
    return [m for m, preset in presets().items() if preset.get("default", True)]


_BUDGET_FUNCTIONS = {"max": max, "min": min, "ceil": math.ceil}
_BUDGET_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


def budget_value(expression: str, budget: dict[str, int]) -> Any:
    """Evaluate a preset's ``"= ..."`` value: arithmetic and comparisons on the budget's
    names, with ``max``, ``min`` and ``ceil`` (parsed, never ``eval``-ed)."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.Name) and node.id in budget:
            return budget[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BUDGET_OPS:
            return _BUDGET_OPS[type(node.op)](value(node.left), value(node.right))
        if (
            isinstance(node, ast.Compare)
            and len(node.ops) == 1
            and type(node.ops[0]) in _BUDGET_OPS
        ):
            return _BUDGET_OPS[type(node.ops[0])](value(node.left), value(node.comparators[0]))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _BUDGET_FUNCTIONS
        ):
            return _BUDGET_FUNCTIONS[node.func.id](*(value(a) for a in node.args))
        raise LorankError(f"compare preset value {expression!r}: cannot evaluate {ast.dump(node)}")

    return value(ast.parse(expression.removeprefix("=").strip(), mode="eval").body)


def method_settings(name: str, epochs: int, steps_per_epoch: int) -> dict[str, Any]:
    """The ``[method]`` table of a compared method, scaled to the budget."""
    preset = presets().get(name)
    if preset is None or "method" not in preset:
        raise LorankError(
            f"compare: no training preset for method {name!r} (choose from "
            f"{', '.join(m for m, p in presets().items() if 'method' in p)})"
        )
    budget = {"epochs": epochs, "steps_per_epoch": steps_per_epoch}

    def scaled(table: dict[str, Any]) -> dict[str, Any]:
        return {
            k: scaled(v)
            if isinstance(v, dict)
            else budget_value(v, budget)
            if isinstance(v, str) and v.startswith("=")
            else v
            for k, v in table.items()
        }

    return scaled(preset["method"])


def _steps_per_epoch(raw: dict[str, Any], data_dir: str | Path | None) -> int:
    from lorank.data import load_dataset

    config = validate_config(raw)
    data = load_dataset(config.data, device="cpu", data_dir=data_dir)
    return data.num_train_batches


def compare(
    out: str | Path,
    *,
    dataset: str = "mnist",
    epochs: int | None = None,
    seeds: Sequence[int] = (0,),
    hidden: Sequence[int] | None = None,
    train_subset: int | None = None,
    methods: Sequence[str] | None = None,
    workers: int | None = None,
    overrides: Sequence[str] = (),
    data_dir: str | Path | None = None,
    quiet: bool = False,
) -> Path:
    """Train and compress every method into ``out/runs/``, write the report into ``out``."""
    from lorank.compress import compress
    from lorank.experiments.report import report

    if dataset not in DATASETS:
        raise LorankError(f"--dataset {dataset!r}: compare trains an MLP on {', '.join(DATASETS)}")
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    if epochs < 1:
        raise LorankError(f"--epochs {epochs} must be >= 1")
    available = presets()
    methods = list(methods or default_methods())
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise LorankError(
            f"compare: unknown method {unknown[0]!r} (choose from {', '.join(available)})"
        )
    compressed = {m: available[m]["compress"] for m in methods if "compress" in available[m]}
    if compressed and "dense" not in methods:
        methods.insert(0, "dense")  # a compression preset compresses the dense runs
    out = Path(out)
    runs_dir = out / "runs"
    start = time.perf_counter()

    base = base_config(dataset, epochs, hidden or DEFAULT_HIDDEN, train_subset, overrides)
    steps = _steps_per_epoch(base, data_dir)
    specs = []
    for method in (m for m in methods if m not in compressed):
        for seed in seeds:
            raw = copy.deepcopy(base)
            raw["method"] = method_settings(method, epochs, steps)
            raw["train"]["seed"] = seed
            validate_config(raw)
            name = f"{method},seed={seed}"
            specs.append(RunSpec(name, {"method": method}, seed, raw, "compare"))
    n_workers, threads = plan_workers(len(specs), workers, base["train"].get("threads"))
    entries = run_specs(
        specs,
        runs_dir,
        workers=n_workers,
        data_dir=data_dir,
        quiet=quiet,
        index=lambda entries: {"format": "lorank-sweep/1", "base": base, "runs": entries},
    )

    if compressed:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads * n_workers)
        try:
            for method, rule in compressed.items():
                for seed in seeds:
                    source = runs_dir / f"dense,seed={seed}"
                    target = runs_dir / f"{method},seed={seed}"
                    if run_status(source) != "completed" or run_status(target) == "completed":
                        continue
                    compress(source, rule, target, data_dir=data_dir, overwrite=True)
        finally:
            torch.set_num_threads(previous)

    title = (
        f"lorank compare: {dataset}, MLP {'-'.join(str(h) for h in base['model']['hidden'])}, "
        f"{epochs} epochs, seeds {','.join(str(s) for s in seeds)}"
    )
    report([runs_dir], out, title=title)
    atomic_write_json(
        out / "compare.json",
        {
            "dataset": dataset,
            "epochs": epochs,
            "seeds": list(seeds),
            "methods": methods,
            "base": base,
            "workers": n_workers,
            "threads_per_worker": threads,
            "compress_rules": compressed,
            "runs": entries,
            "wall_time_s": time.perf_counter() - start,
        },
    )
    return out


def load_compare(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "compare.json").read_text())
