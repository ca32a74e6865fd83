"""Writing chosen ranks and factors into a model: dense layers become diagonal-core low-rank
layers, low-rank layers are truncated; one report row per layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lorank.core.adapters import low_rank_from_factors
from lorank.core.convert import replace_module
from lorank.core.layers import LowRankLayer
from lorank.core.search import LayerSpectrum

__all__ = ["apply_ranks", "install_factors", "is_truncated"]


def is_truncated(spec: LayerSpectrum, k: int) -> bool:
    """Whether rank ``k`` changes ``spec``'s layer (rank choices keep a dense layer dense at
    ranks that would not save parameters, by choosing its full rank)."""
    if isinstance(spec.module, LowRankLayer):
        return k < spec.module.rank
    return k < spec.full_rank


def _row(spec: LayerSpectrum, k: int) -> dict[str, Any]:
    module = spec.module
    return {
        "name": spec.name,
        "type": type(module).__name__,
        "shape": [int(spec.u.shape[0]), int(spec.v.shape[0])],
        "full_rank": spec.full_rank,
        "rank": k,
        "params_before": sum(p.numel() for p in module.parameters()),
        "sigma_1": float(spec.sigma[0]),
        "sigma_next": float(spec.sigma[k]) if k < spec.full_rank else 0.0,
    }


@torch.no_grad()
def install_factors(
    model: nn.Module,
    spec: LayerSpectrum,
    u: Tensor,
    sigma: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
) -> dict[str, Any]:
    """Replace ``spec``'s layer by ``u diag(sigma) vᵀ`` (rank = columns of u), and its bias by
    ``bias`` when given; the report row."""
    k = int(u.shape[1])
    row = _row(spec, k)
    module = spec.module
    if isinstance(module, LowRankLayer):
        row["params_before"] = module.params_eval
        layer = module
        layer.load_svd_(u, sigma, v)
        row["status"] = "truncated"
    else:
        layer = low_rank_from_factors(module, u, sigma, v, core="diag")
        replace_module(model, spec.name, layer)
        row["status"] = "converted"
    if bias is not None and layer.bias is not None:
        layer.bias.copy_(bias.to(layer.bias))
    row["params_after"] = layer.params_eval
    return row


@torch.no_grad()
def apply_ranks(
    model: nn.Module,
    spectra: list[LayerSpectrum],
    chosen: dict[str, int],
    exact_factors: bool = False,
) -> list[dict[str, Any]]:
    """Truncate every layer of ``spectra`` to ``chosen[name]`` in place; one report row each.

    Dense layers become diagonal-core low-rank layers (or stay dense at full rank) made from
    the first k columns of their spectrum's ``(u, sigma, v)``: the SVD already taken for the
    rank choice is reused, never taken again. Low-rank layers are truncated to their exact
    rank-k SVD, or with ``exact_factors`` to the spectrum's factors as they are (the
    activation-aware factors of :mod:`lorank.compress.calibration`, whose v is not
    orthonormal).
    """
    rows = []
    for spec in spectra:
        k = chosen.get(spec.name, spec.full_rank)
        module = spec.module
        if isinstance(module, LowRankLayer):
            row = _row(spec, k)
            before, old_rank = module.params_eval, module.rank
            if k < old_rank and exact_factors:
                module.load_svd_(spec.u[:, :k], spec.sigma[:k], spec.v[:, :k])
            elif k < old_rank:
                module.truncate(k)
            row.update(
                params_before=before,
                params_after=module.params_eval,
                status="truncated" if k < old_rank else "kept",
            )
        elif not is_truncated(spec, k):
            row = _row(spec, k)
            row.update(params_after=row["params_before"], status="kept")
        else:
            row = install_factors(model, spec, spec.u[:, :k], spec.sigma[:k], spec.v[:, :k])
        rows.append(row)
    return rows
