"""lorank: low-rank training and low-rank compression of neural networks in PyTorch.

The public API::

    import lorank
    report = lorank.convert(model, lorank.LowRankConfig(method="svd", rank=0.25))
    lorank.merge(model)                       # back to plain nn.Linear / nn.Conv2d
    lorank.save(model, "ckpt/model"); model = lorank.load("ckpt/model", model)
"""

__version__ = "0.1.0"

from lorank.core.attention import LowRankMultiheadAttention
from lorank.core.convert import ConversionReport, LowRankConfig, convert, low_rank_layers, merge
from lorank.core.io import load, save
from lorank.core.layers import LowRankConv2d, LowRankLayer, LowRankLinear
from lorank.core.rank import RankRule
from lorank.errors import LorankError

__all__ = [
    "ConversionReport",
    "LorankError",
    "LowRankConfig",
    "LowRankConv2d",
    "LowRankLayer",
    "LowRankLinear",
    "LowRankMultiheadAttention",
    "RankRule",
    "__version__",
    "convert",
    "load",
    "low_rank_layers",
    "merge",
    "save",
]
