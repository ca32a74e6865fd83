"""Data: dataset files on disk (:mod:`lorank.data.files`: lookup, checksums, downloads,
decoding), time series cut into forecasting windows (:mod:`lorank.data.forecast`) and the
in-memory datasets built from them (:mod:`lorank.data.datasets`)."""

from lorank.data.datasets import (
    ClassificationData,
    DataConfig,
    Dataset,
    DatasetInfo,
    ForecastData,
    LanguageModelData,
    load_dataset,
)
from lorank.data.files import data_roots
from lorank.data.forecast import ForecastConfig

__all__ = [
    "ClassificationData",
    "DataConfig",
    "ForecastConfig",
    "Dataset",
    "DatasetInfo",
    "ForecastData",
    "LanguageModelData",
    "data_roots",
    "load_dataset",
]
