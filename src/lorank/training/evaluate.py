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
from lorank.data import load_dataset
from lorank.errors import LorankError
from lorank.training.config import RunConfig, load_config, validate_config
from lorank.training.environment import resolve_device
from lorank.training.rundir import CONFIG, MODEL


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
    test = evaluate(model, data.eval_batches("test"))
    return {
        "checkpoint": str(stem.with_suffix(".safetensors")),
        "test_loss": test["loss"],
        "test_acc": test["acc"],
        **parameter_counts(model),
        "ranks": ranks(model),
    }
