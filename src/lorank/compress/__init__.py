"""Post-training compression: truncated SVD of a trained model (plain or activation-aware),
rank selection by rule, budget allocation or loss tolerance, error-propagation-aware
truncation, closed-form refits and distillation on unlabeled data.

The in-memory core, like ``torchao.quantize_(model, config)``::

    import lorank
    from lorank.compress import BudgetRanks, CompressConfig

    report = lorank.compress(model, CompressConfig(svd="activation",
                             ranks=BudgetRanks(budget=0.5)), calibration=batches)

(``lorank.compress(...)`` is :func:`compress_model`; the package is callable.) The parts:
``config`` (the options), ``api`` (the core), ``calibration`` (second moments,
activation-aware SVD), ``allocation`` (ranks under a budget), ``propagation`` (layer-by-layer
truncation and refit), ``distill``, ``outputs`` (output distances), ``surgery`` (writing
factors), ``sources`` and ``calibration_files`` (loading models and calibration files),
``pipeline`` (path in, run directory out: ``lorank compress``).

``from lorank.compress import compress`` is the path-based function, as before the package
existed.
"""

import sys
import types
from typing import Any

from lorank.compress.api import CompressionReport, compress_model
from lorank.compress.config import (
    BudgetRanks,
    CompressConfig,
    DistillFinetune,
    EpochFinetune,
    RuleRanks,
    ToleranceRanks,
)
from lorank.compress.pipeline import (
    apply_ranks,
    calibration_file_batches,
    compress,
    load_huggingface_compressed,
    load_source,
)

__all__ = [
    "BudgetRanks",
    "CompressConfig",
    "CompressionReport",
    "DistillFinetune",
    "EpochFinetune",
    "RuleRanks",
    "ToleranceRanks",
    "apply_ranks",
    "calibration_file_batches",
    "compress",
    "compress_model",
    "load_huggingface_compressed",
    "load_source",
]


class _CallableModule(types.ModuleType):
    """Makes ``lorank.compress(model, config, calibration=...)`` call :func:`compress_model`."""

    def __call__(self, *args: Any, **kwargs: Any) -> CompressionReport:
        return compress_model(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
