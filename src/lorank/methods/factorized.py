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

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lorank.core.convert import ConversionReport, LowRankConfig, convert
from lorank.core.layers import CoreKind
from lorank.core.rank import RankSpec
from lorank.methods.base import Method, MethodConfig
from lorank.methods.registry import register


class ConversionFields(BaseModel):
    """Which layers a low-rank training method factorizes, and at which starting rank.

    Shared by the methods that convert the model once in :meth:`Method.prepare`
    (``factorized``, ``svd``, ``nnsvd``); :meth:`low_rank_config` turns it into the
    :class:`~lorank.core.convert.LowRankConfig` that :func:`lorank.convert` takes.
    """

    model_config = ConfigDict(extra="forbid")

    rank: RankSpec = Field(
        0.25, description="rank of each layer: an int, or a fraction of the layer's full rank"
    )
    init: Literal["svd", "random"] = Field(
        "random", description="random orthonormal factors, or the SVD of the dense init"
    )
    target_modules: list[str] | str | None = Field(
        None, description="layer names (suffix list) or a regex; default every Linear/Conv2d"
    )
    exclude_modules: list[str] | str | None = Field(None, description="layers left dense")
    keep_first_dense: bool = Field(False, description="leave the first candidate layer dense")
    keep_last_dense: bool = Field(True, description="leave the last candidate (classifier) dense")
    skip_if_no_savings: bool = Field(True, description="leave layers dense when r(m+n) >= mn")
    rank_pattern: dict[str, int | float] = Field(
        default_factory=dict, description="per-layer ranks by exact name or name suffix"
    )

    def low_rank_config(self, core: CoreKind) -> LowRankConfig:
        shared = self.model_dump(include=set(ConversionFields.model_fields))
        return LowRankConfig(**shared, core=core)


class FactorizedConfig(MethodConfig, ConversionFields):
    """Fixed-rank W = U Vᵀ trained by the base optimizer."""

    name: Literal["factorized"] = "factorized"


@register
class Factorized(Method):
    name = "factorized"
    config_class = FactorizedConfig
    config: FactorizedConfig

    def prepare(self, model: nn.Module) -> ConversionReport:
        return convert(model, self.config.low_rank_config("none"))
