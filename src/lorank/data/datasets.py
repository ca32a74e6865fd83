"""Datasets as in-memory tensors: every split lives on the training device as one tensor.

The datasets used here are small (at most ~180 MB of uint8 pixels), so holding them on the
device and batching by indexing is both simpler and much faster than a ``DataLoader`` with
worker processes, and it makes an epoch a pure function of one ``torch.Generator``.

Files are looked up in the dataset roots (``--data-dir``/``DataConfig.dir``, ``$LORANK_DATA``,
``~/.cache/lorank``), verified against known checksums before use, and downloaded into the
first writable root when absent and the network is reachable.

Long because it holds the in-memory dataset class of every task (classification, language
model, forecasting) and their shared batching.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from lorank.data.files import data_roots, load_cifar10, load_idx_dataset, load_text
from lorank.data.forecast import FORECAST_SPLITS, ForecastConfig, load_series, split_series
from lorank.errors import LorankError

__all__ = [
    "DataConfig",
    "Dataset",
    "DatasetInfo",
    "ForecastData",
    "LanguageModelData",
    "ClassificationData",
    "data_roots",
    "load_dataset",
]

# Per-channel pixel mean and std on the 0..1 scale, from each training set.
_NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

# Augmentation per dataset: (zero padding of the random crop, random horizontal flip).
# Digits must not be mirrored, and 28x28 images get a proportionally smaller shift.
_AUGMENT = {"cifar10": (4, True), "mnist": (2, False), "fashion-mnist": (2, False)}

_SPLITS = ("train", "test")

DatasetName = Literal[
    "mnist", "fashion-mnist", "cifar10", "tinyshakespeare", "synthetic", "forecast"
]


class DataConfig(BaseModel):
    """Which dataset to train on and how to batch it."""

    model_config = ConfigDict(extra="forbid")

    name: DatasetName = Field("mnist", description="Dataset to load.")
    dir: str | None = Field(
        None,
        description="Dataset root searched first (then $LORANK_DATA, then ~/.cache/lorank).",
    )
    batch_size: int = Field(128, ge=1, description="Training batch size.")
    eval_batch_size: int = Field(
        1000, ge=1, description="Batch size for evaluation; larger is faster and uses no grads."
    )
    train_subset: int | None = Field(
        None,
        ge=1,
        description="Use only the first N training samples (LM: windows), e.g. for fast tests.",
    )
    test_subset: int | None = Field(
        None, ge=1, description="Use only the first N test samples (LM: windows)."
    )
    augment: bool | None = Field(
        None,
        description=(
            "Random-crop (+ flip for CIFAR-10) augmentation of training batches; "
            "None means the dataset's default (on for cifar10 only)."
        ),
    )
    block_size: int = Field(128, ge=2, description="Context length of language-model windows.")
    synthetic_train: int = Field(2048, ge=1, description="Synthetic: number of training samples.")
    synthetic_test: int = Field(512, ge=1, description="Synthetic: number of test samples.")
    synthetic_shape: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [20],
        min_length=1,
        description="Synthetic: shape of one input, e.g. [20] for vectors or [1, 8, 8] for images.",
    )
    synthetic_classes: int = Field(4, ge=2, description="Synthetic: number of classes.")
    synthetic_seed: int = Field(
        0, ge=0, description="Synthetic: seed; the same seed always gives the same data."
    )
    forecast: ForecastConfig = Field(
        default_factory=ForecastConfig,
        description="Forecast: the series file, its columns and the window sizes.",
    )


@dataclass
class DatasetInfo:
    """What a model needs to know about its data; JSON-serialisable via ``dataclasses.asdict``."""

    name: str
    task: Literal["classification", "language_model", "forecast"]
    input_shape: tuple[int, ...]
    """Shape of one sample: (C, H, W) for images, (block_size,) for the language model,
    (context, channels) for forecasting."""
    num_classes: int
    """Number of classes; the vocabulary size for the language model; 0 for forecasting."""
    vocab: str | None
    """The language model's characters in sorted order (token id = index); None otherwise."""
    train_size: int
    """Training samples, or windows per epoch for the language model."""
    test_size: int
    horizon: int | None = None
    """Forecasting: future steps per window (targets are (horizon, channels)); else None."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        """Rebuild from ``asdict`` output read back from JSON (where tuples became lists)."""
        return cls(**{**d, "input_shape": tuple(d["input_shape"])})


def _synthetic(cfg: DataConfig) -> dict[str, np.ndarray]:
    """A seeded Gaussian-mixture classification problem (two clusters per class).

    Cluster centres have norm 6 and the noise norm is at most 8 whatever the input size, so a
    small MLP separates the classes (>90% test accuracy within a few epochs) even when the
    input has more dimensions than there are samples. Two clusters per class keep it from
    being a single linear template per class. Inputs are then rescaled to unit variance per
    coordinate, like normalised real data. (Inputs of only a few dimensions cannot hold the
    clusters apart, so their accuracy ceiling is lower.)
    """
    dim = math.prod(cfg.synthetic_shape)
    seeds = np.random.SeedSequence(cfg.synthetic_seed).generate_state(3)
    g_centres, g_train, g_test = (torch.Generator().manual_seed(int(s)) for s in seeds)
    radius, noise = 6.0, min(1.0, 8.0 / math.sqrt(dim))
    centres = torch.randn(cfg.synthetic_classes * 2, dim, generator=g_centres)
    centres *= radius / math.sqrt(dim)
    scale = math.sqrt(dim / (radius**2 + noise**2 * dim))

    def draw(n: int, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        cluster = torch.randint(0, len(centres), (n,), generator=g)
        x = (centres[cluster] + noise * torch.randn(n, dim, generator=g)) * scale
        y = cluster % cfg.synthetic_classes
        return x.reshape(n, *cfg.synthetic_shape).numpy(), y.numpy()

    train_x, train_y = draw(cfg.synthetic_train, g_train)
    test_x, test_y = draw(cfg.synthetic_test, g_test)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


# --------------------------------------------------------------------------------------------
# Datasets


def _batched_ranges(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


class Dataset(ABC):
    """A dataset held on ``device`` with deterministic epoch iteration.

    Subclasses provide the split tensors; all batching is by tensor indexing, never a Python
    loop over samples.
    """

    info: DatasetInfo
    device: torch.device
    batch_size: int
    eval_batch_size: int

    eval_splits: tuple[str, ...] = ("test",)
    """The splits the trainer evaluates each time (``test`` last)."""
    target_std: Tensor | None = None
    """Regression: per-channel scale that turns a normalised error into original units."""

    @property
    def num_train_batches(self) -> int:
        """Batches in one epoch of ``train_batches`` (the last partial batch counts)."""
        return math.ceil(self.info.train_size / self.batch_size)

    def num_eval_batches(self, split: str = "test") -> int:
        """Batches that ``eval_batches(split)`` yields."""
        return math.ceil(self._split_size(split) / self.eval_batch_size)

    def _split_size(self, split: str) -> int:
        if split == "train":
            return self.info.train_size
        if split == "test":
            return self.info.test_size
        raise LorankError(f"unknown split {split!r}; use 'train' or 'test'")

    @abstractmethod
    def train_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled (and, if enabled, augmented) epoch; a function of the generator state."""

    @abstractmethod
    def _batch(self, split: str, index: Tensor | slice) -> tuple[Tensor, Tensor]:
        """The un-augmented samples ``index`` of ``split``, ready for the model."""

    def eval_batches(self, split: str = "test") -> Iterator[tuple[Tensor, Tensor]]:
        """The whole split in order, in batches of ``eval_batch_size``, without augmentation."""
        n = self._split_size(split)
        for s in _batched_ranges(n, self.eval_batch_size):
            yield self._batch(split, s)

    def train_subset_batches(
        self, n: int, batch_size: int | None = None
    ) -> list[tuple[Tensor, Tensor]]:
        """The first ``n`` training samples as a fixed list of batches.

        Loss-based rank searches compare many candidate ranks on the same data, so this is
        deliberately not shuffled or augmented.
        """
        n = min(n, self.info.train_size)
        bs = batch_size or self.batch_size
        return [self._batch("train", s) for s in _batched_ranges(n, bs)]


def _as_tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class ClassificationData(Dataset):
    """Inputs and integer labels; images are stored as uint8 and normalised per batch.

    Keeping pixels as uint8 takes a quarter of the memory, and lets the crop augmentation pad
    with black pixels exactly as the usual CIFAR recipe does.
    """

    def __init__(
        self,
        info: DatasetInfo,
        arrays: dict[str, np.ndarray],
        device: torch.device,
        batch_size: int,
        eval_batch_size: int,
        normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        augment: tuple[int, bool] | None = None,
    ) -> None:
        self.info = info
        self.device = device
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        # Read-only cached buffers (e.g. decoded IDX) are copied; nothing here writes to them.
        self._x = {s: _as_tensor(arrays[f"{s}_x"]).to(device) for s in _SPLITS}
        self._y = {
            s: torch.from_numpy(arrays[f"{s}_y"].astype(np.int64)).to(device) for s in _SPLITS
        }
        self._augment = augment
        self._padded: Tensor | None = None
        if augment is not None:
            # Pad the training images once; the unpadded split is a view into the padded one.
            pad = augment[0]
            self._padded = torch.nn.functional.pad(self._x["train"], (pad,) * 4)
            self._x["train"] = self._padded[:, :, pad:-pad, pad:-pad]
        self._scale: Tensor | None = None
        self._shift: Tensor | None = None
        if normalisation is not None:
            # (x / 255 - mean) / std  ==  x * scale - shift
            mean = torch.tensor(normalisation[0], device=device).view(1, -1, 1, 1)
            std = torch.tensor(normalisation[1], device=device).view(1, -1, 1, 1)
            self._scale = 1.0 / (255.0 * std)
            self._shift = mean / std

    def _prepare(self, x: Tensor) -> Tensor:
        if self._scale is None or self._shift is None:
            return x
        return x.float().mul_(self._scale).sub_(self._shift)

    def _batch(self, split: str, index: Tensor | slice) -> tuple[Tensor, Tensor]:
        return self._prepare(self._x[split][index]), self._y[split][index]

    def train_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.info.train_size
        perm = torch.randperm(n, generator=generator).to(self.device)
        for s in _batched_ranges(n, self.batch_size):
            idx = perm[s]
            if self._augment is not None and self._padded is not None:
                x = _random_crop_flip(self._padded[idx], *self._augment, generator=generator)
            else:
                x = self._x["train"][idx]
            yield self._prepare(x), self._y["train"][idx]


def _random_crop_flip(padded: Tensor, pad: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Per-sample random crop of an already zero-padded batch, plus optional horizontal flip.

    Vectorised as one ``gather``: each sample's crop is a set of flat pixel indices into its
    padded image (row offset, column offset, columns reversed when flipped), so the cost does
    not depend on how many different offsets the batch has.
    """
    b, c, hp, wp = padded.shape
    h, w = hp - 2 * pad, wp - 2 * pad
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    mirrored = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=bool)
    rows = offsets[0, :, None] + torch.arange(h)  # (b, h)
    cols = offsets[1, :, None] + torch.arange(w)  # (b, w)
    cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    pixels = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).to(padded.device)
    out = padded.reshape(b, c, hp * wp).gather(2, pixels.expand(b, c, h * w))
    return out.reshape(b, c, h, w)


class LanguageModelData(Dataset):
    """Character-level next-token prediction over windows of ``block_size`` tokens.

    Each epoch starts at a random offset in [0, block_size) and cuts the training text into
    non-overlapping windows, so over epochs the model sees every window alignment while one
    epoch still covers the text once. Evaluation uses fixed windows from offset 0.
    """

    def __init__(
        self,
        info: DatasetInfo,
        train_tokens: Tensor,
        test_tokens: Tensor,
        block_size: int,
        batch_size: int,
        eval_batch_size: int,
    ) -> None:
        self.info = info
        self.device = train_tokens.device
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.block_size = block_size
        self._tokens = {"train": train_tokens, "test": test_tokens}
        self._window = torch.arange(block_size + 1, device=self.device)

    def _windows(self, split: str, starts: Tensor) -> tuple[Tensor, Tensor]:
        chunk = self._tokens[split][starts[:, None] + self._window]
        return chunk[:, :-1], chunk[:, 1:]

    def _batch(self, split: str, index: Tensor | slice) -> tuple[Tensor, Tensor]:
        if isinstance(index, slice):
            index = torch.arange(index.start, index.stop, device=self.device)
        return self._windows(split, index * self.block_size)

    def train_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        offset = int(torch.randint(0, self.block_size, (1,), generator=generator))
        perm = torch.randperm(self.info.train_size, generator=generator).to(self.device)
        for s in _batched_ranges(self.info.train_size, self.batch_size):
            yield self._windows("train", offset + perm[s] * self.block_size)


class ForecastData(Dataset):
    """Forecasting windows (context -> horizon) of a series, built by
    :mod:`lorank.data.forecast`; inputs (B, context, C) and targets (B, horizon, C), both
    normalised with the training part's statistics.

    ``target_std`` (C,) turns an error on the normalised scale back into the series' units.
    """

    eval_splits = ("val", "test")

    def __init__(
        self,
        info: DatasetInfo,
        x: dict[str, Tensor],
        y: dict[str, Tensor],
        mean: Tensor,
        std: Tensor,
        batch_size: int,
        eval_batch_size: int,
    ) -> None:
        self.info = info
        self.device = x["train"].device
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self._x, self._y = x, y
        self.target_mean, self.target_std = mean, std
        if len(x["val"]) == 0:
            self.eval_splits = ("test",)

    def _split_size(self, split: str) -> int:
        if split not in self._x:
            raise LorankError(f"unknown split {split!r}; use one of {', '.join(FORECAST_SPLITS)}")
        return len(self._x[split])

    def _batch(self, split: str, index: Tensor | slice) -> tuple[Tensor, Tensor]:
        return self._x[split][index], self._y[split][index]

    def train_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.info.train_size
        perm = torch.randperm(n, generator=generator).to(self.device)
        for s in _batched_ranges(n, self.batch_size):
            idx = perm[s]
            yield self._x["train"][idx], self._y["train"][idx]


# --------------------------------------------------------------------------------------------
# Entry point


def _load_forecast(cfg: DataConfig, roots: list[Path], device: torch.device) -> Dataset:
    fc = cfg.forecast
    values = load_series(fc.file, fc.columns, roots)
    splits = split_series(values, fc, name=Path(fc.file).name)
    limits = {"train": cfg.train_subset, "val": cfg.test_subset, "test": cfg.test_subset}
    x = {k: torch.from_numpy(v[: limits[k]]).to(device) for k, v in splits.x.items()}
    y = {k: torch.from_numpy(v[: limits[k]]).to(device) for k, v in splits.y.items()}
    info = DatasetInfo(
        name=cfg.name,
        task="forecast",
        input_shape=(fc.context, len(fc.columns)),
        num_classes=0,
        vocab=None,
        train_size=len(x["train"]),
        test_size=len(x["test"]),
        horizon=fc.horizon,
    )
    mean = torch.tensor(splits.mean, dtype=torch.float32, device=device)
    std = torch.tensor(splits.std, dtype=torch.float32, device=device)
    return ForecastData(info, x, y, mean, std, cfg.batch_size, cfg.eval_batch_size)


def _subset(arrays: dict[str, np.ndarray], cfg: DataConfig) -> dict[str, np.ndarray]:
    out = dict(arrays)
    for split, n in (("train", cfg.train_subset), ("test", cfg.test_subset)):
        if n is not None:
            out[f"{split}_x"] = arrays[f"{split}_x"][:n]
            out[f"{split}_y"] = arrays[f"{split}_y"][:n]
    return out


def _load_language_model(cfg: DataConfig, roots: list[Path], device: torch.device) -> Dataset:
    text = load_text(roots)
    vocab = "".join(sorted(set(text)))
    lookup = np.zeros(max(map(ord, vocab)) + 1, dtype=np.int64)
    lookup[[ord(ch) for ch in vocab]] = np.arange(len(vocab))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    tokens = torch.from_numpy(lookup[codes])
    split = int(0.9 * len(tokens))
    train, test = tokens[:split], tokens[split:]
    block = cfg.block_size
    # Windows per epoch: enough that every offset in [0, block) still fits the last target.
    n_train = (len(train) - block) // block
    n_test = (len(test) - 1) // block
    if cfg.train_subset is not None:
        n_train = min(n_train, cfg.train_subset)
        train = train[: (n_train + 1) * block]
    if cfg.test_subset is not None:
        n_test = min(n_test, cfg.test_subset)
    if n_train < 1 or n_test < 1:
        raise LorankError(
            f"block_size {block} is too large for tinyshakespeare; use a smaller data.block_size"
        )
    info = DatasetInfo(
        name=cfg.name,
        task="language_model",
        input_shape=(block,),
        num_classes=len(vocab),
        vocab=vocab,
        train_size=n_train,
        test_size=n_test,
    )
    return LanguageModelData(
        info, train.to(device), test.to(device), block, cfg.batch_size, cfg.eval_batch_size
    )


def load_dataset(
    cfg: DataConfig,
    device: torch.device | str = "cpu",
    data_dir: str | Path | None = None,
) -> Dataset:
    """Load, verify and place a dataset on ``device``; ``data_dir`` (--data-dir) beats cfg.dir."""
    device = torch.device(device)
    roots = data_roots(data_dir if data_dir is not None else cfg.dir)
    if cfg.name == "tinyshakespeare":
        if cfg.augment:
            raise LorankError("augment is not available for tinyshakespeare; set augment: false")
        return _load_language_model(cfg, roots, device)

    if cfg.name == "forecast":
        if cfg.augment:
            raise LorankError("augment is not available for forecast; set augment: false")
        return _load_forecast(cfg, roots, device)
    if cfg.name == "synthetic":
        arrays = _synthetic(cfg)
    elif cfg.name == "cifar10":
        arrays = load_cifar10(roots)
    else:
        arrays = load_idx_dataset(cfg.name, roots)
    arrays = _subset(arrays, cfg)

    augment = cfg.augment if cfg.augment is not None else cfg.name == "cifar10"
    if augment and cfg.name not in _AUGMENT:
        raise LorankError(
            f"augment is only available for {', '.join(_AUGMENT)}; set augment: false for "
            f"{cfg.name}"
        )
    num_classes = cfg.synthetic_classes if cfg.name == "synthetic" else 10
    info = DatasetInfo(
        name=cfg.name,
        task="classification",
        input_shape=tuple(int(d) for d in arrays["train_x"].shape[1:]),
        num_classes=num_classes,
        vocab=None,
        train_size=len(arrays["train_y"]),
        test_size=len(arrays["test_y"]),
    )
    return ClassificationData(
        info,
        arrays,
        device,
        cfg.batch_size,
        cfg.eval_batch_size,
        normalisation=_NORMALISATION.get(cfg.name),
        augment=_AUGMENT[cfg.name] if augment else None,
    )
