"""Section 5, inference: latency (batch 1) and throughput (batch 1024) of a low-rank MLP, its
dense counterpart, and the low-rank model after ``lorank.merge`` (back to dense shapes).

Timings do not depend on the weights' values, so the low-rank model is the factorized model
at its trained shapes (ranks given per case) with random factors.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import lorank
from benchmarks.common import median_time
from benchmarks.memory import mlp
from lorank.core.convert import LowRankConfig

CASES = ((500, 32), (4096, 64))  # (width, rank)


@torch.inference_mode()
def run(steps: int, device: torch.device, quick: bool = False) -> list[dict[str, Any]]:
    rows = []
    for width, rank in CASES[:1] if quick else CASES:
        torch.manual_seed(0)
        dense = mlp(width).to(device).eval()
        low = copy.deepcopy(dense)
        lorank.convert(low, LowRankConfig(rank=rank, core="full", keep_last_dense=True))
        merged = lorank.merge(copy.deepcopy(low))
        models: dict[str, nn.Module] = {"dense": dense, "low-rank": low, "merged": merged}
        base: dict[int, float] = {}
        for name, model in models.items():
            row: dict[str, Any] = {"width": width, "rank": rank, "model": name}
            for batch in (1, 1024):
                x = torch.randn(batch, 784, device=device)
                # A dense batch of 1024 at width 4096 takes seconds on a CPU: fewer repeats.
                repeats = steps if batch == 1 else max(3, steps // 10)
                seconds = median_time(lambda m=model, x=x: m(x), repeats, 1, device)
                base.setdefault(batch, seconds)
                row[f"b{batch}_ms"] = 1e3 * seconds
                row[f"b{batch}_x_dense"] = seconds / base[batch]
            row["throughput"] = 1024 / (row["b1024_ms"] / 1e3)
            row["params"] = sum(p.numel() for p in model.parameters())
            rows.append(row)
            print(_format(row), flush=True)
    return rows


HEADER = (
    f"{'width':>6} {'rank':>5} {'model':<9} {'b1 ms':>8} {'x dense':>8} {'b1024 ms':>9} "
    f"{'x dense':>8} {'samples/s':>10}"
)


def _format(row: dict[str, Any]) -> str:
    return (
        f"{row['width']:>6} {row['rank']:>5} {row['model']:<9} {row['b1_ms']:>8.3f} "
        f"{row['b1_x_dense']:>8.3f} {row['b1024_ms']:>9.2f} {row['b1024_x_dense']:>8.3f} "
        f"{row['throughput']:>10.0f}"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| width | rank | model | params | latency b=1 (ms) | × dense | b=1024 (ms) | × dense "
        "| samples/s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['width']} | {r['rank']} | {r['model']} | {r['params']:,} | {r['b1_ms']:.3f} "
            f"| {r['b1_x_dense']:.3f} | {r['b1024_ms']:.2f} | {r['b1024_x_dense']:.3f} "
            f"| {r['throughput']:,.0f} |"
        )
    return "\n".join(out) + "\n"
