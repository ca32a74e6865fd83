"""Model surgery: ``convert`` dense layers to low-rank ones, ``merge`` them back.

Targets are matched peft-style on module names from ``model.named_modules()``: a string is a
regular expression that must match the whole name; a list matches a name equal to an entry
or ending in ``"." + entry``. ``LowRankConfig.filter_fn(module, name) -> bool`` (Python API,
like torchao's ``quantize_``) narrows the selection further. Which modules are layers, and how
each kind is factorized, is the layer-adapter registry's business
(:mod:`lorank.core.adapters`: Linear, Conv2d, Conv1d, Hugging Face Conv1D, Embedding).

:func:`plan` lists every layer the selection reaches, with the reason when it stays dense:

* the model's output layer: ``keep_last_dense`` is **on by default**, in ``convert`` and in
  every method (the classifier or LM head is small, and low rank there costs accuracy for
  little saving); it and ``keep_first_dense`` apply to the default selection only; layers
  named in ``target_modules`` are converted as named;
* a Parameter (or a whole module) shared with another module: a tied LM head and its input
  embedding, T5's shared embedding. Factorizing one side would silently untie them (and grow
  the model), so both stay dense and the report names the other side;
* the adapter's reason (grouped/depthwise convolution, ...), a module with a weight matrix and
  no adapter (``nn.ConvTranspose2d``, ...), an embedding not named in ``target_modules``, a
  layer the model asks to keep dense (``lorank_dense_modules``).

Naming a layer in a ``target_modules`` list that cannot be converted is an error that says why.

``nn.MultiheadAttention`` keeps its q/k/v projection in a packed parameter, not a layer: the
candidate search first re-expresses each targeted one as a
:class:`~lorank.core.attention.LowRankMultiheadAttention` with dense ``nn.Linear`` projections
(``in_proj`` or ``q_proj``/``k_proj``/``v_proj``, and ``out_proj``; same function, and in the
default packed layout the same Parameter objects), which then convert like any Linear. A target
or exclusion naming the attention module applies to all its projections. ``merge`` restores
plain ``nn.MultiheadAttention`` modules. A model may list layer names it wants dense unless
targeted explicitly in a ``lorank_dense_modules`` attribute (the ViT's patch embedding).

Long because the conversion schema, the planner and the surgery must change together;
keeping them in one file keeps that visible.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from lorank.core.adapters import (
    adapter_for,
    low_rank_from,
    matrix_shape,
    unsupported_reason,
)
from lorank.core.attention import LowRankMultiheadAttention, expand_attention
from lorank.core.layers import CoreKind, LowRankLayer, factor_params
from lorank.core.rank import RankSpec, resolve_rank
from lorank.core.reference import document_fields
from lorank.errors import LorankError, LowRankWarning, logger

# The layer parametrization each training method trains, by method name. Methods state theirs
# (``Method.core``) and the method registry fills this in, so the core names no method.
CORE_KINDS: dict[str, CoreKind] = {}


def register_core_kind(method: str, core: CoreKind | None) -> None:
    """Record the core kind ``method`` trains (``None``: it converts no layers itself)."""
    if core is not None:
        CORE_KINDS[method] = core
    KNOWN_METHODS.add(method)


KNOWN_METHODS: set[str] = set()


class LayerSelection(BaseModel):
    """Which layers are candidates for low rank: the part of every conversion config that
    :func:`plan` reads. Shared by :class:`LowRankConfig` and every method's config."""

    model_config = ConfigDict(extra="forbid")

    target_modules: list[str] | str | None = Field(
        None,
        description="names (suffix list) or a regex; default: every Linear/Conv/HF Conv1D "
        "layer (embeddings only when named)",
    )
    exclude_modules: list[str] | str | None = Field(None, description="names never converted")
    keep_first_dense: bool = Field(
        False, description="leave the first candidate layer dense (default selection only)"
    )
    keep_last_dense: bool = Field(
        True,
        description="leave the last candidate (the output layer) dense; default selection only",
    )
    attention_qkv: Literal["packed", "separate"] = Field(
        "packed",
        description="nn.MultiheadAttention's q/k/v projection: one packed 3E×E layer (shared "
        "input basis, reuses the original Parameters) or three separate layers",
    )

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _compiles(cls, value: list[str] | str | None) -> list[str] | str | None:
        # A regex is compiled now, so a typo is a config error and not a crash mid-conversion.
        if isinstance(value, str):
            if len(value) > 1000:
                raise ValueError("a regular expression of at most 1000 characters is expected")
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e})") from None
        return value


class ConversionFields(LayerSelection):
    """The layers (:class:`LayerSelection`) and their ranks and initialisation: everything a
    conversion needs except the parametrization, which a method fixes itself."""

    rank: RankSpec = Field(0.25, description="int rank, or a fraction of each layer's full rank")
    init: Literal["svd", "random"] = Field(
        "svd", description="SVD of the existing weight or random"
    )
    skip_if_no_savings: bool = Field(True, description="leave layers dense when r(m+n) ≥ mn")
    rank_pattern: dict[str, int | float] = Field(
        default_factory=dict, description="per-layer ranks by exact name or suffix"
    )

    def low_rank_config(self, core: CoreKind) -> LowRankConfig:
        """This selection as the :class:`LowRankConfig` of :func:`convert`, with ``core``."""
        shared = self.model_dump(include=set(ConversionFields.model_fields))
        return LowRankConfig(**shared, core=core)


class LowRankConfig(ConversionFields):
    """Which layers become low-rank, at which rank, in which parametrization."""

    method: str | None = Field(
        None, description="a registered training method; picks the core kind it trains"
    )
    core: Literal["full", "diag", "none"] | None = Field(
        None, description="U S Vᵀ with a full or diagonal S, or U Vᵀ; default from method"
    )
    objective: Literal["params", "latency"] = Field(
        "params",
        description="params: convert every layer the rank makes smaller; latency: only where "
        "the low-rank layer measures faster on this device (needs example_input; layers that "
        "cannot be timed stay dense), with its rank rounded up to a faster size when measured "
        "faster",
    )
    latency_mode: Literal["forward", "train"] = Field(
        "forward", description="latency objective: time inference (forward) or forward+backward"
    )
    latency_margin: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="latency objective: convert a layer only where its low-rank form measures "
        "at least this fraction faster than dense (timings vary by a few percent)",
    )
    filter_fn: Callable[[nn.Module, str], bool] | None = Field(
        None,
        exclude=True,
        description="Python API only: filter_fn(module, name) -> False leaves a layer out",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str | None) -> str | None:
        if method is not None and KNOWN_METHODS and method not in KNOWN_METHODS:
            raise ValueError(
                f"unknown method {method!r}; choose one of {', '.join(sorted(KNOWN_METHODS))}"
            )
        return method

    def core_kind(self) -> CoreKind:
        if self.core is not None:
            return self.core
        return CORE_KINDS.get(self.method or "", "diag")


document_fields(LowRankConfig)


@dataclass
class LayerConversion:
    name: str
    kind: str
    shape: tuple[int, int]
    rank: int | None
    status: Literal["converted", "kept", "skipped"]
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    dense_ms: float | None = None  # measured, with objective="latency"
    low_rank_ms: float | None = None


@dataclass
class ConversionReport:
    """What :func:`convert` did to each candidate layer.

    ``params_before``/``params_after`` sum the listed layers; ``model_params_before`` and
    ``model_params_after`` count the whole model's unique Parameters (a shared Parameter once,
    a low-rank layer by its ``params_eval``), so they are what the model really holds.
    """

    layers: list[LayerConversion] = field(default_factory=list)
    model_params_before: int | None = None
    model_params_after: int | None = None

    @property
    def converted(self) -> list[LayerConversion]:
        return [e for e in self.layers if e.status == "converted"]

    @property
    def skipped(self) -> list[LayerConversion]:
        """Layers left dense, each with its reason."""
        return [e for e in self.layers if e.status != "converted"]

    @property
    def params_before(self) -> int:
        return sum(e.params_before for e in self.layers)

    @property
    def params_after(self) -> int:
        return sum(e.params_after for e in self.layers)

    def to_dict(self) -> dict:
        out = {
            "layers": [e.__dict__ | {"shape": list(e.shape)} for e in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
        }
        if self.model_params_before is not None:
            out["model_params_before"] = self.model_params_before
            out["model_params_after"] = self.model_params_after
        return out

    def __str__(self) -> str:
        rows = [f"{'layer':<32} {'shape':>13} {'rank':>6} {'params':>19}  status"]
        for e in self.layers:
            shape = f"{e.shape[0]}x{e.shape[1]}"
            rank = "-" if e.rank is None else str(e.rank)
            params = f"{e.params_before}->{e.params_after}"
            note = e.status + (f" ({e.reason})" if e.reason else "")
            rows.append(f"{e.name:<32} {shape:>13} {rank:>6} {params:>19}  {note}")
        if self.model_params_before is not None:
            rows.append(
                f"model: {self.model_params_before} -> {self.model_params_after} parameters "
                "(unique Parameters)"
            )
        return "\n".join(rows)


def matches(name: str, patterns: list[str] | str | None) -> bool:
    """peft-style name matching: regex full match for a string, suffix match for a list."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


KEPT_BY_OPTION = "kept dense by keep_first_dense/keep_last_dense"


@dataclass
class PlannedLayer:
    """One layer the selection reaches and its fate: eligible for low rank, or kept dense
    and why."""

    name: str
    module: nn.Module
    shape: tuple[int, int]
    reason: str = ""
    #: named in a target_modules list: a reason to keep it dense is an error in convert
    named: bool = False
    #: a layer of a registered kind the selection targets (what keep_first/last count)
    candidate: bool = False

    @property
    def eligible(self) -> bool:
        return not self.reason


def plan(model: nn.Module, selection: LayerSelection) -> list[PlannedLayer]:
    """Every layer ``selection`` reaches, in module order, with the reason it must stay dense
    if it must (module docstring).

    The one place that decides layer eligibility: :func:`convert`, compression and the methods
    that factorize later (OIALR's switch, hybrid's) all plan with it. Targeted
    ``nn.MultiheadAttention`` modules are re-expressed in place first, so their projections
    are among the layers.
    """
    _expand_targeted_attention(model, selection)
    dense_default = _dense_by_default(model)
    shared = shared_parameters(model)
    filter_fn = getattr(selection, "filter_fn", None)
    targets = selection.target_modules
    out: list[PlannedLayer] = []
    ends: list[int] = []  # indices of the candidates keep_first/last_dense count
    for name, module in model.named_modules():
        if isinstance(module, LowRankLayer):
            continue
        adapter = adapter_for(module)
        reason = unsupported_reason(module)
        if adapter is None and not reason:
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else None
        if isinstance(parent, nn.MultiheadAttention):
            continue  # its out_proj: PyTorch's forward reads .weight, it must stay an nn.Linear
        names = [name]
        if isinstance(parent, LowRankMultiheadAttention):
            names.append(parent_name)
        targeted = targets is not None and any(matches(n, targets) for n in names)
        if targets is not None and not targeted:
            continue
        if any(matches(n, selection.exclude_modules) for n in names):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        shape, candidate = (0, 0), False
        if adapter is not None:
            shape = adapter.matrix_shape(module)
            reason = adapter.skip_reason(module)
            if not reason and adapter.targeted_only and not targeted:
                reason = f"{type(module).__name__}: converted only when named in target_modules"
            elif targets is None and name in dense_default:
                reason = "kept dense by the model (lorank_dense_modules)"
            else:
                candidate = True
                ends.append(len(out))
            if not reason and name in shared:
                reason = shared[name]
        named = targeted and isinstance(targets, list)
        out.append(PlannedLayer(name, module, shape, reason, named, candidate))
    if targets is None and ends:
        keep = {ends[0]} if selection.keep_first_dense else set()
        keep |= {ends[-1]} if selection.keep_last_dense else set()
        for i in keep:
            if not out[i].reason:
                out[i].reason = KEPT_BY_OPTION
    return out


def eligible_layers(model: nn.Module, selection: LayerSelection) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the layers :func:`plan` finds eligible."""
    return [(p.name, p.module) for p in plan(model, selection) if p.eligible]


def candidate_layers(model: nn.Module, selection: LayerSelection) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every dense layer of a registered kind the selection targets,
    eligible or not (kept by keep-first/last, tied, or refused by its adapter: :func:`plan`
    says why)."""
    return [(p.name, p.module) for p in plan(model, selection) if p.candidate]


def shared_parameters(model: nn.Module) -> dict[str, str]:
    """``{module name: reason}`` for every module that shares a Parameter with another module
    (a tied head and its embedding), or that the model holds at more than one place."""
    owners: dict[int, list[tuple[str, str]]] = {}
    places: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        places.setdefault(id(module), []).append(name)
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((name, pname))
    out: dict[str, str] = {}
    for holders in owners.values():
        for name, pname in holders if len(holders) > 1 else ():
            others = ", ".join(f"{n or '<root>'}.{p}" for n, p in holders if n != name)
            out[name] = f"tied: its {pname} is {others}; kept dense so the tie holds"
    for names in places.values():
        for name in names[:1] if len(names) > 1 else ():
            # named_modules() yields a shared module once, under its first name.
            out[name] = f"module shared with {', '.join(names[1:])}; kept dense"
    return out


def unique_parameter_count(model: nn.Module) -> int:
    """Parameters the model holds, each shared Parameter once, a low-rank layer by its
    ``params_eval`` (what inference needs)."""
    low_rank = [m for m in model.modules() if isinstance(m, LowRankLayer)]
    inside = {id(p) for layer in low_rank for p in layer.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return rest + sum(layer.params_eval for layer in low_rank)


def _expand_targeted_attention(model: nn.Module, config: LowRankConfig) -> None:
    names = set()
    for name, module in model.named_modules():
        if type(module) is not nn.MultiheadAttention:
            continue
        if matches(name, config.exclude_modules):
            continue
        if module.bias_k is not None or module.add_zero_attn:
            if config.target_modules is not None and matches(name, config.target_modules):
                LowRankMultiheadAttention.from_mha(module)  # raises the explanatory error
            continue
        names.add(name)
    if names:
        expand_attention(model, config.attention_qkv, names)


def _dense_by_default(model: nn.Module) -> set[str]:
    out = set()
    for prefix, module in model.named_modules():
        for name in getattr(module, "lorank_dense_modules", ()):
            out.add(f"{prefix}.{name}" if prefix else name)
    return out


def _rank_for(name: str, config: LowRankConfig) -> int | float:
    for key, rank in config.rank_pattern.items():
        if name == key or name.endswith("." + key):
            return rank
    return config.rank


def convert(
    model: nn.Module,
    config: LowRankConfig | None = None,
    *,
    example_input: Any = None,
    cost_model: Any = None,
) -> ConversionReport:
    """Replace the targeted layers of ``model`` in place by low-rank layers.

    Every layer the selection reaches is in the report: converted, or kept dense with its
    reason (module docstring). With ``config.objective = "latency"``, ``example_input`` (a
    batch as the model takes it) gives every layer's real input shape, and a layer is
    converted only where its low-rank form measures faster
    (:class:`lorank.core.cost.CostModel`, or ``cost_model``). Example::

        report = lorank.convert(model, lorank.LowRankConfig(method="svd", rank=0.25))
        print(report)   # one row per layer, and the model's unique parameter count
    """
    config = config or LowRankConfig()
    core = config.core_kind()
    latency = None
    if config.objective == "latency":
        if example_input is None:
            raise LorankError(
                'objective = "latency" needs example_input (a batch as the model takes it) to '
                "measure each layer at its real input shape"
            )
    report = ConversionReport(model_params_before=unique_parameter_count(model))
    planned = plan(model, config)
    if config.objective == "latency":
        from lorank.core.cost import CostModel, layer_inputs

        # After plan(): it re-expresses targeted attention as Linear projections, which are
        # then timed like any Linear.
        costs = cost_model or CostModel(core=core, margin=config.latency_margin)
        latency = (costs, layer_inputs(model, example_input))
    if config.target_modules is not None and not planned:
        raise LorankError(
            f"target_modules {config.target_modules!r} matched no layer lorank can convert; "
            "check the names with `print(model)`"
        )
    for layer_plan in planned:
        name, module, (m, n) = layer_plan.name, layer_plan.module, layer_plan.shape
        before = sum(p.numel() for p in module.parameters())
        entry = LayerConversion(
            name, type(module).__name__, (m, n), None, "skipped", layer_plan.reason, before, before
        )
        report.layers.append(entry)
        if not layer_plan.eligible:
            if layer_plan.named:
                raise LorankError(f"cannot convert {name!r}: {layer_plan.reason}")
            if layer_plan.reason == KEPT_BY_OPTION:
                entry.status = "kept"
            continue
        rank = resolve_rank(_rank_for(name, config), min(m, n))

        def saves(r: int, m: int = m, n: int = n) -> bool:
            return not config.skip_if_no_savings or factor_params(m, n, r, core) < m * n

        if not saves(rank):
            entry.rank = rank
            entry.reason = f"rank {rank} saves no parameters"
            continue
        if latency is not None and not (
            name in latency[1] and isinstance(module, nn.Linear | nn.Conv2d)
        ):
            entry.rank = rank
            entry.reason = (
                f"objective latency: a {type(module).__name__} is not timed here (only "
                "Linear/Conv2d layers the example input reaches are)"
            )
            continue
        if latency is not None:
            costs, layer_input = latency[0], latency[1][name]
            shape, mode, how = layer_input.shape, config.latency_mode, layer_input.options()
            fastest = costs.fastest_rank_near(module, shape, rank, mode, **how)
            if saves(fastest):  # rounded up only while it still saves parameters
                rank = fastest
            entry.dense_ms = 1e3 * costs.time(module, shape, None, mode, **how)
            entry.low_rank_ms = 1e3 * costs.time(module, shape, rank, mode, **how)
            if not costs.faster(entry.low_rank_ms, entry.dense_ms):
                entry.rank, entry.status = rank, "skipped"
                entry.reason = (
                    f"rank {rank} is not faster here ({entry.low_rank_ms:.3g} ms vs dense "
                    f"{entry.dense_ms:.3g} ms; needs {costs.margin:.0%} less)"
                )
                continue
        layer = low_rank_from(module, rank, core, config.init)
        replace_module(model, name, layer)
        entry.rank, entry.status, entry.params_after = rank, "converted", layer.params_eval
    for entry in report.layers:
        logger.info("convert %s %s: %s %s", entry.name, entry.shape, entry.status, entry.reason)
    if report.layers and not report.converted:
        warnings.warn(
            f"lorank.convert left all {len(report.layers)} candidate layers dense ("
            f"{report.layers[0].reason or report.layers[0].status}); lower the rank or set "
            "skip_if_no_savings=False",
            LowRankWarning,
            stacklevel=2,
        )
    report.model_params_after = unique_parameter_count(model)
    return report


def planned_report(
    layers: list[tuple[str, nn.Module]], reason: str, at_full_rank: bool = False
) -> ConversionReport:
    """A report for layers a method will convert later (OIALR, hybrid): kept dense for now,
    with the planned rank (full, or unknown until the switch)."""
    report = ConversionReport()
    for name, module in layers:
        shape = matrix_shape(module)
        size = sum(p.numel() for p in module.parameters())
        planned = min(shape) if at_full_rank else None
        report.layers.append(
            LayerConversion(name, type(module).__name__, shape, planned, "kept", reason, size, size)
        )
    return report


def merge(model: nn.Module) -> nn.Module:
    """Turn every low-rank layer of ``model`` back into the dense layer it replaced
    (``nn.Linear``, ``nn.Conv2d``, ``nn.Conv1d``, Hugging Face ``Conv1D``, ``nn.Embedding``),
    and every :class:`~lorank.core.attention.LowRankMultiheadAttention` into an
    ``nn.MultiheadAttention``."""
    merge_layers(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankMultiheadAttention):
            replace_module(model, name, module.to_mha())
    return model


def merge_layers(model: nn.Module) -> dict[str, tuple[LowRankLayer, nn.Module]]:
    """Replace each low-rank layer by its dense ``W = U S Vᵀ`` and return ``{name: (low-rank,
    dense)}``. The dense layer keeps the low-rank layer's bias Parameter (the same object),
    so a caller that moves optimizer state only has to map the factors."""
    merged = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLayer):
            dense = module.to_dense()
            if module.bias is not None:
                dense.bias = module.bias
            replace_module(model, name, dense)
            merged[name] = (module, dense)
    return merged


def low_rank_layers(model: nn.Module) -> dict[str, LowRankLayer]:
    """``{name: layer}`` for every low-rank layer of ``model``, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLayer)}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (the root cannot be replaced)."""
    if not name:
        raise LorankError("cannot replace the root module; wrap the layer in a container")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
