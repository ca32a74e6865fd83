"""Experiment (d), seed 000's future-work item 3: Phil Kim's MNIST CNN (MATLAB Deep Learning,
Apress, 2017) trained dense, SVD-trained and pruned, and fitted by Bi-PIL and by PIL (both
variants), on MNIST and Fashion-MNIST with seeds 0, 1, 2; writes one markdown table of test
accuracy, parameters and training time (mean ± sample std over the seeds).

    python experiments/phil_kim_cnn.py --out runs/exp-d --table experiments/phil_kim_cnn.md
    python experiments/phil_kim_cnn.py --out runs/exp-d --report-only   # tabulate what ran

Each run is ``lorank train phil-kim-cnn-<dataset>-<method>`` in its own
directory ``OUT/<dataset>/<method>/seed=<s>``; a run whose ``summary.json`` says
``completed`` is not run again, so an interrupted experiment resumes. The seed sets
``train.seed`` and, for the closed-form methods, ``method.seed`` (their random units), so the
spread over seeds is real for every method but the original PIL, which has no randomness.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
# (directory name, label, config suffix, extra --set values)
METHODS = [
    ("dense", "dense (Adam)", "dense", []),
    ("svd", "SVD-trained (λ_s = 0.02), pruned, fine-tuned", "svd", []),
    (
        "svd-sparse",
        "SVD-trained (λ_s = 0.1), pruned, fine-tuned",
        "svd",
        ["method.lambda_sparsity=0.1"],
    ),
    ("bipil", "Bi-PIL (gradient-free)", "bipil", []),
    ("pil-whitened", "PIL, lorank's whitened variant", "pil", ["method.variant=whitened"]),
    ("pil-original", "PIL, original (Guo & Lyu)", "pil", ["method.variant=original"]),
]
GRADIENT = {"dense", "svd", "svd-sparse"}


def run_one(out: Path, dataset: str, method: tuple, seed: int, args: argparse.Namespace) -> dict:
    key, _, suffix, extra = method
    # The epoch budget is part of a gradient run's name, so a rerun with another never
    # mistakes an old run for its own.
    name = f"{key}-e{args.epochs}" if key in GRADIENT else key
    run_dir = out / dataset / name / f"seed={seed}"
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "completed":
        return json.loads(summary.read_text())
    if args.report_only:
        return {}
    sets = [f"train.seed={seed}", f"train.threads={args.threads}", *extra]
    if key in GRADIENT:
        sets.append(f"train.epochs={args.epochs}")
    else:
        sets.append(f"method.seed={seed}")
    config = ROOT / "src" / "lorank" / "configs" / f"phil-kim-cnn-{dataset}-{suffix}.toml"
    cmd = [sys.executable, "-m", "lorank", "train", str(config), "--out", str(run_dir)]
    cmd += ["--overwrite", "--quiet"] + [a for s in sets for a in ("--set", s)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    print(f"{dataset} {key} seed={seed}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return json.loads(summary.read_text())


def mean_std(values: list[float], fmt: str) -> str:
    if len(values) < 2:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def notes(key: str, runs: list[dict]) -> str:
    first = runs[0]
    if key.startswith("svd"):
        ranks = sorted({", ".join(f"{k} {v}" for k, v in r["ranks"].items()) for r in runs})
        return "ranks after pruning: " + "; ".join(ranks)
    if key == "bipil":
        depth = sorted({r["bipil_depth"] for r in runs})
        return f"depth {depth}, 50 + 50 twin units; conv rank {first.get('bipil_conv_rank')}"
    if key == "pil-whitened":
        kept = sorted({r["pil_kept_ranks"][0] for r in runs})
        return f"hidden layer keeps {kept} principal directions; conv rank {first['pil_conv_rank']}"
    if key == "pil-original":
        errs = "; ".join(f"{e:.3g}" for e in first["pil_errors"])
        return f"hidden {first['pil_hidden']}, ‖HH⁺ − I‖_F per depth: {errs}"
    return ""


def table(results: dict) -> str:
    lines = [
        "| dataset | method | test accuracy (%) | parameters | train time (s) | notes |",
        "|---|---|---|---|---|---|",
    ]
    for dataset, label in DATASETS.items():
        for key, name, _, _ in METHODS:
            runs = results.get((dataset, key))
            if not runs:
                continue
            acc = mean_std([100 * r["test_acc"] for r in runs], ".2f")
            params = sorted({r["params_eval"] for r in runs})
            p = f"{params[0]:,}" if len(params) == 1 else f"{min(params):,}–{max(params):,}"
            if key.startswith("svd"):
                p += f" (of {runs[0]['params_dense']:,})"
            t = mean_std([r["train_time_s"] for r in runs], ".1f")
            note = f"n = {len(runs)}; {notes(key, runs)}"
            lines.append(f"| {label} | {name} | {acc} | {p} | {t} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/exp-d"))
    parser.add_argument("--table", type=Path, default=None, help="write the markdown here")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of dense and svd")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--report-only", action="store_true", help="tabulate the completed runs, run nothing"
    )
    args = parser.parse_args()

    results: dict = {}
    # Seed-major order: an interrupted experiment still has every method at the first seeds.
    for seed in args.seeds:
        for dataset in args.datasets:
            for method in METHODS:
                if method[0] in args.methods:
                    summary = run_one(args.out, dataset, method, seed, args)
                    if summary:
                        results.setdefault((dataset, method[0]), []).append(summary)
    text = table(results)
    print(text)
    if args.table:
        command = " ".join(["python", "experiments/phil_kim_cnn.py", *sys.argv[1:]])
        args.table.write_text(
            f"<!-- generated by: {command} -->\n"
            f"Seeds {', '.join(map(str, args.seeds))} (n per row below); mean ± sample std; "
            f"dense and svd {args.epochs} epochs; {args.threads} torch thread(s).\n\n"
            f"{text}\n"
        )


if __name__ == "__main__":
    main()
