"""``lorank sweep``: a grid of config values × seeds, each a normal run directory.

A sweep is a base config (a TOML file plus ``--set`` overrides), a grid ``{dotted key:
[values]}`` and a list of seeds. Its runs are the Cartesian product grid × seeds; each one is
the base config with those values set, trained by :func:`lorank.training.trainer.train` into
``OUT/<name>/`` where the name spells the grid values and the seed
(``lr=0.001,lambda_orth=0.1,seed=0``).

The grid comes from the TOML's ``[sweep]`` section, from ``--grid key=v1,v2`` (which replaces
the same key of the TOML grid), or both::

    [sweep]
    grid = { "optim.lr" = [1e-2, 1e-3], "method.lambda_orth" = [1.0, 0.0] }
    seeds = [0, 1, 2]

``[sweep]`` is removed before the run config is validated. An optional ``[sweep.published]``
table (``source``, ``metric``, ``rows = [{key = value, ..., test_acc = 0.95}]``) carries
published numbers that ``lorank report`` puts beside ours.

Runs are executed by a pool of worker processes (``spawn`` context, so no forked torch
state); by default as many workers as fit the cores, each with ``cores // workers`` torch
threads so that workers × threads never exceeds the cores. The sweep is resumable: a run
whose ``summary.json`` says ``completed`` or ``diverged`` is skipped, a half-written one
(killed mid-training) is restarted from scratch. A run that diverges or fails is recorded
as such in ``OUT/sweep.json`` and the sweep goes on.

Long because a sweep is grid parsing, a worker pool and resumable runs, which only make
sense together.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
import sys
import time
import tomllib
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lorank.core.io import atomic_write_json
from lorank.errors import LorankError
from lorank.training.config import MAX_SEED, apply_override, read_config_file, validate_config
from lorank.training.rundir import (
    CONFIG,
    FINISHED,
    config_changes,
    ensure_dir,
    read_json,
    run_status,
    run_summary,
)
from lorank.training.schemas import Published, validate_file

# More runs than this in one sweep is a typo in the grid or the seeds, not a plan.
MAX_RUNS = 10_000

# Keys that describe where/how a run executes, not what it computes.
EXECUTION_KEYS = ("train.seed", "train.threads", "train.device", "data.dir")


@dataclass
class RunSpec:
    """One run of a sweep: its directory name, grid values, seed and full raw config."""

    name: str
    settings: dict[str, Any]
    seed: int
    raw: dict[str, Any]
    config_name: str = "sweep"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings, "seed": self.seed}


@dataclass
class Sweep:
    """A base config, a grid and seeds; :meth:`runs` expands them."""

    base: dict[str, Any]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    config_path: str | None = None
    published: dict[str, Any] | None = None

    def runs(self) -> list[RunSpec]:
        """The Cartesian product grid × seeds, in grid order with the seed varying fastest;
        every config is validated here so that a bad value fails before any training."""
        keys = list(self.grid)
        labels = short_labels(keys)
        stem = Path(self.config_path).stem if self.config_path else "sweep"
        specs = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            settings = dict(zip(keys, values, strict=True))
            for seed in self.seeds:
                raw = copy.deepcopy(self.base)
                for key, value in settings.items():
                    _set_dotted(raw, key, value)
                _set_dotted(raw, "train.seed", seed)
                try:
                    validate_config(raw)
                except LorankError as e:
                    shown = ", ".join(f"{k}={v!r}" for k, v in settings.items())
                    raise LorankError(f"sweep run ({shown}): {e}") from None
                parts = [f"{labels[k]}={format_value(v)}" for k, v in settings.items()]
                name = safe_name(",".join([*parts, f"seed={seed}"]))
                specs.append(RunSpec(name, settings, seed, raw, stem))
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise LorankError(
                "sweep: two grid points give the same run name; make the grid values distinct"
            )
        return specs


def short_labels(keys: Sequence[str]) -> dict[str, str]:
    """``{dotted key: label}``: the last component when unique among ``keys``, else the key."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "x".join(format_value(v) for v in value)
    if isinstance(value, dict):  # a whole section, e.g. {"name": "dlrt", "tolerance": 0.1}
        parts = [format_value(value["name"])] if "name" in value else []
        parts += [f"{k}{format_value(v)}" for k, v in value.items() if k != "name"]
        return "-".join(parts)
    return str(value)


def safe_name(text: str) -> str:
    """A file-system-safe directory name (letters, digits and ``.,=+-_`` only)."""
    return re.sub(r"[^A-Za-z0-9.,=+_-]", "-", text)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise LorankError(f"sweep key {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def parse_grid_arg(item: str) -> tuple[str, list[Any]]:
    """``"optim.lr=1e-2,1e-3"`` → ``("optim.lr", [0.01, 0.001])``; values parse as TOML
    (``"model.hidden=[16],[32]"`` gives two lists), else stay strings."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or not text.strip():
        raise LorankError(
            f"--grid {item!r} is not of the form key=v1,v2,... (e.g. --grid optim.lr=1e-2,1e-3)"
        )
    try:
        values = tomllib.loads(f"v = [{text}]")["v"]
    except tomllib.TOMLDecodeError:
        values = [v.strip() for v in text.split(",") if v.strip()]
    return key, values


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` (inclusive range) → list of seeds."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if re.fullmatch(r"\d+-\d+", part):
                lo, hi = (int(p) for p in part.split("-"))
                if hi - lo >= MAX_RUNS or hi > MAX_SEED:
                    raise LorankError(
                        f"--seeds {text!r}: at most {MAX_RUNS:,} seeds, each <= {MAX_SEED}"
                    )
                seeds.extend(range(lo, hi + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise LorankError(f"--seeds {text!r}: give seeds >= 0 as 0,1,2 or a range 0-4")
    return seeds


def load_sweep(
    config: str | Path | None,
    grid: Sequence[str] = (),
    seeds: str | Sequence[int] | None = None,
    overrides: Sequence[str] = (),
) -> Sweep:
    """Read a TOML config with an optional ``[sweep]`` section, then apply ``--set``
    overrides, ``--grid`` items (replacing the same keys of the TOML grid) and ``--seeds``."""
    raw: dict[str, Any] = read_config_file(config) if config is not None else {}
    section = raw.pop("sweep", {}) or {}
    unknown = set(section) - {"grid", "seeds", "published"}
    if unknown:
        raise LorankError(
            f"config error: unknown key 'sweep.{sorted(unknown)[0]}' "
            "(allowed: grid, seeds, published)"
        )
    table = section.get("grid", {})
    if not isinstance(table, dict) or not all(isinstance(v, list) and v for v in table.values()):
        raise LorankError(
            "config error: sweep.grid must map dotted keys to non-empty lists, e.g. "
            'grid = { "optim.lr" = [1e-2, 1e-3] }'
        )
    grid_values: dict[str, list[Any]] = dict(table)
    for item in grid:
        key, values = parse_grid_arg(item)
        grid_values[key] = values
    for item in overrides:
        apply_override(raw, item)
    if seeds is None:
        seed_list = section.get("seeds", [raw.get("train", {}).get("seed", 0)])
        if not isinstance(seed_list, list) or not all(
            isinstance(s, int) and s >= 0 for s in seed_list
        ):
            raise LorankError("config error: sweep.seeds must be a list of integers >= 0")
    elif isinstance(seeds, str):
        seed_list = parse_seeds(seeds)
    else:
        seed_list = list(seeds)
    bad = [k for k in grid_values if k in EXECUTION_KEYS]
    if bad:
        raise LorankError(f"sweep grid key {bad[0]!r} is not allowed; use --seeds for seeds")
    published = section.get("published")
    if published is not None:
        fix = "see [sweep.published] in the README"
        validate_file(Published, published, Path(str(config)), fix)
    too_big = [s for s in seed_list if s > MAX_SEED]
    if too_big:
        raise LorankError(f"config error: seed {too_big[0]} is above the largest, {MAX_SEED}")
    runs = math.prod(len(v) for v in grid_values.values()) * len(set(seed_list))
    if runs > MAX_RUNS:
        raise LorankError(
            f"sweep: the grid and seeds make {runs:,} runs, more than {MAX_RUNS:,}; "
            "split it into smaller sweeps"
        )
    return Sweep(
        base=raw,
        grid=grid_values,
        seeds=list(dict.fromkeys(seed_list)),
        config_path=str(config) if config is not None else None,
        published=published,
    )


# ---------------------------------------------------------------------- execution


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def plan_workers(
    n_runs: int, workers: int | None, threads_per_run: int | None, cores: int | None = None
) -> tuple[int, int]:
    """``(workers, torch threads per worker)`` with workers × threads ≤ cores.

    Default: one thread per run (small models train faster as parallel processes than as
    threads) and as many workers as cores, never more workers than runs.
    """
    cores = cores or available_cores()
    if workers is not None and workers < 1:
        raise LorankError(f"--workers {workers} must be >= 1")
    if workers is None:
        workers = max(1, cores // (threads_per_run or 1))
    workers = max(1, min(workers, max(n_runs, 1)))
    threads = threads_per_run or max(1, cores // workers)
    return workers, threads


def execute_run(
    raw: dict[str, Any],
    out: str,
    config_name: str,
    threads: int,
    data_dir: str | None,
    overwrite: bool,
) -> dict[str, Any]:
    """Train one run (in a worker process or in-process); never raises.

    Returns ``{"status": completed|diverged|failed, "error": ...}``; a diverged run is the
    trainer's ``LorankError`` after it wrote ``summary.json`` with status ``diverged``.
    """
    import torch

    from lorank.training.checkpoint import complete_checkpoints
    from lorank.training.trainer import train

    # An interrupted run with a checkpoint continues where it stopped (same result as an
    # uninterrupted one); a run that died before its first checkpoint starts over.
    resume = overwrite and bool(complete_checkpoints(Path(out)))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        config = validate_config(raw)
        train(
            config,
            out,
            config_name=config_name,
            data_dir=data_dir,
            overwrite=overwrite,
            quiet=True,
            resume=resume,
        )
        result: dict[str, Any] = {"status": "completed"}
    except LorankError as e:
        status = run_status(Path(out))
        result = {"status": "diverged" if status == "diverged" else "failed", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - one broken run must not stop the sweep
        result = {
            "status": "failed",
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(limit=8),
        }
    finally:
        torch.set_num_threads(previous)
    result["wall_s"] = time.perf_counter() - start
    return result


def run_specs(
    specs: Sequence[RunSpec],
    out: str | Path,
    *,
    workers: int | None = None,
    data_dir: str | Path | None = None,
    quiet: bool = False,
    index: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run ``specs`` into ``out/<spec.name>/`` with a process pool; return one entry per run.

    ``index(entries)`` (optional) builds the JSON written to ``out/sweep.json`` after every
    finished run, so an interrupted sweep leaves an up-to-date index behind.
    """
    out = ensure_dir(Path(out), "sweep directory")
    entries: list[dict[str, Any]] = []
    todo: list[tuple[int, RunSpec, bool]] = []
    for spec in specs:
        check_reusable(out / spec.name, spec)
    for i, spec in enumerate(specs):
        path = out / spec.name
        status = run_status(path)
        entry = {**spec.to_dict(), "dir": spec.name, "status": status}
        if status in FINISHED:
            entry.update(run_summary(path), skipped=True)
        else:
            entry["status"] = "pending"
            todo.append((i, spec, status == "broken"))
        entries.append(entry)

    def write_index() -> None:
        if index is not None:
            atomic_write_json(out / "sweep.json", index(entries))

    write_index()
    threads_cfg = {s.raw.get("train", {}).get("threads") for _, s, _ in todo}
    fixed_threads = threads_cfg.pop() if len(threads_cfg) == 1 else None
    n_workers, threads = plan_workers(len(todo), workers, fixed_threads)
    data_dir_s = str(data_dir) if data_dir is not None else None
    bar = tqdm(
        total=len(specs),
        initial=len(specs) - len(todo),
        desc="sweep",
        unit="run",
        disable=quiet or not sys.stderr.isatty(),
    )
    counts = {"diverged": 0, "failed": 0}

    def finish(i: int, result: dict[str, Any]) -> None:
        entry = entries[i]
        entry.update(result)
        entry.update(run_summary(out / entry["dir"]))
        if result["status"] in counts:
            counts[result["status"]] += 1
            if not quiet and result["status"] == "failed":
                tqdm.write(f"lorank sweep: run {entry['dir']} failed: {result.get('error')}")
        bar.update(1)
        bar.set_postfix(diverged=counts["diverged"], failed=counts["failed"])
        write_index()

    if todo and n_workers == 1:
        # One worker: train in this process (no interpreter start-up per run).
        for i, spec, broken in todo:
            entries[i]["status"] = "running"
            finish(
                i,
                execute_run(
                    spec.raw, str(out / spec.name), spec.config_name, threads, data_dir_s, broken
                ),
            )
    elif todo:
        context = get_context("spawn")
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=context) as pool:
            futures: dict[Future, int] = {}
            try:
                for i, spec, broken in todo:
                    future = pool.submit(
                        execute_run,
                        spec.raw,
                        str(out / spec.name),
                        spec.config_name,
                        threads,
                        data_dir_s,
                        broken,
                    )
                    futures[future] = i
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        try:
                            result = future.result()
                        except Exception as e:  # noqa: BLE001 - a crashed worker process
                            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                        finish(futures[future], result)
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    bar.close()
    return entries


def check_reusable(path: Path, spec: RunSpec) -> None:
    """Refuse to reuse (skip or resume) a run in the sweep directory that was made with
    another config than this grid point's: ``sweep.json`` would then describe runs that were
    never made. Where and how a run executes (threads, device, data folder) may differ."""
    if not (path / CONFIG).is_file():
        return
    stored = read_json(path / CONFIG)
    if not isinstance(stored, dict):
        return  # not a finished run: it is restarted, which --overwrite's checks guard
    try:
        old = validate_config(stored).model_dump(mode="json")
    except LorankError:
        return
    new = validate_config(spec.raw).model_dump(mode="json")
    changes = {k: v for k, v in config_changes(old, new).items() if k not in EXECUTION_KEYS}
    if changes:
        key, (was, now) = next(iter(changes.items()))
        raise LorankError(
            f"sweep: run {path} was made with {key} = {was!r}, but this sweep's point has "
            f"{now!r}; use another --out for a changed sweep (or delete that run)"
        )


def sweep_index(sweep: Sweep, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": "lorank-sweep/1",
        "config": sweep.config_path,
        "base": sweep.base,
        "grid": sweep.grid,
        "seeds": sweep.seeds,
        "published": sweep.published,
        "updated": datetime.now().isoformat(timespec="seconds"),
        "counts": {
            s: sum(e["status"] == s for e in entries)
            for s in ("completed", "diverged", "failed", "pending", "running")
        },
        "runs": entries,
    }


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    *,
    workers: int | None = None,
    data_dir: str | Path | None = None,
    quiet: bool = False,
) -> Path:
    """Run every point of ``sweep`` into ``out`` (resuming), write ``out/sweep.json``."""
    specs = sweep.runs()
    out = Path(out)
    run_specs(
        specs,
        out,
        workers=workers,
        data_dir=data_dir,
        quiet=quiet,
        index=lambda entries: sweep_index(sweep, entries),
    )
    return out
