"""Training checkpoints that resume a run exactly: model (with current ranks), optimizer,
LR schedule, method state, every RNG, and the metrics written so far.

Layout: ``RUN/checkpoints/epoch-NNNN/`` holding ``model.safetensors`` + ``model.json`` (see
:mod:`lorank.core.io`), ``state.safetensors`` (every tensor of the optimizer, method and RNG state)
and ``state.json`` (everything else, with ``{"__tensor__": key}`` placeholders). A checkpoint
is written into a hidden temporary folder and renamed into place, so a crash never leaves a
half-written ``epoch-*`` folder; only the newest ``keep`` checkpoints are kept.

The optimizer's state is stored by parameter *name*, not by position, because methods that
change ranks replace parameters and so change the optimizer's parameter order.

Long because a checkpoint holds the model, optimizer, schedule, method and RNG state, each
with its exact restore.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from lorank.core.convert import merge
from lorank.core.io import (
    atomic_save_tensors,
    atomic_write_json,
    load,
    read_json_file,
    read_metadata,
    save,
)
from lorank.errors import LorankError
from lorank.training.rundir import MODEL
from lorank.training.schemas import TrainingState, validate_file

CHECKPOINTS = "checkpoints"


def split_tensors(obj: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    """Replace every tensor inside ``obj`` by a placeholder, collecting it in ``tensors``."""
    if isinstance(obj, Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [split_tensors(k, tensors, prefix), split_tensors(v, tensors, prefix)]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, list | tuple):
        items = [split_tensors(v, tensors, prefix) for v in obj]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    return obj


def join_tensors(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`split_tensors`; a malformed skeleton raises ``ValueError``."""
    try:
        return _join(obj, tensors)
    except KeyError as e:
        raise ValueError(f"it refers to tensor {e} that state.safetensors lacks") from None
    except (TypeError, ValueError, AttributeError, RecursionError) as e:
        raise ValueError(f"its structure is malformed ({type(e).__name__}: {e})") from None


def _join(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            if obj.get("dtype") not in ("uint32", "int64", "float64", "float32"):
                raise ValueError(f"unexpected array dtype {obj.get('dtype')!r}")
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """The optimizer's state keyed by parameter names of ``model``."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in names]
        if missing:
            raise RuntimeError(
                "the optimizer holds a parameter the model no longer has; "
                "a method changed shapes without lorank.core.optim.swap_parameters"
            )
        groups.append(
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": [names[id(p)] for p in group["params"]],
            }
        )
    state = {names[id(p)]: s for p, s in optimizer.state.items() if id(p) in names}
    return {"param_groups": groups, "state": state}


def check_like(live: Any, saved: Any, where: str) -> None:
    """Raise :class:`LorankError` unless ``saved`` (read from a checkpoint) has the structure
    and kinds of ``live`` (what this run's own object holds): the same keys, list lengths,
    and finite, non-negative numbers where it has numbers. torch would otherwise accept a
    tampered value and fail, or silently misbehave, steps later."""

    def bad(what: str) -> LorankError:
        return LorankError(
            f"checkpoint {where}: {what}; the checkpoint is corrupt or from another config"
        )

    if isinstance(live, bool) or live is None:
        if not (saved is None or isinstance(saved, bool)):
            raise bad(f"{saved!r} should be true, false or null")
    elif isinstance(live, int | float):
        if isinstance(saved, bool) or not isinstance(saved, int | float):
            raise bad(f"{str(saved)[:40]!r} should be a number")
        if not (math.isfinite(saved) and -1 <= saved <= 2**62):
            raise bad(f"{saved!r} is not a finite number >= 0")
    elif isinstance(live, str):
        if not isinstance(saved, str):
            raise bad(f"{str(saved)[:40]!r} should be a string")
    elif isinstance(live, dict):
        if not isinstance(saved, dict) or set(saved) != set(live):
            raise bad("a table has other keys than this run's")
        for key, value in live.items():
            check_like(value, saved[key], f"{where}.{key}")
    elif isinstance(live, list | tuple):
        if not isinstance(saved, list | tuple) or len(saved) != len(live):
            raise bad(f"should be a list of {len(live)}")
        for i, (a, b) in enumerate(zip(live, saved, strict=True)):
            check_like(a, b, f"{where}[{i}]")
    elif isinstance(live, Tensor):
        if not isinstance(saved, Tensor) or saved.dtype != live.dtype:
            raise bad(f"should be a {live.dtype} tensor")


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict[str, Any]
) -> None:
    """Rebuild ``optimizer``'s param groups and state from :func:`optimizer_state`."""
    params = dict(model.named_parameters())
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise LorankError(
            "checkpoint optimizer has a different number of parameter groups; "
            "resume with the config the run was started with"
        )
    device = next(model.parameters()).device
    optimizer.state.clear()
    for i, (group, saved_group) in enumerate(
        zip(optimizer.param_groups, saved["param_groups"], strict=True)
    ):
        # Settings both know (another torch version may add or drop one).
        live = {k: v for k, v in group.items() if k != "params" and k in saved_group}
        check_like(live, {k: saved_group[k] for k in live}, f"optimizer group {i}")
        if "betas" in live and not all(0 <= b < 1 for b in saved_group["betas"]):
            raise LorankError(
                f"checkpoint optimizer group {i}: betas {saved_group['betas']} are not in [0, 1)"
            )
        for key, value in saved_group.items():
            if key != "params":
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
        try:
            group["params"] = [params[name] for name in saved_group["params"]]
        except KeyError as e:
            raise LorankError(
                f"checkpoint optimizer refers to parameter {e} that the rebuilt "
                "model lacks; the checkpoint does not match this config"
            ) from None
    expected = _state_keys(optimizer)
    for name, state in saved["state"].items():
        if state and expected is not None and set(state) != expected:
            raise LorankError(
                f"checkpoint optimizer state of {name!r} has the entries {sorted(state)}, not "
                f"{sorted(expected)} as {type(optimizer).__name__} keeps; the checkpoint is "
                "corrupt or from another optimizer"
            )
        step = state.get("step")
        if step is not None and not (
            (isinstance(step, Tensor) and step.numel() == 1 and bool(torch.isfinite(step).all()))
            or (isinstance(step, int | float) and not isinstance(step, bool) and step >= 0)
        ):
            raise LorankError(f"checkpoint optimizer state {name}.step is not a step count")
        if name not in params:
            raise LorankError(
                f"checkpoint optimizer state names parameter {name!r} that the rebuilt model "
                "lacks; the checkpoint does not match this config"
            )
        for key, value in state.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != params[name].shape:
                raise LorankError(
                    f"checkpoint optimizer state {name}.{key} has shape {tuple(value.shape)}, "
                    f"not the parameter's {tuple(params[name].shape)}; the checkpoint is corrupt "
                    "or from another config"
                )
        # Own, freshly allocated copies: tensors read from a file can sit at any offset of
        # one buffer, and vectorized kernels may round differently on unaligned memory.
        optimizer.state[params[name]] = {
            k: v.to(device, copy=True) if isinstance(v, Tensor) and v.dim() > 0 else v
            for k, v in state.items()
        }


def _state_keys(optimizer: torch.optim.Optimizer) -> set[str] | None:
    """The per-parameter state entries ``optimizer`` keeps (e.g. Adam: step, exp_avg,
    exp_avg_sq), found by one step of the same optimizer, with the same settings, on a
    one-element probe; None if it cannot be built that way."""
    import inspect

    cls = type(optimizer)
    accepted = set(inspect.signature(cls.__init__).parameters)
    settings = {
        k: v for k, v in optimizer.param_groups[0].items() if k != "params" and k in accepted
    }
    probe = nn.Parameter(torch.zeros(1))
    try:
        probe_optimizer = cls([probe], **settings)
        probe.grad = torch.zeros(1)
        probe_optimizer.step()
    except (TypeError, ValueError, RuntimeError):
        return None
    return set(probe_optimizer.state[probe])


def rng_state(data_generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "data": data_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], data_generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(
    run_dir: Path,
    epoch: int,
    model: nn.Module,
    model_meta: dict[str, Any],
    training_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``checkpoints/epoch-NNNN`` atomically (temp folder + rename); prune old ones."""
    root = run_dir / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / f"epoch-{epoch:04d}"
    tmp = root / f".tmp-epoch-{epoch:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save(model, tmp / MODEL, model_meta)
    tensors: dict[str, Tensor] = {}
    skeleton = split_tensors(training_state, tensors, "t")
    atomic_save_tensors(tensors, tmp / "state.safetensors")
    atomic_write_json(tmp / "state.json", skeleton)
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CHECKPOINT_FILES = (f"{MODEL}.safetensors", f"{MODEL}.json", "state.safetensors", "state.json")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary folders are ignored)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.glob("epoch-*") if re.fullmatch(r"epoch-\d{4,}", p.name) and p.is_dir()
    )


def checkpoint_epoch(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("epoch-"))


def read_training_state(checkpoint: Path) -> dict[str, Any]:
    """The training state of ``checkpoint``, validated (:class:`TrainingState`); any problem
    is a :class:`LorankError` naming the file and what is wrong."""
    fix = "it is corrupt: delete this checkpoint folder to resume from the one before"
    path = checkpoint / "state.json"
    skeleton = read_json_file(path, "checkpoint state", fix)
    try:
        tensors = load_file(checkpoint / "state.safetensors")
    except (OSError, SafetensorError) as e:
        raise LorankError(
            f"checkpoint tensors {checkpoint / 'state.safetensors'} are unreadable ({e}); {fix}"
        ) from None
    try:
        state = join_tensors(skeleton, tensors)
    except ValueError as e:
        raise LorankError(f"checkpoint state {path} is invalid: {e}; {fix}") from None
    validated = validate_file(TrainingState, state, path, fix)
    if validated.epoch != checkpoint_epoch(checkpoint):
        raise LorankError(
            f"checkpoint state {path}: field epoch: {validated.epoch} does not match the folder "
            f"name {checkpoint.name}; {fix}"
        )
    return state


def check_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """Validate every file of ``checkpoint`` (present, schema, weights readable to the last
    byte) and return its training state; raises :class:`LorankError` saying what is wrong."""
    for name in CHECKPOINT_FILES:
        if not (checkpoint / name).is_file():
            raise LorankError(f"{name} is missing")
    read_metadata(checkpoint / MODEL)
    weights = checkpoint / f"{MODEL}.safetensors"
    try:
        load_file(weights)  # reads every tensor: a truncated file fails here, not mid-resume
    except (OSError, SafetensorError) as e:
        raise LorankError(f"{weights.name} is unreadable ({e})") from None
    return read_training_state(checkpoint)


def usable_checkpoint(
    run_dir: Path, last_epoch: int | None = None
) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest checkpoint of ``run_dir`` that validates completely (and, when
    ``last_epoch`` is given, whose epoch ``metrics.jsonl`` still has), its training state,
    and one line per newer checkpoint skipped, saying why."""
    skipped: list[str] = []
    for checkpoint in reversed(complete_checkpoints(run_dir)):
        if last_epoch is not None and checkpoint_epoch(checkpoint) > last_epoch:
            skipped.append(
                f"{checkpoint.name} (metrics.jsonl has complete records only up to epoch "
                f"{last_epoch})"
            )
            continue
        try:
            state = check_checkpoint(checkpoint)
        except LorankError as e:
            skipped.append(f"{checkpoint.name} ({e})")
            continue
        return checkpoint, state, skipped
    why = f": {'; '.join(skipped)}" if skipped else ""
    raise LorankError(
        f"{run_dir} has no complete checkpoint to resume from (looked in "
        f"{run_dir / CHECKPOINTS}{why}); start the run again"
    )


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint that validates completely."""
    return usable_checkpoint(run_dir)[0]


def apply_training_state(
    checkpoint: Path,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    method: Any,
    model: nn.Module,
    data_generator: torch.Generator,
) -> None:
    """Load a validated training state into the run's objects; a state that does not fit
    them (another config, a hand-edited file) is a one-line error, not a traceback."""
    try:
        load_optimizer_state(optimizer, model, state["optimizer"])
        check_like(scheduler.state_dict(), state["scheduler"], "LR schedule")
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        set_rng_state(state["rng"], data_generator)
    except LorankError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise LorankError(
            f"checkpoint {checkpoint} does not fit this run ({type(e).__name__}: {e}); resume "
            "with the config it was written with, or delete the checkpoint"
        ) from None


def restore_model(model: nn.Module, checkpoint: Path) -> None:
    """Give ``model`` the checkpoint's structure (which layers are low-rank, at which ranks,
    which factors are frozen) and weights, whatever structure it had before."""
    merge(model)  # back to the dense architecture; load() then applies the saved layer specs
    load(checkpoint / MODEL, model)
