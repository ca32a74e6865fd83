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

Long because it is the one module that owns every file of a run directory: names, writers,
readers, status, divergence and the overwrite guard.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from lorank.core.io import (
    MAX_DEPTH,
    atomic_write_json,
    atomic_write_text,
    nesting_depth,
    read_json_file,
)
from lorank.errors import LorankError, TrainingDiverged
from lorank.training.schemas import CONFIG_FORMAT, SUMMARY_FORMAT

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


# Everything lorank writes into a run directory. ``--overwrite`` replaces a directory only
# when it is empty or holds nothing but these (and lorank's hidden temporary files), so that
# a folder of the user's own files can never be deleted by a mistyped --out.
RUN_ENTRIES = frozenset(
    {
        CONFIG,
        ENV,
        METRICS,
        SUMMARY,
        CONVERSION,
        COMPRESS,
        f"{MODEL}.safetensors",
        f"{MODEL}.json",
        "checkpoints",
    }
)
# Files that make a directory recognisably a lorank run (one of them must be present).
RUN_MARKERS = (SUMMARY, CONFIG, COMPRESS)


def _is_lorank_temp(name: str) -> bool:
    # atomic_write_* temp files (".summary.json.abc.tmp"), checkpoint temp folders
    # (".tmp-epoch-0003") and compress's assembly folder (".out.abc.tmp").
    return name.startswith(".") and (name.endswith(".tmp") or name.startswith(".tmp-epoch-"))


def foreign_entries(path: Path) -> list[str]:
    """The entries of ``path`` (and of its ``checkpoints/``) that lorank did not write."""
    foreign = []
    for entry in sorted(path.iterdir()):
        name = entry.name
        if _is_lorank_temp(name):
            continue
        if name not in RUN_ENTRIES:
            foreign.append(name)
        elif name == "checkpoints":
            if not entry.is_dir() or entry.is_symlink():
                foreign.append(name)
                continue
            for sub in sorted(entry.iterdir()):
                if not (_is_lorank_temp(sub.name) or re.fullmatch(r"epoch-\d{4,}", sub.name)):
                    foreign.append(f"checkpoints/{sub.name}")
        elif entry.is_dir() or entry.is_symlink():
            foreign.append(f"{name}/")  # a lorank file name, but a folder or a link
    return foreign


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a lorank run directory: a JSON object in one of its marker files
    and no entry lorank does not write."""
    if not path.is_dir() or path.is_symlink():
        return False
    markers = [read_json(path / name) for name in RUN_MARKERS]
    return any(isinstance(m, dict) for m in markers) and not foreign_entries(path)


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(
    out: Path,
    overwrite: bool,
    *,
    protect: Sequence[str | Path] = (),
    what: str = "run directory",
    option: str = "--out",
    overwrite_option: str = "--overwrite",
) -> None:
    """Fail, with one line and before anything slow, when ``out`` cannot become a fresh
    run directory: it exists and ``overwrite`` is off; ``overwrite`` is on but ``out`` is
    neither empty nor a lorank run directory; it is, holds or lies inside one of the
    protected inputs (``protect``: the model being compressed, a config, a dataset); it or a
    parent is a file; its nearest existing parent is read-only.

    ``option`` and ``overwrite_option`` are how the messages name ``out`` and ``overwrite``:
    a command's flags, or (for a library call) its arguments in backquotes."""
    out = Path(out)
    resolved = out.resolve()
    for item in protect:
        source = Path(item).resolve()
        if _within(source, resolved):
            raise LorankError(
                f"{option} {out} is or contains the input {item}; writing there would "
                f"replace it: choose another {option}"
            )
        if source.is_dir() and _within(resolved, source):
            raise LorankError(
                f"{option} {out} is inside the input {item}; choose an {option} outside it"
            )
    if out.exists():
        if not out.is_dir():
            raise LorankError(
                f"cannot create {what} {out}: it is a file, not a directory; choose another "
                f"{option}"
            )
        try:
            empty = not any(out.iterdir())
        except OSError as e:
            raise LorankError(
                f"cannot read {what} {out} ({e.strerror}); choose another {option}"
            ) from None
        if not empty:
            if not overwrite:
                raise LorankError(
                    f"{what} {out} already exists; choose another {option} or "
                    f"pass {overwrite_option} to replace it"
                )
            if not is_run_dir(out):
                foreign = foreign_entries(out)
                held = (
                    f"it holds {foreign[0]!r}, which lorank did not write"
                    if foreign
                    else ("it has no readable summary.json or config.json")
                )
                raise LorankError(
                    f"{overwrite_option} replaces only an empty directory or a lorank run "
                    "directory, "
                    f"and {out} is not one ({held}); choose another {option} or empty it yourself"
                )
        writable = out.parent if not empty else out
    else:
        writable = resolved.parent
        while not writable.exists():
            writable = writable.parent
        if not writable.is_dir():
            raise LorankError(
                f"cannot create {what} {out}: {writable} is a file, not a directory; "
                f"choose another {option}"
            )
    if not os.access(writable, os.W_OK | os.X_OK):
        raise LorankError(
            f"cannot create {what} {out}: {writable} is not writable; choose another {option}"
        )


# Kept for callers of the earlier name: the same checks.
check_run_dir = check_output_dir


def _os_error(what: str, out: Path, error: OSError, option: str = "--out") -> LorankError:
    return LorankError(
        f"cannot create {what} {out} ({error.strerror or error}); choose a writable {option}"
    )


def prepare_run_dir(out: Path, overwrite: bool, *, protect: Sequence[str | Path] = ()) -> Path:
    """Create ``out``, replacing an existing one only when ``overwrite`` and it is a run
    directory (see :func:`check_output_dir`)."""
    check_output_dir(out, overwrite, protect=protect)
    try:
        if out.is_dir() and any(out.iterdir()):
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error("run directory", out, e) from None
    return out


def ensure_dir(out: Path, what: str, option: str = "--out") -> Path:
    """Create ``out`` (a sweep or report directory, whose own files lorank updates in place)
    or reuse it; a file in the way, a read-only parent or any other OS refusal is one line."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorankError(
            f"cannot create {what} {out}: it is a file, not a directory; choose another {option}"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(what, out, e, option) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise LorankError(f"cannot write {what} {out}: it is read-only; choose another {option}")
    return out


def temp_dir_beside(out: Path, what: str = "run directory", option: str = "--out") -> Path:
    """A fresh hidden directory in ``out``'s parent (created if missing), so that the final
    rename into ``out`` never crosses file systems; mode as ``mkdir`` would give it."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700 folders; runs are meant to be shared
    except OSError as e:
        raise _os_error(what, out, e, option) from None
    return tmp


def replace_dir(
    tmp: Path,
    out: Path,
    overwrite: bool,
    *,
    protect: Sequence[str | Path] = (),
    what: str = "run directory",
    option: str = "--out",
    overwrite_option: str = "--overwrite",
) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` (checked again: it may have
    appeared meanwhile) is first moved aside, so a failure leaves one of the two whole."""
    check_output_dir(
        out,
        overwrite,
        protect=protect,
        what=what,
        option=option,
        overwrite_option=overwrite_option,
    )
    old = None
    try:
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old.", suffix=".tmp"))
            os.replace(out, old / "run")
        os.replace(tmp, out)
    except OSError as e:
        if old is not None and (old / "run").exists() and not out.exists():
            os.replace(old / "run", out)  # put the previous run back
        raise _os_error(what, out, e, option) from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


class Run:
    """A run directory with atomic writers for its files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []

    def write_json(self, name: str, obj: Any) -> None:
        # summary.json and config.json carry their format version
        if name == SUMMARY:
            obj = {"format": SUMMARY_FORMAT, **obj}
        elif name == CONFIG:
            obj = {"format": CONFIG_FORMAT, **obj}
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
    """The JSON in ``path``, or None when it is missing, unreadable or absurdly nested."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return value if nesting_depth(value) <= MAX_DEPTH else None


def read_summary(path: Path) -> dict[str, Any]:
    """The validated ``summary.json`` of run directory ``path``; a missing or invalid one
    is a one-line error naming the file and field."""
    from lorank.training.schemas import SummaryFile, validate_file

    file = path / SUMMARY
    fix = "re-run it, or leave this run out"
    value = read_json_file(file, "run summary", fix)
    validate_file(SummaryFile, value, file, fix)
    return value


def valid_summary(path: Path) -> dict[str, Any] | None:
    """``summary.json`` of ``path`` when it is present and valid, else None (a killed run,
    or a directory that is not a run)."""
    try:
        return read_summary(path)
    except LorankError:
        return None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (or of the run directory holding one); a torn or
    garbled line (a killed run) is skipped."""
    if path.is_dir():
        path = path / METRICS
    from lorank.training.schemas import valid_record

    records = []
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue  # a torn last line of a killed run
        if valid_record(record):
            records.append(record)
    return records


def read_complete_records(path: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` up to its last complete one: reading stops
    at the first line that is torn, garbled, not a record, or not the next epoch, since what
    follows it cannot be trusted (a resume rewrites the file from these)."""
    from lorank.training.schemas import valid_record

    records: list[dict[str, Any]] = []
    try:
        text = (path / METRICS).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            break
        if not valid_record(record) or record["epoch"] != len(records):
            break
        records.append(record)
    return records


# Settings a resumed run may change (recorded in config.json): how long and how it trains.
# Anything else (data, model, method, seed) would make the resumed run a different run than
# the one config.json describes, so it needs --allow-changes.
RESUME_FREE = ("train.", "optim.")
RESUME_GUARDED = ("train.seed",)


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """``{dotted key: [old, new]}`` for every setting that differs."""
    a, b = flat_config(old), flat_config(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def resume_entry(
    run_dir: Path, config: Any, checkpoint: str, allow_changes: bool
) -> dict[str, Any]:
    """What a resume changes, as the entry :func:`write_resume` appends to ``config.json``'s
    ``resumes``; a change of data, model, method or seed raises unless ``allow_changes``."""
    from lorank.training.config import load_run_config

    old = load_run_config(run_dir).model_dump(mode="json")
    changes = config_changes(old, config.model_dump(mode="json"))
    guarded = [k for k in changes if not k.startswith(RESUME_FREE) or k.startswith(RESUME_GUARDED)]
    if guarded and not allow_changes:
        was, now = changes[guarded[0]]
        raise LorankError(
            f"--resume with {guarded[0]} = {now!r} (the run was made with {was!r}) would make "
            "it a different run than its config.json describes; resume without that --set, "
            "start a new run, or pass --allow-changes to record the change and go on"
        )
    return {
        "time": datetime.now().isoformat(timespec="seconds"),
        "checkpoint": checkpoint,
        "changes": changes,
    }


def write_resume(run_dir: Path, config: Any, entry: dict[str, Any]) -> None:
    """Rewrite ``config.json`` as the config the run now continues with, keeping the list of
    resumes (each with its time, checkpoint and changes)."""
    raw = read_json(run_dir / CONFIG)
    resumes = raw.get("resumes", []) if isinstance(raw, dict) else []
    resumes = resumes if isinstance(resumes, list) else []
    atomic_write_json(
        run_dir / CONFIG,
        {"format": CONFIG_FORMAT} | config.model_dump(mode="json") | {"resumes": [*resumes, entry]},
    )


def remove_temp_files(run_dir: Path) -> None:
    """Delete what a killed run's unfinished atomic writes left behind (hidden ``*.tmp``
    files and ``.tmp-epoch-*`` checkpoint folders); nothing else is touched."""
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if _is_lorank_temp(entry.name) and not entry.is_symlink():
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def num_classes(path: Path) -> int:
    meta = read_json(path / f"{MODEL}.json")
    info = meta.get("data_info") if isinstance(meta, dict) else None
    classes = info.get("num_classes") if isinstance(info, dict) else None
    ok = isinstance(classes, int) and not isinstance(classes, bool) and 1 <= classes <= 2**20
    return classes if ok else 10


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
    summary = valid_summary(path)
    if summary is None:
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
    summary = valid_summary(path)
    status = summary.get("status") if summary is not None else None
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
    run: Run,
    train_time: float,
    epoch: int,
    step: int,
    loss: float,
    what: str = "the loss",
    detail: str | None = None,
) -> NoReturn:
    """Stop a run whose loss or parameters are no longer finite: mark it ``diverged``
    (keeping the last good checkpoint and metrics) and raise the one-line error."""
    summary = summarize(run.records, train_time, "diverged") if run.records else {}
    run.write_json(
        SUMMARY,
        summary | {"status": "diverged", "diverged_epoch": epoch, "diverged_step": step},
    )
    happened = detail or f"{what} became {loss}"
    raise TrainingDiverged(
        f"training diverged at epoch {epoch}, step {step}: {happened}; the learning "
        "rate is likely too high (lower optim.lr or set optim.grad_clip); the last good "
        f"checkpoint and metrics are in {run.path}"
    )
