"""Where a model to compress comes from: a lorank run directory or checkpoint, a plain PyTorch
``state_dict`` file (architecture and data from a ``model_config`` TOML), or a Hugging Face
model directory.

The Hugging Face part (loading, its forward and language-model loss on calibration windows,
its tokenizer, rebuilding a compressed model from a run directory) is the block below
``# ---- Hugging Face``; it needs the optional ``transformers``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorank.compress import huggingface
from lorank.compress.huggingface import load_huggingface_compressed
from lorank.core.io import load, read_metadata
from lorank.data import Dataset, load_dataset
from lorank.errors import LorankError
from lorank.training.config import RunConfig, apply_override, load_config, validate_config
from lorank.training.environment import resolve_device
from lorank.training.rundir import CONFIG, MODEL

__all__ = ["Source", "load_huggingface_compressed", "load_source"]


@dataclass
class Source:
    """A loaded model with what is known about it."""

    model: nn.Module
    kind: str  # "lorank" | "state_dict" | "huggingface"
    config: RunConfig | None
    data: Dataset | None = None
    path: Path | None = None  # a Hugging Face folder: where its tokenizer files are
    sentence_transformer: Path | None = None  # the sentence-transformers folder it came from


def load_source(
    source: str | Path,
    model_config: str | Path | None,
    overrides: list[str] | None,
    data_dir: str | Path | None = None,
) -> Source:
    """Load a lorank run/checkpoint, a plain state_dict file, or a Hugging Face directory."""
    path = Path(source)
    if not path.exists() and not path.with_suffix(".json").exists():
        raise LorankError(
            f"{path} not found; pass a lorank run directory, a checkpoint, a "
            "PyTorch state_dict file or a Hugging Face model directory"
        )
    st = huggingface.sentence_transformer_module(path) if path.is_dir() else None
    if st is not None:  # a sentence-transformers folder: compress its transformer
        model = huggingface.load_sentence_transformer_model(st[0])
        return Source(model, "huggingface", None, path=st[0], sentence_transformer=path)
    if huggingface.compressed_stem(path) is not None:  # what lorank compress wrote for HF
        hf_folder = path if path.is_dir() else path.parent
        return Source(load_huggingface_compressed(path), "huggingface", None, path=hf_folder)
    if path.is_dir() and not (path / "model.json").is_file():
        if _is_hf_directory(path):
            return Source(huggingface.load_pretrained(path), "huggingface", None, path=path)
        raise LorankError(
            f"{path} holds no model.json/model.safetensors; is it a finished lorank run directory?"
        )
    lorank_stem = _lorank_stem(path)
    if lorank_stem is not None:
        from lorank.training.evaluate import run_config_of

        read_metadata(lorank_stem)
        run_dir = lorank_stem.parent if (lorank_stem.parent / CONFIG).is_file() else None
        config = _with_overrides(
            run_config_of(run_dir, model_config and str(model_config)), overrides
        )
        return Source(load(lorank_stem).cpu(), "lorank", config)
    return _load_state_dict(path, model_config, overrides, data_dir)


def _lorank_stem(path: Path) -> Path | None:
    if path.is_dir():
        return path / MODEL
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem if stem.with_suffix(".json").is_file() else None


def _with_overrides(config: RunConfig, overrides: list[str] | None) -> RunConfig:
    if not overrides:
        return config
    raw = config.model_dump(mode="json")
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw)


def _load_state_dict(
    path: Path,
    model_config: str | Path | None,
    overrides: list[str] | None,
    data_dir: str | Path | None,
) -> Source:
    from lorank.models import build_model

    if model_config is None:
        raise LorankError(
            f"{path} is a plain state_dict: pass `model_config`, a TOML "
            "config whose [model] and [data] sections describe it"
        )
    config = load_config(model_config, overrides)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise LorankError(
            f"cannot read {path} as a PyTorch state_dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if (
        isinstance(state, Mapping)
        and "state_dict" in state
        and isinstance(state["state_dict"], Mapping)
    ):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise LorankError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    data = load_dataset(config.data, device=resolve_device(config.train.device), data_dir=data_dir)
    model = build_model(config.model, data.info)
    try:
        model.load_state_dict(dict(state))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise LorankError(
            f"{path} does not fit the [model] of {model_config}: {first[0].strip()}"
        ) from None
    return Source(model, "state_dict", config, data)


# ---------------------------------------------------------------------- Hugging Face


def _is_hf_directory(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(config, dict) and "model_type" in config


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
)


def _hf_tokenizer(source: Path) -> Any:
    import transformers

    fix = "save one there or pass a .pt/.safetensors/.npy tensor of token ids"
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        # AutoTokenizer may otherwise build an empty tokenizer from the model type alone.
        raise LorankError(
            f"{source} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) to "
            f"encode a text `calibration_file`; {fix}"
        )
    try:
        with huggingface.quiet_transformers(transformers):
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - no/unreadable tokenizer files: one user error
        reason = str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__
        raise LorankError(
            f"{source} has no usable tokenizer to encode a text `calibration_file` ({reason}); "
            f"{fix}"
        ) from None
    # Calibration text is cut into windows afterwards: a long text is not an error.
    tokenizer.model_max_length = int(1e30)
    return tokenizer
