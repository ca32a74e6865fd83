"""Calibration data from a file (``--calibration-file``): text encoded with the model's
characters or a Hugging Face tokenizer and cut into windows, or a tensor of inputs; read by
:func:`lorank.compress.calibration.read_calibration_file`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorank.compress import huggingface
from lorank.compress.sources import _hf_tokenizer
from lorank.data import Dataset
from lorank.errors import LorankError

__all__ = ["HF_BATCH", "HF_BLOCK", "calibration_file_batches"]


HF_BLOCK = 128  # tokens per calibration window of a Hugging Face model (capped by its context)


HF_BATCH = 8


def calibration_file_batches(
    model: nn.Module,
    content: str | Tensor,
    n: int | None,
    data: Dataset | None,
    source: Path,
    path: str | Path,
) -> list[tuple[Tensor]]:
    """The first ``n`` samples (default all) of a calibration file as ``(inputs,)`` batches.

    Text is encoded with the language model's characters (a lorank ``char_transformer``) or
    the tokenizer saved in the Hugging Face directory ``source``, and cut into windows of the
    model's context (a Hugging Face model: at most 128 tokens). A tensor holds token ids
    (N×T, or one 1-D stream that is cut the same way) for a language model, or float inputs
    (N × input shape, prepared as in training) for a classifier.
    """
    if data is None:
        inputs, batch_size = _hf_inputs(model, content, source, path), HF_BATCH
    else:
        inputs, batch_size = _lorank_inputs(model, content, data, path), data.batch_size
        inputs = inputs.to(data.device)
    inputs = inputs[:n] if n is not None else inputs
    return [(inputs[i : i + batch_size],) for i in range(0, len(inputs), batch_size)]


def _lorank_inputs(model: nn.Module, content: str | Tensor, data: Dataset, path: Any) -> Tensor:
    info = data.info
    if info.task == "language_model":
        assert info.vocab is not None
        block = info.input_shape[0]
        if isinstance(content, str):
            index = {ch: i for i, ch in enumerate(info.vocab)}
            unknown = sorted(set(content) - index.keys())
            if unknown:
                raise LorankError(
                    f"`calibration_file` {path} has {len(unknown)} character(s) the model's "
                    f"vocabulary lacks (e.g. {unknown[0]!r}); remove them or pass token ids"
                )
            ids = torch.tensor([index[ch] for ch in content], dtype=torch.long)
        else:
            ids = _token_ids(content, info.num_classes, path)
        return _windows(ids, block, block, path)
    if isinstance(content, str):
        raise LorankError(
            f"`calibration_file` {path} is text, but this {info.name} model takes tensors; "
            "pass a .pt/.safetensors/.npy of inputs shaped "
            f"(N, {', '.join(map(str, info.input_shape))})"
        )
    shape = tuple(info.input_shape)
    x = content
    if not x.is_floating_point():
        raise LorankError(
            f"`calibration_file` {path} holds {x.dtype} values; pass the float inputs the "
            "model sees (normalised as in training)"
        )
    if tuple(x.shape) == shape:
        x = x.unsqueeze(0)
    per_sample = torch.Size(shape).numel()
    if x.ndim < 2 or x.shape[1:].numel() != per_sample:
        raise LorankError(
            f"`calibration_file` {path} holds a tensor of shape {tuple(content.shape)}; "
            f"this model takes inputs shaped (N, {', '.join(map(str, shape))})"
        )
    dtype = next(model.parameters()).dtype
    return x.reshape(-1, *shape).to(dtype)


def _token_ids(t: Tensor, vocab_size: int | None, path: Any) -> Tensor:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise LorankError(
            f"`calibration_file` {path} holds {t.dtype} values; a language model needs "
            "integer token ids"
        )
    if t.ndim not in (1, 2):
        raise LorankError(
            f"`calibration_file` {path} holds a tensor of shape {tuple(t.shape)}; pass token "
            "ids shaped (N, T) or one 1-D stream"
        )
    low, high = int(t.min()), int(t.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise LorankError(
            f"`calibration_file` {path} has token ids in [{low}, {high}], outside the model's "
            f"vocabulary [0, {vocab_size}); encode it with the model's tokenizer"
        )
    return t.long()


def _windows(ids: Tensor, block: int, context: int, path: Any) -> Tensor:
    """(N, T) ids as they are (T ≤ context), or a 1-D stream cut into windows of ``block``."""
    if ids.ndim == 2:
        if ids.shape[1] > context:
            raise LorankError(
                f"`calibration_file` {path} has sequences of {ids.shape[1]} tokens, longer "
                f"than the model's context of {context}; cut them or pass a 1-D stream"
            )
        return ids
    if len(ids) <= block:
        return ids[None]
    usable = len(ids) // block * block
    return ids[:usable].reshape(-1, block)


def _hf_inputs(model: nn.Module, content: str | Tensor, source: Path, path: Any) -> Tensor:
    if not huggingface.takes_tokens(model):  # a vision model: pixel values
        return huggingface.float_inputs(model, content, path)
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    context = (
        getattr(config, "n_positions", None)
        or getattr(config, "max_position_embeddings", None)
        or HF_BLOCK
    )
    if isinstance(content, str):
        ids = torch.tensor(_hf_tokenizer(source)(content)["input_ids"], dtype=torch.long)
        if ids.numel() == 0:
            raise LorankError(
                f"`calibration_file` {path} encodes to no tokens with the tokenizer in {source}"
            )
        ids = _token_ids(ids, vocab_size, path)
    else:
        ids = _token_ids(content, vocab_size, path)
    return _windows(ids, min(HF_BLOCK, context), context, path)
