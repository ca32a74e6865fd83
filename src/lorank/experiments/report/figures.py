"""The report's figures (matplotlib, Agg backend), each from aggregated :class:`Group` s.

Long because it holds one function per figure of the report; they share colours, axes and
the group helpers.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lorank.errors import LorankError
from lorank.experiments.report.collect import (
    DENSE_FRACTION,
    MAX_CURVES,
    Ablation,
    Group,
    HeatMap,
    RunData,
    ablations,
    best_per_method,
    cell_text,
    curve,
    curve_groups,
    dense_accuracy,
    flops_text,
    heat_maps,
    method_rank,
)
from lorank.experiments.sweep import format_value, short_labels
from lorank.training.rundir import (
    MODEL,
)

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


def _target_line(ax: Any, groups: Sequence[Group]) -> None:
    dense = dense_accuracy(groups)
    if dense is not None:
        ax.axhline(
            100 * DENSE_FRACTION * dense,
            color="grey",
            ls=":",
            lw=1,
            label=f"{100 * DENSE_FRACTION:g}% of dense",
        )


def _flops_x(ax: Any, label: str) -> None:
    """Log x axis of FLOPs with SI labels (60 k, 200 G) instead of 6×10⁴."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    # Within two decades label 1, 2 and 5 of each: a single "100 G" tells nothing.
    subs = (1.0, 2.0, 5.0) if hi / max(lo, 1e-30) < 100 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: flops_text(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)


def fig_accuracy_train_flops(groups: Sequence[Group]) -> Any | None:
    """Test accuracy vs cumulative training FLOPs: a curve per method (its best setting,
    mean over seeds at each evaluated epoch), a point per run without epochs (a post-training
    compression, at its source's training cost)."""
    chosen = curve_groups(groups)
    fig, axes = _figure(1, 1, width=7.0, height=4.6)
    ax = axes[0][0]
    colors = _colors([g for g in groups if g.ok_runs])
    drawn = False
    for g in chosen:
        # From epoch 1: epoch 0 is the untrained model (at the cost of its conversion).
        xs, means, _ = curve(g.ok_runs, "test_acc", "train_flops", first_epoch=1)
        pts = [(x, 100 * m) for x, m in zip(xs, means, strict=True) if x > 0]
        if pts:
            ax.plot(
                *zip(*pts, strict=True),
                marker="o",
                ms=3,
                lw=1.8,
                color=colors[id(g)],
                label=g.label,
            )
            drawn = True
    shown = {id(g) for g in chosen}
    for g in groups:
        if id(g) in shown:
            continue
        for r in g.ok_runs:
            flops, acc = r.final("train_flops"), r.final("test_acc")
            if len(r.records) <= 1 and flops and acc is not None:
                ax.scatter(
                    flops, 100 * acc, color=colors[id(g)], marker="s", s=36, label=g.label, zorder=3
                )
                drawn = True
    if not drawn:
        return None
    _target_line(ax, groups)
    _flops_x(ax, "training FLOPs, cumulative (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy vs training FLOPs")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    return fig


def fig_accuracy_inference_flops(groups: Sequence[Group]) -> Any | None:
    """Final test accuracy vs forward FLOPs per inference sample, every completed run, with
    the Pareto front (fewest FLOPs for the accuracy)."""
    runs = [
        (g, r)
        for g in groups
        for r in g.ok_runs
        if r.final("test_acc") is not None and r.final("inference_flops")
    ]
    if not runs:
        return None
    fig, axes = _figure(1, 1, width=7.0, height=4.6)
    ax = axes[0][0]
    by_method = len({g.method for g, _ in runs}) > 1
    palette = _colors([g for g in groups if g.ok_runs])
    pts = [(float(r.final("inference_flops")), 100 * float(r.final("test_acc"))) for _, r in runs]
    labelled = set()
    for (x, y), (g, _) in zip(pts, runs, strict=True):
        name = g.method if by_method else g.label
        ax.scatter(
            x,
            y,
            color=palette[id(g)],
            s=28,
            alpha=0.8,
            zorder=3,
            label=None if name in labelled else name,
        )
        labelled.add(name)
    front = pareto_front(pts)
    ax.step(
        [pts[i][0] for i in front],
        [pts[i][1] for i in front],
        where="post",
        color="black",
        ls="--",
        lw=1,
        label="Pareto front",
        zorder=2,
    )
    for i in front:
        ax.annotate(
            runs[i][0].label, pts[i], textcoords="offset points", xytext=(5, -11), fontsize=7
        )
    _target_line(ax, groups)
    _flops_x(ax, "inference FLOPs per sample (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy vs inference FLOPs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
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
    """``{layer: singular values}`` of every dense layer lorank converts by default (Linear,
    convolutions, HF Conv1D; not embeddings) and every low-rank layer of the checkpoint."""
    import torch

    from lorank.core.adapters import adapter_for, dense_matrix
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
            try:
                if isinstance(module, LowRankLayer):
                    sigma = module.singular_values()
                elif (adapter := adapter_for(module)) is not None and not adapter.targeted_only:
                    sigma = torch.linalg.svdvals(dense_matrix(module).double())
                else:
                    continue
            except RuntimeError:  # NaN/inf weights (a tampered or diverged model): no SVD
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


def fig_heatmap(hm: HeatMap) -> Any:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    grid = np.full((len(hm.rows), len(hm.cols)), np.nan)
    texts = {}
    for (i, j), g in hm.cells.items():
        mean, text = cell_text(g)
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
    dense = dense_accuracy(groups)
    target = (
        f"; dotted: {100 * DENSE_FRACTION:g}% of the dense accuracy" if dense is not None else ""
    )
    add(
        "accuracy_train_flops.png",
        fig_accuracy_train_flops(groups),
        f"Test accuracy vs cumulative training FLOPs ({which}; squares: post-training "
        f"compressions at their source's training cost){target}. FLOPs counted with "
        "FlopCounterMode (products and convolutions; decompositions estimated).",
    )
    add(
        "accuracy_inference_flops.png",
        fig_accuracy_inference_flops(groups),
        f"Test accuracy vs forward FLOPs per inference sample, every completed run; dashed: "
        f"the Pareto front{target}.",
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
