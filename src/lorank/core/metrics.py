"""Per-model measurements every run logs, whatever method produced the model."""

from __future__ import annotations

import torch
from torch import nn

from lorank.core.convert import low_rank_layers


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``params_eval`` (what inference needs), ``params_train`` (trainable now) and
    ``params_dense`` (the same architecture with every low-rank layer dense)."""
    low_rank = low_rank_layers(model)
    inside = {id(p) for layer in low_rank.values() for p in layer.parameters()}
    other = [p for p in model.parameters() if id(p) not in inside]
    rest = sum(p.numel() for p in other)
    return {
        "params_eval": rest + sum(layer.params_eval for layer in low_rank.values()),
        "params_train": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params_dense": rest + sum(layer.params_dense for layer in low_rank.values()),
    }


def ranks(model: nn.Module) -> dict[str, int]:
    """``{layer name: active rank}`` for every low-rank layer (empty for a dense model)."""
    return {name: layer.rank for name, layer in low_rank_layers(model).items()}


@torch.no_grad()
def orthogonality_errors(model: nn.Module) -> dict[str, float]:
    """``{layer: max(‖UᵀU − I‖_F, ‖VᵀV − I‖_F)}``; 0 for orthonormal bases."""
    out = {}
    for name, layer in low_rank_layers(model).items():
        out[name] = max(_gram_error(layer.U), _gram_error(layer.V))
    return out


def _gram_error(factor: torch.Tensor) -> float:
    gram = factor.T @ factor
    return float(
        torch.linalg.matrix_norm(
            gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        )
    )


@torch.no_grad()
def low_rank_spectra(model: nn.Module) -> dict[str, list[float]]:
    """``{layer: singular values of W, descending}`` for every low-rank layer (from the
    factors: a QR of U and V and an r×r SVD, never the dense W)."""
    return {
        name: layer.singular_values().detach().double().cpu().tolist()
        for name, layer in low_rank_layers(model).items()
    }


def low_rank_scalars(model: nn.Module, prefix: str = "lorank/") -> dict[str, float]:
    """What the training-framework callbacks log: parameter counts and each layer's rank."""
    counts = parameter_counts(model)
    out = {f"{prefix}params_eval": float(counts["params_eval"])}
    out[f"{prefix}params_train"] = float(counts["params_train"])
    out |= {f"{prefix}rank/{name}": float(r) for name, r in ranks(model).items()}
    return out
