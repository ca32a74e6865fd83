"""``lorank profile RUN_OR_CONFIG``: per layer, how long the dense layer and its low-rank form
take on this device at the layer's real input shape, the rank where low rank stops paying,
and the FLOP ratio — the table behind ``objective = "latency"``.

For a run directory the low-rank layers are timed at their trained ranks against the dense
layers they replace; for a config, every Linear/Conv2d of the model is timed against its
low-rank form at ``--rank`` (default: the config's method rank when it has one, else 1/4 of
full rank). Input shapes come from one forward pass of a training batch
(``data.batch_size`` samples, or ``--batch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorank.core.convert import low_rank_layers
from lorank.core.cost import CostModel, Mode, layer_inputs
from lorank.core.rank import resolve_rank
from lorank.data import load_dataset
from lorank.errors import LorankError
from lorank.models import build_model
from lorank.training.config import load_config
from lorank.training.evaluate import locate_checkpoint, run_config_of


@dataclass
class LayerProfile:
    name: str
    shape: tuple[int, int]
    input_shape: tuple[int, ...]
    rank: int
    dense_ms: float
    low_rank_ms: float
    break_even: int | None

    @property
    def flop_ratio(self) -> float:
        m, n = self.shape
        return self.rank * (m + n) / (m * n)

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.low_rank_ms


def _dense_of(module: nn.Module) -> nn.Module:
    return module.to_dense() if hasattr(module, "to_dense") else module


def profile(
    source: str | Path,
    rank: int | float | None = None,
    batch: int | None = None,
    mode: Mode = "forward",
    data_dir: str | Path | None = None,
    costs: CostModel | None = None,
) -> list[LayerProfile]:
    """Time every Linear/Conv2d (or every low-rank layer of a run) dense vs low rank."""
    from lorank.core.io import load

    path = Path(source)
    if path.is_dir():
        stem, run_dir = locate_checkpoint(path)
        config = run_config_of(run_dir, None)
        model = load(stem)
    else:
        config = load_config(path)
        data_info = load_dataset(config.data, device="cpu", data_dir=data_dir).info
        model = build_model(config.model, data_info)
    data = load_dataset(config.data, device="cpu", data_dir=data_dir)
    size = batch or config.data.batch_size
    x, _ = data.train_subset_batches(size, size)[0]
    model.eval()
    inputs = layer_inputs(model, x)
    shapes = {name: inp.shape for name, inp in inputs.items()}
    costs = costs or CostModel()
    trained = low_rank_layers(model)
    default_rank = rank if rank is not None else getattr(config.method, "rank", 0.25)
    rows = []
    for name, module in model.named_modules():
        if name not in shapes:
            continue
        if trained and name not in trained:
            continue  # a run: profile what the method made low-rank
        dense = _dense_of(module)
        m = dense.weight.shape[0]
        n = dense.weight[0].numel()
        if name in trained:
            r = trained[name].rank
        elif isinstance(default_rank, int):
            r = min(default_rank, m, n)  # an int rank applies up to each layer's full rank
        else:
            r = resolve_rank(default_rank, min(m, n))
        rows.append(
            LayerProfile(
                name,
                (m, n),
                shapes[name],
                r,
                1e3 * costs.time(dense, shapes[name], None, mode, **inputs[name].options()),
                1e3 * costs.time(dense, shapes[name], r, mode, **inputs[name].options()),
                costs.break_even_rank(dense, shapes[name], mode, **inputs[name].options()),
            )
        )
    if not rows:
        raise LorankError(f"{source}: the model has no Linear/Conv2d layer to profile")
    return rows


def format_profile(rows: list[LayerProfile], mode: str) -> str:
    header = (
        f"{'layer':<24} {'matrix':>11} {'input':>18} {'rank':>5} {'dense ms':>9} "
        f"{'low-rank ms':>11} {'speed-up':>8} {'break-even':>10} {'FLOP ratio':>10}"
    )
    lines = [f"per-layer {mode} time on {torch.get_num_threads()} thread(s)", header]
    for r in rows:
        lines.append(
            f"{r.name:<24} {f'{r.shape[0]}x{r.shape[1]}':>11} "
            f"{'x'.join(map(str, r.input_shape)):>18} {r.rank:>5} {r.dense_ms:>9.3f} "
            f"{r.low_rank_ms:>11.3f} {r.speedup:>7.2f}x {r.break_even or '-':>10} "
            f"{r.flop_ratio:>10.3f}"
        )
    dense = sum(r.dense_ms for r in rows)
    fastest = sum(min(r.dense_ms, r.low_rank_ms) for r in rows)
    low = sum(r.low_rank_ms for r in rows)
    lines.append(
        f"total: dense {dense:.3f} ms, all low-rank {low:.3f} ms ({dense / low:.2f}x), "
        f"latency-aware {fastest:.3f} ms ({dense / fastest:.2f}x)"
    )
    return "\n".join(lines)


def profile_json(rows: list[LayerProfile]) -> list[dict[str, Any]]:
    return [
        r.__dict__
        | {"speedup": r.speedup, "flop_ratio": r.flop_ratio, "input_shape": list(r.input_shape)}
        for r in rows
    ]
