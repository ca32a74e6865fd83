"""Reading run directories and aggregating them: runs grouped by settings, mean ± std over
seeds, curves, best setting per method (the data behind every table and figure).

Long because it holds every aggregation the report needs (groups, curves, heat maps,
ablations, FLOPs to a target), each small.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorank.core.io import read_json_file
from lorank.errors import LorankError
from lorank.experiments.sweep import EXECUTION_KEYS, format_value, short_labels
from lorank.methods import METHODS
from lorank.training.config import validate_config
from lorank.training.rundir import (
    CONFIG,
    METRICS,
    SUMMARY,
    divergence_epoch,
    num_classes,
    read_json,
    read_records,
    read_summary,
)
from lorank.training.schemas import SweepFile, validate_file

LOSS_WEIGHT_PREFIXES = ("lambda_", "alpha")
MAX_CURVES = 8


# ---------------------------------------------------------------------- loading


@dataclass
class RunData:
    """One run directory, read once."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    method: str
    seed: int
    settings: dict[str, Any]
    status: str
    diverged_epoch: int | None = None
    compress: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed" and self.diverged_epoch is None

    def final(self, key: str) -> Any:
        """The last value of ``key``: the summary's, else the last record holding it."""
        if self.summary.get(key) is not None:
            return self.summary[key]
        for record in reversed(self.records):
            if record.get(key) is not None:
                return record[key]
        return None

    def params_train(self) -> int | None:
        # A post-training compression was trained dense: its training cost is the source's.
        if self.compress is not None and not self.compress.get("finetune_epochs"):
            return self.summary.get("params_eval_before") or self.final("params_train")
        return self.final("params_train")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def load_run(path: Path) -> RunData | None:
    fix = "repair or delete that run, or leave it out of the report"
    config = read_json_file(path / CONFIG, "run config", fix)
    if not isinstance(config, dict):
        raise LorankError(
            f"run config {path / CONFIG} holds a JSON {type(config).__name__}, not an object; {fix}"
        )
    try:
        validate_config(config)
    except LorankError as e:
        raise LorankError(f"{path / CONFIG}: {e}; {fix}") from None
    # The run's history and the file's version are not settings to group runs by.
    config = {k: v for k, v in config.items() if k not in ("resumes", "format")}
    summary = read_summary(path) if (path / SUMMARY).exists() else {}
    records = read_records(path / METRICS)
    compress = read_json(path / "compress.json")
    if compress is not None and not isinstance(compress, dict):
        raise LorankError(f"{path / 'compress.json'} is not a JSON object; {fix}")
    method = (config.get("method") or {}).get("name", "dense")
    settings = {k: v for k, v in flatten(config).items() if k not in EXECUTION_KEYS}
    if compress is not None:
        method = "nnsvd"
        settings["compress.rule"] = compress.get("rule")
        settings["compress.finetune_epochs"] = compress.get("finetune_epochs", 0)
        key, _, value = str(compress.get("rule", "")).partition("=")
        if key == "rank" and value.isdigit():
            settings["compress.rank"] = int(value)
    status = summary.get("status", "running")
    diverged = divergence_epoch(records, num_classes(path))
    if status == "diverged" and summary.get("diverged_epoch") is not None:
        diverged = int(summary["diverged_epoch"])  # the trainer's per-step NaN guard
    elif status == "diverged" and diverged is None:
        diverged = int(records[-1]["epoch"]) if records else 0
    if diverged is not None:
        status = "diverged"
    return RunData(
        path=path,
        config=config,
        summary=summary,
        records=records,
        method=method,
        seed=int((config.get("train") or {}).get("seed", 0)),
        settings=settings,
        status=status,
        diverged_epoch=diverged,
        compress=compress,
    )


def find_run_dirs(path: Path) -> list[Path]:
    """Run directories at or below ``path`` (hidden folders, e.g. temp dirs, skipped)."""
    if (path / CONFIG).is_file() and ((path / METRICS).is_file() or (path / SUMMARY).is_file()):
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if CONFIG in files and (METRICS in files or SUMMARY in files):
            found.append(Path(root))
            dirs[:] = []
    return found


@dataclass
class Collected:
    runs: list[RunData]
    published: list[dict[str, Any]]
    failed: list[dict[str, Any]]  # sweep entries that never produced a run directory


def collect(paths: Iterable[str | Path]) -> Collected:
    """Every run below ``paths``, the ``published`` tables of their sweeps, and the runs the
    sweep indexes list as failed."""
    runs: list[RunData] = []
    published: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    seen: set[Path] = set()
    paths = list(paths)
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise LorankError(f"{p} does not exist; pass run or sweep directories")
        for index in [p / "sweep.json", *sorted(p.glob("*/sweep.json"))]:
            if not index.is_file():
                continue
            data = read_json_file(index, "sweep index", "re-run the sweep to rewrite it")
            validate_file(SweepFile, data, index, "re-run the sweep to rewrite it")
            if data.get("published"):
                published.append(data["published"])
            for entry in data.get("runs", []):
                if entry.get("status") == "failed":
                    failed.append({**entry, "dir": str(index.parent / entry.get("dir", ""))})
        for run_dir in find_run_dirs(p):
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            run = load_run(run_dir)
            if run is not None:
                runs.append(run)
    if not runs and not failed:
        raise LorankError(
            f"no run directories (config.json + metrics.jsonl) found under "
            f"{', '.join(str(p) for p in paths)}"
        )
    failed_dirs = {str(Path(f["dir"]).resolve()) for f in failed}
    runs = [r for r in runs if str(r.path.resolve()) not in failed_dirs or r.records]
    return Collected(runs, published, failed)


# ---------------------------------------------------------------------- aggregation


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (n − 1; 0 for n = 1) of the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0, 1
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var), len(xs)


def curve(
    runs: Sequence[RunData], key: str, x: str = "epoch", first_epoch: int = 0
) -> tuple[list[float], list[float], list[float]]:
    """Per-epoch mean and std of ``key`` over ``runs`` from ``first_epoch`` on; x is the
    epoch or the mean of ``x`` (e.g. ``time_s``) at that epoch."""
    by_epoch: dict[int, list[tuple[float, float]]] = {}
    for run in runs:
        for record in run.records:
            if int(record.get("epoch", 0)) < first_epoch:
                continue
            value, xv = record.get(key), record.get(x)
            if value is None or xv is None or not math.isfinite(value):
                continue
            by_epoch.setdefault(int(record["epoch"]), []).append((float(xv), float(value)))
    xs, means, stds = [], [], []
    for epoch in sorted(by_epoch):
        pairs = by_epoch[epoch]
        xs.append(sum(p[0] for p in pairs) / len(pairs))
        m, s, _ = mean_std(p[1] for p in pairs)
        means.append(m)
        stds.append(s)
    return xs, means, stds


@dataclass
class Group:
    """Runs with the same settings (different seeds)."""

    method: str
    settings: dict[str, Any]
    runs: list[RunData]
    label: str = ""
    varying: dict[str, Any] = field(default_factory=dict)

    @property
    def ok_runs(self) -> list[RunData]:
        return [r for r in self.runs if r.ok]

    @property
    def diverged(self) -> list[RunData]:
        return [r for r in self.runs if r.diverged_epoch is not None]

    def stat(self, key: str) -> tuple[float | None, float | None, int]:
        if key == "params_train":
            return mean_std(r.params_train() for r in self.ok_runs)
        return mean_std(r.final(key) for r in self.ok_runs)

    def acc(self) -> float:
        """Higher is better: the test accuracy, or minus the test MSE of a regression."""
        mean = self.stat("test_acc")[0]
        if mean is None:
            mse = self.stat("test_mse")[0]
            return -math.inf if mse is None else -mse
        return mean


def _settings_key(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def method_rank(method: str) -> tuple[int, str]:
    """Sort key: the registry's order of methods, then any other name alphabetically."""
    order = list(METHODS)
    return (order.index(method) if method in order else len(order), method)


def group_runs(runs: Sequence[RunData]) -> list[Group]:
    """Group by (method, settings); label each by the keys that vary within its method."""
    groups: dict[tuple[str, str], Group] = {}
    for run in runs:
        key = (run.method, _settings_key(run.settings))
        groups.setdefault(key, Group(run.method, run.settings, [])).runs.append(run)
    out = sorted(groups.values(), key=lambda g: method_rank(g.method))
    for method in {g.method for g in out}:
        mine = [g for g in out if g.method == method]
        keys = sorted({k for g in mine for k in g.settings})
        varying = [
            k
            for k in keys
            if len({json.dumps(g.settings.get(k), default=str) for g in mine}) > 1
            and k != "method.name"
        ]
        labels = short_labels(varying)
        for g in mine:
            g.varying = {k: g.settings.get(k) for k in varying}
            parts = [f"{labels[k]}={format_value(g.settings.get(k))}" for k in varying]
            g.label = " ".join([method, *parts])
            g.runs.sort(key=lambda r: r.seed)
    # Within a method, order by the varying values so tables read like grids.
    out.sort(key=lambda g: (method_rank(g.method), [_sortable(v) for v in g.varying.values()]))
    return out


def _sortable(value: Any) -> tuple[int, Any]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, -float(value))
    return (1, str(value))


def best_per_method(groups: Sequence[Group]) -> list[Group]:
    """The group with the highest mean test accuracy of each method (runs that completed)."""
    best: dict[str, Group] = {}
    for g in groups:
        if not g.ok_runs:
            continue
        if g.method not in best or g.acc() > best[g.method].acc():
            best[g.method] = g
    return sorted(best.values(), key=lambda g: method_rank(g.method))


def curve_groups(groups: Sequence[Group]) -> list[Group]:
    """Which groups get loss curves: the best of each method, or for a single-method report
    its best ``MAX_CURVES`` settings. Runs with no training epochs (a post-training
    compression) have no curve."""
    live = [g for g in groups if g.ok_runs and len(g.ok_runs[0].records) > 1]
    if len({g.method for g in live}) > 1:
        return best_per_method(live)
    return sorted(live, key=lambda g: -g.acc())[:MAX_CURVES]


# ---------------------------------------------------------------------- cost to accuracy

DENSE_FRACTION = 0.99
"""The accuracy target of the "FLOPs to reach X% of dense accuracy" column and figure."""


def flops_text(value: float | None) -> str:
    """FLOPs with an SI prefix: ``471 G``, ``3.12 T``, ``12.6 k``."""
    if value is None:
        return "–"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


def dense_accuracy(groups: Sequence[Group]) -> float | None:
    """The best mean test accuracy of the ``dense`` groups (None without one)."""
    dense = [g for g in groups if g.method == "dense" and g.ok_runs and g.stat("test_acc")[0]]
    return max(g.acc() for g in dense) if dense else None


def flops_to_reach(run: RunData, target: float) -> float | None:
    """Training FLOPs when ``run``'s test accuracy first reached ``target`` (None: never, or
    no FLOPs recorded). A run without epochs (a post-training compression) reaches it, if at
    all, at its recorded cost (the source's training)."""
    logged = [r["train_flops"] for r in run.records if r.get("train_flops") is not None]
    total = run.summary.get("train_flops")
    # A fine-tuned compression logs only its fine-tuning; its summary adds the source's.
    offset = total - logged[-1] if logged and total is not None else 0.0
    for record in run.records:
        acc, flops = record.get("test_acc"), record.get("train_flops")
        if acc is not None and flops is not None and acc >= target and record.get("epoch"):
            return float(flops) + offset
    acc, flops = run.final("test_acc"), run.final("train_flops")
    if len(run.records) <= 1 and acc is not None and flops is not None and acc >= target:
        return float(flops)
    return None


def group_flops_to_reach(g: Group, target: float) -> tuple[float | None, int]:
    """Mean training FLOPs to ``target`` over the runs that reached it, and how many did."""
    reached = [f for f in (flops_to_reach(r, target) for r in g.ok_runs) if f is not None]
    return (sum(reached) / len(reached) if reached else None), len(reached)


@dataclass
class HeatMap:
    method: str
    row_key: str
    col_key: str
    rows: list[Any]
    cols: list[Any]
    cells: dict[tuple[int, int], Group]


def heat_maps(groups: Sequence[Group]) -> list[HeatMap]:
    """One per method whose groups vary in exactly two numeric keys (besides nothing else)."""
    out = []
    for method in sorted({g.method for g in groups}, key=method_rank):
        mine = [g for g in groups if g.method == method]
        keys = list(mine[0].varying)
        if len(keys) != 2:
            continue
        if all(g.stat("test_acc")[0] is None for g in mine):
            continue  # the cells show accuracy; a regression task has none (see the runs table)
        if not all(isinstance(g.settings.get(k), int | float) for g in mine for k in keys):
            continue
        # Columns: the learning rate when it is one of the keys (seed 000's layout).
        col_key, row_key = sorted(keys, key=lambda k: (not k.endswith(".lr"), k))
        cols = sorted({g.settings[col_key] for g in mine}, reverse=True)
        rows = sorted({g.settings[row_key] for g in mine}, reverse=True)
        cells = {
            (rows.index(g.settings[row_key]), cols.index(g.settings[col_key])): g for g in mine
        }
        out.append(HeatMap(method, row_key, col_key, rows, cols, cells))
    return out


def cell_text(g: Group) -> tuple[float | None, str]:
    mean, std, n = g.stat("test_acc")
    div = g.diverged
    if mean is None:
        if div:
            epochs = sorted({r.diverged_epoch for r in div})
            return None, f"div\n(ep {epochs[0]})"
        return None, "failed"
    text = f"{100 * mean:.1f}"
    if n > 1:
        text += f"\n±{100 * std:.1f}"
    if div:
        text += f"\n{len(div)}/{len(g.runs)} div"
    return mean, text


def _is_loss_weight(key: str) -> bool:
    name = key.rsplit(".", 1)[-1]
    return key.startswith("method.") and name.startswith(LOSS_WEIGHT_PREFIXES)


@dataclass
class Ablation:
    method: str
    full: Group
    without: list[tuple[str, Group]]  # (removed term, group)


def ablations(groups: Sequence[Group]) -> list[Ablation]:
    """For each method: the best group with every loss weight on, and the groups equal to
    it but for one (or all) loss weights set to 0."""
    out = []
    for method in sorted({g.method for g in groups}, key=method_rank):
        mine = [g for g in groups if g.method == method and g.ok_runs]
        found: list[Ablation] = []
        for full in mine:
            weights = [
                k
                for k, v in full.settings.items()
                if _is_loss_weight(k) and isinstance(v, int | float) and v != 0
            ]
            if not weights:
                continue
            without = []
            for other in mine:
                if other is full:
                    continue
                diff = [
                    k
                    for k in set(full.settings) | set(other.settings)
                    if full.settings.get(k) != other.settings.get(k)
                ]
                if diff and all(k in weights and other.settings.get(k) == 0 for k in diff):
                    name = "all terms" if len(diff) > 1 else diff[0].rsplit(".", 1)[-1]
                    without.append((name, other))
            if without:
                found.append(Ablation(method, full, sorted(without, key=lambda t: t[0])))
        if found:
            out.append(max(found, key=lambda a: a.full.acc()))
    return out
