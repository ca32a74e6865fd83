"""Run directories: the one module that knows their files, writes them atomically and reads
them back (trainer, sweeps, reports, ``lorank compare`` and ``lorank compress`` all use it).

A run directory holds:

* ``config.json`` the resolved config, ``env.json`` versions/device/threads/command line,
* ``metrics.jsonl`` one record per epoch (epoch 0 = before training),
* ``summary.json`` final figures and ``status`` (``running``/``completed``/``diverged``),
* ``model.safetensors`` + ``model.json`` the final model (rebuilds low-rank shapes),
* ``conversion.json`` which layers became low-rank, ``checkpoints/epoch-NNNN/`` to resume.

Readers never raise on a half-written or foreign file: a killed run may leave a torn last
line in ``metrics.jsonl``, and a directory may be a user's, not lorank's.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from lorank.core.io import atomic_write_json, atomic_write_text
from lorank.errors import LorankError, TrainingDiverged

CONFIG = "config.json"
ENV = "env.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONVERSION = "conversion.json"
COMPRESS = "compress.json"  # the options of `lorank compress`
MODEL = "model"  # model.safetensors + model.json, through lorank.save / lorank.load

FINISHED = ("completed", "diverged")

# A training loss this many times that of a uniform guess, ln(classes), means the run blew
# up even when it stayed finite (it then usually collapses to one class: "9.8% accuracy").
EXPLOSION_FACTOR = 3.0
# Prefixes of the regression figures that summary.json carries over from the last evaluation.
REGRESSION_METRICS = ("test_mse", "test_mae", "val_mse", "val_mae")


def default_run_dir(config_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config_name}-{stamp}"


def check_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty run directory unless ``overwrite``."""
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LorankError(
            f"run directory {out} already exists; choose another --out or "
            "pass --overwrite to replace it"
        )


def prepare_run_dir(out: Path, overwrite: bool) -> Path:
    """Create ``out``, replacing an existing one only when ``overwrite``."""
    check_run_dir(out, overwrite)
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LorankError(
            f"cannot create run directory {out} ({e.strerror}); choose a writable --out"
        ) from None
    return out


class Run:
    """A run directory with atomic writers for its files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.log_all()

    def log_all(self) -> None:
        import json

        lines = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write_text(self.path / METRICS, lines)


class SilentRun(Run):
    """The run seen by DDP processes other than rank 0: keeps the records, writes nothing."""

    def write_json(self, name: str, obj: Any) -> None:
        return None  # only rank 0 writes the run directory

    def log_all(self) -> None:
        return None  # only rank 0 writes metrics.jsonl


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (or of the run directory holding one); a torn or
    garbled line (a killed run) is skipped."""
    if path.is_dir():
        path = path / METRICS
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
    return records


def num_classes(path: Path) -> int:
    try:
        meta = json.loads((path / "model.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 10
    return int((meta.get("data_info") or {}).get("num_classes") or 10)


def divergence_epoch(records: Sequence[dict[str, Any]], classes: int) -> int | None:
    """First epoch whose training loss is non-finite or > EXPLOSION_FACTOR·ln(classes)."""
    limit = EXPLOSION_FACTOR * math.log(max(classes, 2))
    for record in records:
        loss = record.get("train_loss")
        if loss is None:
            continue
        if not math.isfinite(loss) or loss > limit:
            return int(record["epoch"])
    return None


def run_summary(path: Path) -> dict[str, Any]:
    """The index entry's figures; ``status`` is ``diverged`` (with ``diverged_epoch``) when
    the loss went non-finite or exploded, even if the trainer finished the run."""
    try:
        summary = json.loads((path / SUMMARY).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    keys = (
        "status",
        "test_acc",
        "test_loss",
        "test_mse",
        "params_eval",
        "params_train",
        "train_time_s",
    )
    out = {k: summary.get(k) for k in keys if k in summary}
    if out.get("status") == "diverged" and summary.get("diverged_epoch") is not None:
        out["diverged_epoch"] = summary["diverged_epoch"]
    elif out.get("status") in FINISHED:
        epoch = divergence_epoch(read_records(path / METRICS), num_classes(path))
        if epoch is not None:
            out["status"] = "diverged"
            out["diverged_epoch"] = epoch
    return out


def run_status(path: Path) -> str:
    """``new`` (no directory), ``completed``/``diverged`` (finished), or ``broken``."""
    if not path.exists():
        return "new"
    try:
        status = json.loads((path / SUMMARY).read_text()).get("status")
    except (OSError, json.JSONDecodeError, AttributeError):
        return "broken"
    return status if status in FINISHED else "broken"


def summarize(records: list[dict[str, Any]], train_time: float, status: str) -> dict[str, Any]:
    last = records[-1]
    evaluated = [r for r in records if "test_loss" in r]
    final = evaluated[-1] if evaluated else last
    summary = {
        "status": status,
        "epochs": last["epoch"],
        "test_acc": final.get("test_acc"),
        "test_loss": final.get("test_loss"),
        "train_loss": last.get("train_loss"),
        "params_eval": last["params_eval"],
        "params_train": last["params_train"],
        "params_dense": last["params_dense"],
        "compression": 1.0 - last["params_eval"] / last["params_dense"],
        "ranks": last["ranks"],
        "train_time_s": train_time,
    }
    if "test_ppl" in final:
        summary["test_ppl"] = final["test_ppl"]
    # Training FLOPs (cumulative), inference FLOPs per sample, energy in joules (measured).
    for key in ("train_flops", "inference_flops", "energy_j"):
        if last.get(key) is not None:
            summary[key] = last[key]
    # Regression (forecasting) figures, on the normalised scale and in original units.
    summary.update({k: v for k, v in final.items() if k.startswith(REGRESSION_METRICS)})
    if summary["test_acc"] is None and "test_mse" in summary:
        del summary["test_acc"]  # a regression task has no accuracy
    return summary


def diverge(
    run: Run, train_time: float, epoch: int, step: int, loss: float, what: str = "the loss"
) -> NoReturn:
    """Stop a run whose loss or parameters are no longer finite: mark it ``diverged``
    (keeping the last good checkpoint and metrics) and raise the one-line error."""
    summary = summarize(run.records, train_time, "diverged") if run.records else {}
    run.write_json(
        SUMMARY,
        summary | {"status": "diverged", "diverged_epoch": epoch, "diverged_step": step},
    )
    raise TrainingDiverged(
        f"training diverged at epoch {epoch}, step {step}: {what} became {loss}; the learning "
        "rate is likely too high (lower optim.lr or set optim.grad_clip); the last good "
        f"checkpoint and metrics are in {run.path}"
    )
