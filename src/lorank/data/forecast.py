"""Time-series forecasting data: CSV series cut into sliding windows, context -> horizon.

A series file is a CSV with a header row (the shared ``timeseries/`` files: an ISO date
column, then numeric columns). From it:

* the chosen ``columns`` become a (T, C) float array; an empty cell is a missing value;
* the time axis is split chronologically into train / validation / test parts (no shuffling
  across the split): the first ``1 - val_fraction - test_fraction`` of the steps, the next
  ``val_fraction``, the last ``test_fraction``;
* each column is normalised with the mean and standard deviation of its *training part
  only*, so no statistic of a later value reaches training;
* a window is ``context`` past steps (input) and the ``horizon`` steps right after them
  (target). A window belongs to the part its target starts in and must end inside it; its
  context may reach back into the previous part, as in the usual forecasting benchmarks
  (those values are the past at prediction time, not a leak);
* missing values are handled as ``missing`` says: ``"skip"`` drops every window with a
  missing value anywhere in it; ``"interpolate"`` fills gaps of the *context* by linear
  interpolation between the context's own observed values (so nothing of the horizon is
  used) and still drops windows whose horizon has a gap, since a made-up target cannot be
  scored.

All windows are built once as in-memory tensors of shape (N, context, C) and (N, horizon, C).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lorank.data.files import _check_file_hash, _locate, _roots_text
from lorank.errors import LorankError

__all__ = [
    "ForecastConfig",
    "ForecastSplits",
    "load_series",
    "make_windows",
    "split_bounds",
    "split_series",
]

# sha256 of the shared timeseries files (see the shared datasets README); a file not listed
# here (the user's own CSV) is read without a check.
_SHA256 = {
    "timeseries/temps-2010-hourly.csv": (
        "da0392e3da7e39138adad4d87802c372134ec834d2e8a2d61dbe305c8797c9c4"
    ),
    "timeseries/co2-weekly.csv": (
        "c81c3530b5079ec397531291a770113dde31613ef3cc319b6ffc95a6d41d0b68"
    ),
    "timeseries/seattle-weather-daily.csv": (
        "f5ae7dee19d689a4e5294ef3d56d8ba04a58afdde756779b35f671d5ba635e80"
    ),
    "timeseries/macrodata-quarterly.csv": (
        "242dee4a4188894324cf152b49e31e1687e359cfdbc2ea5a2f8a69a9d0e1a849"
    ),
}

FORECAST_SPLITS = ("train", "val", "test")


class ForecastConfig(BaseModel):
    """Which series to forecast and how to cut it into windows (``[data.forecast]``)."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(
        "timeseries/temps-2010-hourly.csv",
        description="CSV with a header row: a path relative to a dataset root, or absolute.",
    )
    columns: list[str] = Field(
        default_factory=lambda: ["seattle_temp_f", "san_francisco_temp_f"],
        min_length=1,
        description="Numeric columns to forecast (each one a channel, forecast jointly).",
    )
    context: int = Field(168, ge=1, description="Past steps the model sees.")
    horizon: int = Field(24, ge=1, description="Future steps it predicts.")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of the time steps in the validation part."
    )
    test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Share of the time steps (the last ones) in the test part."
    )
    stride: Annotated[int, Field(ge=1)] = Field(
        1, description="Steps between the starts of consecutive training windows."
    )
    missing: Literal["skip", "interpolate"] = Field(
        "skip",
        description=(
            "Missing values: skip every window holding one, or interpolate gaps inside the "
            "context (windows with a gap in the horizon are always skipped)."
        ),
    )

    @model_validator(mode="after")
    def _fractions_leave_training(self) -> ForecastConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction ({self.val_fraction} + {self.test_fraction}) "
                "must be below 1 to leave a training part"
            )
        return self


def _find(file: str, roots: list[Path]) -> tuple[Path, str | None]:
    """The CSV's path and the key of its known checksum (None for the user's own file)."""
    path = Path(file).expanduser()
    if path.is_absolute():
        if not path.is_file():
            raise LorankError(f"series file {path} does not exist; fix data.forecast.file")
        return path, None
    found = _locate(file, roots)
    if found is None:
        raise LorankError(
            f"series file {file} not found in {_roots_text(roots)}; set data.forecast.file to "
            "a CSV under a dataset root (e.g. timeseries/temps-2010-hourly.csv) or an absolute path"
        )
    return found, file if file in _SHA256 else None


def load_series(file: str, columns: list[str], roots: list[Path]) -> np.ndarray:
    """The ``columns`` of a CSV as a (T, C) float64 array; empty cells become NaN.

    Unknown and non-numeric columns are one-line errors naming the column (and the first
    offending row) and what to pass instead.
    """
    path, known = _find(file, roots)
    if known is not None:
        _check_file_hash(
            path, "sha256", _SHA256[known], "replace it with the copy from the shared datasets"
        )
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise LorankError(f"series file {path} is empty; pass a CSV with a header row")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in columns if c not in header]
    if missing:
        raise LorankError(
            f"column {missing[0]!r} is not in {path.name}; data.forecast.columns must be among "
            f"{', '.join(header)}"
        )
    out = np.empty((len(rows) - 1, len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        k = header.index(col)
        for i, row in enumerate(rows[1:]):
            cell = row[k].strip() if k < len(row) else ""
            if cell == "" or cell.lower() in ("nan", "na"):
                out[i, j] = np.nan
                continue
            try:
                out[i, j] = float(cell)
            except ValueError:
                raise LorankError(
                    f"column {col!r} of {path.name} is not numeric (row {i + 2}: {cell!r}); "
                    "pick numeric columns for data.forecast.columns"
                ) from None
    if len(out) == 0:
        raise LorankError(f"series file {path} has no data rows; pass a CSV with values")
    return out


@dataclass
class ForecastSplits:
    """The windows of each part, normalised, and the statistics used to normalise them."""

    x: dict[str, np.ndarray]
    """Per part: inputs (N, context, C), normalised with the training statistics."""
    y: dict[str, np.ndarray]
    """Per part: targets (N, horizon, C), normalised the same way."""
    target_index: dict[str, np.ndarray]
    """Per part: the time step of each window's first target value (for checks and plots)."""
    mean: np.ndarray
    """(C,) mean of each column over the observed values of the training part."""
    std: np.ndarray
    """(C,) standard deviation of each column over the same values."""
    bounds: tuple[int, int]
    """(first validation step, first test step)."""


def split_bounds(n: int, cfg: ForecastConfig) -> tuple[int, int]:
    """(first validation step, first test step) of a series of ``n`` steps."""
    test_start = n - round(n * cfg.test_fraction)
    val_start = test_start - round(n * cfg.val_fraction)
    return val_start, test_start


def _interpolate_context(window: np.ndarray) -> np.ndarray | None:
    """Fill a context's gaps per column from its own observed values; None if a column has
    none (nothing to interpolate from). Values before/after the first/last observation take
    that observation's value."""
    out = window.copy()
    steps = np.arange(len(window))
    for c in range(window.shape[1]):
        col = window[:, c]
        seen = ~np.isnan(col)
        if not seen.any():
            return None
        if not seen.all():
            out[:, c] = np.interp(steps, steps[seen], col[seen])
    return out


def make_windows(
    values: np.ndarray,
    starts: np.ndarray,
    context: int,
    horizon: int,
    missing: Literal["skip", "interpolate"],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows whose target begins at each step of ``starts``: (x, y, kept starts).

    ``x[i] = values[t - context : t]`` and ``y[i] = values[t : t + horizon]`` for the i-th
    kept ``t``; windows with missing values are dropped or (context only) interpolated.
    """
    if len(starts) == 0:
        shape = values.shape[1]
        return np.empty((0, context, shape)), np.empty((0, horizon, shape)), starts
    x = values[starts[:, None] - context + np.arange(context)]
    y = values[starts[:, None] + np.arange(horizon)]
    keep = ~np.isnan(y).any(axis=(1, 2))
    gappy = np.isnan(x).any(axis=(1, 2))
    if missing == "skip":
        keep &= ~gappy
    else:
        for i in np.flatnonzero(gappy & keep):
            filled = _interpolate_context(x[i])
            if filled is None:
                keep[i] = False
            else:
                x[i] = filled
    return x[keep], y[keep], starts[keep]


def split_series(values: np.ndarray, cfg: ForecastConfig, name: str = "series") -> ForecastSplits:
    """Split, normalise (training statistics only) and window a (T, C) series."""
    n = len(values)
    val_start, test_start = split_bounds(n, cfg)
    ctx, hor = cfg.context, cfg.horizon
    if n - test_start < hor:
        raise LorankError(
            f"horizon {hor} is longer than the test part of {name} ({n - test_start} steps); "
            "lower data.forecast.horizon or raise data.forecast.test_fraction"
        )
    if val_start - ctx - hor + 1 < 1:
        raise LorankError(
            f"context {ctx} + horizon {hor} do not fit the training part of {name} "
            f"({val_start} steps); lower data.forecast.context or horizon"
        )
    train = values[:val_start]
    seen = ~np.isnan(train)
    if not seen.any(axis=0).all():
        col = int(np.flatnonzero(~seen.any(axis=0))[0])
        raise LorankError(
            f"column {cfg.columns[col]!r} of {name} has no value in the training part; "
            "pick another column"
        )
    mean = np.nanmean(train, axis=0)
    std = np.nanstd(train, axis=0)
    # A constant column would divide by zero; leave its scale alone instead.
    std = np.where(std > 0, std, 1.0)
    normed = (values - mean) / std
    ranges = {
        "train": np.arange(ctx, val_start - hor + 1, cfg.stride),
        "val": np.arange(max(val_start, ctx), test_start - hor + 1),
        "test": np.arange(max(test_start, ctx), n - hor + 1),
    }
    xs, ys, idx = {}, {}, {}
    for part, starts in ranges.items():
        xs[part], ys[part], idx[part] = make_windows(normed, starts, ctx, hor, cfg.missing)
    for part in ("train", "test"):
        if len(xs[part]) == 0:
            raise LorankError(
                f"the {part} part of {name} has no window without missing values; use "
                "data.forecast.missing = 'interpolate' or a shorter context"
            )
    return ForecastSplits(
        x={k: v.astype(np.float32) for k, v in xs.items()},
        y={k: v.astype(np.float32) for k, v in ys.items()},
        target_index=idx,
        mean=mean,
        std=std,
        bounds=(val_start, test_start),
    )
