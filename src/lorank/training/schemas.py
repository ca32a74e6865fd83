"""Schemas of the run-directory files lorank reads back: ``summary.json``, each record of
``metrics.jsonl``, a checkpoint's ``state.json`` (after its tensors are joined back in) and a
sweep's ``sweep.json``. (``config.json`` is :class:`lorank.training.config.RunConfig` plus its
``format`` and ``resumes``; ``model.json`` is :class:`lorank.core.io.ModelFile`.)

Every file a user can edit, a crash can tear or another program can replace is validated
here before any value in it is used, so a bad file is one line naming the file, the field
and the fix, never a ``KeyError`` deep in the trainer. Files carry a ``format`` version;
files of release 0.1.0, written before it, have none and read as version 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lorank.core.io import validation_message
from lorank.errors import LorankError

SUMMARY_FORMAT = "lorank-summary/1"
CONFIG_FORMAT = "lorank-config/1"
CHECKPOINT_FORMAT = "lorank-checkpoint/1"
SWEEP_FORMAT = "lorank-sweep/1"

# An epoch count or index lorank accepts anywhere (config, checkpoint, metrics).
MAX_EPOCHS = 100_000

Count = Annotated[int, Field(ge=0, strict=True)]
Epoch = Annotated[int, Field(ge=0, le=MAX_EPOCHS, strict=True)]
Number = Annotated[float, Field(strict=False)]  # ints are fine where a float is expected


class _Lenient(BaseModel):
    # Other keys are allowed: methods add their own figures (``method.summary()``).
    model_config = ConfigDict(extra="allow")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, value: Any, info: Any) -> Any:
        # pydantic would read ``true`` as 1; in a file of numbers it means the file is wrong.
        field = cls.model_fields.get(info.field_name)
        if isinstance(value, bool) and field is not None and field.annotation is not bool:
            annotation = str(field.annotation)
            if "bool" not in annotation:
                raise ValueError("a number is expected, not true/false")
        return value


class SummaryFile(_Lenient):
    format: Literal["lorank-summary/1"] | None = None
    status: Literal["running", "completed", "diverged"]
    epochs: Count | None = None
    test_acc: Number | None = None
    test_loss: Number | None = None
    train_loss: Number | None = None
    params_eval: Count | None = None
    params_train: Count | None = None
    params_dense: Count | None = None
    compression: Number | None = None
    ranks: dict[str, Count] | None = None
    train_time_s: Number | None = None
    diverged_epoch: Count | None = None
    diverged_step: Count | None = None
    # lorank compress's figures, read by `lorank report`
    params_eval_before: Count | None = None
    params_eval_after: Count | None = None
    test_acc_before: Number | None = None
    test_acc_after: Number | None = None


class MetricsRecord(_Lenient):
    epoch: Epoch
    train_loss: Number | None = None
    test_loss: Number | None = None
    test_acc: Number | None = None
    test_ppl: Number | None = None
    params_eval: Count | None = None
    params_train: Count | None = None
    params_dense: Count | None = None
    ranks: dict[str, Count] | None = None
    orth_error: dict[str, Number | None] | None = None
    time_s: Number | None = None
    epoch_time_s: Number | None = None
    lr: Number | None = None

    @model_validator(mode="after")
    def _loss_terms_are_numbers(self) -> MetricsRecord:
        # Every loss_* term is averaged and plotted like train_loss.
        for key, value in (self.model_extra or {}).items():
            if key.startswith("loss_") and not (
                value is None or (isinstance(value, int | float) and not isinstance(value, bool))
            ):
                raise ValueError(f"{key} must be a number")
        return self


class SweepEntry(_Lenient):
    name: str | None = None
    dir: str
    status: str
    settings: dict[str, Any] = {}
    seed: Count | None = None


class Published(_Lenient):
    """``[sweep.published]``: numbers from a paper, shown beside ours by ``lorank report``."""

    title: str | None = None
    source: str | None = None
    metric: str | None = None
    rows: list[dict[str, Any]] = []

    @field_validator("rows")
    @classmethod
    def _metrics_are_numbers(cls, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Dotted keys are settings (any value); "method" and "note" are text; the rest are
        # published metrics, which the report formats as numbers.
        for row in rows:
            for key, value in row.items():
                if "." in key or key in ("method", "note"):
                    continue
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, int | float)
                ):
                    raise ValueError(f"published metric {key!r} must be a number or absent")
        return rows


class SweepFile(_Lenient):
    format: Literal["lorank-sweep/1"]
    base: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    seeds: list[Count] = []
    published: Published | None = None
    runs: list[SweepEntry] = []


def validate_file(schema: type[BaseModel], value: Any, path: Path, fix: str) -> Any:
    """``value`` (read from ``path``) validated by ``schema``; a one-line error otherwise."""
    if not isinstance(value, dict):
        raise LorankError(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}")
    try:
        return schema.model_validate(value)
    except ValidationError as e:
        raise LorankError(validation_message(e, str(path), fix)) from None


def valid_record(value: Any) -> bool:
    """Whether one parsed ``metrics.jsonl`` line is a well-formed record."""
    if not isinstance(value, dict):
        return False
    try:
        MetricsRecord.model_validate(value)
    except ValidationError:
        return False
    return True


# ------------------------------------------------------------------ checkpoint state.json


class OptimizerGroup(BaseModel):
    model_config = ConfigDict(extra="allow")

    params: list[str]


class OptimizerState(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    param_groups: list[OptimizerGroup]
    state: dict[str, dict[str, Any]]


class TrainingState(BaseModel):
    """A checkpoint's training state, after :func:`join_tensors` put its tensors back."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    format: Literal["lorank-checkpoint/1"] | None = None
    epoch: Annotated[int, Field(ge=1, le=MAX_EPOCHS, strict=True)]
    train_time: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    optimizer: OptimizerState
    scheduler: dict[str, Any]
    method: dict[str, Any]
    rng: dict[str, Any]
    flops: dict[str, Any] | None = None  # the FLOP meter's counts (absent before issue 25)

    @field_validator("rng")
    @classmethod
    def _rng(cls, rng: dict[str, Any]) -> dict[str, Any]:
        check_rng_state(rng)
        return rng


def _byte_tensor(value: Any, like: torch.Tensor, name: str) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise ValueError(f"rng.{name} must be a uint8 tensor")
    if value.shape != like.shape:
        raise ValueError(f"rng.{name} has shape {tuple(value.shape)}, not {tuple(like.shape)}")


def check_rng_state(rng: dict[str, Any]) -> None:
    """The RNG states' types and sizes: a wrong one would crash, or worse silently reseed."""
    missing = {"python", "numpy", "torch", "data"} - set(rng)
    if missing:
        raise ValueError(f"rng lacks {sorted(missing)[0]!r}")
    python = rng["python"]
    if not (
        isinstance(python, tuple | list)
        and len(python) == 3
        and isinstance(python[0], int)
        and isinstance(python[1], tuple | list)
        and len(python[1]) == 625
        and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in python[1]
        )
        and (python[2] is None or isinstance(python[2], float))
    ):
        raise ValueError("rng.python is not a Python random state (version, 625 words, gauss)")
    numpy = rng["numpy"]
    if not (
        isinstance(numpy, tuple | list)
        and len(numpy) == 5
        and numpy[0] == "MT19937"
        and isinstance(numpy[1], np.ndarray)
        and numpy[1].shape == (624,)
        and numpy[1].dtype == np.uint32
        and isinstance(numpy[2], int)
        and 0 <= numpy[2] <= 624
        and isinstance(numpy[3], int)
        and isinstance(numpy[4], float)
        and math.isfinite(numpy[4])
    ):
        raise ValueError("rng.numpy is not a NumPy MT19937 state")
    reference = torch.get_rng_state()
    _byte_tensor(rng["torch"], reference, "torch")
    _byte_tensor(rng["data"], torch.Generator().get_state(), "data")
    cuda = rng.get("cuda")
    if cuda is not None and not (
        isinstance(cuda, list | tuple) and all(isinstance(t, torch.Tensor) for t in cuda)
    ):
        raise ValueError("rng.cuda must be a list of tensors")
