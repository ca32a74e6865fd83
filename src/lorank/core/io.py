"""Saving and loading: atomic files, and models as safetensors + a JSON side-car.

A saved model is two files: ``<stem>.safetensors`` (weights only: loading never runs code)
and ``<stem>.json`` (what rebuilds the architecture: the model config, the dataset shape it
was built for, and each low-rank layer's type, shape, rank and frozen factors).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorank.core.attention import LowRankMultiheadAttention, apply_attention_specs
from lorank.core.convert import low_rank_layers, replace_module
from lorank.core.layers import layer_from_spec
from lorank.errors import LorankError

FORMAT = "lorank-model/1"


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, then rename, so
    a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600 files; results should be shareable
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def save(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Save weights to ``<path>.safetensors`` and shapes to ``<path>.json``, atomically.

    ``metadata`` (e.g. ``{"model": model_config_dict, "data_info": ...}``) is stored in the
    JSON so :func:`load` can rebuild a zoo model without being given one.
    """
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    layers = {name: layer.spec() for name, layer in low_rank_layers(model).items()}
    attention = {
        name: m.spec()
        for name, m in model.named_modules()
        if isinstance(m, LowRankMultiheadAttention)
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = stem.with_suffix(".safetensors")
    fd, tmp = tempfile.mkstemp(dir=weights.parent, prefix=f".{weights.name}.", suffix=".tmp")
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    try:
        save_file(_unshare(tensors), tmp, metadata={"format": FORMAT})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, weights)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(
        stem.with_suffix(".json"),
        {
            "format": FORMAT,
            "low_rank_layers": layers,
            **({"attention": attention} if attention else {}),
            **(metadata or {}),
        },
    )
    return weights


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): store copies.
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON side-car of a saved model."""
    meta_path = _stem(path).with_suffix(".json")
    if not meta_path.is_file():
        raise LorankError(
            f"checkpoint metadata {meta_path} not found; pass a run directory or "
            "the path of a model saved with lorank.save"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LorankError(
            f"checkpoint metadata {meta_path} is corrupt ({e}); re-save the model"
        ) from None
    if meta.get("format") != FORMAT:
        raise LorankError(
            f"{meta_path} is not a lorank checkpoint (format "
            f"{meta.get('format')!r}, expected {FORMAT!r})"
        )
    return meta


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a model saved with :func:`save`.

    With ``model`` given (the dense architecture), its layers are replaced by low-rank
    layers of the saved shapes and the weights are loaded into it. Without, the model is
    rebuilt from the model config stored in the metadata (lorank model-zoo models).
    """
    stem = _stem(path)
    meta = read_metadata(stem)
    if model is None:
        model = build_from_metadata(meta)
    # Attention modules first: the low-rank layers named in the specs live inside them.
    apply_attention_specs(model, meta.get("attention", {}))
    apply_layer_specs(model, meta.get("low_rank_layers", {}))
    weights = stem.with_suffix(".safetensors")
    if not weights.is_file():
        raise LorankError(f"checkpoint weights {weights} not found beside {stem}.json")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise LorankError(
            f"checkpoint weights {weights} are corrupt or truncated ({e}); restore them or retrain"
        ) from None
    device = next(model.parameters()).device
    try:
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise LorankError(
            f"checkpoint {weights} does not fit this model: {first[0].strip()}"
        ) from None
    return model


# How ``load(path)`` without a model rebuilds the architecture from the metadata. The core
# knows no model zoo; :mod:`lorank.models` registers its builder here when imported.
_MODEL_BUILDERS: list[Callable[[dict[str, Any]], nn.Module | None]] = []


def register_model_builder(builder: Callable[[dict[str, Any]], nn.Module | None]) -> None:
    """Let :func:`load` rebuild models it has no instance of: ``builder(metadata)`` returns
    the dense architecture, or ``None`` when the metadata is not one it knows."""
    if builder not in _MODEL_BUILDERS:
        _MODEL_BUILDERS.append(builder)


def build_from_metadata(meta: dict[str, Any]) -> nn.Module:
    for builder in _MODEL_BUILDERS:
        model = builder(meta)
        if model is not None:
            return model
    raise LorankError(
        "checkpoint metadata has no model config; pass the model to lorank.load(path, model)"
    )


def apply_layer_specs(model: nn.Module, specs: dict[str, dict]) -> None:
    """Replace the named modules of ``model`` by low-rank layers of the given specs."""
    names = dict(model.named_modules())
    for name, spec in specs.items():
        if name not in names:
            raise LorankError(
                f"checkpoint has a low-rank layer {name!r} that this model lacks; "
                "load it with the architecture it was trained with"
            )
        layer = layer_from_spec(spec)
        ref = next(names[name].parameters(), None)
        if ref is not None:
            layer.to(device=ref.device, dtype=ref.dtype)
        replace_module(model, name, layer)
