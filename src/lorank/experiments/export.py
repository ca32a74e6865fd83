"""``lorank export RUN --for latency|throughput``: a copy of a trained low-rank run in which
each low-rank layer is kept factorized or merged back to dense, whichever measures faster on
this device — at batch 1 (``latency``) or at a large batch (``throughput``).

A factorized layer is faster only below its break-even rank, which depends on the device, the
batch and the layer's input shape (see :mod:`lorank.core.cost`); merging is exact (``W = U S
Vᵀ``), so the exported model computes the same function with the fastest form per layer.
The output is a normal run directory (``lorank eval`` reads it) with ``export.json`` holding
the per-layer table.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from lorank.core.convert import low_rank_layers, replace_module
from lorank.core.cost import CostModel, layer_input_shapes
from lorank.core.io import load, read_metadata, save
from lorank.data import load_dataset
from lorank.errors import LorankError
from lorank.training.evaluate import locate_checkpoint, run_config_of
from lorank.training.rundir import CONFIG, MODEL, Run, check_run_dir

Target = Literal["latency", "throughput"]
BATCH = {"latency": 1, "throughput": 1024}


def export(
    source: str | Path,
    out: str | Path,
    target: Target = "latency",
    overwrite: bool = False,
    data_dir: str | Path | None = None,
    costs: CostModel | None = None,
) -> dict[str, Any]:
    """Write ``out``: the run at ``source`` with every low-rank layer in its faster form."""
    stem, run_dir = locate_checkpoint(source)
    out = Path(out)
    if run_dir is not None and out.resolve() == Path(run_dir).resolve():
        raise LorankError("lorank export writes a new run directory; choose another --out")
    check_run_dir(out, overwrite)
    meta = read_metadata(stem)
    config = run_config_of(run_dir, None)
    model = load(stem).eval()
    layers = low_rank_layers(model)
    if not layers:
        raise LorankError(f"{source} has no low-rank layer: there is nothing to choose")
    data = load_dataset(config.data, device="cpu", data_dir=data_dir)
    batch = BATCH[target]
    x = data.train_subset_batches(batch, batch)[0][0]
    if x.shape[0] < batch:  # a small dataset: repeat samples up to the batch size
        x = x.repeat((batch + x.shape[0] - 1) // x.shape[0], *([1] * (x.dim() - 1)))[:batch]
    shapes = layer_input_shapes(model, x)
    costs = costs or CostModel()
    rows = []
    for name, layer in layers.items():
        dense = layer.to_dense()
        dense_ms = 1e3 * costs.time(dense, shapes[name], None, "forward")
        low_ms = 1e3 * costs.time(dense, shapes[name], layer.rank, "forward")
        keep = costs.faster(low_ms, dense_ms)
        if not keep:
            if layer.bias is not None:
                dense.bias = layer.bias
            replace_module(model, name, dense)
        rows.append(
            {
                "layer": name,
                "rank": layer.rank,
                "input_shape": list(shapes[name]),
                "dense_ms": dense_ms,
                "low_rank_ms": low_ms,
                "form": "low-rank" if keep else "dense",
            }
        )
    summary = {
        "source": str(stem),
        "target": target,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "layers": rows,
        "time_ms_all_low_rank": sum(r["low_rank_ms"] for r in rows),
        "time_ms_exported": sum(min(r["dense_ms"], r["low_rank_ms"]) for r in rows),
        "time_ms_all_dense": sum(r["dense_ms"] for r in rows),
    }
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out)
    run.write_json(CONFIG, config.model_dump(mode="json"))
    run.write_json("export.json", summary)
    save(model, out / MODEL, {k: v for k, v in meta.items() if k not in ("low_rank_layers",)})
    return summary


def format_export(summary: dict[str, Any]) -> str:
    lines = [
        f"export for {summary['target']} (batch {summary['batch']}, "
        f"{summary['threads']} thread(s)):",
        f"{'layer':<24} {'rank':>5} {'dense ms':>9} {'low-rank ms':>11}  form",
    ]
    for r in summary["layers"]:
        lines.append(
            f"{r['layer']:<24} {r['rank']:>5} {r['dense_ms']:>9.3f} {r['low_rank_ms']:>11.3f}  "
            f"{r['form']}"
        )
    lines.append(
        f"layers' time: all dense {summary['time_ms_all_dense']:.3f} ms, all low-rank "
        f"{summary['time_ms_all_low_rank']:.3f} ms, exported {summary['time_ms_exported']:.3f} ms"
    )
    return "\n".join(lines)
