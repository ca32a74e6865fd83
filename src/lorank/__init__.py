"""lorank: low-rank training and low-rank compression of neural networks in PyTorch.

The public API::

    import lorank
    report = lorank.convert(model, lorank.LowRankConfig(method="svd", rank=0.25))
    report = lorank.compress(model, lorank.CompressConfig(svd="activation",
                             ranks=lorank.compress.BudgetRanks(budget=0.5)), calibration=batches)
    lorank.merge(model)                       # back to the original dense layers
    lorank.save(model, "ckpt/model"); model = lorank.load("ckpt/model", model)

The package, bottom to top; each part imports only the parts above it in this list
(``tests/test_layout.py`` parses every import to keep it so):

- ``lorank.errors``: ``LorankError``, the one-line error every part raises for bad input.
- ``lorank.core``: low-rank layers, attention, the conversion planner (``convert``/``merge``),
  rank rules, layer spectra and the loss-bounded search, regularizers, ``swap_parameters``,
  ``save``/``load``, parameter counts. Knows no method, model, dataset or trainer.
- ``lorank.data``: dataset files (lookup, checksums, decoding) and in-memory datasets.
- ``lorank.models``: the model zoo (MLP, LeNet-5, ResNet-20, VGG, ViT, char transformer).
- ``lorank.methods``: one file per training method behind the hook protocol of
  ``methods/base.py``, and the registry every list of methods is read from.
- ``lorank.training``: run config, the trainer (which names no method), checkpoints, run
  directories, evaluation, ``torchrun`` support.
- ``lorank.compress``: post-training compression (SVD kinds, calibration, allocation).
- ``lorank.experiments``: sweeps, ``lorank compare`` and reports.
- ``lorank.integrations``: hooks for plain PyTorch loops, Lightning and Hugging Face.
- ``lorank.cli``: the ``lorank`` command, which only maps arguments to the parts above.
"""

__version__ = "0.2.0.dev0"

from lorank import _compat
from lorank import methods as _methods  # noqa: F401  (registers the methods and their cores)
from lorank import models as _models  # noqa: F401  (registers the zoo with lorank.load)
from lorank.core.attention import LowRankMultiheadAttention
from lorank.core.convert import ConversionReport, LowRankConfig, convert, low_rank_layers, merge
from lorank.core.io import load, save
from lorank.core.layers import (
    LowRankConv1d,
    LowRankConv2d,
    LowRankEmbedding,
    LowRankLayer,
    LowRankLinear,
)
from lorank.core.rank import RankRule
from lorank.errors import LorankError

_compat.install()  # old module paths (lorank.optim, lorank.calibration, ...) keep working


def __getattr__(name: str) -> object:
    # lorank.compress (a callable package) and its config are imported on first use: they
    # pull in the trainer, which ``import lorank`` alone should not.
    if name in ("compress", "CompressConfig", "compress_model"):
        import importlib

        module = importlib.import_module("lorank.compress")
        return module if name == "compress" else getattr(module, name)
    raise AttributeError(f"module 'lorank' has no attribute {name!r}")


# lorank.compress, lorank.CompressConfig and lorank.compress_model are public too, imported on
# first use (module __getattr__ below), so they are not listed for `import *`.
__all__ = [
    "ConversionReport",
    "LorankError",
    "LowRankConfig",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankEmbedding",
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
