r"""``factorized``: vanilla fixed-rank factorization :math:`W = U V^\top`.

Every targeted Linear/Conv2d layer of width :math:`m \times n` is replaced by two factors
:math:`U \in \mathbb{R}^{m\times r}` and :math:`V \in \mathbb{R}^{n\times r}` that plain gradient
descent trains directly (the "vanilla low-rank" baseline of Wang et al.'s Pufferfish/Cuttlefish
line of work). The rank never changes; the forward computes :math:`(xV)U^\top` and costs
:math:`r(m+n)` instead of :math:`mn` multiply-adds per sample.

Training starts from scratch, so the factors are initialised at random by default
(orthonormal columns scaled so the layer's output variance matches PyTorch's dense init); with
``init = "svd"`` they are the truncated SVD of the freshly initialised dense weight instead. The
classifier (the last candidate layer) stays dense by default, as is usual for low-rank
training.

Example config::

    [method]
    name = "factorized"
    rank = 32          # or a fraction of each layer's full rank, e.g. 0.1
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from lorank.core.convert import ConversionReport, convert
from lorank.methods.base import Method, MethodConfig, MethodConversion
from lorank.methods.registry import register


class FactorizedConfig(MethodConfig, MethodConversion):
    """Fixed-rank W = U Vᵀ trained by the base optimizer."""

    name: Literal["factorized"] = "factorized"


@register
class Factorized(Method):
    name = "factorized"
    core = "none"
    config_class = FactorizedConfig
    config: FactorizedConfig

    def prepare(self, model: nn.Module) -> ConversionReport:
        return convert(model, self.config.low_rank_config(self.core))
