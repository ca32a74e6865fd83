"""Model surgery: ``convert`` dense layers to low-rank ones, ``merge`` them back.

Targets are matched peft-style on module names from ``model.named_modules()``: a string is a
regular expression that must match the whole name; a list matches a name equal to an entry
or ending in ``"." + entry``. Hugging Face GPT-2 ``Conv1D`` layers (which store Wᵀ) are
treated as Linear layers.

``nn.MultiheadAttention`` keeps its q/k/v projection in a packed parameter, not a layer: the
candidate search first re-expresses each targeted one as a
:class:`~lorank.core.attention.LowRankMultiheadAttention` with dense ``nn.Linear`` projections
(``in_proj`` or ``q_proj``/``k_proj``/``v_proj``, and ``out_proj``; same function, and in the
default packed layout the same Parameter objects), which then convert like any Linear. A target
or exclusion naming the attention module applies to all its projections. ``merge`` restores
plain ``nn.MultiheadAttention`` modules. A model may list layer names it wants dense unless
targeted explicitly in a ``lorank_dense_modules`` attribute (the ViT's patch embedding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from lorank.core.attention import LowRankMultiheadAttention, expand_attention
from lorank.core.layers import CoreKind, LowRankConv2d, LowRankLayer, LowRankLinear
from lorank.core.rank import RankSpec, resolve_rank
from lorank.errors import LorankError

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
        None, description="names (suffix list) or a regex; default: every Linear/Conv2d"
    )
    exclude_modules: list[str] | str | None = Field(None, description="names never converted")
    keep_first_dense: bool = Field(False, description="leave the first candidate layer dense")
    keep_last_dense: bool = Field(False, description="leave the last candidate (e.g. output) dense")
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


@dataclass
class ConversionReport:
    """What :func:`convert` did to each candidate layer."""

    layers: list[LayerConversion] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerConversion]:
        return [e for e in self.layers if e.status == "converted"]

    @property
    def params_before(self) -> int:
        return sum(e.params_before for e in self.layers)

    @property
    def params_after(self) -> int:
        return sum(e.params_after for e in self.layers)

    def to_dict(self) -> dict:
        return {
            "layers": [e.__dict__ | {"shape": list(e.shape)} for e in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
        }

    def __str__(self) -> str:
        rows = [f"{'layer':<32} {'shape':>13} {'rank':>6} {'params':>19}  status"]
        for e in self.layers:
            shape = f"{e.shape[0]}x{e.shape[1]}"
            rank = "-" if e.rank is None else str(e.rank)
            params = f"{e.params_before}->{e.params_after}"
            note = e.status + (f" ({e.reason})" if e.reason else "")
            rows.append(f"{e.name:<32} {shape:>13} {rank:>6} {params:>19}  {note}")
        return "\n".join(rows)


def matches(name: str, patterns: list[str] | str | None) -> bool:
    """peft-style name matching: regex full match for a string, suffix match for a list."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def is_convertible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d) or _is_hf_conv1d(module)


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, matched by name so transformers stays optional.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def candidate_layers(model: nn.Module, config: LowRankConfig) -> list[tuple[str, nn.Module]]:
    """Layers the config targets, in ``named_modules`` order (before keep-first/last).

    Targeted ``nn.MultiheadAttention`` modules are re-expressed in place first (module
    docstring), so their projections are among the returned layers.
    """
    _expand_targeted_attention(model, config)
    dense_default = _dense_by_default(model)
    out = []
    for name, module in model.named_modules():
        if not is_convertible(module):
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else None
        if isinstance(parent, nn.MultiheadAttention):
            continue  # its out_proj: PyTorch's forward reads .weight, it must stay an nn.Linear
        names = [name]
        if isinstance(parent, LowRankMultiheadAttention):
            names.append(parent_name)
        if config.target_modules is not None and not any(
            matches(n, config.target_modules) for n in names
        ):
            continue
        if any(matches(n, config.exclude_modules) for n in names):
            continue
        if config.target_modules is None and name in dense_default:
            continue
        out.append((name, module))
    return out


@dataclass
class PlannedLayer:
    """One candidate layer and its fate: eligible for low rank, or kept dense and why."""

    name: str
    module: nn.Module
    shape: tuple[int, int]
    reason: str = ""

    @property
    def eligible(self) -> bool:
        return not self.reason


def plan(model: nn.Module, selection: LayerSelection) -> list[PlannedLayer]:
    """Every layer ``selection`` targets, in module order, with the reason it must stay dense
    if it must (keep-first/last, a convolution that cannot be factorized over channels).

    The one place that decides layer eligibility: :func:`convert`, and the methods that
    factorize later (OIALR's switch, hybrid's), all plan with it.
    """
    candidates = candidate_layers(model, selection)
    last = len(candidates) - 1
    out = []
    for i, (name, module) in enumerate(candidates):
        reason = ""
        if (selection.keep_first_dense and i == 0) or (selection.keep_last_dense and i == last):
            reason = "kept dense by keep_first_dense/keep_last_dense"
        elif isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros"
        ):
            reason = "grouped or non-zero-padded conv"
        out.append(PlannedLayer(name, module, _matrix_shape(module), reason))
    return out


def eligible_layers(model: nn.Module, selection: LayerSelection) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the layers :func:`plan` finds eligible."""
    return [(p.name, p.module) for p in plan(model, selection) if p.eligible]


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


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels, module.in_channels * kh * kw // module.groups
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.nf, module.weight.shape[0]  # HF Conv1D: weight is (in, out)


def _rank_for(name: str, config: LowRankConfig) -> int | float:
    for key, rank in config.rank_pattern.items():
        if name == key or name.endswith("." + key):
            return rank
    return config.rank


def low_rank_from(
    module: nn.Module, rank: int | float, core: CoreKind = "diag", init: str = "svd"
) -> LowRankLayer:
    """The low-rank version of one Linear / Conv2d / HF Conv1D module."""
    if isinstance(module, nn.Conv2d):
        layer: LowRankLayer = LowRankConv2d.from_conv(module, rank, core)
    elif isinstance(module, nn.Linear):
        layer = LowRankLinear.from_linear(module, rank, core)
    elif _is_hf_conv1d(module):
        linear = nn.Linear(module.weight.shape[0], module.nf, bias=module.bias is not None)
        linear.to(module.weight)
        linear.weight.data.copy_(module.weight.data.T)
        if module.bias is not None:
            linear.bias.data.copy_(module.bias.data)
        layer = LowRankLinear.from_linear(linear, rank, core)
    else:
        raise LorankError(f"cannot factorize a {type(module).__name__}")
    if init == "random":
        layer.reset_parameters()
    return layer


def convert(model: nn.Module, config: LowRankConfig | None = None) -> ConversionReport:
    """Replace the targeted Linear/Conv2d layers of ``model`` in place by low-rank layers.

    Example::

        report = lorank.convert(model, lorank.LowRankConfig(method="svd", rank=0.25,
                                                            keep_last_dense=True))
        print(report)
    """
    config = config or LowRankConfig()
    core = config.core_kind()
    planned = plan(model, config)
    if config.target_modules is not None and not planned:
        raise LorankError(
            f"target_modules {config.target_modules!r} matched no Linear/Conv2d "
            "layer; check the names with `print(model)`"
        )
    report = ConversionReport()
    for layer_plan in planned:
        name, module, (m, n) = layer_plan.name, layer_plan.module, layer_plan.shape
        before = sum(p.numel() for p in module.parameters())
        entry = LayerConversion(
            name, type(module).__name__, (m, n), None, "kept", layer_plan.reason, before, before
        )
        report.layers.append(entry)
        if isinstance(module, nn.Conv2d) and not layer_plan.eligible:
            if config.target_modules is not None:
                low_rank_from(module, 1, core)  # raises the explanatory LorankError
            entry.status = "skipped"
            continue
        if not layer_plan.eligible:
            continue
        rank = resolve_rank(_rank_for(name, config), min(m, n))
        cost = rank * (m + n) + (rank * rank if core == "full" else 0)
        if config.skip_if_no_savings and cost >= m * n:
            entry.rank, entry.status = rank, "skipped"
            entry.reason = f"rank {rank} saves no parameters"
            continue
        layer = low_rank_from(module, rank, core, config.init)
        replace_module(model, name, layer)
        entry.rank, entry.status, entry.params_after = rank, "converted", layer.params_eval
    return report


def planned_report(
    layers: list[tuple[str, nn.Module]], reason: str, at_full_rank: bool = False
) -> ConversionReport:
    """A report for layers a method will convert later (OIALR, hybrid): kept dense for now,
    with the planned rank (full, or unknown until the switch)."""
    report = ConversionReport()
    for name, module in layers:
        shape = _matrix_shape(module)
        size = sum(p.numel() for p in module.parameters())
        planned = min(shape) if at_full_rank else None
        report.layers.append(
            LayerConversion(name, type(module).__name__, shape, planned, "kept", reason, size, size)
        )
    return report


def merge(model: nn.Module) -> nn.Module:
    """Turn every low-rank layer of ``model`` back into a plain ``nn.Linear``/``nn.Conv2d``,
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
