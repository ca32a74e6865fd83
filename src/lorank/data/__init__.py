"""Data: dataset files on disk (:mod:`lorank.data.files`: lookup, checksums, downloads,
decoding) and the in-memory datasets built from them (:mod:`lorank.data.datasets`)."""

from lorank.data.datasets import (
    ClassificationData,
    DataConfig,
    Dataset,
    DatasetInfo,
    LanguageModelData,
    load_dataset,
)
from lorank.data.files import data_roots

__all__ = [
    "ClassificationData",
    "DataConfig",
    "Dataset",
    "DatasetInfo",
    "LanguageModelData",
    "data_roots",
    "load_dataset",
]
