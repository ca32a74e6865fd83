"""Section 1, layer cost: one training step of a single width×width Linear layer.

For each width and rank, the time of ``method.train_step`` (forward, backward, Adam and any
integrator work) on one layer at batch 256, as a ratio to the dense layer, beside the FLOP
ratio r(m+n)/(mn) of the factorized matmuls (the physical limit of the speed-up).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks.common import VARIANTS, mse, prepare, time_train_step

BATCH = 256


def run(
    widths: list[int], ranks: list[int], steps: int, warmup: int, device: torch.device
) -> list[dict[str, Any]]:
    rows = []
    for width in widths:
        x = torch.randn(BATCH, width, device=device)
        target = torch.randn(BATCH, width, device=device)
        dense_seconds = None
        for rank in [0, *ranks]:
            if rank * 2 > width:
                continue
            for variant in VARIANTS if rank else ("dense",):
                if rank and variant == "dense":
                    continue
                torch.manual_seed(0)
                model = nn.Sequential(nn.Linear(width, width)).to(device)
                method = prepare(model, variant, rank, last_dense=False)
                model.to(device)
                seconds, passes = time_train_step(
                    model, method, (x, target), mse, steps, warmup, device
                )
                if variant == "dense":
                    dense_seconds = seconds
                rows.append(
                    {
                        "width": width,
                        "rank": rank or width,
                        "variant": variant,
                        "ms": 1e3 * seconds,
                        "x_dense": seconds / dense_seconds,
                        "flop_ratio": (2 * rank / width) if rank else 1.0,
                        "passes": passes,
                    }
                )
                print(_format(rows[-1]), flush=True)
    return rows


HEADER = f"{'width':>6} {'rank':>5} {'variant':<18} {'ms/step':>9} {'x dense':>8} {'FLOPs':>7}"


def _format(row: dict[str, Any]) -> str:
    return (
        f"{row['width']:>6} {row['rank']:>5} {row['variant']:<18} {row['ms']:>9.2f} "
        f"{row['x_dense']:>8.3f} {row['flop_ratio']:>7.3f}"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table per width: rows are ranks, columns the variants' ratios to dense."""
    out = []
    for width in sorted({r["width"] for r in rows}):
        sub = [r for r in rows if r["width"] == width]
        dense = next(r for r in sub if r["variant"] == "dense")
        variants = [v for v in VARIANTS if v != "dense"]
        out.append(f"Width {width} (dense step {dense['ms']:.1f} ms); time ÷ dense:\n")
        out.append("| rank | FLOP ratio | " + " | ".join(variants) + " |")
        out.append("|---:|---:|" + "---:|" * len(variants))
        for rank in sorted({r["rank"] for r in sub if r["variant"] != "dense"}):
            cells = {r["variant"]: r["x_dense"] for r in sub if r["rank"] == rank}
            flops = 2 * rank / width
            values = " | ".join(f"{cells[v]:.3f}" if v in cells else "–" for v in variants)
            out.append(f"| {rank} | {flops:.3f} | {values} |")
        out.append("")
    return "\n".join(out)
