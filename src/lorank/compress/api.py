r"""The in-memory core of post-training compression: ``compress_model(model, config, data)``.

::

    from lorank.compress import BudgetRanks, CompressConfig, compress_model

    config = CompressConfig(svd="activation", ranks=BudgetRanks(budget=0.5),
                            error_propagation=True, refit=True)
    report = compress_model(model, config, calibration=batches)   # model changed in place
    print(report)

(``lorank.compress(model, config, calibration=batches)`` is the same call.) The steps, each
optional according to the config:

1. **Spectra.** The thin SVD of every Linear / Conv2d / Hugging Face Conv1D and low-rank layer
   (an output layer tied to the input embedding stays dense).
2. **Calibration** (:mod:`lorank.compress.calibration`). The batches run through the model
   once; each layer's input second moment C = XᵀX/N gives the activation-aware spectrum
   (``svd="activation"``: the SVD of W·L, L Lᵀ = C + λI).
3. **Ranks** (:mod:`lorank.compress.allocation`): a rule, a budget with an allocation (uniform,
   greedy on each layer's own error, or ``measured``: greedy weighted by each layer's measured
   end-to-end effect), or the smallest budget within a loss tolerance.
4. **Truncation.** Independently per layer (the first r singular triples), or layer by layer in
   forward order from the inputs the compressed upstream produces (``error_propagation``), with
   an optional closed-form least-squares refit of the output factor and bias (``refit``;
   :mod:`lorank.compress.propagation`).
5. **Distillation** (``finetune=DistillFinetune(...)``, :mod:`lorank.compress.distill`): the
   factors, norms and biases learn the original model's outputs on the calibration batches.

With ``objective="latency"`` step 3 also measures each layer dense and low-rank at the input
shape of the first calibration (or loss) batch (:mod:`lorank.compress.latency`): a layer stays
dense where low rank is not measured faster, a budget goes to the layers where it buys time,
ranks are rounded up to faster sizes where measured faster; ``report.latency`` has the
predicted and measured speed-ups.

A batch is what ``forward(model, batch)`` takes: by default an ``(inputs, ...)`` tuple runs
``model(inputs)``, a mapping runs ``model(**batch)`` (Hugging Face ``input_ids`` /
``attention_mask``), anything else ``model(batch)``. ``loss_fn(model, batch) -> Tensor``, when
given, is the loss reported before and after and used by loss tolerances.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lorank.compress.allocation import allocate, budget_search, measured_allocation, relative_error
from lorank.compress.calibration import (
    activation_layer_spectra,
    activation_spectra,
    collect_second_moments,
)
from lorank.compress.config import (
    BudgetRanks,
    CompressConfig,
    DistillFinetune,
    EpochFinetune,
    RuleRanks,
    ToleranceRanks,
    compress_config,
)
from lorank.compress.distill import distill, frozen_copy
from lorank.compress.latency import LatencyPlanner
from lorank.compress.latency import summary as latency_summary
from lorank.compress.propagation import propagate
from lorank.compress.rules import CompressionRule
from lorank.compress.surgery import apply_ranks, is_truncated
from lorank.core.convert import LayerSelection, candidate_layers, shared_parameters
from lorank.core.cost import CostModel
from lorank.core.metrics import parameter_counts, ranks
from lorank.core.search import (
    LayerSpectrum,
    default_layers,
    layer_spectra,
    loss_bounded_search,
    mean_loss,
    rule_ranks,
    truncated,
)
from lorank.errors import LorankError

__all__ = ["CompressionReport", "compress_model", "default_forward", "drop_tied"]

Forward = Callable[[nn.Module, Any], Any]
LossFn = Callable[[nn.Module, Any], Tensor]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(inputs)`` for an ``(inputs, ...)`` tuple, ``model(**batch)`` for a mapping."""
    if isinstance(batch, tuple | list):
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def batch_size(batch: Any) -> int:
    """Samples in one batch (the length of its first tensor)."""
    if isinstance(batch, tuple | list):
        batch = batch[0]
    elif isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    return len(batch) if isinstance(batch, Tensor) else 1


def first_samples(batches: Iterable[Any], n: int | None) -> list[Any]:
    """The batches holding the first ``n`` samples (the last one cut), or all of them."""
    out: list[Any] = []
    left = n
    for batch in batches:
        if left is not None and left <= 0:
            break
        size = batch_size(batch)
        if left is not None and size > left:
            batch = _cut(batch, left)
            size = left
        out.append(batch)
        if left is not None:
            left -= size
    return out


def _cut(batch: Any, n: int) -> Any:
    if isinstance(batch, tuple | list):
        return type(batch)(x[:n] if isinstance(x, Tensor) else x for x in batch)
    if isinstance(batch, Mapping):
        return {k: v[:n] if isinstance(v, Tensor) else v for k, v in batch.items()}
    return batch[:n]


@dataclass
class CompressionReport:
    """What :func:`compress_model` did: per-layer rows, parameter counts, losses, timings."""

    config: CompressConfig
    layers: list[dict[str, Any]]
    ranks: dict[str, int]
    params_before: dict[str, int]
    params_after: dict[str, int]
    tied_layers_kept: list[str] = field(default_factory=list)
    search: dict[str, Any] | None = None
    calibration_samples: int = 0
    calibration_rows: dict[str, int] | None = None
    calibration_loss_before: float | None = None
    calibration_loss_after: float | None = None
    svd_comparison: dict[str, dict[str, float]] | None = None
    allocation_measurements: dict[str, dict[str, float]] | None = None
    distill: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    """``objective="latency"``: predicted and measured speed-ups (compress/latency.py)."""
    timings: dict[str, float] = field(default_factory=dict)
    spectra: list[LayerSpectrum] = field(default_factory=list, repr=False)
    """The spectra the ranks were cut from (not serialised)."""

    @property
    def compression(self) -> float:
        """1 − params_eval after / before."""
        return 1.0 - self.params_after["params_eval"] / max(self.params_before["params_eval"], 1)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("config", "spectra")}
        out["config"] = self.config.model_dump(mode="json")
        out["compression"] = self.compression
        return out

    def __str__(self) -> str:
        kept = sum(1 for r in self.layers if r.get("status") != "kept")
        lines = [
            f"compressed {kept}/{len(self.layers)} layers ({self.config.label()}, "
            f"svd={self.config.svd}): params_eval {self.params_before['params_eval']} -> "
            f"{self.params_after['params_eval']} ({self.compression:.1%} fewer)"
        ]
        if self.calibration_loss_before is not None:
            lines.append(
                f"calibration loss {self.calibration_loss_before:.4f} -> "
                f"{self.calibration_loss_after:.4f}"
            )
        if self.distill is not None:
            d = self.distill
            lines.append(
                f"distill ({d['loss']}): held-out {d['held_out_before']:.4g} -> "
                f"{d['held_out_after']:.4g} in {d['steps']} steps"
            )
        if self.latency is not None:
            t = self.latency
            line = (
                f"latency ({t['mode']}): layers {t['layers_dense_ms']:.3g} -> "
                f"{t['layers_ms']:.3g} ms predicted ({t['predicted_speedup']:.2f}x)"
            )
            if t.get("measured_speedup") is not None:
                line += (
                    f"; model {t['model_dense_ms']:.3g} -> {t['model_ms']:.3g} ms measured "
                    f"({t['measured_speedup']:.2f}x)"
                )
            lines.append(line)
        return "\n".join(lines)


def _tied(model: nn.Module) -> tuple[dict[str, str], list[str]]:
    """Modules sharing a Parameter with another, and the candidate layers among them."""
    shared = shared_parameters(model)
    candidates = candidate_layers(model, LayerSelection(keep_last_dense=False))
    return shared, [name for name, _ in candidates if name in shared]


def drop_tied(
    model: nn.Module, spectra: list[LayerSpectrum]
) -> tuple[list[LayerSpectrum], list[str]]:
    """``spectra`` without layers that share a Parameter with another module (a tied output
    head), and the names of the tied layers :func:`~lorank.core.convert.plan` keeps dense.

    Factorizing a tied head saves nothing (the embedding still holds the matrix) and adds
    the factors, so such a layer stays dense.
    """
    shared, tied = _tied(model)
    return [s for s in spectra if s.name not in shared], tied


def compressible_layers(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """``({name: layer}, tied)``: the layers :func:`~lorank.core.search.layer_spectra` takes,
    less the tied ones :func:`drop_tied` drops, and the names of those."""
    shared, tied = _tied(model)
    return {n: m for n, m in default_layers(model).items() if n not in shared}, tied


def compress_model(
    model: nn.Module,
    config: CompressConfig | dict[str, Any] | None = None,
    calibration: Iterable[Any] | None = None,
    *,
    loss_fn: LossFn | None = None,
    forward: Forward | None = None,
    loss_batches: Sequence[Any] | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    progress: bool = True,
    cost_model: Any = None,
) -> CompressionReport:
    """Compress ``model`` in place as ``config`` says (see the module doc); the report.

    ``calibration``: the batches statistics, propagation, measured allocation and distillation
    use (the first ``config.calibration`` samples of them). ``loss_batches`` (default: the
    calibration batches, first ``config.samples`` samples) are those ``loss_fn`` is measured
    on. ``evaluate(model)`` adds figures (e.g. a test loss) to the plain-vs-activation
    comparison. ``cost_model`` (``objective="latency"``): the
    :class:`~lorank.core.cost.CostModel` to time layers with (default: a new one with
    ``config.latency_margin``; a given one decides "faster" by its own ``margin``).
    """
    config = compress_config(config)
    forward = forward or default_forward
    timings: dict[str, float] = {}
    if isinstance(config.finetune, EpochFinetune):
        raise LorankError(
            "`finetune` epochs trains on the source's own training data, which an in-memory "
            "model does not have; use finetune distill, or lorank.compress.compress on a "
            "lorank run"
        )
    batches = first_samples(calibration, config.calibration) if calibration is not None else []
    if config.needs_calibration and not batches:
        raise LorankError(
            "this config needs `calibration` data (svd='activation', error_propagation, "
            "refit, the measured allocation or distillation); pass calibration batches"
        )
    if loss_batches is None and loss_fn is not None:
        loss_batches = first_samples(batches, config.samples) or None
    if config.needs_loss and (loss_fn is None or not loss_batches):
        raise LorankError(
            "a loss tolerance needs a loss: pass loss_fn and calibration (or loss) batches"
        )
    params_before = parameter_counts(model)
    layers, tied = compressible_layers(model)
    if not layers:
        raise LorankError("the model has no Linear/Conv2d or low-rank layer to compress")
    needs_teacher = (
        config.error_propagation
        or config.refit
        or isinstance(config.finetune, DistillFinetune)
        or (loss_fn is not None and loss_batches is not None)
    )
    original = frozen_copy(model) if needs_teacher else None

    # Plain spectra: for svd="plain", or to compare plain vs activation-aware factors on the
    # loss (which needs a loss); an activation-aware compression alone never uses them.
    plain = None
    if config.svd == "plain" or loss_fn is not None:
        start = time.perf_counter()
        plain = layer_spectra(None, layers)
        timings["plain_svd_s"] = time.perf_counter() - start
    activation = None
    rows_seen = None
    # Activation-aware spectra: for svd="activation", or for that comparison; a plain
    # compression does not need them.
    if batches and (config.svd == "activation" or loss_fn is not None):
        start = time.perf_counter()
        moments = collect_second_moments(model, layers, batches, forward)
        timings["calibration_s"] = time.perf_counter() - start
        start = time.perf_counter()
        if plain is not None:
            activation = activation_spectra(plain, moments, config.damping)
        else:
            activation = activation_layer_spectra(layers, moments, config.damping)
        timings["svd_s"] = time.perf_counter() - start
        rows_seen = {n: m.rows for n, m in moments.items()}
        del moments
    spectra = activation if config.svd == "activation" else plain
    assert spectra is not None

    latency = None
    model_dense_ms = None
    if config.objective == "latency":
        example = next(iter(batches or loss_batches or []), None)
        if example is None:
            raise LorankError(
                "`objective` latency times each layer at its real input shape: pass "
                "calibration (or loss) batches"
            )
        start = time.perf_counter()
        costs = cost_model or CostModel(core="diag", margin=config.latency_margin)
        latency = LatencyPlanner(model, spectra, example, forward, config.latency_mode, costs)
        model_dense_ms = latency.model_ms(model)
        timings["latency_s"] = time.perf_counter() - start

    start = time.perf_counter()
    chosen, search, measured, latency_rows = _choose_ranks(
        model, spectra, config, batches, loss_batches, loss_fn, forward, progress, latency
    )
    timings["allocation_s"] = time.perf_counter() - start

    comparison = None
    if plain is not None and activation is not None and loss_fn is not None and loss_batches:
        comparison = {}
        for kind, kind_spectra in {"plain": plain, "activation": activation}.items():
            with truncated(kind_spectra, chosen):
                row = {"calibration_loss": mean_loss(model, loss_batches, loss_fn)}
                if evaluate is not None:
                    row |= evaluate(model)
            comparison[kind] = row

    start = time.perf_counter()
    if config.error_propagation or config.refit:
        assert original is not None
        targets = {s.name: chosen[s.name] for s in spectra if is_truncated(s, chosen[s.name])}
        done = propagate(
            model,
            original,
            spectra,
            targets,
            batches,
            forward,
            error_propagation=config.error_propagation,
            refit_factors=config.refit,
            damping=config.damping,
            progress=progress,
        )
        by_name = {row["name"]: row for row in done}
        rest = [s for s in spectra if s.name not in by_name]
        by_name |= {row["name"]: row for row in apply_ranks(model, rest, chosen)}
        rows = [by_name[s.name] for s in spectra]
    else:
        rows = apply_ranks(model, spectra, chosen, exact_factors=config.svd == "activation")
    timings["truncation_s"] = time.perf_counter() - start
    for row, spec in zip(rows, spectra, strict=True):
        row["relative_error"] = relative_error(spec, row["rank"])
        row["relative_error_kind"] = config.svd
        row |= latency_rows.get(spec.name, {})

    distilled = None
    if isinstance(config.finetune, DistillFinetune):
        assert original is not None
        distilled = distill(model, original, batches, forward, config.finetune, progress)
        timings["distill_s"] = distilled["time_s"]

    latency_report = None
    if latency is not None:
        latency_report = latency_summary(
            latency_rows, config.latency_mode, model_dense_ms, latency.model_ms(model)
        )

    report = CompressionReport(
        config=config,
        layers=rows,
        ranks=ranks(model),
        params_before=params_before,
        params_after=parameter_counts(model),
        tied_layers_kept=tied,
        search=search,
        calibration_samples=sum(batch_size(b) for b in batches),
        calibration_rows=rows_seen,
        svd_comparison=comparison,
        allocation_measurements=measured,
        distill=distilled,
        latency=latency_report,
        timings=timings,
        spectra=spectra,
    )
    if loss_fn is not None and loss_batches and original is not None:
        report.calibration_loss_before = (
            search["loss_before"] if search else mean_loss(original, loss_batches, loss_fn)
        )
        report.calibration_loss_after = mean_loss(model, loss_batches, loss_fn)
    return report


def _choose_ranks(
    model: nn.Module,
    spectra: list[LayerSpectrum],
    config: CompressConfig,
    batches: list[Any],
    loss_batches: Sequence[Any] | None,
    loss_fn: LossFn | None,
    forward: Forward,
    progress: bool,
    latency: LatencyPlanner | None = None,
) -> tuple[
    dict[str, int],
    dict[str, Any] | None,
    dict[str, dict[str, float]] | None,
    dict[str, dict[str, Any]],
]:
    """Ranks, the search record, the measured allocation's measurements and (latency
    objective) the per-layer timing rows."""
    r = config.ranks
    extras: list[Any] = [None, None]  # the last choice's search record and measurements

    def choose(specs: list[LayerSpectrum]) -> dict[str, int]:
        chosen, extras[0], extras[1] = _ranks_for(
            model, specs, config, batches, loss_batches, loss_fn, forward, progress
        )
        return chosen

    if latency is None:
        return choose(spectra), extras[0], extras[1], {}
    budget = None
    if isinstance(r, RuleRanks):
        chosen = choose(spectra)
    else:
        # Budgets are spent only where low rank measures faster (compress/latency.py).
        chosen = latency.allocate(spectra, choose)
        budget = r.budget if isinstance(r, BudgetRanks) else extras[0]["budget"]
    chosen, rows = latency.settle(spectra, chosen, budget)
    return chosen, extras[0], extras[1], rows


def _ranks_for(
    model: nn.Module,
    spectra: list[LayerSpectrum],
    config: CompressConfig,
    batches: list[Any],
    loss_batches: Sequence[Any] | None,
    loss_fn: LossFn | None,
    forward: Forward,
    progress: bool,
) -> tuple[dict[str, int], dict[str, Any] | None, dict[str, dict[str, float]] | None]:
    r = config.ranks
    if isinstance(r, BudgetRanks):
        if r.allocation == "measured":
            probe = first_samples(batches, config.measure_samples)
            loss = config.finetune.loss if isinstance(config.finetune, DistillFinetune) else "auto"
            chosen, measured = measured_allocation(
                model, spectra, r.budget, probe, forward, loss, progress
            )
            return chosen, None, measured
        return allocate(spectra, r.budget, r.allocation), None, None
    if isinstance(r, ToleranceRanks):
        assert loss_batches is not None and loss_fn is not None
        found = budget_search(
            model, loss_batches, loss_fn, r.loss_tolerance, spectra, r.allocation, r.precision
        )
        return found.ranks, found.to_dict(), None
    assert isinstance(r, RuleRanks)
    rule = CompressionRule.parse(r.rule)
    if rule.rule is not None:
        return rule_ranks(spectra, rule.rule), None, None
    assert loss_batches is not None and loss_fn is not None and rule.epsilon is not None
    found = loss_bounded_search(model, loss_batches, loss_fn, rule.epsilon, r.precision, spectra)
    return found.ranks, found.to_dict(), None
