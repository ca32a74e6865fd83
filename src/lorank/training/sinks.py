"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard, CSV and Weights & Biases
(offline), chosen in the ``[log]`` config section.

Every sink receives the same scalars: each epoch record of ``metrics.jsonl`` flattened
(``ranks`` → ``rank/<layer>``, ``orth_error`` → ``orth_error/<layer>``; the method's own
values, e.g. OIALR's and hybrid's switch events, are in the record already), and every
``every_steps`` optimizer steps the step's losses and learning rate under ``step/``. The
TensorBoard and W&B sinks also get a histogram of each low-rank layer's singular values every
``spectra_every`` epochs. Sinks are written only by the main process and never change what a
run computes.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lorank.core.io import atomic_write_text
from lorank.core.metrics import low_rank_spectra
from lorank.errors import LorankError

TENSORBOARD_DIR = "tensorboard"
CSV_FILE = "metrics.csv"
WANDB_DIR = "wandb"


class LogConfig(BaseModel):
    """Logging sinks besides metrics.jsonl (TensorBoard, CSV, W&B offline)."""

    model_config = ConfigDict(extra="forbid")

    tensorboard: bool = Field(
        False,
        description="TensorBoard event files in RUN/tensorboard (pip install tensorboard)",
    )
    csv: bool = Field(False, description="write RUN/metrics.csv, one row per epoch")
    wandb: bool = Field(
        False,
        description="Weights & Biases, offline mode, in RUN/wandb (pip install wandb)",
    )
    every_steps: int = Field(
        50, ge=0, description="log the step's losses and lr every N optimizer steps (0: never)"
    )
    spectra_every: int = Field(
        1,
        ge=0,
        description="singular-value histograms of low-rank layers every N epochs (0 never)",
    )


def flatten_record(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of an epoch record, with per-layer dicts flattened to ``key/layer``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            prefix = "rank" if key == "ranks" else key
            for layer, v in value.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"{prefix}/{layer}"] = float(v)
        elif isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, int | float) and value is not None:
            out[key] = float(value)
    return out


class Sink:
    """A destination for scalars; the base class drops everything."""

    wants_spectra = False  # histograms cost an SVD per layer: computed only if a sink draws them

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        pass

    def log_spectra(self, epoch: int, spectra: dict[str, list[float]]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink(Sink):
    wants_spectra = True

    def __init__(self, path: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LorankError(
                "log.tensorboard = true needs the tensorboard package: "
                "pip install 'lorank[tensorboard]' (or set log.tensorboard = false)"
            ) from None
        self.writer = SummaryWriter(log_dir=str(path))

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(f"step/{key}", value, step)

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def log_spectra(self, epoch: int, spectra: dict[str, list[float]]) -> None:
        import numpy as np

        for layer, sigma in spectra.items():
            if sigma:
                self.writer.add_histogram(f"singular_values/{layer}", np.asarray(sigma), epoch)

    def close(self) -> None:
        self.writer.close()


class CsvSink(Sink):
    """One row per epoch; the header is the union of every record's keys (ranks may appear
    and vanish), so the file is rewritten whole and atomically each epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []
        if path.is_file():  # a resumed run continues its file
            with path.open(newline="") as f:
                self.rows = [
                    {k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)
                ]

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        self.rows = [r for r in self.rows if r.get("epoch") != epoch] + [scalars]
        columns = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, text.getvalue())


class WandbSink(Sink):
    wants_spectra = True

    def __init__(self, path: Path, name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise LorankError(
                "log.wandb = true needs the wandb package: pip install wandb "
                "(or set log.wandb = false)"
            ) from None
        path.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(mode="offline", dir=str(path), name=name, config=config)

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({f"step/{k}": v for k, v in scalars.items()} | {"step": step})

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars)

    def log_spectra(self, epoch: int, spectra: dict[str, list[float]]) -> None:
        self.run.log(
            {f"singular_values/{k}": self.wandb.Histogram(v) for k, v in spectra.items() if v}
            | {"epoch": epoch}
        )

    def close(self) -> None:
        self.run.finish()


def check_sinks(config: LogConfig) -> None:
    """Fail before a run starts when a sink it asks for cannot be made."""
    for wanted, module, extra in (
        (config.tensorboard, "torch.utils.tensorboard", "'lorank[tensorboard]'"),
        (config.wandb, "wandb", "wandb"),
    ):
        if not wanted:
            continue
        try:
            __import__(module)
        except ImportError:
            name = module.split(".")[-1]
            raise LorankError(
                f"log.{name} = true needs the {name} package: pip install {extra} "
                f"(or set log.{name} = false)"
            ) from None


class Sinks:
    """The sinks a run's ``[log]`` section asks for, fed by the trainer."""

    def __init__(self, config: LogConfig, run_dir: Path, run_config: dict[str, Any]) -> None:
        self.config = config
        self.sinks: list[Sink] = []
        if config.tensorboard:
            self.sinks.append(TensorBoardSink(run_dir / TENSORBOARD_DIR))
        if config.csv:
            self.sinks.append(CsvSink(run_dir / CSV_FILE))
        if config.wandb:
            self.sinks.append(WandbSink(run_dir / WANDB_DIR, run_dir.name, run_config))

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def wants_step(self, step: int) -> bool:
        return (
            bool(self.sinks) and self.config.every_steps > 0 and step % self.config.every_steps == 0
        )

    def log_step(self, step: int, stats: dict[str, Any], lr: float) -> None:
        scalars = {k: float(v) for k, v in stats.items()} | {"lr": lr}
        scalars = {k: v for k, v in scalars.items() if math.isfinite(v)}
        for sink in self.sinks:
            sink.log_step(step, scalars)

    def log_epoch(self, record: dict[str, Any], model: nn.Module) -> None:
        if not self.sinks:
            return
        epoch = int(record["epoch"])
        scalars = flatten_record(record)
        every = self.config.spectra_every
        drawn = every and epoch % every == 0 and any(sink.wants_spectra for sink in self.sinks)
        spectra = low_rank_spectra(model) if drawn else {}
        for sink in self.sinks:
            sink.log_epoch(epoch, scalars)
            if spectra:
                sink.log_spectra(epoch, spectra)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
