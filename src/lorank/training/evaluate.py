"""Evaluate a saved model (a run directory or a checkpoint) on its dataset's test split."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorank.core.io import load, read_json_file, read_metadata
from lorank.core.metrics import parameter_counts, ranks
from lorank.data import Dataset, load_dataset
from lorank.errors import LorankError
from lorank.training.config import RunConfig, load_config, validate_config
from lorank.training.environment import resolve_device
from lorank.training.rundir import CONFIG, MODEL


def task_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The task's training loss, told apart by the targets' dtype: integer targets are
    classes (cross-entropy over B×C logits, or B×T×V for the language model), floating
    targets are values to regress (mean squared error, e.g. forecasts B×horizon×C)."""
    x, y = batch
    out = model(x)
    if y.is_floating_point():
        return F.mse_loss(out, y)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    target_std: Tensor | None = None,
) -> dict[str, float]:
    """Mean loss and accuracy (per sample, or per token for the language model).

    For floating (regression) targets: ``loss`` = ``mse`` and ``mae`` per target value, and,
    when ``target_std`` (one scale per last-axis channel) is given, ``mse_orig`` and
    ``mae_orig`` in the data's original units (errors times the channel's scale).
    """
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    count = 0

    def add(key: str, value: Tensor) -> None:
        value = value.double().cpu()
        sums[key] = sums[key] + value if key in sums else value

    for x, y in batches:
        out = model(x)
        if y.is_floating_point():
            err = out - y
            add("mse", err.square().sum())
            add("mae", err.abs().sum())
            if target_std is not None:
                err = err * target_std
                add("mse_orig", err.square().sum())
                add("mae_orig", err.abs().sum())
        else:
            logits, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
            add("loss", F.cross_entropy(logits, y, reduction="sum"))
            add("acc", (logits.argmax(-1) == y).sum())
        count += y.numel()
    model.train(was_training)
    metrics = {k: float(v) / max(count, 1) for k, v in sums.items()}
    if "mse" in metrics:
        metrics = {"loss": metrics["mse"], **metrics}
    return metrics


def evaluate_split(model: nn.Module, data: Dataset, split: str = "test") -> dict[str, float]:
    """:func:`evaluate` on a split of ``data``, in original units too where it has them."""
    return evaluate(model, data.eval_batches(split), data.target_std)


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """``{"loss": 1.0}`` -> ``{"test_loss": 1.0}`` (the names metrics.jsonl uses)."""
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def locate_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint stem, run directory or None) for a run directory or checkpoint path."""
    path = Path(path)
    if path.is_dir():
        stem = path / MODEL
        if not stem.with_suffix(".json").is_file():
            raise LorankError(
                f"{path} holds no model.json/model.safetensors; is it a finished "
                "lorank run directory?"
            )
        return stem, path
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    if not stem.with_suffix(".json").is_file():
        raise LorankError(f"checkpoint {path} not found; pass a run directory or model.safetensors")
    run_dir = stem.parent if (stem.parent / CONFIG).is_file() else None
    return stem, run_dir


def run_config_of(run_dir: Path | None, config_path: str | None) -> RunConfig:
    if config_path:
        return load_config(config_path)
    if run_dir is None:
        raise LorankError(
            "this checkpoint is not inside a run directory; pass --config with "
            "the [data] section to evaluate it on"
        )
    path = run_dir / CONFIG
    fix = "pass --config with the [data] section to evaluate on"
    raw = read_json_file(path, "run config", fix)
    if not isinstance(raw, dict):
        raise LorankError(f"run config {path} holds a JSON {type(raw).__name__}; {fix}")
    try:
        return validate_config(raw)
    except LorankError as e:
        raise LorankError(f"{path}: {e}") from None


def evaluate_checkpoint(
    path: str | Path, data_dir: str | Path | None = None, config_path: str | None = None
) -> dict[str, Any]:
    stem, run_dir = locate_checkpoint(path)
    read_metadata(stem)  # fail early, with a clear message, on a foreign or corrupt file
    config = run_config_of(run_dir, config_path)
    device = resolve_device(config.train.device)
    data = load_dataset(config.data, device=device, data_dir=data_dir)
    model = load(stem).to(device)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise LorankError(
            f"checkpoint {stem.with_suffix('.safetensors')} holds NaN or inf weights ({bad[0]}"
            "): the run diverged; evaluate one of its earlier checkpoints "
            "(checkpoints/epoch-NNNN) instead"
        )
    test = evaluate_split(model, data, "test")
    return {
        "checkpoint": str(stem.with_suffix(".safetensors")),
        **prefixed("test", test),
        **parameter_counts(model),
        "ranks": ranks(model),
    }
