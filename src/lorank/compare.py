"""``lorank compare``: every method on the same model and data budget, then the report.

The flagship command. It trains ``dense``, ``factorized``, ``svd``, ``dlrt`` and ``oialr`` on
one MLP with the same data, optimizer (Adam, lr 1e-3, cosine schedule), batch size, epochs and
seeds, fits the gradient-free baselines ``pil`` and ``bipil`` to the same MLP, compresses each
dense run by truncated SVD with no retraining (``nnsvd``, via
:func:`lorank.compress.compress`), and writes :func:`lorank.report.report` into ``OUT/``. Runs
go to ``OUT/runs/<method>,seed=<s>/`` and are resumable exactly like a sweep.

**The default budget** (chosen to finish in a few minutes on a 2-core laptop CPU with the
MNIST files embedded in the package): MNIST, all 60k training images, MLP 784-256-256-10,
batch 256, 5 epochs, seed 0, two worker processes with one torch thread each. One epoch of
the dense MLP takes about 2-5 s on one core; the low-rank methods cost 0.5-1.6× that.
Method settings, scaled to the budget:

* ``factorized``: rank 1/8 of each hidden layer's full rank (32 for 256 units), classifier
  dense;
* ``svd``: start at 40% of full rank, λ_o = 1, Hoyer λ_s = 0.003, prune by ``energy=0.02``
  at the start of a one-epoch fine-tune (λ_s = 0) at the end;
* ``dlrt``: rank-adaptive parallel integrator, τ = 0.15, initial and maximal rank 50%;
* ``oialr``: dense for the first ⌈epochs/3⌉ epochs, then S-only training with a basis
  update and cut (β = 0.3, at most half a layer's rank per update) every half epoch;
* ``pil`` and ``bipil``: the gradient-free baselines with their defaults (one closed-form
  fit on the same MLP, no optimizer; ``bipil`` chooses its depth, up to the MLP's, on 10% of
  the training samples held out, and runs its two twins at half width each), a few seconds
  each;
* ``nnsvd``: the dense run compressed with ``loss-tolerance=0.02`` (seed 003's search: the
  largest truncation δ whose training-loss change on 2048 fixed samples stays below 0.02),
  evaluated with no training. (A dense MLP trained this briefly has a flat spectrum: a
  relative ``tolerance=0.1`` keeps every layer at full rank.)
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorank.config import apply_override, validate_config
from lorank.errors import LorankError
from lorank.io import atomic_write_json
from lorank.sweep import RunSpec, plan_workers, run_specs, run_status

METHODS = ("dense", "factorized", "svd", "dlrt", "oialr", "pil", "bipil", "nnsvd")
TRAINED = ("dense", "factorized", "svd", "dlrt", "oialr", "pil", "bipil")
DATASETS = ("mnist", "fashion-mnist", "synthetic")
DEFAULT_EPOCHS = 5
DEFAULT_HIDDEN = (256, 256)
NNSVD_RULE = "loss-tolerance=0.02"


def parse_hidden(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.replace("x", ",").split(",") if w.strip()]
    except ValueError:
        widths = []
    if not widths or any(w < 1 for w in widths):
        raise LorankError(f"--hidden {text!r}: give layer widths like 256,256")
    return widths


def base_config(
    dataset: str,
    epochs: int,
    hidden: Sequence[int],
    train_subset: int | None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """The shared run config every method starts from."""
    raw: dict[str, Any] = {
        "data": {"name": dataset, "batch_size": 256},
        "model": {"name": "mlp", "hidden": list(hidden)},
        "method": {"name": "dense"},
        "optim": {"name": "adam", "lr": 1e-3, "schedule": "cosine"},
        "train": {"epochs": epochs, "seed": 0},
    }
    if train_subset:
        raw["data"]["train_subset"] = train_subset
    for item in overrides:
        apply_override(raw, item)
    return raw


def method_settings(name: str, epochs: int, steps_per_epoch: int) -> dict[str, Any]:
    """The ``[method]`` table of each compared method, scaled to the budget."""
    if name == "dense":
        return {"name": "dense"}
    if name == "factorized":
        return {"name": "factorized", "rank": 0.125, "keep_last_dense": True}
    if name == "svd":
        return {
            "name": "svd",
            "rank": 0.4,
            "lambda_orth": 1.0,
            "lambda_sparsity": 0.003,
            "sparsity": "hoyer",
            "rule": "energy=0.02",
            "finetune_epochs": 1 if epochs >= 2 else 0,
            "prune_at_end": epochs < 2,
        }
    if name == "dlrt":
        return {
            "name": "dlrt",
            "integrator": "parallel",
            "adaptive": True,
            "tolerance": 0.15,
            "init_rank": 0.5,
            "r_min": 2,
            "r_max": 0.5,
        }
    if name in ("pil", "bipil"):
        return {"name": name}  # gradient-free: one closed-form fit, epochs and optim unused
    if name == "oialr":
        dense_epochs = max(1, math.ceil(epochs / 3)) if epochs > 1 else 0
        return {
            "name": "oialr",
            "delay": max(1, dense_epochs * steps_per_epoch),
            "frequency": max(1, steps_per_epoch // 2),
            "cutoff": 0.3,
            "max_cut_fraction": 0.5,
            "keep_last_dense": True,
        }
    raise LorankError(f"compare: unknown method {name!r} (choose from {', '.join(METHODS)})")


def _steps_per_epoch(raw: dict[str, Any], data_dir: str | Path | None) -> int:
    from lorank.data import load_dataset

    config = validate_config(raw)
    data = load_dataset(config.data, device="cpu", data_dir=data_dir)
    return data.num_train_batches


def compare(
    out: str | Path,
    *,
    dataset: str = "mnist",
    epochs: int | None = None,
    seeds: Sequence[int] = (0,),
    hidden: Sequence[int] | None = None,
    train_subset: int | None = None,
    methods: Sequence[str] | None = None,
    workers: int | None = None,
    overrides: Sequence[str] = (),
    data_dir: str | Path | None = None,
    quiet: bool = False,
) -> Path:
    """Train and compress every method into ``out/runs/``, write the report into ``out``."""
    from lorank.compress import compress
    from lorank.report import report

    if dataset not in DATASETS:
        raise LorankError(f"--dataset {dataset!r}: compare trains an MLP on {', '.join(DATASETS)}")
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    if epochs < 1:
        raise LorankError(f"--epochs {epochs} must be >= 1")
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LorankError(
            f"compare: unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})"
        )
    if "nnsvd" in methods and "dense" not in methods:
        methods.insert(0, "dense")  # nnsvd compresses the dense run
    out = Path(out)
    runs_dir = out / "runs"
    start = time.perf_counter()

    base = base_config(dataset, epochs, hidden or DEFAULT_HIDDEN, train_subset, overrides)
    steps = _steps_per_epoch(base, data_dir)
    specs = []
    for method in (m for m in methods if m in TRAINED):
        for seed in seeds:
            raw = copy.deepcopy(base)
            raw["method"] = method_settings(method, epochs, steps)
            raw["train"]["seed"] = seed
            validate_config(raw)
            name = f"{method},seed={seed}"
            specs.append(RunSpec(name, {"method": method}, seed, raw, "compare"))
    n_workers, threads = plan_workers(len(specs), workers, base["train"].get("threads"))
    entries = run_specs(
        specs,
        runs_dir,
        workers=n_workers,
        data_dir=data_dir,
        quiet=quiet,
        index=lambda entries: {"format": "lorank-sweep/1", "base": base, "runs": entries},
    )

    if "nnsvd" in methods:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads * n_workers)
        try:
            for seed in seeds:
                source = runs_dir / f"dense,seed={seed}"
                target = runs_dir / f"nnsvd,seed={seed}"
                if run_status(source) != "completed" or run_status(target) == "completed":
                    continue
                compress(source, NNSVD_RULE, target, data_dir=data_dir, overwrite=True)
        finally:
            torch.set_num_threads(previous)

    title = (
        f"lorank compare: {dataset}, MLP {'-'.join(str(h) for h in base['model']['hidden'])}, "
        f"{epochs} epochs, seeds {','.join(str(s) for s in seeds)}"
    )
    report([runs_dir], out, title=title)
    atomic_write_json(
        out / "compare.json",
        {
            "dataset": dataset,
            "epochs": epochs,
            "seeds": list(seeds),
            "methods": methods,
            "base": base,
            "workers": n_workers,
            "threads_per_worker": threads,
            "nnsvd_rule": NNSVD_RULE,
            "runs": entries,
            "wall_time_s": time.perf_counter() - start,
        },
    )
    return out


def load_compare(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "compare.json").read_text())
