"""Section 3, time to accuracy on MNIST with the 784-500×4-10 MLP.

Trains each method from its shipped config (``configs/mnist-mlp-<method>.toml``; evaluation
after every epoch) and reports the training wall time (evaluation excluded) until the test
accuracy first reaches 97% and 98%, the training FLOPs spent by then (``train_flops`` of
that epoch's record, counted by the trainer: see ``lorank.training.flops``), the epoch
time and the forward FLOPs per inference sample. Also times one epoch of the data loader
alone (shuffle + batch indexing of the in-memory tensors, no model).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lorank.data import load_dataset
from lorank.training.config import load_config
from lorank.training.trainer import train

CONFIGS = Path(__file__).resolve().parent.parent / "src" / "lorank" / "configs"
METHODS = (
    "dense",
    "factorized",
    "svd",
    "dlrt",
    "dlrt-kls",
    "oialr",
    "hybrid-lr2dense",
    "hybrid-dense2lr",
)
THRESHOLDS = (0.97, 0.98)


def data_epoch_seconds(
    data_dir: str | None, threads: int | None, device: torch.device | str = "cpu"
) -> float:
    config = load_config(CONFIGS / "mnist-mlp-dense.toml")
    data = load_dataset(config.data, device, data_dir)
    gen = torch.Generator().manual_seed(0)
    for _ in data.train_batches(gen):  # warm-up
        pass
    start = time.perf_counter()
    for x, y in data.train_batches(gen):
        x.sum(), y.sum()  # touch the batch, as a model would
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def matmul_gflops(
    m: int, k: int, n: int, device: torch.device | str = "cpu", repeats: int = 20
) -> float:
    """Measured GFLOP/s of one ``(m×k) @ (k×n)`` float32 product (median of ``repeats``):
    the square 2048³ product is this machine's matmul peak; the MLP's own shapes bound what
    its training can reach."""
    device = torch.device(device)
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return 2 * m * k * n / sorted(times)[len(times) // 2] / 1e9


def run(
    methods: list[str],
    epochs: int | None,
    threads: int | None,
    data_dir: str | None,
    device: torch.device | str = "cpu",
) -> tuple[list[dict[str, Any]], float]:
    device = torch.device(device)
    data_seconds = data_epoch_seconds(data_dir, threads, device)
    print(f"data loading alone: {data_seconds:.3f} s per MNIST epoch (batch 256)", flush=True)
    if threads:
        torch.set_num_threads(threads)
    # The hardware's ceilings, measured now: the square product, and the MLP's largest
    # training products at batch 256 (forward 256×784×500, weight gradient 500×256×500).
    peaks = {
        "square_2048": matmul_gflops(2048, 2048, 2048, device),
        "mlp_forward": matmul_gflops(256, 784, 500, device, repeats=200),
        "mlp_weight_grad": matmul_gflops(500, 256, 500, device, repeats=200),
    }
    print("matmul GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()), flush=True)
    rows = []
    for name in methods:
        overrides = [
            "train.eval_every=1",
            "train.checkpoint_every=0",
            f"train.device={device.type}",
        ]
        if epochs:
            overrides.append(f"train.epochs={epochs}")
        if threads:
            overrides.append(f"train.threads={threads}")
        config = load_config(CONFIGS / f"mnist-mlp-{name}.toml", overrides)
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = train(config, Path(tmp) / "run", data_dir=data_dir, quiet=True)
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        trained = [r for r in records if r["epoch"] > 0]
        row: dict[str, Any] = {
            "method": name,
            "matmul_gflops": peaks,
            "epochs": len(trained),
            "final_acc": trained[-1]["test_acc"],
            "epoch_s": trained[-1]["time_s"] / len(trained),
            "params_eval": trained[-1]["params_eval"],
            "train_flops": trained[-1].get("train_flops"),
            "inference_flops": trained[-1].get("inference_flops"),
        }
        for t in THRESHOLDS:
            hit = next((r for r in trained if r.get("test_acc", 0) >= t), None)
            row[f"to_{round(t * 100)}"] = hit["time_s"] if hit else None
            row[f"epoch_{round(t * 100)}"] = hit["epoch"] if hit else None
            row[f"flops_{round(t * 100)}"] = hit.get("train_flops") if hit else None
        rows.append(row)
        print(_format(row), flush=True)
    return rows, data_seconds


HEADER = (
    f"{'method':<16} {'final acc':>9} {'s/epoch':>8} {'to 97%':>14} {'to 98%':>14} "
    f"{'FLOPs to 97%':>13} {'FLOPs to 98%':>13}"
)


def _seconds(value: float | None, epoch: int | None) -> str:
    return "not reached" if value is None else f"{value:.1f} s (ep {epoch})"


def _flops(value: float | None) -> str:
    if value is None:
        return "not reached"
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


def _format(row: dict[str, Any]) -> str:
    to97, to98 = _seconds(row["to_97"], row["epoch_97"]), _seconds(row["to_98"], row["epoch_98"])
    return (
        f"{row['method']:<16} {100 * row['final_acc']:>8.2f}% {row['epoch_s']:>8.2f} "
        f"{to97:>14} {to98:>14} {_flops(row.get('flops_97')):>13} "
        f"{_flops(row.get('flops_98')):>13}"
    )


def markdown(rows: list[dict[str, Any]], data_seconds: float) -> str:
    dense_epoch = next((r["epoch_s"] for r in rows if r["method"] == "dense"), None)
    out = [
        "| method | epochs | final test acc | s/epoch | to 97% | to 98% | train FLOPs to 97% "
        "| train FLOPs to 98% | eval params | inference FLOPs/sample |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        # Rows saved by an earlier version of this benchmark have no FLOPs: "–".
        flops = [
            _flops(r.get(k)) if k in r else "–" for k in ("flops_97", "flops_98", "inference_flops")
        ]
        out.append(
            f"| {r['method']} | {r['epochs']} | {100 * r['final_acc']:.2f}% | {r['epoch_s']:.2f} "
            f"| {_seconds(r['to_97'], r['epoch_97'])} | {_seconds(r['to_98'], r['epoch_98'])} "
            f"| {flops[0]} | {flops[1]} | {r['params_eval']:,} | {flops[2]} |"
        )
    share = f" = {100 * data_seconds / dense_epoch:.1f}% of a dense epoch" if dense_epoch else ""
    out.append("")
    out.append(f"Data loading alone: {data_seconds:.3f} s per epoch{share}.")
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense and dense.get("matmul_gflops") and dense.get("train_flops"):
        peaks = dense["matmul_gflops"]
        achieved = dense["train_flops"] / dense["epochs"] / dense["epoch_s"] / 1e9
        out.append(
            f"The dense epoch runs at {achieved:.1f} GFLOP/s, "
            f"{100 * achieved / max(peaks.values()):.0f}% of the fastest matmul measured in "
            f"this run (square 2048³: {peaks['square_2048']:.1f} GFLOP/s; the MLP's forward "
            f"product 256×784×500 alone: {peaks['mlp_forward']:.1f}; its weight gradient "
            f"500×256×500: {peaks['mlp_weight_grad']:.1f}). The rest of the gap (not broken "
            "down by this benchmark) is the work that is not matmul (ReLU and its backward, "
            "bias and softmax, the "
            "optimizer's elementwise update of 1.1M weights) and per-operation overhead."
        )
    return "\n".join(out) + "\n"
