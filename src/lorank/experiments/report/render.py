"""The report's tables (markdown and HTML) and :func:`report`, which writes ``OUT/``.

Long because it renders every table of the report in markdown and HTML.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from lorank.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lorank.experiments.report.collect import (
    DENSE_FRACTION,
    Group,
    HeatMap,
    ablations,
    cell_text,
    collect,
    dense_accuracy,
    flops_text,
    group_flops_to_reach,
    group_runs,
    heat_maps,
)
from lorank.experiments.report.figures import build_figures
from lorank.experiments.sweep import format_value, short_labels
from lorank.training.rundir import ensure_dir

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
    "train FLOPs",
    "inference FLOPs/sample",
    f"train FLOPs to {100 * DENSE_FRACTION:g}% of dense acc",
    "status",
]
ENERGY_COLUMN = "train energy (J)"


def _to_target(g: Group, dense: float | None) -> str:
    if dense is None:
        return "– (no dense run)"
    if not g.ok_runs:
        return "–"
    mean, reached = group_flops_to_reach(g, DENSE_FRACTION * dense)
    if reached == 0:
        final = [r.final("train_flops") for r in g.ok_runs]
        return "– (no FLOPs logged)" if all(f is None for f in final) else "not reached"
    text = flops_text(mean)
    return text if reached == len(g.ok_runs) else f"{text} ({reached}/{len(g.ok_runs)} seeds)"


# Regression (forecasting) columns: (summary key, header); shown when some run has them.
REGRESSION_COLUMNS = (
    ("test_mse", "test MSE"),
    ("test_mae", "test MAE"),
    ("test_mse_orig", "test MSE (units²)"),
    ("test_mae_orig", "test MAE (units)"),
)


def _has(groups: Sequence[Group], key: str) -> bool:
    return any(r.final(key) is not None for g in groups for r in g.runs)


def run_columns(groups: Sequence[Group]) -> list[str]:
    """:data:`RUN_COLUMNS`, without accuracy when no run has one (a regression task), with
    the regression errors (mean ± std) when some run has them, and the energy column only
    when some run measured it."""
    columns = list(RUN_COLUMNS)
    if any(g.stat("energy_j")[0] is not None for g in groups):
        columns.insert(columns.index("status"), ENERGY_COLUMN)
    if groups and not _has(groups, "test_acc"):
        columns.remove("test acc (%)")
    at = columns.index("test loss") + 1
    extra = [header for key, header in REGRESSION_COLUMNS if _has(groups, key)]
    return columns[:at] + extra + columns[at:]


def _mean_std(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "–"
    return _num(mean) + (f" ± {_num(std)}" if n > 1 and std is not None else "")


def runs_table(groups: Sequence[Group]) -> list[list[str]]:
    """Rows under :func:`run_columns` ``(groups)``."""
    with_acc = not groups or _has(groups, "test_acc")
    regression = [key for key, _ in REGRESSION_COLUMNS if _has(groups, key)]
    rows = []
    dense = dense_accuracy(groups)
    energy = ENERGY_COLUMN in run_columns(groups)
    for g in groups:
        acc = g.stat("test_acc")
        loss = g.stat("test_loss")
        comp = g.stat("compression")
        rows.append(
            [g.label, f"{len(g.ok_runs)}/{len(g.runs)}"]
            + ([_pct(*acc)] if with_acc else [])
            + [_num(loss[0])]
            + [_mean_std(*g.stat(key)) for key in regression]
            + [
                _num(g.stat("params_eval")[0]),
                _num(g.stat("params_train")[0]),
                _num(g.stat("params_dense")[0]),
                "–" if comp[0] is None else f"{100 * comp[0]:.1f}",
                _ranks_text(g),
                _num(g.stat("train_time_s")[0], 3),
                flops_text(g.stat("train_flops")[0]),
                flops_text(g.stat("inference_flops")[0]),
                _to_target(g, dense),
                *([_num(g.stat("energy_j")[0], 4)] if energy else []),
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
            mean, text = cell_text(g)
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


def report(paths: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Aggregate the runs under ``paths`` into ``out`` (summary.md, report.html, figures)."""
    import matplotlib

    matplotlib.use("Agg")
    collected = collect(paths)
    runs, published = collected.runs, collected.published
    groups = group_runs(runs)
    out = ensure_dir(Path(out), "report directory")
    ensure_dir(out / "figures", "report directory")
    figures = build_figures(groups)
    for f in figures:
        atomic_write_bytes(out / "figures" / f.name, f.png)

    title = title or "lorank report"
    sections: list[tuple[str, list[str], list[list[str]]]] = [
        ("Runs (mean ± std over seeds)", run_columns(groups), runs_table(groups))
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

    dense = dense_accuracy(groups)
    target = None if dense is None else DENSE_FRACTION * dense
    atomic_write_json(
        out / "report.json",
        {
            "runs": len(runs),
            "flops_target_acc": target,  # DENSE_FRACTION of the best dense accuracy
            "groups": [
                {
                    "method": g.method,
                    "label": g.label,
                    "settings": g.varying,
                    "seeds": [r.seed for r in g.runs],
                    "test_acc": g.stat("test_acc"),
                    **{key: g.stat(key) for key, _ in REGRESSION_COLUMNS if _has(groups, key)},
                    "params_eval": g.stat("params_eval")[0],
                    "params_train": g.stat("params_train")[0],
                    "train_flops": g.stat("train_flops")[0],
                    "inference_flops": g.stat("inference_flops")[0],
                    "train_flops_to_target": (
                        None if target is None else group_flops_to_reach(g, target)[0]
                    ),
                    "energy_j": g.stat("energy_j")[0],
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
