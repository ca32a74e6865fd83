"""``lorank report``: aggregate run directories into tables, PNG figures and one HTML page.

Input: run directories, sweep directories (``sweep.json``) or any folder holding them. Runs
are grouped by their *settings* (the resolved config without seed, threads, device and data
folder; a ``lorank compress`` run adds its rank rule); each group is summarised as mean ± std
over its seeds (sample standard deviation, n − 1; 0 for one seed).

**Divergence.** A run is *diverged* at the first epoch whose training loss is NaN/inf or
exceeds ``EXPLOSION_FACTOR`` × ln(classes) (a model far worse than a uniform
guess has blown up; it typically collapses to predicting one class, the "9.8%" of seed 000),
or when its ``summary.json`` says ``diverged``. Diverged runs are listed with that epoch and
left out of every accuracy mean, curve band and scatter; heat maps mark them as hatched
"div" cells rather than colouring them by accuracy.

Outputs in ``OUT/``: ``summary.md`` (the tables), ``report.html`` (self-contained: tables and
every figure embedded as base64 PNG), ``report.json`` (the aggregated numbers) and
``figures/*.png``:

* ``loss_epoch.png``/``loss_time.png``: train and test loss vs epoch / training wall time,
  one line per method (its best setting; for a single-method sweep the best settings), seed
  band ±1 std;
* ``accuracy_params.png``: test accuracy vs params_eval and vs params_train, every run, the
  Pareto front (fewest parameters for the accuracy) highlighted;
* ``ranks.png``: rank per layer vs epoch for methods whose ranks change during training;
* ``spectra.png``: singular values σ_i/σ_1 per layer of the final checkpoint;
* ``orth_error.png``: max(‖UᵀU − I‖_F, ‖VᵀV − I‖_F) per layer vs epoch;
* ``heatmap_<method>.png``: mean test accuracy over two grid keys (e.g. lr × λ_orth);
* ``ablation.png``: runs that differ only by switching off a loss term (a ``lambda_*`` or
  ``alpha`` weight set to 0), side by side: accuracy bars and training-loss curves.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lorank.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lorank.errors import LorankError
from lorank.experiments.sweep import EXECUTION_KEYS, format_value, short_labels
from lorank.training.rundir import (
    CONFIG,
    METRICS,
    MODEL,
    SUMMARY,
    divergence_epoch,
    num_classes,
    read_json,
    read_records,
)

METHOD_ORDER = ["dense", "factorized", "svd", "dlrt", "oialr", "nnsvd", "hybrid"]
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
    config = read_json(path / CONFIG)
    if not isinstance(config, dict):
        return None
    summary = read_json(path / SUMMARY) or {}
    records = read_records(path / METRICS)
    compress = read_json(path / "compress.json")
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
            data = read_json(index)
            if not isinstance(data, dict):
                continue
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
    runs: Sequence[RunData], key: str, x: str = "epoch"
) -> tuple[list[float], list[float], list[float]]:
    """Per-epoch mean and std of ``key`` over ``runs``; x is the epoch or the mean of
    ``x`` (e.g. ``time_s``) at that epoch."""
    by_epoch: dict[int, list[tuple[float, float]]] = {}
    for run in runs:
        for record in run.records:
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
        mean = self.stat("test_acc")[0]
        return -1.0 if mean is None else mean


def _settings_key(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


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


# ---------------------------------------------------------------------- figures


def _figure(rows: int, cols: int, width: float = 6.0, height: float = 4.2) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _colors(groups: Sequence[Group]) -> dict[int, Any]:
    """A colour per group: by method when there are several methods, else per group."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    methods = sorted({g.method for g in groups}, key=method_rank)
    if len(methods) > 1:
        return {id(g): palette[methods.index(g.method) % 10] for g in groups}
    return {id(g): palette[i % 10] for i, g in enumerate(groups)}


def _log_y(ax: Any) -> None:
    """Log y axis with plain tick labels (0.2, 0.5, 1) instead of 2×10⁻¹; a linear one when
    the data span less than a factor 5 (a log axis would show no labelled tick)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if not ys or max(ys) / min(ys) < 5:
        return
    ax.set_yscale("log")
    decades = math.log10(max(ys) / min(ys))
    subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _epoch_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def method_colors(methods: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    ordered = sorted(set(methods), key=method_rank)
    return {m: palette[i % 10] for i, m in enumerate(ordered)}


def _band(
    ax: Any, xs: list[float], means: list[float], stds: list[float], color: Any, label: str
) -> None:
    ax.plot(xs, means, color=color, label=label, lw=1.8, marker="o", ms=3)
    lo = [m - s for m, s in zip(means, stds, strict=True)]
    hi = [m + s for m, s in zip(means, stds, strict=True)]
    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)


def fig_loss(groups: Sequence[Group], x: str) -> Any | None:
    chosen = curve_groups(groups)
    if not chosen:
        return None
    fig, axes = _figure(1, 2)
    colors = _colors(chosen)
    any_data = False
    for ax, key, title in zip(
        axes[0], ("train_loss", "test_loss"), ("training loss", "test loss"), strict=True
    ):
        for g in chosen:
            xs, means, stds = curve(g.ok_runs, key, x)
            if xs:
                any_data = True
                n = len(g.ok_runs)
                _band(ax, xs, means, stds, colors[id(g)], f"{g.label} (n={n})")
        _log_y(ax)
        if x == "epoch":
            _epoch_x(ax)
        ax.set_xlabel("epoch" if x == "epoch" else "training wall time (s)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs {'epoch' if x == 'epoch' else 'wall time'}")
        ax.grid(True, which="both", alpha=0.3)
    if not any_data:
        return None
    axes[0][1].legend(fontsize=8, loc="best")
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (fewer or equal params and higher or
    equal accuracy, one strictly), ordered by params."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def fig_accuracy_params(groups: Sequence[Group]) -> Any | None:
    runs = [(g, r) for g in groups for r in g.ok_runs if r.final("test_acc") is not None]
    if not runs:
        return None
    fig, axes = _figure(1, 2)
    # Colour by method; a single-method sweep is coloured by setting instead.
    by_method = len({g.method for g, _ in runs}) > 1
    palette = _colors([g for g in groups if g.ok_runs])
    for ax, key in zip(axes[0], ("params_eval", "params_train"), strict=True):
        pts, owners = [], []
        for g, r in runs:
            p = r.params_train() if key == "params_train" else r.final(key)
            if p:
                pts.append((float(p), 100 * float(r.final("test_acc"))))
                owners.append(g)
        if not pts:
            continue
        labelled = set()
        for (p, a), g in zip(pts, owners, strict=True):
            name = g.method if by_method else g.label
            ax.scatter(
                p,
                a,
                color=palette[id(g)],
                s=28,
                alpha=0.8,
                label=None if name in labelled else name,
                zorder=3,
            )
            labelled.add(name)
        front = pareto_front(pts)
        fx = [pts[i][0] for i in front]
        fy = [pts[i][1] for i in front]
        ax.step(fx, fy, where="post", color="black", ls="--", lw=1, label="Pareto front", zorder=2)
        ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="black", lw=1.4, zorder=4)
        for i in front:
            ax.annotate(
                owners[i].label, pts[i], textcoords="offset points", xytext=(5, -11), fontsize=7
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"{key} (log scale)")
        ax.set_ylabel("test accuracy (%)")
        title = "inference parameters" if key == "params_eval" else "trainable parameters"
        ax.set_title(f"test accuracy vs {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return fig


def _layer_series(runs: Sequence[RunData], key: str) -> dict[str, tuple[list, list]]:
    """``{layer: (epochs, mean over runs)}`` for a per-layer dict metric (ranks, orth_error)."""
    values: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for record in run.records:
            for layer, v in (record.get(key) or {}).items():
                if v is not None and math.isfinite(v):
                    values.setdefault(layer, {}).setdefault(int(record["epoch"]), []).append(v)
    out = {}
    for layer, by_epoch in values.items():
        epochs = sorted(by_epoch)
        out[layer] = (epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs])
    return out


def _grid_axes(n: int, width: float = 5.0, height: float = 3.8) -> tuple[Any, list[Any]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = _figure(rows, cols, width, height)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def adaptive_groups(groups: Sequence[Group]) -> list[Group]:
    """Best group of each method whose per-layer ranks change during training."""
    out = []
    for g in best_per_method(groups):
        series = _layer_series(g.ok_runs, "ranks")
        if (
            any(
                len(set(vals)) > 1 or len(eps) < len(g.ok_runs[0].records)
                for eps, vals in series.values()
            )
            and len(g.ok_runs[0].records) > 1
        ):
            out.append(g)
    return out


def fig_ranks(groups: Sequence[Group]) -> Any | None:
    chosen = adaptive_groups(groups)
    if not chosen:
        return None
    fig, axes = _grid_axes(len(chosen))
    for ax, g in zip(axes, chosen, strict=True):
        for layer, (epochs, vals) in _layer_series(g.ok_runs, "ranks").items():
            ax.plot(epochs, vals, marker="o", ms=3, label=layer)
        ax.set_title(f"{g.label}: rank per layer", fontsize=10)
        _epoch_x(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel("rank (mean over seeds)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def final_spectra(run: RunData) -> dict[str, list[float]]:
    """``{layer: singular values}`` of every Linear/Conv2d/low-rank layer of the checkpoint."""
    import torch
    from torch import nn

    from lorank.core.io import load
    from lorank.core.layers import LowRankLayer

    if not (run.path / "model.json").is_file():
        return {}
    try:
        model = load(run.path / MODEL)
    except LorankError:
        return {}
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LowRankLayer):
                sigma = module.singular_values()
            elif isinstance(module, nn.Linear | nn.Conv2d):
                sigma = torch.linalg.svdvals(module.weight.detach().flatten(1).double())
            else:
                continue
            out[name] = [float(s) for s in sigma]
    return out


def fig_spectra(groups: Sequence[Group]) -> Any | None:
    chosen = [(g, final_spectra(g.ok_runs[0])) for g in best_per_method(groups)]
    chosen = [(g, s) for g, s in chosen if s]
    if not chosen:
        return None
    fig, axes = _grid_axes(len(chosen))
    for ax, (g, spectra) in zip(axes, chosen, strict=True):
        for layer, sigma in spectra.items():
            top = sigma[0] if sigma and sigma[0] > 0 else 1.0
            ys = [max(s / top, 1e-8) for s in sigma]
            ax.plot(range(1, len(ys) + 1), ys, lw=1.5, label=f"{layer} (r={len(ys)})")
        _log_y(ax)
        ax.set_title(f"{g.label} (seed {g.ok_runs[0].seed}): final spectra", fontsize=10)
        ax.set_xlabel("index i")
        ax.set_ylabel("σ_i / σ_1")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def fig_orth(groups: Sequence[Group]) -> Any | None:
    chosen = [g for g in best_per_method(groups) if _layer_series(g.ok_runs, "orth_error")]
    if not chosen:
        return None
    fig, axes = _grid_axes(len(chosen))
    for ax, g in zip(axes, chosen, strict=True):
        for layer, (epochs, vals) in _layer_series(g.ok_runs, "orth_error").items():
            ax.plot(epochs, [max(v, 1e-12) for v in vals], marker="o", ms=3, label=layer)
        _log_y(ax)
        ax.set_title(f"{g.label}: orthogonality error", fontsize=10)
        _epoch_x(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel("max(‖UᵀU−I‖_F, ‖VᵀV−I‖_F)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return fig


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


def _cell_text(g: Group) -> tuple[float | None, str]:
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


def fig_heatmap(hm: HeatMap) -> Any:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    grid = np.full((len(hm.rows), len(hm.cols)), np.nan)
    texts = {}
    for (i, j), g in hm.cells.items():
        mean, text = _cell_text(g)
        if mean is not None:
            grid[i, j] = 100 * mean
        texts[(i, j)] = text
    w = max(5.0, 1.1 * len(hm.cols) + 2.5)
    h = max(3.5, 0.75 * len(hm.rows) + 1.8)
    fig, axes = _figure(1, 1, w, h)
    ax = axes[0][0]
    cmap = colormaps["viridis"].with_extremes(bad="white")
    finite = grid[np.isfinite(grid)]
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 100.0
    vmin = min(vmin, vmax - 1.0)  # at least one percentage point of colour range
    image = ax.imshow(
        np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=max(vmax, vmin + 1e-6), aspect="auto"
    )
    bar = fig.colorbar(image, ax=ax, label="mean test accuracy (%)")
    bar.ax.yaxis.set_major_formatter("{x:.1f}")
    for (i, j), text in texts.items():
        value = grid[i, j]
        if not np.isfinite(value):
            ax.add_patch(
                Rectangle(
                    (j - 0.5, i - 0.5), 1, 1, facecolor="0.85", edgecolor="0.4", hatch="///", lw=0.5
                )
            )
            color = "firebrick"
        else:
            frac = (value - vmin) / (vmax - vmin) if vmax > vmin else 1.0
            color = "black" if frac > 0.55 else "white"
        ax.text(
            j,
            i,
            text,
            ha="center",
            va="center",
            fontsize=8,
            color=color,
            fontweight="bold" if not np.isfinite(value) else None,
        )
    labels = short_labels([hm.row_key, hm.col_key])
    ax.set_xticks(range(len(hm.cols)), [format_value(c) for c in hm.cols])
    ax.set_yticks(range(len(hm.rows)), [format_value(r) for r in hm.rows])
    ax.set_xlabel(labels[hm.col_key])
    ax.set_ylabel(labels[hm.row_key])
    ax.set_title(f"{hm.method}: test accuracy (%), hatched = diverged")
    return fig


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


def fig_ablation(items: Sequence[Ablation]) -> Any | None:
    if not items:
        return None
    fig, axes = _figure(len(items), 2, 6.0, 4.0)
    for row, ab in zip(axes, items, strict=True):
        variants = [("all terms on", ab.full)] + [(f"without {n}", g) for n, g in ab.without]
        names, means, stds = [], [], []
        for name, g in variants:
            m, s, _ = g.stat("test_acc")
            names.append(name)
            means.append(100 * (m or 0.0))
            stds.append(100 * (s or 0.0))
        ax = row[0]
        bars = ax.bar(
            range(len(names)),
            means,
            yerr=stds,
            capsize=6,
            ecolor="0.3",
            color=[f"C{i}" for i in range(len(names))],
        )
        for bar, m in zip(bars, means, strict=True):
            ax.annotate(
                f"{m:.2f}",
                (bar.get_x() + bar.get_width() / 2, m),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=8,
            )
        low = min(m - s for m, s in zip(means, stds, strict=True))
        high = max(m + s for m, s in zip(means, stds, strict=True))
        ax.set_ylim(max(0.0, low - 3), min(100.0, high + 1.5))
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{ab.method} ablation ({ab.full.label})", fontsize=10)
        ax = row[1]
        for i, (name, g) in enumerate(variants):
            xs, ms, ss = curve(g.ok_runs, "train_loss")
            if xs:
                _band(ax, xs, ms, ss, f"C{i}", name)
        _log_y(ax)
        _epoch_x(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training task loss")
        ax.set_title(f"{ab.method}: loss with each term removed", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------- tables


def _pct(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if n > 1 else "")


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _ranks_text(g: Group) -> str:
    runs = g.ok_runs or g.runs
    ranks = runs[0].final("ranks") if runs else None
    if not ranks:
        return "dense"
    return " ".join(str(r) for r in ranks.values())


def _status(g: Group) -> str:
    div = g.diverged
    failed = [r for r in g.runs if r.status not in ("completed", "diverged")]
    parts = []
    if div:
        epochs = ",".join(str(r.diverged_epoch) for r in div)
        parts.append(f"diverged {len(div)}/{len(g.runs)} (epoch {epochs})")
    if failed:
        parts.append(f"{failed[0].status} {len(failed)}/{len(g.runs)}")
    return "; ".join(parts) or "ok"


RUN_COLUMNS = [
    "method / setting",
    "seeds",
    "test acc (%)",
    "test loss",
    "params_eval",
    "params_train",
    "params_dense",
    "eval compression (%)",
    "final ranks",
    "train time (s)",
    "status",
]


def runs_table(groups: Sequence[Group]) -> list[list[str]]:
    rows = []
    for g in groups:
        acc = g.stat("test_acc")
        loss = g.stat("test_loss")
        comp = g.stat("compression")
        rows.append(
            [
                g.label,
                f"{len(g.ok_runs)}/{len(g.runs)}",
                _pct(*acc),
                _num(loss[0]),
                _num(g.stat("params_eval")[0]),
                _num(g.stat("params_train")[0]),
                _num(g.stat("params_dense")[0]),
                "–" if comp[0] is None else f"{100 * comp[0]:.1f}",
                _ranks_text(g),
                _num(g.stat("train_time_s")[0], 3),
                _status(g),
            ]
        )
    return rows


def heatmap_table(hm: HeatMap) -> tuple[list[str], list[list[str]]]:
    labels = short_labels([hm.row_key, hm.col_key])
    header = [f"{labels[hm.row_key]} ↓ \\ {labels[hm.col_key]} →"] + [
        format_value(c) for c in hm.cols
    ]
    rows = []
    for i, r in enumerate(hm.rows):
        row = [format_value(r)]
        for j in range(len(hm.cols)):
            g = hm.cells.get((i, j))
            if g is None:
                row.append("")
                continue
            mean, text = _cell_text(g)
            row.append(text.replace("\n", " "))
        rows.append(row)
    return header, rows


PUBLISHED_METRICS = ("test_acc", "compression", "params_eval")


def _matches(g: Group, row: dict[str, Any]) -> bool:
    if "method" in row and row["method"] != g.method:
        return False
    for key, value in row.items():
        if "." not in key:
            continue
        mine = g.settings.get(key)
        if isinstance(value, int | float) and isinstance(mine, int | float):
            if not math.isclose(float(value), float(mine), rel_tol=1e-6):
                return False
        elif mine != value:
            return False
    return True


def published_tables(
    published: Sequence[dict[str, Any]], groups: Sequence[Group]
) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, rows)`` per published table: its keys, then published | ours for
    each metric it gives."""
    out = []
    for table in published:
        rows_in = table.get("rows") or []
        if not rows_in:
            continue
        keys = list(dict.fromkeys(k for r in rows_in for k in r if "." in k))
        metrics = [m for m in PUBLISHED_METRICS if any(m in r for r in rows_in)]
        labels = short_labels(keys)
        header = (
            (["method"] if any("method" in r for r in rows_in) else [])
            + [labels[k] for k in keys]
            + [f"{m} {w}" for m in metrics for w in ("published", "ours")]
            + ["seeds", "note"]
        )
        rows = []
        for r in rows_in:
            match = [g for g in groups if _matches(g, r)]
            g = match[0] if match else None
            row = ([r.get("method", "")] if "method" in header else []) + [
                "–" if r.get(k) is None else format_value(r[k]) for k in keys
            ]
            for m in metrics:
                pub = r.get(m)
                row.append(_fmt_metric(m, pub))
                if g is None:
                    row.append("not run")
                elif not g.ok_runs and g.diverged:
                    row.append(f"diverged (epoch {g.diverged[0].diverged_epoch})")
                else:
                    mean, std, n = g.stat(m)
                    row.append(_fmt_metric(m, mean, std, n))
            row.append("–" if g is None else f"{len(g.ok_runs)}/{len(g.runs)}")
            row.append(str(r.get("note", "")))
            rows.append(row)
        title = table.get("title") or table.get("source") or "published"
        out.append((title, header, rows))
    return out


def _fmt_metric(metric: str, mean: Any, std: float | None = None, n: int = 1) -> str:
    if mean is None:
        return "–"
    if metric in ("test_acc", "compression"):
        return _pct(float(mean), std, n)
    return _num(float(mean))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = [
        "| " + " | ".join(esc(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------------- the report


@dataclass
class FigureOut:
    name: str
    caption: str
    png: bytes


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def build_figures(groups: Sequence[Group]) -> list[FigureOut]:
    figures: list[FigureOut] = []

    def add(name: str, fig: Any | None, caption: str) -> None:
        if fig is not None:
            figures.append(FigureOut(name, caption, _png(fig)))

    multi = len({g.method for g in groups if g.ok_runs}) > 1
    which = "the best setting of each method" if multi else f"the best {MAX_CURVES} settings"
    add(
        "loss_epoch.png",
        fig_loss(groups, "epoch"),
        f"Training and test loss vs epoch ({which}); band = ±1 std over seeds.",
    )
    add(
        "loss_time.png",
        fig_loss(groups, "time_s"),
        f"Training and test loss vs training wall time ({which}); band = ±1 std over seeds.",
    )
    add(
        "accuracy_params.png",
        fig_accuracy_params(groups),
        "Test accuracy vs inference (params_eval) and trainable (params_train) parameters, "
        "every completed run; dashed: the Pareto front. Diverged runs are not plotted.",
    )
    add(
        "ranks.png",
        fig_ranks(groups),
        "Rank per layer vs epoch for the methods whose ranks change during training.",
    )
    add(
        "spectra.png",
        fig_spectra(groups),
        "Singular values σ_i/σ_1 of each layer of the final checkpoint (best setting, first "
        "seed); low-rank layers show their stored rank r.",
    )
    add(
        "orth_error.png",
        fig_orth(groups),
        "Orthogonality error of the factors U, V per layer vs epoch (0 = orthonormal).",
    )
    for hm in heat_maps(groups):
        add(
            f"heatmap_{hm.method}.png",
            fig_heatmap(hm),
            f"{hm.method}: mean test accuracy over {hm.row_key} × {hm.col_key}; hatched "
            "cells diverged (epoch shown) and are not counted as accuracy.",
        )
    add(
        "ablation.png",
        fig_ablation(ablations(groups)),
        "Ablation: runs identical but for one loss term switched off (weight 0).",
    )
    return figures


def report(paths: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Aggregate the runs under ``paths`` into ``out`` (summary.md, report.html, figures)."""
    import matplotlib

    matplotlib.use("Agg")
    collected = collect(paths)
    runs, published = collected.runs, collected.published
    groups = group_runs(runs)
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures = build_figures(groups)
    for f in figures:
        atomic_write_bytes(out / "figures" / f.name, f.png)

    title = title or "lorank report"
    sections: list[tuple[str, list[str], list[list[str]]]] = [
        ("Runs (mean ± std over seeds)", RUN_COLUMNS, runs_table(groups))
    ]
    for hm in heat_maps(groups):
        header, rows = heatmap_table(hm)
        sections.append(
            (f"{hm.method}: test accuracy (%) over {hm.row_key} × {hm.col_key}", header, rows)
        )
    for ab in ablations(groups):
        rows = []
        for name, g in [("all terms on", ab.full)] + [(f"without {n}", g) for n, g in ab.without]:
            rows.append([name, g.label, _pct(*g.stat("test_acc")), _num(g.stat("train_loss")[0])])
        sections.append(
            (
                f"{ab.method}: ablation of the loss terms",
                ["variant", "setting", "test acc (%)", "final train loss"],
                rows,
            )
        )
    for ptitle, header, rows in published_tables(published, groups):
        sections.append((f"Published vs ours: {ptitle}", header, rows))
    bad = [r for r in runs if not r.ok]
    if bad or collected.failed:
        rows = [
            [
                str(r.path),
                r.method,
                str(r.seed),
                r.status,
                "–" if r.diverged_epoch is None else str(r.diverged_epoch),
                "",
            ]
            for r in bad
        ]
        rows += [
            [f["dir"], "", str(f.get("seed", "")), "failed", "–", str(f.get("error", ""))[:200]]
            for f in collected.failed
        ]
        sections.append(
            (
                "Diverged, failed or unfinished runs",
                ["run", "method", "seed", "status", "diverged at epoch", "error"],
                rows,
            )
        )

    stamp = datetime.now().isoformat(timespec="seconds")
    sources = ", ".join(str(p) for p in paths)
    md = [f"# {title}", "", f"{len(runs)} runs from {sources}; generated {stamp}.", ""]
    for name, header, rows in sections:
        md += [f"## {name}", "", markdown_table(header, rows), ""]
    md += ["## Figures", ""]
    for f in figures:
        md += [f"![{f.caption}](figures/{f.name})", "", f"*{f.caption}*", ""]
    atomic_write_text(out / "summary.md", "\n".join(md))

    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(runs)} runs from {html.escape(sources)}; generated {stamp}.</p>",
    ]
    for name, header, rows in sections:
        body += [f"<h2>{html.escape(name)}</h2>", html_table(header, rows)]
    body.append("<h2>Figures</h2>")
    for f in figures:
        data = base64.b64encode(f.png).decode()
        body.append(
            f'<figure><img alt="{html.escape(f.name)}" src="data:image/png;base64,'
            f'{data}"><figcaption>{html.escape(f.caption)}</figcaption></figure>'
        )
    page = HTML_TEMPLATE.format(title=html.escape(title), body="\n".join(body))
    atomic_write_text(out / "report.html", page)

    atomic_write_json(
        out / "report.json",
        {
            "runs": len(runs),
            "groups": [
                {
                    "method": g.method,
                    "label": g.label,
                    "settings": g.varying,
                    "seeds": [r.seed for r in g.runs],
                    "test_acc": g.stat("test_acc"),
                    "params_eval": g.stat("params_eval")[0],
                    "params_train": g.stat("params_train")[0],
                    "status": _status(g),
                    "runs": [str(r.path) for r in g.runs],
                }
                for g in groups
            ],
            "figures": [f.name for f in figures],
        },
    )
    return out


HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f0f0f0; }} td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 1em 0 2em; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 0.9em; }}
</style></head><body>
{body}
</body></html>
"""
