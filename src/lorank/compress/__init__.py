"""Post-training compression: truncated SVD of a trained model (plain or activation-aware),
rank selection by rule, budget allocation or loss tolerance, optional fine-tuning.

``from lorank.compress import compress`` keeps working from before the package existed.
"""

from lorank.compress.pipeline import (
    apply_ranks,
    calibration_file_batches,
    compress,
    load_huggingface_compressed,
    load_source,
)

__all__ = [
    "apply_ranks",
    "calibration_file_batches",
    "compress",
    "load_huggingface_compressed",
    "load_source",
]
