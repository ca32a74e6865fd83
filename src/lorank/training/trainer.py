"""The trainer: one plain loop that knows no method by name.

Per batch it calls ``method.train_step``; per epoch ``method.on_epoch_end``, evaluation,
logging and a checkpoint. Everything a run produces goes into one run directory:

* ``config.json`` the resolved config, ``env.json`` versions/device/threads,
* ``metrics.jsonl`` one record per epoch (epoch 0 = before training),
* ``summary.json`` final figures and ``status`` (``running``/``completed``/``diverged``),
* ``model.safetensors`` + ``model.json`` the checkpoint (rebuilds low-rank shapes).
"""

from __future__ import annotations

import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from lorank import __version__
from lorank.core.io import atomic_write_json, atomic_write_text, save
from lorank.core.metrics import orthogonality_errors, parameter_counts, ranks
from lorank.core.optim import build_optimizer, build_scheduler
from lorank.data import Dataset, load_dataset
from lorank.errors import LorankError, TrainingDiverged
from lorank.methods import build as build_method
from lorank.models import build_model
from lorank.training import distributed
from lorank.training.checkpoint import (
    latest_checkpoint,
    load_optimizer_state,
    optimizer_state,
    read_training_state,
    restore_model,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from lorank.training.config import RunConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LorankError(
            "train.device = 'cuda' but no CUDA device is available; use device = 'auto' or 'cpu'"
        )
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def task_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Cross-entropy for classification (B×C logits) and language modelling (B×T×V)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Mean loss and accuracy (per sample, or per token for the language model)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    count = 0
    for x, y in batches:
        logits = model(x)
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double().cpu()
        correct += (logits.argmax(-1) == y).sum().cpu()
        count += y.numel()
    model.train(was_training)
    loss = float(loss_sum) / max(count, 1)
    return {"loss": loss, "acc": float(correct) / max(count, 1)}


def environment(device: torch.device) -> dict[str, Any]:
    import pydantic

    env = {
        "lorank": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pydantic": pydantic.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


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
        atomic_write_text(self.path / "metrics.jsonl", lines)


class SilentRun(Run):
    """The run seen by DDP processes other than rank 0: keeps the records, writes nothing."""

    def write_json(self, name: str, obj: Any) -> None:
        return None  # only rank 0 writes the run directory

    def log_all(self) -> None:
        return None  # only rank 0 writes metrics.jsonl


def train(
    config: RunConfig,
    out: str | Path | None = None,
    *,
    config_name: str = "run",
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    model: nn.Module | None = None,
    resume: bool = False,
) -> Path:
    """Train ``config`` into a run directory and return its path.

    ``model`` (optional) is trained instead of a fresh ``config.model`` (e.g. a compressed
    model being fine-tuned); ``config.model`` must still describe its dense architecture.
    ``resume=True`` continues the run at ``out`` from its newest complete checkpoint, with
    the same model, optimizer, schedule, method and RNG states, so the result is identical
    to an uninterrupted run.

    Under ``torchrun`` (see :mod:`lorank.training.distributed`) every process runs this function on
    its shard of each global batch of ``data.batch_size`` samples; only rank 0 writes files
    and prints.
    """
    tc = config.train
    ddp = distributed.setup(tc.device)  # None unless started by torchrun
    device = ddp.device if ddp else resolve_device(tc.device)
    main = ddp is None or ddp.is_main
    quiet = quiet or not main
    if ddp and tc.nonfinite == "skip":
        raise LorankError(
            "train.nonfinite = 'skip' is not supported with several processes; use 'stop'"
        )
    if tc.threads:
        torch.set_num_threads(tc.threads)
    run_path = Path(out) if out else default_run_dir(config_name)
    if ddp:
        run_path = ddp.broadcast_object(run_path)  # one timestamped name for all processes
    checkpoint = latest_checkpoint(run_path) if resume else None
    if not resume and main:
        check_run_dir(run_path, overwrite)  # fail before the slow set-up
    data = load_dataset(config.data, device=device, data_dir=data_dir)

    seed_everything(tc.seed)
    model = (model if model is not None else build_model(config.model, data.info)).to(device)
    method = build_method(config.method)
    method.attach(
        loss_fn=task_loss,
        calibration=lambda n: data.train_subset_batches(n),
        max_grad_norm=config.optim.grad_clip,
        epochs=tc.epochs,
        skip_nonfinite=tc.nonfinite == "skip",
    )
    if method.gradient_free and (ddp or resume):
        raise LorankError(
            f"method {method.name!r} trains in one closed-form pass: it runs in one process "
            "and has nothing to resume; drop --nproc/--resume (use --overwrite to rerun)"
        )
    report = method.prepare(model)
    model.to(device)
    data_gen = torch.Generator().manual_seed(tc.seed)
    if checkpoint is not None:
        restore_model(model, checkpoint)
    optimizer = build_optimizer(method.parameters(model), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, data.num_train_batches, tc.epochs)
    meta = {
        "model": config.model.model_dump(mode="json"),
        "data_info": asdict(data.info),
        "method": config.method.name,
    }
    show = not quiet and sys.stderr.isatty()

    if checkpoint is None:
        # Only now, with every input validated, create the run directory.
        run = Run(prepare_run_dir(run_path, overwrite)) if main else SilentRun(run_path)
        run.write_json("config.json", config.model_dump(mode="json"))
        run.write_json("env.json", environment(device))
        if report.layers:
            run.write_json("conversion.json", report.to_dict())
        run.write_json("summary.json", {"status": "running"})
        run.log(epoch_record(0, model, data, method, {}, 0.0, tc.eval_every, force_eval=True))
        first_epoch, train_time = 1, 0.0
    else:
        state = read_training_state(checkpoint)
        load_optimizer_state(optimizer, model, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        set_rng_state(state["rng"], data_gen)
        run = Run(run_path) if main else SilentRun(run_path)
        run.records = read_records(run_path)[: state["epoch"] + 1]
        run.log_all()
        run.write_json("summary.json", {"status": "running"})
        first_epoch, train_time = state["epoch"] + 1, state["train_time"]

    if method.gradient_free:
        train_time = fit_closed_form(run, model, data, method, tc.eval_every, meta, quiet)
        first_epoch = tc.epochs + 1  # no gradient epochs

    for epoch in range(first_epoch, tc.epochs + 1):
        model.train()
        sums: dict[str, Tensor] = {}
        steps = 0
        start = time.perf_counter()
        bar = tqdm(
            data.train_batches(data_gen),
            total=data.num_train_batches,
            disable=not show,
            desc=f"epoch {epoch}/{tc.epochs}",
            leave=False,
            unit="batch",
        )
        for batch in bar:
            if ddp:
                stats = ddp.train_step(method, model, optimizer, batch, task_loss)
            else:
                stats = method.train_step(model, optimizer, batch, task_loss)
            steps += 1
            nonfinite = tc.nonfinite == "stop" and not torch.isfinite(stats["loss"])
            if ddp and tc.nonfinite == "stop":
                nonfinite = ddp.any_true(nonfinite)  # every process stops together
            if nonfinite:
                diverge(run, train_time, epoch, steps, float(stats["loss"]))
            scheduler.step()
            for k, v in stats.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            if show and steps % 20 == 0:
                rate = steps * config.data.batch_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{float(stats['loss']):.4f}", samples_s=f"{rate:.0f}")
        train_stats = {k: float(v) / max(steps, 1) for k, v in sums.items()}
        if ddp:
            train_stats = ddp.average(train_stats)  # the global-batch means
        method.on_epoch_end(model, optimizer, epoch, train_stats)
        if ddp:
            ddp.sync_structure(model)  # an epoch hook may have swapped parameters
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - start
        train_time += epoch_time
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            diverge(run, train_time, epoch, steps, float("nan"), what="a parameter")
        record = epoch_record(
            epoch,
            model,
            data,
            method,
            train_stats,
            train_time,
            tc.eval_every,
            force_eval=epoch == tc.epochs,
        )
        record["epoch_time_s"] = epoch_time
        record["lr"] = optimizer.param_groups[0]["lr"]
        run.log(record)
        if main:
            save(model, run.path / "model", meta)
        due = tc.checkpoint_every and (epoch % tc.checkpoint_every == 0 or epoch == tc.epochs)
        if main and due:
            training_state = {
                "epoch": epoch,
                "train_time": train_time,
                "optimizer": optimizer_state(optimizer, model),
                "scheduler": scheduler.state_dict(),
                "method": method.state_dict(),
                "rng": rng_state(data_gen),
            }
            write_checkpoint(run.path, epoch, model, meta, training_state, tc.keep_checkpoints)
        if not quiet:
            print(format_record(record, tc.epochs), file=sys.stderr, flush=True)
    if tc.epochs == 0 and main:
        save(model, run.path / "model", meta)
    run.write_json(
        "summary.json", summarize(run.records, train_time, "completed") | method.summary()
    )
    if ddp:
        ddp.barrier()  # summary.json exists before any process returns
        ddp.close()
    return run.path


def fit_closed_form(
    run: Run,
    model: nn.Module,
    data: Dataset,
    method: Any,
    eval_every: int,
    meta: dict[str, Any],
    quiet: bool,
) -> float:
    """Train a gradient-free method by its ``fit`` on the whole training set, log it as
    epoch 1 and save the model; returns the training time."""
    start = time.perf_counter()
    batches = data.train_subset_batches(data.info.train_size, data.eval_batch_size)
    stats = method.fit(model, batches)
    train_time = time.perf_counter() - start
    if "model" in stats:  # the method chose the architecture
        meta["model"] = {**meta["model"], **stats.pop("model")}
    record = epoch_record(1, model, data, method, stats, train_time, eval_every, force_eval=True)
    record["epoch_time_s"] = train_time
    record["max_rss_mb"] = peak_memory_mb()
    run.log(record)
    save(model, run.path / "model", meta)
    if not quiet:
        print(format_record(record, 1), file=sys.stderr, flush=True)
    return train_time


def peak_memory_mb() -> float | None:
    """Peak resident memory of this process so far, dataset included (None off Unix)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def diverge(
    run: Run, train_time: float, epoch: int, step: int, loss: float, what: str = "the loss"
) -> NoReturn:
    """Stop a run whose loss or parameters are no longer finite: mark it ``diverged``
    (keeping the last good checkpoint and metrics) and raise the one-line error."""
    summary = summarize(run.records, train_time, "diverged") if run.records else {}
    run.write_json(
        "summary.json",
        summary | {"status": "diverged", "diverged_epoch": epoch, "diverged_step": step},
    )
    raise TrainingDiverged(
        f"training diverged at epoch {epoch}, step {step}: {what} became {loss}; the learning "
        "rate is likely too high (lower optim.lr or set optim.grad_clip); the last good "
        f"checkpoint and metrics are in {run.path}"
    )


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def epoch_record(
    epoch: int,
    model: nn.Module,
    data: Dataset,
    method: Any,
    train_stats: dict[str, float],
    train_time: float,
    eval_every: int,
    force_eval: bool = False,
) -> dict[str, Any]:
    record: dict[str, Any] = {"epoch": epoch, "train_loss": train_stats.get("loss_task")}
    record.update({k: v for k, v in train_stats.items() if k != "loss_task"})
    if force_eval or epoch % eval_every == 0:
        test = evaluate(model, data.eval_batches("test"))
        record["test_loss"], record["test_acc"] = test["loss"], test["acc"]
        if data.info.task == "language_model":
            record["test_ppl"] = math.exp(min(test["loss"], 50.0))
    record.update(parameter_counts(model))
    record["ranks"] = ranks(model)
    if record["ranks"]:
        record["orth_error"] = orthogonality_errors(model)
    record.update(method.epoch_metrics(model))
    record["time_s"] = train_time
    return record


def summarize(records: list[dict[str, Any]], train_time: float, status: str) -> dict[str, Any]:
    last = records[-1]
    evaluated = [r for r in records if "test_acc" in r]
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
    return summary


def format_record(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"train_loss {record['train_loss']:.4f}"]
    if "test_acc" in record:
        parts.append(f"test_loss {record['test_loss']:.4f}")
        parts.append(f"test_acc {100 * record['test_acc']:.2f}%")
    if "test_ppl" in record:
        parts.append(f"ppl {record['test_ppl']:.2f}")
    parts.append(f"params {record['params_eval']:,}/{record['params_dense']:,}")
    parts.append(f"{record['epoch_time_s']:.1f}s")
    return "  ".join(parts)
