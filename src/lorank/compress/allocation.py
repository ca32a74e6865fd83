r"""Rank allocation across layers under a global parameter budget.

Given each layer's (plain or activation-weighted) spectrum :math:`\sigma^l` and a budget
:math:`b \in (0, 1]`, choose ranks :math:`k_l` so that the weights of the compressed layers
take at most :math:`b` times their current count (biases, which truncation never touches, are
not counted). A layer's weight count at rank k is ``k(m+n)`` (plus ``k²`` for a full core),
or ``mn`` while it stays dense; a dense layer is only factorized at ranks that save parameters
(``k ≤ max_rank``). Ranks never increase.

* ``uniform``: every layer keeps the same fraction f = b of its own weights,
  :math:`k_l = \max\{k : \text{params}_l(k) \le f\,\text{params}_l\}` (at least 1; a layer
  that no rank would make smaller stays as it is), and the total is then within budget. When
  such fixed layers or the rounding up to rank 1 push the total over, f is lowered (bisection)
  to the largest common fraction whose total fits.
* ``greedy``: start from the current ranks and repeatedly remove the rank-1 component with the
  smallest estimated increase in output error per parameter saved, across all layers, until
  the total fits the budget. Removing component i of layer l raises that layer's squared output
  error by :math:`\sigma_i^2` (Eckart–Young; with activation-weighted σ this is the error on the
  calibration inputs, :math:`\|(W-W_r)X^\top\|_F^2/N`). Layers are made comparable by
  measuring it relative to the layer's output energy :math:`\sum_i \sigma_i^2`.

  A dense layer has no rank-1 step that saves parameters until it is factorized, and
  factorizing at ``max_rank`` saves almost nothing (r(m+n) ≈ mn there), so pricing its first
  move as the jump to ``max_rank`` would make every dense layer look prohibitively expensive
  and the greedy would strip whichever layer it happened to factorize first. Its first move is
  priced instead with a look-ahead: the jump to the rank k ≤ ``max_rank`` with the smallest
  error per parameter saved, :math:`\min_k \sum_{i>k}\sigma_i^2 / (mn - k(m+n))`, and made to
  that k. Such a jump can overshoot the budget, so the removal loop (which stops at the first
  allocation within budget) is followed by a refill: components are added back, most error
  removed per parameter first, to factorized layers below their starting rank, while the total
  stays within budget; then an exchange: while the best component to add back (error per
  parameter) removes more error than the cheapest other component whose removal pays for it
  adds, the two are swapped; then a last refill.

* ``measured``: the greedy above, with each layer's relative error weighted by the measured
  end-to-end effect of truncating that layer. For every layer l, only l is truncated (in
  place, then restored) to a probe rank :math:`k_l` (the rank greedy gives it, or the uniform
  rank when greedy keeps it whole), and the distance :math:`D_l` of the model's outputs from
  the original's is measured on a calibration subset (:mod:`lorank.compress.outputs`: KL of
  logits, or 1 − cosine of hidden states). Its sensitivity is
  :math:`s_l = D_l / e_l(k_l)`, with :math:`e_l(k) = \sum_{i>k}\sigma_i^2 / \sum_i \sigma_i^2` the
  layer's own relative error, and greedy then removes the component with the smallest
  :math:`s_l\,\sigma_i^2 / \sum_j \sigma_j^2` per parameter saved: a first-order model
  of the output distance as a sum of per-layer terms, each linear in the layer's own error.
  A layer whose truncation does not change the outputs measurably gets the smallest positive
  sensitivity measured.

**Budget from a loss tolerance.** :func:`budget_search` (``--loss-tolerance ε``) finds the
global budget instead of taking it: a bisection on b ∈ (0, 1] for the smallest budget whose
allocation (uniform or greedy, as above) changes the loss on a fixed calibration subset by
less than ε. b = 1 keeps every rank (change 0), so the bracket starts feasible; a budget that
cannot be met even at rank 1 counts as infeasible. As in seed 003's δ-search
(:func:`lorank.core.search.loss_bounded_search`, ``--rule loss-tolerance=ε``, which applies one
relative cutoff δ to every layer), feasibility is assumed monotone, every returned allocation
was measured to satisfy the bound, and trial truncations are made in place and undone.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from lorank.core.layers import LowRankLayer
from lorank.core.search import (
    LayerSpectrum,
    LossFn,
    SearchResult,
    TruncationLosses,
    bisect,
    check_search_options,
    truncated,
)
from lorank.errors import LorankError

Allocation = Literal["uniform", "greedy"]
ALLOCATIONS: tuple[str, ...] = ("uniform", "greedy")

__all__ = [
    "ALLOCATIONS",
    "allocate",
    "budget_search",
    "measured_allocation",
    "sensitivities",
    "weight_params",
]


def weight_params(spec: LayerSpectrum, rank: int) -> int:
    """Weights ``spec``'s layer holds at ``rank`` (a dense layer past max_rank stays dense)."""
    module = spec.module
    m, n = int(spec.u.shape[0]), int(spec.v.shape[0])
    if isinstance(module, LowRankLayer):
        per_rank = m if module.V is module.U else m + n
        return rank * per_rank + (rank * rank if module.core == "full" else 0)
    return m * n if rank > spec.max_rank else rank * (m + n)


def _current_rank(spec: LayerSpectrum) -> int:
    return spec.full_rank


def allocate(
    spectra: Sequence[LayerSpectrum],
    budget: float,
    method: Allocation = "greedy",
    weights: dict[str, float] | None = None,
) -> dict[str, int]:
    """``{layer: rank}`` keeping at most ``budget`` of the layers' weights (see module doc).

    ``weights`` (greedy only) multiply each layer's relative error: the sensitivities of the
    ``measured`` allocation.
    """
    if not 0 < budget <= 1:
        raise LorankError(f"`ranks.budget` {budget} must be in (0, 1], e.g. 0.5")
    if method not in ALLOCATIONS:
        raise LorankError(f"`ranks.allocation` {method!r}: choose one of {', '.join(ALLOCATIONS)}")
    before = {s.name: weight_params(s, _current_rank(s)) for s in spectra}
    target = budget * sum(before.values())
    if method == "uniform":
        ranks = _uniform(spectra, budget, before, target)
    else:
        ranks = _greedy(spectra, target, weights)
    total = sum(weight_params(s, ranks[s.name]) for s in spectra)
    if total > target + 1e-9:
        raise LorankError(
            f"`ranks.budget` {budget} cannot be met even at rank 1 in every layer "
            f"({total} > {target:.0f} weights); choose a larger budget"
        )
    return ranks


def _uniform(
    spectra: Sequence[LayerSpectrum], budget: float, before: dict[str, int], target: float
) -> dict[str, int]:
    def ranks_at(fraction: float) -> dict[str, int]:
        ranks = {}
        for spec in spectra:
            k = _current_rank(spec)
            while k > 1 and weight_params(spec, k) > fraction * before[spec.name]:
                k -= 1
            if weight_params(spec, k) >= before[spec.name]:  # no rank saves anything here
                k = _current_rank(spec)
            ranks[spec.name] = k
        return ranks

    def total(ranks: dict[str, int]) -> int:
        return sum(weight_params(s, ranks[s.name]) for s in spectra)

    ranks = ranks_at(budget)
    if total(ranks) <= target:
        return ranks
    lo, hi, best = 0.0, budget, ranks_at(0.0)  # fraction 0: rank 1 wherever that saves
    if total(best) > target:
        return best  # allocate reports that the budget cannot be met
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        candidate = ranks_at(mid)
        if total(candidate) <= target:
            lo, best = mid, candidate
        else:
            hi = mid
    return best


def _greedy(
    spectra: Sequence[LayerSpectrum], target: float, weights: dict[str, float] | None = None
) -> dict[str, int]:
    energy = [s.sigma.double().pow(2) for s in spectra]
    # tail[l][k] = sum of sigma_i^2 for i >= k (0-based): the error of layer l at rank k.
    tails = [torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)]) for e in energy]
    totals = [max(float(t[0]), 1e-300) for t in tails]
    if weights is not None:  # errors relative to the layer's energy, times its sensitivity
        scale = [max(weights.get(s.name, 1.0), 1e-300) for s in spectra]
        totals = [t / w for t, w in zip(totals, scale, strict=True)]
    tail_lists = [t.tolist() for t in tails]  # scalar reads in the loops below
    start = [_current_rank(s) for s in spectra]
    ranks = list(start)
    total = sum(weight_params(s, k) for s, k in zip(spectra, ranks, strict=True))

    def dense(i: int) -> bool:
        return not isinstance(spectra[i].module, LowRankLayer) and ranks[i] > spectra[i].max_rank

    def next_move(i: int) -> tuple[float, int, int] | None:
        spec, k = spectra[i], ranks[i]
        if dense(i):  # look-ahead: the best jump to a factorized rank (see module doc)
            if spec.max_rank < 1:
                return None
            m, n = int(spec.u.shape[0]), int(spec.v.shape[0])
            ks = torch.arange(1, spec.max_rank + 1)
            saved = (m * n - ks * (m + n)).double()
            ratio = (tails[i][ks] - tails[i][k]) / totals[i] / saved
            best = int(torch.argmin(ratio))
            return float(ratio[best]), i, int(ks[best])
        if k <= 1:
            return None
        saved = weight_params(spec, k) - weight_params(spec, k - 1)
        if saved <= 0:
            return None
        return (tail_lists[i][k - 1] - tail_lists[i][k]) / totals[i] / saved, i, k - 1

    heap = [m for i in range(len(spectra)) if (m := next_move(i)) is not None]
    heapq.heapify(heap)
    while total > target and heap:
        _, i, new_k = heapq.heappop(heap)
        if new_k >= ranks[i]:  # stale entry
            continue
        total -= weight_params(spectra[i], ranks[i]) - weight_params(spectra[i], new_k)
        ranks[i] = new_k
        if (move := next_move(i)) is not None:
            heapq.heappush(heap, move)

    def limit(i: int) -> int:
        return start[i] if isinstance(spectra[i].module, LowRankLayer) else spectra[i].max_rank

    def add(i: int) -> tuple[float, int] | None:
        """(error removed, parameters it costs) by adding layer i's next component back."""
        k = ranks[i]
        if dense(i) or k >= limit(i):
            return None
        cost = weight_params(spectra[i], k + 1) - weight_params(spectra[i], k)
        return (tail_lists[i][k] - tail_lists[i][k + 1]) / totals[i], max(cost, 1)

    def remove(i: int) -> tuple[float, int] | None:
        """(error added, parameters saved) by dropping layer i's last kept component."""
        k = ranks[i]
        if dense(i) or k <= 1:
            return None
        saved = weight_params(spectra[i], k) - weight_params(spectra[i], k - 1)
        return (tail_lists[i][k - 1] - tail_lists[i][k]) / totals[i], saved

    def refill() -> None:
        nonlocal total
        heap = []
        for i in range(len(spectra)):
            if (a := add(i)) is not None:
                heap.append((-a[0] / a[1], i))
        heapq.heapify(heap)
        while heap:
            _, i = heapq.heappop(heap)
            a = add(i)
            if a is None or total + a[1] > target:
                continue  # costs never shrink as rank grows: this layer is done
            total += a[1]
            ranks[i] += 1
            if (a := add(i)) is not None:
                heapq.heappush(heap, (-a[0] / a[1], i))

    refill()
    # Exchange: a jump (or the order of the removals) can leave one layer cut deeper than
    # another for the same price; move components while that lowers the estimated error.
    for _ in range(sum(start)):
        adds = [(a[0] / a[1], a, i) for i in range(len(spectra)) if (a := add(i)) is not None]
        if not adds:
            break
        _, (gain, cost), i = max(adds)
        removes = [
            (r[0] / r[1], r, j)
            for j in range(len(spectra))
            if j != i and (r := remove(j)) is not None and total - r[1] + cost <= target
        ]
        if not removes:
            break
        _, (loss, saved), j = min(removes)
        if loss >= gain:
            break
        total += cost - saved
        ranks[i] += 1
        ranks[j] -= 1
    refill()
    return {s.name: k for s, k in zip(spectra, ranks, strict=True)}


def budget_search(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: LossFn,
    epsilon: float,
    spectra: Sequence[LayerSpectrum],
    method: Allocation | str = "greedy",
    precision: float = 0.01,
) -> SearchResult:
    """The smallest budget (to within ``precision``) whose ``method`` allocation keeps the
    loss change on ``batches`` below ``epsilon`` (see module doc); the model is left as it was.
    """
    check_search_options(epsilon, precision)
    losses = TruncationLosses(model, spectra, list(batches), loss_fn)
    trials: list[dict[str, float]] = []

    def feasible(b: float) -> bool:
        try:
            loss = losses(allocate(spectra, b, method))  # type: ignore[arg-type]
        except LorankError:  # not even rank 1 everywhere fits
            loss = float("nan")
        ok = abs(loss - losses.before) < epsilon  # False for nan
        trials.append({"budget": b, "loss": loss, "feasible": float(ok)})
        return ok

    # Budget 1 keeps every rank, so it is feasible by construction.
    trials.append({"budget": 1.0, "loss": losses.before, "feasible": 1.0})
    found = bisect(feasible, precision, feasible_low=False)
    ranks = allocate(spectra, found, method)  # type: ignore[arg-type]
    return SearchResult(
        "budget",
        found,
        ranks,
        losses.before,
        losses(ranks),
        epsilon,
        precision,
        trials,
        allocation=str(method),
    )


def relative_error(spec: LayerSpectrum, k: int) -> float:
    """The layer's own relative squared error at rank k: Σ_{i≥k} σ_i² / Σ σ_i²."""
    energy = spec.sigma.double().pow(2)
    return float(energy[k:].sum() / energy.sum().clamp_min(1e-300))


@torch.no_grad()
def sensitivities(
    model: nn.Module,
    spectra: Sequence[LayerSpectrum],
    probe: dict[str, int],
    batches: Sequence[Any],
    forward: Any,
    kind: str = "auto",
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Per layer: the output distance with only that layer truncated to ``probe[name]``, the
    layer's relative error there, and their ratio (see the module doc); the model is left as
    it was."""
    from tqdm.auto import tqdm

    from lorank.compress.outputs import distance, output_kind, output_tensor

    was = model.training
    model.eval()
    try:
        outs = [forward(model, b) for b in batches]
        kind = output_kind(outs[0], kind)
        teacher = [output_tensor(o).detach() for o in outs]
        del outs
        result: dict[str, dict[str, float]] = {}
        for spec in tqdm(spectra, desc="measure", unit="layer", disable=not progress):
            k = probe.get(spec.name, spec.full_rank)
            err = relative_error(spec, k) if k < spec.full_rank else 0.0
            if err <= 0:
                result[spec.name] = {"probe_rank": k, "distance": 0.0, "relative_error": 0.0}
                continue
            with truncated([spec], {spec.name: k}):
                d = sum(
                    float(distance(output_tensor(forward(model, b)), t, kind))
                    for b, t in zip(batches, teacher, strict=True)
                ) / len(batches)
            result[spec.name] = {"probe_rank": k, "distance": d, "relative_error": err}
    finally:
        model.train(was)
    ratios = [r["distance"] / r["relative_error"] for r in result.values() if r["distance"] > 0]
    floor = min(ratios) if ratios else 1.0
    for row in result.values():
        ok = row["distance"] > 0 and row["relative_error"] > 0
        row["sensitivity"] = row["distance"] / row["relative_error"] if ok else floor
    return result


def measured_allocation(
    model: nn.Module,
    spectra: Sequence[LayerSpectrum],
    budget: float,
    batches: Sequence[Any],
    forward: Any,
    kind: str = "auto",
    progress: bool = True,
) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
    """The ``measured`` allocation at ``budget`` and the per-layer measurements behind it."""
    greedy = allocate(spectra, budget, "greedy")
    uniform = allocate(spectra, budget, "uniform")
    probe = {
        s.name: greedy[s.name] if greedy[s.name] < s.full_rank else uniform[s.name] for s in spectra
    }
    measured = sensitivities(model, spectra, probe, batches, forward, kind, progress)
    weights = {name: row["sensitivity"] for name, row in measured.items()}
    return allocate(spectra, budget, "greedy", weights), measured
