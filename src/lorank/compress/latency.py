r"""``objective = "latency"`` for compression: ranks from measured speed, not only from size.

The same :class:`~lorank.core.cost.CostModel` as ``LowRankConfig(objective="latency")`` times
every dense Linear/Conv2d the compression would factorize, at the input shape one calibration
(or loss) batch gives it, dense and at the candidate ranks (forward, or forward+backward with
``latency_mode = "train"``), cached per device/dtype/shape:

* **Rule ranks** (``RuleRanks``): each layer gets its rule's rank, rounded up to a multiple of
  8/16/64 only when that measures faster (:meth:`CostModel.fastest_rank_near`, never above
  the largest rank that saves parameters), and stays dense when its low-rank form does not
  measure faster than the dense layer at that rank.
* **A budget** (``BudgetRanks``, and the budgets ``ToleranceRanks`` tries): the budget is
  still a fraction of the compressed layers' weights, but each layer may only be factorized at
  ranks up to its measured break-even rank (:meth:`CostModel.break_even_rank`; a layer with
  none stays dense and keeps its full weight in the total). The allocation (uniform, greedy or
  measured, unchanged) therefore spends the budget's cuts on the layers where low rank buys
  time, and cuts those deeper when others must stay dense; a budget that the faster layers
  alone cannot meet is refused with the allocation's usual error. The chosen ranks are then
  checked: a layer whose chosen rank does not measure faster (timings need not be monotone
  in the rank) gets its cap lowered below that rank and the allocation runs again. Finally
  ranks are rounded up to faster sizes where the measurement says so and the budget still
  holds, the largest time saving first.

Existing low-rank layers are truncated as with ``objective = "params"`` (fewer columns never
cost time); dense layers of a kind the cost model cannot time (Hugging Face ``Conv1D``) stay
dense, since nothing says low rank would be faster there. Their rows say so. The report gives,
per layer, the measured dense and low-rank ms, and for the whole model the predicted speed-up
(sum of the per-layer times) and the measured one (the model's forward, or forward+backward,
timed before and after compression on the same batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lorank.compress.allocation import weight_params
from lorank.core.cost import CostModel, Mode, layer_inputs
from lorank.core.layers import LowRankLayer
from lorank.core.search import LayerSpectrum
from lorank.errors import LorankError

__all__ = ["LatencyPlanner", "MAX_REALLOCATIONS"]

#: how often a budget allocation is redone after a chosen rank measured slower than dense
MAX_REALLOCATIONS = 20


class LatencyPlanner:
    """Per-layer dense and low-rank times at the layers' real input shapes (module doc)."""

    def __init__(
        self,
        model: nn.Module,
        spectra: Sequence[LayerSpectrum],
        example: Any,
        forward: Callable[[nn.Module, Any], Any],
        mode: Mode = "forward",
        costs: CostModel | None = None,
    ) -> None:
        self.mode: Mode = mode
        self.costs = costs or CostModel(core="diag")
        self.example, self.forward = example, forward
        self.inputs = layer_inputs(model, example, forward)
        self.shapes = {name: inp.shape for name, inp in self.inputs.items()}
        self.timed = {
            s.name: s
            for s in spectra
            if s.name in self.shapes
            and isinstance(s.module, nn.Linear | nn.Conv2d)
            and not isinstance(s.module, LowRankLayer)
        }
        #: dense layers the cost model cannot time: kept dense
        self.untimed = {
            s.name: type(s.module).__name__
            for s in spectra
            if s.name not in self.timed and not isinstance(s.module, LowRankLayer)
        }
        self.caps: dict[str, int] = {}

    # ------------------------------------------------------------------ measurements
    def ms(self, name: str, rank: int | None) -> float:
        """Milliseconds of layer ``name`` dense (``rank=None``) or at ``rank``."""
        spec = self.timed[name]
        how = self.inputs[name].options()
        return 1e3 * self.costs.time(spec.module, self.shapes[name], rank, self.mode, **how)

    def faster(self, name: str, rank: int) -> bool:
        return self.costs.faster(self.ms(name, rank), self.ms(name, None))

    def factorized(self, spec: LayerSpectrum, rank: int) -> bool:
        """Whether ``rank`` turns ``spec``'s dense layer into a low-rank one."""
        return spec.name in self.timed and rank <= spec.max_rank and rank < spec.full_rank

    def break_even(self, name: str) -> int | None:
        spec = self.timed[name]
        how = self.inputs[name].options()
        return self.costs.break_even_rank(spec.module, self.shapes[name], self.mode, **how)

    # ------------------------------------------------------------------ rank choice
    def capped(self, spectra: Sequence[LayerSpectrum]) -> list[LayerSpectrum]:
        """``spectra`` with each timed layer's ``max_rank`` lowered to its cap (initially
        its break-even rank; 0 keeps the layer dense), for the budget allocations."""
        for name in self.timed:
            if name not in self.caps:
                self.caps[name] = self.break_even(name) or 0
        self.caps |= dict.fromkeys(self.untimed, 0)
        return [
            dataclasses.replace(s, max_rank=min(s.max_rank, self.caps[s.name]))
            if s.name in self.caps
            else s
            for s in spectra
        ]

    def allocate(
        self,
        spectra: Sequence[LayerSpectrum],
        choose: Callable[[list[LayerSpectrum]], dict[str, int]],
    ) -> dict[str, int]:
        """``choose(capped spectra)``, redone with lower caps while a chosen rank measures
        slower than dense; a layer still slower after :data:`MAX_REALLOCATIONS` rounds is
        kept dense by :meth:`settle`."""
        try:
            ranks = choose(self.capped(spectra))
        except LorankError as e:
            faster = sum(1 for n in self.timed if self.caps[n])
            untimed = f", {len(self.untimed)} untimed kept dense" if self.untimed else ""
            raise LorankError(
                f"{e} (objective latency factorizes only layers measured faster: "
                f"{faster} of the {len(self.timed)} timed layers have a faster rank here"
                f"{untimed})"
            ) from None
        for _ in range(MAX_REALLOCATIONS):
            slow = [
                s.name
                for s in spectra
                if self.factorized(s, ranks[s.name]) and not self.faster(s.name, ranks[s.name])
            ]
            if not slow:
                break
            for name in slow:
                self.caps[name] = min(self.caps[name], ranks[name] - 1)
            ranks = choose(self.capped(spectra))
        return ranks

    def settle(
        self,
        spectra: Sequence[LayerSpectrum],
        ranks: dict[str, int],
        budget: float | None,
    ) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
        """The final ranks: rounded up to faster sizes where measured faster (within the
        budget's weights when there is one, largest saving first), dense where the low-rank
        form is not faster; and the per-layer timing rows."""
        ranks = dict(ranks)
        target = None
        if budget is not None:
            target = budget * sum(weight_params(s, s.full_rank) for s in spectra)
        total = sum(weight_params(s, ranks.get(s.name, s.full_rank)) for s in spectra)
        proposals = []
        for spec in spectra:
            k = ranks.get(spec.name, spec.full_rank)
            if not self.factorized(spec, k):
                continue
            how = self.inputs[spec.name].options()
            best = self.costs.fastest_rank_near(
                spec.module, self.shapes[spec.name], k, self.mode, **how
            )
            if best != k and best <= spec.max_rank:
                proposals.append((self.ms(spec.name, k) - self.ms(spec.name, best), spec, best))
        for _, spec, best in sorted(proposals, key=lambda p: -p[0]):
            k = ranks[spec.name]
            extra = weight_params(spec, best) - weight_params(spec, k)
            if target is None or total + extra <= target + 1e-9:
                ranks[spec.name], total = best, total + extra
        rows: dict[str, dict[str, Any]] = {}
        for spec in spectra:
            name, k = spec.name, ranks.get(spec.name, spec.full_rank)
            if name in self.untimed:
                ranks[name] = spec.full_rank
                rows[name] = {
                    "form": "dense",
                    "latency": f"a {self.untimed[name]} is not timed here: kept dense",
                }
                continue
            if name not in self.timed:
                rows[name] = {"latency": "already low-rank: truncated as for objective params"}
                continue
            dense = self.ms(name, None)
            row: dict[str, Any] = {"dense_ms": dense, "form": "dense"}
            if name in self.caps:
                row["break_even_rank"] = self.caps[name] or None
            if self.factorized(spec, k):
                low = self.ms(name, k)
                row |= {"low_rank_ms": low, "form": "low-rank"}
                if low >= dense:
                    row["latency"] = (
                        f"rank {k} is not faster here ({low:.3g} ms vs dense {dense:.3g} ms): "
                        "kept dense"
                    )
                    ranks[name] = spec.full_rank
                    row |= {"low_rank_ms": dense, "form": "dense"}
            else:
                row["low_rank_ms"] = dense  # stays dense
                if name in self.caps and not self.caps[name]:
                    row["latency"] = "no rank measured faster than dense: kept dense"
            rows[name] = row
        return ranks, rows

    # ------------------------------------------------------------------ the whole model
    def model_ms(self, model: nn.Module) -> float:
        """Milliseconds of the model's forward (``mode="train"``: forward and backward of the
        output's sum) on the example batch, by the cost model's timer."""
        from lorank.compress.outputs import output_tensor

        params = [p for p in model.parameters() if p.requires_grad]

        def run() -> object:
            if self.mode == "forward":
                with torch.no_grad():
                    return self.forward(model, self.example)
            out = output_tensor(self.forward(model, self.example))
            if out.requires_grad:  # a frozen model has no backward to time
                out.float().sum().backward()
            for p in params:
                p.grad = None
            return out

        return 1e3 * self.costs.timer(run)


def summary(
    rows: dict[str, dict[str, Any]],
    mode: str,
    model_dense_ms: float | None,
    model_ms: float | None,
) -> dict[str, Any]:
    """Predicted (per-layer sums) and measured (whole model) speed-ups."""
    timed = [r for r in rows.values() if "dense_ms" in r]
    dense = sum(r["dense_ms"] for r in timed)
    after = sum(r["low_rank_ms"] for r in timed)
    out: dict[str, Any] = {
        "mode": mode,
        "layers_dense_ms": dense,
        "layers_ms": after,
        "predicted_speedup": dense / after if after > 0 else None,
        "layers_kept_dense": [n for n, r in rows.items() if r.get("form") == "dense"],
    }
    if model_dense_ms is not None and model_ms is not None:
        out |= {
            "model_dense_ms": model_dense_ms,
            "model_ms": model_ms,
            "measured_speedup": model_dense_ms / model_ms if model_ms > 0 else None,
        }
    return out
