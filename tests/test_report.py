"""Report: aggregation math on hand-made runs, divergence, Pareto front, and every figure
rendered for a tiny synthetic sweep."""

import json
import math
import statistics
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorank.cli import main
from lorank.experiments.report import collect, group_runs
from lorank.experiments.report.collect import curve, heat_maps, mean_std
from lorank.experiments.report.figures import pareto_front
from lorank.experiments.report.render import heatmap_table
from lorank.experiments.sweep import Sweep, load_sweep, run_sweep
from lorank.training.rundir import divergence_epoch

# ---------------------------------------------------------------------- hand-made runs


def write_run(
    path: Path,
    *,
    method="svd",
    lr=1e-3,
    lam=1.0,
    seed=0,
    losses=(1.0, 0.5),
    acc=0.9,
    status="completed",
    params=100,
    epochs=2,
    accs=None,
    flops=None,
):
    path.mkdir(parents=True)
    config = {
        "data": {"name": "synthetic"},
        "model": {"name": "mlp", "hidden": [16]},
        "method": {"name": method, "lambda_orth": lam} if method == "svd" else {"name": method},
        "optim": {"name": "adam", "lr": lr},
        "train": {"epochs": epochs, "seed": seed, "threads": 1},
    }
    (path / "config.json").write_text(json.dumps(config))
    records = [
        {
            "epoch": 0,
            "train_loss": None,
            "test_loss": 1.4,
            "test_acc": 0.25,
            "params_eval": params,
            "params_train": params,
            "params_dense": 200,
            "ranks": {},
            "time_s": 0.0,
        }
    ]
    for epoch, loss in enumerate(losses, start=1):
        records.append(
            {
                "epoch": epoch,
                "train_loss": loss,
                "test_loss": loss + 0.1,
                "test_acc": accs[epoch - 1] if accs else acc,
                "params_eval": params,
                "params_train": params,
                "params_dense": 200,
                "ranks": {},
                "time_s": float(epoch),
            }
        )
    if flops is not None:  # (per training epoch, per inference sample)
        for r in records:
            r["train_flops"], r["inference_flops"] = r["epoch"] * flops[0], flops[1]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "status": status,
        "test_acc": acc,
        "test_loss": losses[-1] + 0.1,
        "train_loss": losses[-1],
        "params_eval": params,
        "params_train": params,
        "params_dense": 200,
        "compression": 1 - params / 200,
        "ranks": {},
        "train_time_s": float(len(losses)),
    }
    if flops is not None:
        summary["train_flops"], summary["inference_flops"] = len(losses) * flops[0], flops[1]
    (path / "summary.json").write_text(json.dumps(summary))


def test_mean_std_is_the_sample_statistics():
    values = [0.91, 0.93, 0.98]
    mean, std, n = mean_std(values)
    assert n == 3
    assert mean == pytest.approx(statistics.mean(values))
    assert std == pytest.approx(statistics.stdev(values))  # n - 1
    assert mean_std([0.5]) == (0.5, 0.0, 1)
    assert mean_std([None, float("nan")]) == (None, None, 0)
    assert mean_std([1.0, float("inf"), 3.0])[:2] == (2.0, pytest.approx(math.sqrt(2)))


def test_groups_aggregate_over_seeds_and_leave_out_diverged_runs(tmp_path):
    accs = [0.90, 0.92, 0.97]
    for seed, acc in enumerate(accs):
        write_run(tmp_path / f"a{seed}", seed=seed, acc=acc, losses=(1.0 + seed, 0.5 * (seed + 1)))
    write_run(tmp_path / "a3", seed=3, acc=0.098, losses=(float("nan"),), status="diverged")
    write_run(tmp_path / "b0", lr=1e-2, seed=0, acc=0.5)
    runs = collect([tmp_path]).runs
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["svd lr=0.01", "svd lr=0.001"]
    g = groups[1]
    assert len(g.runs) == 4 and len(g.ok_runs) == 3
    assert [r.diverged_epoch for r in g.diverged] == [1]
    mean, std, n = g.stat("test_acc")
    assert (mean, std, n) == (
        pytest.approx(statistics.mean(accs)),
        pytest.approx(statistics.stdev(accs)),
        3,
    )
    # Per-epoch curves: mean and std over seeds at each epoch.
    xs, means, stds = curve(g.ok_runs, "train_loss")
    assert xs == [1, 2]
    assert means == pytest.approx([2.0, 1.0])
    assert stds == pytest.approx([statistics.stdev([1, 2, 3]), statistics.stdev([0.5, 1, 1.5])])
    # x = wall time: the mean of time_s at each epoch.
    assert curve(g.ok_runs, "test_loss", "time_s")[0] == [0.0, 1.0, 2.0]  # epoch 0 too


def test_flops_to_reach_99_percent_of_dense_accuracy(tmp_path):
    from lorank.experiments.report.render import flops_text, run_columns, runs_table

    write_run(tmp_path / "d", method="dense", accs=(0.8, 0.9), flops=(3e9, 5e5))
    # Reaches 0.99 · 0.9 = 0.891 only at its second epoch: 2 · 1e9 FLOPs.
    write_run(tmp_path / "l", method="dlrt", accs=(0.85, 0.895), flops=(1e9, 1e5))
    write_run(tmp_path / "f", method="factorized", accs=(0.5, 0.6), flops=(1e9, 1e5))
    write_run(tmp_path / "s", method="svd", accs=(0.5, 0.95))  # logged no FLOPs
    groups = group_runs(collect([tmp_path]).runs)
    columns = run_columns(groups)
    rows = {row[0]: dict(zip(columns, row, strict=True)) for row in runs_table(groups)}
    to_target = "train FLOPs to 99% of dense acc"
    assert rows["dense"][to_target] == "6 G"  # 0.9 ≥ 0.891 at epoch 2
    assert rows["dlrt"][to_target] == "2 G"
    assert rows["factorized"][to_target] == "not reached"
    assert rows["svd"][to_target] == "– (no FLOPs logged)"
    assert rows["dlrt"]["train FLOPs"] == "2 G"
    assert rows["dlrt"]["inference FLOPs/sample"] == "100 k"
    assert "train energy (J)" not in columns  # nothing measured energy
    assert flops_text(4.71e11) == "471 G" and flops_text(None) == "–"
    # A run that measured its energy adds the column; the others show "–".
    summary = json.loads((tmp_path / "l" / "summary.json").read_text())
    summary |= {"energy_j": 1234.5, "energy_source": "RAPL (1 package)"}
    (tmp_path / "l" / "summary.json").write_text(json.dumps(summary))
    groups = group_runs(collect([tmp_path]).runs)
    columns = run_columns(groups)
    rows = {row[0]: dict(zip(columns, row, strict=True)) for row in runs_table(groups)}
    assert rows["dlrt"]["train energy (J)"] == "1,234" and rows["dense"]["train energy (J)"] == "–"


def test_divergence_is_nan_or_an_exploded_loss():
    ok = [
        {"epoch": 0, "train_loss": None},
        {"epoch": 1, "train_loss": 2.2},
        {"epoch": 2, "train_loss": 0.3},
    ]
    assert divergence_epoch(ok, 10) is None
    assert divergence_epoch(ok + [{"epoch": 3, "train_loss": float("nan")}], 10) == 3
    # Far worse than a uniform guess (ln 10 = 2.30): blown up even though finite.
    assert divergence_epoch(ok + [{"epoch": 3, "train_loss": 1e6}], 10) == 3
    assert divergence_epoch([{"epoch": 1, "train_loss": 7.0}], 10) == 1
    assert divergence_epoch([{"epoch": 1, "train_loss": 6.8}], 10) is None


def test_heat_map_marks_diverged_cells_instead_of_accuracy(tmp_path):
    for i, lr in enumerate([1e-1, 1e-3]):
        for j, lam in enumerate([1.0, 0.1]):
            if lr == 1e-1 and lam == 1.0:
                write_run(tmp_path / f"r{i}{j}", lr=lr, lam=lam, acc=0.098, losses=(1e9,))
            else:
                write_run(tmp_path / f"r{i}{j}", lr=lr, lam=lam, acc=0.9 + 0.01 * (i + j))
    groups = group_runs(collect([tmp_path]).runs)
    (hm,) = heat_maps(groups)
    assert hm.col_key == "optim.lr"  # lr as columns, seed 000's layout
    header, rows = heatmap_table(hm)
    assert header[1:] == ["0.1", "0.001"]
    assert rows[0][0] == "1" and rows[0][1] == "div (ep 1)"
    assert "9.8" not in " ".join(" ".join(r) for r in rows)


points = st.lists(
    st.tuples(st.integers(1, 10**6), st.floats(0, 1, allow_nan=False)), min_size=1, max_size=30
)


@given(points)
def test_pareto_front_is_exactly_the_undominated_points(pts):
    pts = [(float(p), a) for p, a in pts]
    front = set(pareto_front(pts))

    def dominates(a, b):
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    for i, p in enumerate(pts):
        dominated = any(dominates(q, p) for q in pts)
        if i in front:
            assert not dominated
        elif not dominated:
            # An exact duplicate of a front point is represented by that point.
            assert any(pts[j] == p for j in front)


# ---------------------------------------------------------------------- a real tiny sweep

SWEEP_TOML = """
[data]
name = "synthetic"
batch_size = 64
synthetic_train = 384
synthetic_test = 128

[model]
name = "mlp"
hidden = [16, 16]

[method]
name = "svd"
rank = 1.0
lambda_sparsity = 0.003
prune_at_end = true

[optim]
name = "adam"
lr = 1e-2

[train]
epochs = 2
threads = 1

[sweep]
grid = { "optim.lr" = [1e-2, 1e30], "method.lambda_orth" = [1.0, 0.0] }
seeds = [0]

[sweep.published]
source = "a made-up table"
rows = [
  { "optim.lr" = 1e-2, "method.lambda_orth" = 1.0, test_acc = 0.5, note = "x" },
  { "optim.lr" = 1e30, "method.lambda_orth" = 1.0, test_acc = 0.098 },
]
"""


@pytest.fixture(scope="module")
def tiny_sweeps(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    toml = root / "svd.toml"
    toml.write_text(SWEEP_TOML)
    run_sweep(load_sweep(toml), root / "svd", workers=1, quiet=True)
    # A rank-adaptive method and a dense baseline in a second sweep folder.
    base = load_sweep(toml).base
    dlrt = Sweep(
        base=base,
        grid={
            "method": [
                {"name": "dense"},
                {"name": "dlrt", "tolerance": 0.3, "init_rank": 0.75, "r_max": 1.0},
            ]
        },
    )
    run_sweep(dlrt, root / "others", workers=1, quiet=True)
    return root


def test_report_renders_every_figure(tiny_sweeps, tmp_path):
    out = tmp_path / "report"
    assert (
        main(["report", str(tiny_sweeps / "svd"), str(tiny_sweeps / "others"), "--out", str(out)])
        == 0
    )
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == sorted(
        [
            "loss_epoch.png",
            "loss_time.png",
            "accuracy_params.png",
            "accuracy_train_flops.png",
            "accuracy_inference_flops.png",
            "ranks.png",
            "spectra.png",
            "orth_error.png",
            "heatmap_svd.png",
            "ablation.png",
        ]
    )
    for name in figures:
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(figures)  # self-contained
    assert 'src="figures' not in page
    md = (out / "summary.md").read_text()
    for text in (
        "## Runs",
        "svd lambda_orth=1 lr=0.01",
        "dense",
        "dlrt",
        "div (ep 1)",
        "ablation",
        "Published vs ours: a made-up table",
        "train FLOPs to 99% of dense acc",
        "inference FLOPs/sample",
    ):
        assert text in md, text
    # The published 9.8% cell is matched by a diverged run, shown as such.
    line = next(row for row in md.splitlines() if row.startswith("| 1e+30 | 1 | 9.80"))
    assert "diverged (epoch 1)" in line
    index = json.loads((out / "report.json").read_text())
    assert {g["method"] for g in index["groups"]} == {"svd", "dense", "dlrt"}


def test_report_refuses_a_folder_without_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no run directories" in capsys.readouterr().err
