r"""``nnsvd``: the training-time variants of nn-svd (seed 001, jaketae/nn-svd).

nn-svd compresses a trained network by replacing each weight with its truncated SVD; that
post-training path is ``lorank compress`` (:mod:`lorank.compress`). This method covers the
variants nn-svd trains from scratch:

* **fixed-rank** :math:`W = U V^\top` (like ``factorized``), optionally with nn-svd's
  *orthonormal* penalty on each factor, weighted by α and logged as ``loss_orthonormal``:

  .. math:: \mathcal{L} = \mathcal{L}_\text{task}
            + \alpha \sum_l \big(\|U_l^\top U_l - I\|_F^2 + \|V_l^\top V_l - I\|_F^2\big);

* **symmetric** :math:`W = B B^\top` with a single factor :math:`B \in \mathbb{R}^{n\times r}`
  for square layers (m = n), half the parameters of :math:`U V^\top` at the same rank; W is
  then symmetric positive semi-definite. Non-square layers fall back to :math:`U V^\top`.

The symmetric layer (:class:`SymmetricLowRankLinear`) is a ``LowRankLinear`` whose ``V`` is the
*same* parameter as ``U`` (registered under both names), so every tool that reads ``U``/``V``
(forward, SVD, metrics, the search) works unchanged and autograd sums both uses into one
gradient. A saved symmetric model stores B twice and loads as an untied ``U Vᵀ`` layer with
identical weights: evaluation is unchanged, but training the loaded model unties the factors.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from lorank.core.convert import ConversionReport, convert, low_rank_layers, replace_module
from lorank.core.layers import LowRankLinear, orthonormal_
from lorank.core.regularizers import orthonormal_penalty
from lorank.methods.base import Method, MethodConfig, MethodConversion
from lorank.methods.registry import register


class SymmetricLowRankLinear(LowRankLinear):
    """A square Linear with ``W = B Bᵀ`` (B: n×r); ``U`` and ``V`` are both B.

    Forward: ``y = (x B) Bᵀ + b``, never forming W.
    """

    def __init__(self, features: int, rank: int | float, bias: bool = True) -> None:
        super().__init__(features, features, rank, bias, core="none")
        self.V = self.U  # tie: one parameter, two names
        self.reset_parameters()

    @property
    def B(self) -> nn.Parameter:
        return self.U

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Orthonormal B scaled so ‖B Bᵀ‖²_F ≈ n/3, the dense PyTorch init's expected norm."""
        super().reset_parameters(generator)
        scale = math.sqrt(self.out_dim / (3.0 * self.rank))
        with torch.no_grad():
            self.U.copy_(orthonormal_(self.out_dim, self.rank, generator) * math.sqrt(scale))

    @classmethod
    @torch.no_grad()
    def from_linear(  # type: ignore[override]
        cls, linear: nn.Linear, rank: int | float, core: str = "none"
    ) -> SymmetricLowRankLinear:
        """B from the top eigenpairs of the symmetric part (W + Wᵀ)/2, negative ones dropped:
        the closest rank-r PSD matrix to W's symmetric part in Frobenius norm."""
        if linear.in_features != linear.out_features:
            raise ValueError("a symmetric layer needs a square weight")
        layer = cls(linear.in_features, rank, linear.bias is not None)
        layer.to(linear.weight)
        sym = 0.5 * (linear.weight + linear.weight.T).double()
        eigvals, eigvecs = torch.linalg.eigh(sym)
        top = eigvals.argsort(descending=True)[: layer.rank]
        b = eigvecs[:, top] * eigvals[top].clamp_min(0).sqrt()
        layer.U.copy_(b.to(linear.weight))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    @property
    def params_eval(self) -> int:
        return self.rank * self.out_dim + (self.out_dim if self.bias is not None else 0)

    def set_factors(
        self, U: Tensor, S: Tensor | None, V: Tensor
    ) -> dict[nn.Parameter, nn.Parameter]:
        """Set B = U (V must describe the same factor; a PSD truncation gives V = U)."""
        old = self.U
        new = nn.Parameter(U.detach().to(old).contiguous().clone(), requires_grad=old.requires_grad)
        self.U = new
        self.V = new
        return {old: new}

    def spec(self) -> dict:
        return super().spec() | {"symmetric": True}


class NNSVDConfig(MethodConfig, MethodConversion):
    """nn-svd's training variants: fixed-rank U Vᵀ with an orthonormal penalty, or B Bᵀ."""

    name: Literal["nnsvd"] = "nnsvd"
    alpha: float = Field(0.0, ge=0, description="weight α of the orthonormal penalty (0: off)")
    symmetric: bool = Field(False, description="W = B Bᵀ for square layers (others U Vᵀ)")


@register
class NNSVD(Method):
    name = "nnsvd"
    core = "none"
    config_class = NNSVDConfig
    config: NNSVDConfig

    def prepare(self, model: nn.Module) -> ConversionReport:
        report = convert(model, self.config.low_rank_config(self.core))
        if self.config.symmetric:
            symmetrize(model, report)
        return report

    def regularization(self, model: nn.Module) -> dict[str, Tensor]:
        if self.config.alpha == 0:
            return {}
        penalties = []
        for layer in low_rank_layers(model).values():
            penalties.append(orthonormal_penalty(layer.U))
            if layer.V is not layer.U:
                penalties.append(orthonormal_penalty(layer.V))
        if not penalties:
            return {}
        return {"orthonormal": self.config.alpha * sum(penalties)}


def symmetrize(model: nn.Module, report: ConversionReport | None = None) -> list[str]:
    """Replace every square ``LowRankLinear`` of ``model`` by a :class:`SymmetricLowRankLinear`
    of the same rank (randomly initialised); returns the names replaced and updates the
    report's parameter counts."""
    replaced = []
    entries = {e.name: e for e in report.layers} if report is not None else {}
    for name, layer in low_rank_layers(model).items():
        if type(layer) is not LowRankLinear or layer.in_features != layer.out_features:
            continue
        sym = SymmetricLowRankLinear(layer.in_features, layer.rank, layer.bias is not None)
        sym.to(device=layer.U.device, dtype=layer.U.dtype)
        replace_module(model, name, sym)
        replaced.append(name)
        if name in entries:
            entries[name].params_after = sym.params_eval
            entries[name].reason = "symmetric W = B Bᵀ"
    return replaced
