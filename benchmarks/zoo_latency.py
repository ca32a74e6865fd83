"""Section 6, never slower: latency-aware conversion against dense, for every model in the zoo.

For each model of ``lorank.models`` (all the names its ``ModelConfig`` union accepts, at their
default sizes, on inputs shaped like their shipped datasets' batches; random weights and
inputs, since time does not depend on values) and each case latency-aware conversion accepts:

* ``rank f``: ``lorank.convert(model, LowRankConfig(method="factorized", rank=f,
  objective="latency", latency_mode=mode), example_input=batch)``, for the forward pass
  (``mode="forward"``, timed under ``no_grad``) and the training step (``mode="train"``:
  forward and backward);
* ``budget b`` (forward only): ``compress_model(model, CompressConfig(objective="latency",
  ranks=BudgetRanks(budget=b)))``; a budget that the layers measured faster cannot meet is
  refused by the library and shown as ``refused`` (not a case it accepts).

The converted model and the dense one are timed in the same run, alternately (dense,
converted, converted, dense, ...), and the median ratio converted ÷ dense is reported. When
the conversion left every layer dense the model is the dense one and the ratio is 1 by
construction (shown as ``unchanged``, not measured). The cost model's own measurements (the
per-layer decisions) use the same clock (``--clock``); the whole-model ratio is the check that those
decisions add up.
"""

from __future__ import annotations

import copy
import statistics
import warnings
from collections.abc import Callable
from typing import Any, get_args

import torch
from torch import Tensor, nn

import benchmarks.common as common
from lorank.compress import BudgetRanks, CompressConfig, compress_model
from lorank.core.convert import LowRankConfig, convert
from lorank.core.cost import CostModel, Timer
from lorank.data.datasets import DatasetInfo
from lorank.errors import LorankError
from lorank.models import ModelConfig, build_model, model_config_from_dict

MNIST = DatasetInfo("mnist", "classification", (1, 28, 28), 10, None, 60000, 10000)
CIFAR = DatasetInfo("cifar10", "classification", (3, 32, 32), 10, None, 50000, 10000)
CHARS = DatasetInfo("tinyshakespeare", "language_model", (128,), 65, None, 8000, 800)
FORECAST = DatasetInfo("forecast", "forecast", (168, 2), 0, None, 8000, 800, horizon=24)

# model name -> (data it is shipped with, training batch size of its configs)
CASES: dict[str, tuple[DatasetInfo, int]] = {
    "mlp": (MNIST, 256),
    "lenet5": (MNIST, 128),
    "phil_kim_cnn": (MNIST, 128),
    "resnet20": (CIFAR, 128),
    "vgg": (CIFAR, 128),
    "vit": (MNIST, 128),
    "char_transformer": (CHARS, 32),
    "forecast_transformer": (FORECAST, 64),
    "forecast_linear": (FORECAST, 64),
}
RANKS = (0.5, 0.25, 0.1)
BUDGETS = (0.5,)


def zoo() -> list[str]:
    """Every model name ``lorank.models`` accepts (the ``ModelConfig`` union)."""
    union = get_args(ModelConfig)[0]
    return [cls.model_fields["name"].default for cls in get_args(union)]


def example(info: DatasetInfo, batch: int, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    if info.task == "language_model":
        return torch.randint(0, info.num_classes, (batch, *info.input_shape), generator=gen).to(
            device
        )
    return torch.randn(batch, *info.input_shape, generator=gen).to(device)


def _call(model: nn.Module, x: Tensor, mode: str) -> Callable[[], object]:
    params = [p for p in model.parameters() if p.requires_grad]

    def forward() -> object:
        with torch.no_grad():
            return model(x)

    def train() -> object:
        out = model(x)
        out.float().pow(2).mean().backward()
        for p in params:
            p.grad = None
        return out

    return forward if mode == "forward" else train


def paired_ms(
    a: Callable[[], object], b: Callable[[], object], repeats: int, warmup: int, device: Any
) -> tuple[float, float]:
    """Median ms of ``a`` and of ``b``, timed alternately (ABBA...) so drift hits both."""
    device = torch.device(device)
    for _ in range(warmup):
        a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            fn = (a, b)[j]
            common.sync(device)
            start = common.clock()
            fn()
            common.sync(device)
            times[j].append(common.clock() - start)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


def clock_timer(repeats: int, warmup: int, device: torch.device) -> Timer:
    """The cost model's timer on the suite's clock (``--clock``): median of ``repeats``."""

    def measure(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            common.sync(device)
            start = common.clock()
            fn()
            common.sync(device)
            times.append(common.clock() - start)
        return statistics.median(times)

    return measure


def run(
    device: torch.device,
    quick: bool = False,
    models: list[str] | None = None,
    repeats: int | None = None,
) -> list[dict[str, Any]]:
    names = models or zoo()
    missing = [n for n in names if n not in CASES]
    if missing:
        raise ValueError(f"zoo models without a benchmark case: {', '.join(missing)}")
    ranks = (0.25,) if quick else RANKS
    budgets = BUDGETS
    repeats = repeats or (5 if quick else 15)
    # The cost model's timer: fewer repeats when quick (its decisions are cached per shape).
    timer = clock_timer(5, 1, device) if quick else clock_timer(7, 2, device)
    rows = []
    for name in names:
        info, batch = CASES[name]
        if quick:
            batch = min(batch, 64)
        torch.manual_seed(0)
        dense = build_model(model_config_from_dict({"name": name}), info).to(device)
        x = example(info, batch, device)
        for mode in ("forward", "train"):
            dense.train(mode == "train")
            costs = CostModel(timer=timer, core="none")
            cases: list[tuple[str, Any]] = [("rank", r) for r in ranks]
            if mode == "forward":
                cases += [("budget", b) for b in budgets]
            for kind, value in cases:
                model = copy.deepcopy(dense)
                row: dict[str, Any] = {
                    "model": name,
                    "mode": mode,
                    "case": f"{kind} {value}",
                    "batch": batch,
                }
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "left all layers dense" is an outcome
                    try:
                        converted, total = _convert(model, kind, value, mode, x, costs, timer)
                    except LorankError as e:
                        row |= {"status": "refused", "note": str(e)[:120]}
                        rows.append(row)
                        print(_format(row), flush=True)
                        continue
                row |= {"converted": converted, "layers": total}
                if converted == 0:
                    row |= {"status": "unchanged", "x_dense": 1.0}
                else:
                    model.train(mode == "train")
                    d, c = paired_ms(
                        _call(dense, x, mode), _call(model, x, mode), repeats, 2, device
                    )
                    row |= {"status": "measured", "dense_ms": d, "ms": c, "x_dense": c / d}
                rows.append(row)
                print(_format(row), flush=True)
        del dense
    return rows


def _convert(
    model: nn.Module, kind: str, value: float, mode: str, x: Tensor, costs: CostModel, timer: Any
) -> tuple[int, int]:
    """Convert ``model`` in place latency-aware; (layers made low-rank, candidate layers)."""
    if kind == "rank":
        config = LowRankConfig(
            method="factorized", rank=value, objective="latency", latency_mode=mode
        )
        report = convert(model, config, example_input=x, cost_model=costs)
        return len(report.converted), len(report.layers)
    compress_costs = CostModel(timer=timer, core="diag")
    result = compress_model(
        model,
        CompressConfig(objective="latency", ranks=BudgetRanks(budget=value)),
        [(x,)],
        progress=False,
        cost_model=compress_costs,
    )
    return sum(r.get("form") == "low-rank" for r in result.layers), len(result.layers)


HEADER = (
    f"{'model':<21} {'mode':<8} {'case':<12} {'batch':>5} {'low-rank':>9} {'dense ms':>9} "
    f"{'ms':>9} {'x dense':>8}"
)


def _format(row: dict[str, Any]) -> str:
    if row["status"] == "refused":
        return f"{row['model']:<21} {row['mode']:<8} {row['case']:<12} refused: {row['note']}"
    layers = f"{row['converted']}/{row['layers']}"
    if row["status"] == "unchanged":
        return (
            f"{row['model']:<21} {row['mode']:<8} {row['case']:<12} {row['batch']:>5} "
            f"{layers:>9} {'-':>9} {'-':>9} {'1 (unchanged)':>8}"
        )
    return (
        f"{row['model']:<21} {row['mode']:<8} {row['case']:<12} {row['batch']:>5} {layers:>9} "
        f"{row['dense_ms']:>9.2f} {row['ms']:>9.2f} {row['x_dense']:>8.3f}"
    )


def worst(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    measured = [r for r in rows if r.get("status") == "measured"]
    return max(measured, key=lambda r: r["x_dense"]) if measured else None


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| model | timed | case | batch | layers low-rank | dense ms | latency-aware ms "
        "| × dense |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] == "refused":
            out.append(
                f"| {r['model']} | {r['mode']} | {r['case']} | {r['batch']} | refused | – | – | – |"
            )
            continue
        layers = f"{r['converted']}/{r['layers']}"
        if r["status"] == "unchanged":
            cells = "– | – | 1 (unchanged)"
        else:
            cells = f"{r['dense_ms']:.2f} | {r['ms']:.2f} | {r['x_dense']:.3f}"
        out.append(
            f"| {r['model']} | {r['mode']} | {r['case']} | {r['batch']} | {layers} | {cells} |"
        )
    return "\n".join(out) + "\n"
