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
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lorank.core.io import save
from lorank.core.metrics import orthogonality_errors, parameter_counts, ranks
from lorank.core.optim import build_optimizer, build_scheduler
from lorank.data import Dataset, load_dataset
from lorank.errors import LorankError, logger
from lorank.methods import build as build_method
from lorank.models import build_model
from lorank.training import distributed
from lorank.training.checkpoint import (
    apply_training_state,
    optimizer_state,
    restore_model,
    rng_state,
    usable_checkpoint,
    write_checkpoint,
)
from lorank.training.config import RunConfig
from lorank.training.energy import POLL_STEPS, EnergyMeter
from lorank.training.environment import environment, resolve_device, seed_everything
from lorank.training.evaluate import evaluate_split, prefixed, task_loss
from lorank.training.flops import FlopMeter
from lorank.training.rundir import (
    CONFIG,
    CONVERSION,
    ENV,
    MODEL,
    SUMMARY,
    Run,
    SilentRun,
    check_output_dir,
    default_run_dir,
    diverge,
    prepare_run_dir,
    read_complete_records,
    remove_temp_files,
    resume_entry,
    summarize,
    write_resume,
)
from lorank.training.schemas import CHECKPOINT_FORMAT
from lorank.training.sinks import LogConfig, Sinks, check_sinks


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
    allow_changes: bool = False,
) -> Path:
    """Train ``config`` into a run directory and return its path.

    ``model`` (optional) is trained instead of a fresh ``config.model`` (e.g. a compressed
    model being fine-tuned); ``config.model`` must still describe its dense architecture.
    ``resume=True`` continues the run at ``out`` from its newest complete checkpoint, with
    the same model, optimizer, schedule, method and RNG states, so the result is identical
    to an uninterrupted run. A resumed run records its changed settings in ``config.json``
    (``resumes``); a change of data, model, method or seed is refused unless
    ``allow_changes``.

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
    checkpoint = state = None
    if resume:
        # The newest checkpoint that validates completely and whose epoch metrics.jsonl still
        # holds; newer ones are skipped, saying why.
        records = read_complete_records(run_path)
        checkpoint, state, skipped = usable_checkpoint(run_path, len(records) - 1)
        if main:
            for line in skipped:
                print(f"lorank: warning: skipped checkpoint {line}", file=sys.stderr)
            if skipped:
                print(f"lorank: resuming from {checkpoint.name}", file=sys.stderr)
        # Refused before anything is loaded or written: the run's config.json must keep
        # describing the run (see resume_entry).
        resumed = resume_entry(run_path, config, checkpoint.name, allow_changes)
    elif main:
        check_output_dir(run_path, overwrite)  # fail before the slow set-up
    if main:
        check_sinks(config.log)
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
    first_test = next(iter(data.eval_batches("test")), None)
    flops = FlopMeter(
        method,
        task_loss,
        data.train_subset_batches(config.data.batch_size)[0],
        first_test[0] if first_test is not None else None,
    )
    # Preparing (conversion, SVD initialisations) is training work too; a resumed run's
    # total is read back from its records below instead.
    report = flops.counted(method.prepare, model) if checkpoint is None else method.prepare(model)
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
        logger.info("run directory %s (method %s)", run.path, config.method.name)
        run.write_json(CONFIG, config.model_dump(mode="json"))
        run.write_json(ENV, environment(device))
        if report.layers:
            run.write_json(CONVERSION, report.to_dict())
        run.write_json(SUMMARY, {"status": "running"})
        record = epoch_record(0, model, data, method, {}, 0.0, tc.eval_every, force_eval=True)
        run.log(record | flops.record(model))
        first_epoch, train_time, joules = 1, 0.0, 0.0
    else:
        assert state is not None
        apply_training_state(checkpoint, state, optimizer, scheduler, method, model, data_gen)
        # Before anything in the run directory is rewritten: a bad state changes nothing.
        flop_state = state.get("flops") or {}
        try:
            flops.load_state_dict(flop_state)
        except (TypeError, ValueError, AttributeError) as e:
            raise LorankError(
                f"checkpoint {checkpoint} has an unreadable FLOP count ({type(e).__name__}: "
                f"{e}); resume from an earlier checkpoint or delete this one"
            ) from None
        run = Run(run_path) if main else SilentRun(run_path)
        if main:
            remove_temp_files(run_path)  # left by the killed run's unfinished writes
            write_resume(run_path, config, resumed)
        run.records = records[: state["epoch"] + 1]  # metrics.jsonl cut back to the checkpoint
        run.log_all()
        run.write_json(SUMMARY, {"status": "running"})
        first_epoch, train_time = state["epoch"] + 1, state["train_time"]
        last = run.records[-1] if run.records else {}
        if "total" not in flop_state:  # a checkpoint from before FLOPs were counted
            flops.total = float(last.get("train_flops") or 0)
        joules = float(last.get("energy_j") or 0)

    energy = EnergyMeter(tc.measure_energy, device, joules=joules)
    flops.pause = energy.paused  # counting FLOPs on copies is not training
    sinks = Sinks(config.log if main else LogConfig(), run.path, config.model_dump(mode="json"))
    if checkpoint is None:
        sinks.log_epoch(run.records[0], model)
    if method.gradient_free:
        train_time = fit_closed_form(
            run, model, data, method, tc.eval_every, meta, quiet, flops, energy
        )
        sinks.log_epoch(run.records[-1], model)
        first_epoch = tc.epochs + 1  # no gradient epochs

    for epoch in range(first_epoch, tc.epochs + 1):
        model.train()
        sums: dict[str, Tensor] = {}
        steps = 0
        flops.begin_epoch(model, optimizer)  # on copies, when the parameters' shapes changed
        start = time.perf_counter()
        energy.start()
        bar = tqdm(
            data.train_batches(data_gen),
            total=data.num_train_batches,
            disable=not show,
            desc=f"epoch {epoch}/{tc.epochs}",
            leave=False,
            unit="batch",
        )
        for batch in bar:
            try:
                if ddp:
                    stats = ddp.train_step(method, model, optimizer, batch, task_loss)
                else:
                    stats = method.train_step(model, optimizer, batch, task_loss)
            except (FloatingPointError, torch.linalg.LinAlgError) as e:
                # Any method's numerical failure (a NaN core, an SVD that cannot converge
                # on non-finite weights) is the run diverging: the one divergence path.
                diverge(run, train_time, epoch, steps + 1, float("nan"), detail=_failure(e))
            steps += 1
            start += flops.after_step(model, optimizer)  # 0 but when it counted (untimed)
            if steps % POLL_STEPS == 0:
                energy.poll()  # a RAPL counter wraps; read it well before it can
            nonfinite = tc.nonfinite == "stop" and not torch.isfinite(stats["loss"])
            if ddp and tc.nonfinite == "stop":
                nonfinite = ddp.any_true(nonfinite)  # every process stops together
            if nonfinite:
                diverge(run, train_time, epoch, steps, float(stats["loss"]))
            scheduler.step()
            if sinks.wants_step(method.step):
                sinks.log_step(method.step, stats, optimizer.param_groups[0]["lr"])
            for k, v in stats.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            if show and steps % 20 == 0:
                rate = steps * config.data.batch_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{float(stats['loss']):.4f}", samples_s=f"{rate:.0f}")
        train_stats = {k: float(v) / max(steps, 1) for k, v in sums.items()}
        if ddp:
            train_stats = ddp.average(train_stats)  # the global-batch means
        start += flops.end_epoch(model, optimizer)  # counting is not training: untimed
        try:
            flops.counted(method.on_epoch_end, model, optimizer, epoch, train_stats)
        except (FloatingPointError, torch.linalg.LinAlgError) as e:
            diverge(run, train_time, epoch, steps, float("nan"), detail=_failure(e))
        if ddp:
            ddp.sync_structure(model)  # an epoch hook may have swapped parameters
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        energy.stop()
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
        record.update(flops.record(model) | energy.record())
        run.log(record)
        sinks.log_epoch(record, model)
        if main:
            save(model, run.path / MODEL, meta)
        due = tc.checkpoint_every and (epoch % tc.checkpoint_every == 0 or epoch == tc.epochs)
        if main and due:
            training_state = {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "train_time": train_time,
                "optimizer": optimizer_state(optimizer, model),
                "scheduler": scheduler.state_dict(),
                "method": method.state_dict(),
                "rng": rng_state(data_gen),
                "flops": flops.state_dict(),
            }
            write_checkpoint(run.path, epoch, model, meta, training_state, tc.keep_checkpoints)
        if not quiet:
            print(format_record(record, tc.epochs), file=sys.stderr, flush=True)
    if tc.epochs == 0 and main:
        save(model, run.path / MODEL, meta)
    summary = summarize(run.records, train_time, "completed") | energy.summary()
    summary["flop_count_s"], summary["flop_counts"] = flops.seconds, flops.counts
    run.write_json(SUMMARY, summary | method.summary())
    sinks.close()
    if ddp:
        ddp.barrier()  # summary.json exists before any process returns
        ddp.close()
    return run.path


def _failure(error: BaseException) -> str:
    text = " ".join(str(error).split())[:160] or type(error).__name__
    return f"a numerical step failed ({text})"


def fit_closed_form(
    run: Run,
    model: nn.Module,
    data: Dataset,
    method: Any,
    eval_every: int,
    meta: dict[str, Any],
    quiet: bool,
    flops: FlopMeter,
    energy: EnergyMeter,
) -> float:
    """Train a gradient-free method by its ``fit`` on the whole training set, log it as
    epoch 1 and save the model; returns the training time."""
    start = time.perf_counter()
    energy.start()
    batches = data.train_subset_batches(data.info.train_size, data.eval_batch_size)
    stats = flops.counted(method.fit, model, batches)  # its few large ops: counted as run
    energy.stop()
    train_time = time.perf_counter() - start
    if "model" in stats:  # the method chose the architecture
        meta["model"] = {**meta["model"], **stats.pop("model")}
    record = epoch_record(1, model, data, method, stats, train_time, eval_every, force_eval=True)
    record["epoch_time_s"] = train_time
    record["max_rss_mb"] = peak_memory_mb()
    record.update(flops.record(model) | energy.record())
    run.log(record)
    save(model, run.path / MODEL, meta)
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
        for split in data.eval_splits:
            record.update(prefixed(split, evaluate_split(model, data, split)))
        if data.info.task == "language_model":
            record["test_ppl"] = math.exp(min(record["test_loss"], 50.0))
    record.update(parameter_counts(model))
    record["ranks"] = ranks(model)
    if record["ranks"]:
        record["orth_error"] = orthogonality_errors(model)
    record.update(method.epoch_metrics(model))
    record["time_s"] = train_time
    return record


def format_record(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"train_loss {record['train_loss']:.4f}"]
    if "test_loss" in record:
        parts.append(f"test_loss {record['test_loss']:.4f}")
    if "test_acc" in record:
        parts.append(f"test_acc {100 * record['test_acc']:.2f}%")
    if "test_mae" in record:
        parts.append(f"test_mae {record['test_mae']:.4f}")
    if "test_ppl" in record:
        parts.append(f"ppl {record['test_ppl']:.2f}")
    parts.append(f"params {record['params_eval']:,}/{record['params_dense']:,}")
    parts.append(f"{record['epoch_time_s']:.1f}s")
    return "  ".join(parts)
