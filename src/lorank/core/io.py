"""Saving and loading: atomic files, and models as safetensors + a JSON side-car.

A saved model is two files: ``<stem>.safetensors`` (weights only: loading never runs code)
and ``<stem>.json`` (what rebuilds the architecture: the model config, the dataset shape it
was built for, and each low-rank layer's type, shape, rank and frozen factors).

Long because it holds save/load and the schema of ``model.json`` that every load validates
against.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorank.core.attention import LowRankMultiheadAttention, apply_attention_specs
from lorank.core.convert import low_rank_layers, replace_module
from lorank.core.layers import layer_from_spec
from lorank.errors import LorankError

FORMAT = "lorank-model/1"

# How deep a JSON or TOML value lorank reads may nest. Every file lorank writes nests a few
# levels; a file nested thousands deep would exhaust the recursion of every later step.
MAX_DEPTH = 32


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deep ``value`` nests (dicts and lists), counted without recursion and only up to
    ``limit + 1`` (enough to refuse it)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list | tuple):
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def check_depth(value: Any, where: str) -> None:
    if nesting_depth(value) > MAX_DEPTH:
        raise LorankError(
            f"{where} nests more than {MAX_DEPTH} levels of tables or lists; no lorank file or "
            "config value does: fix or remove it"
        )


def read_json_file(path: str | Path, what: str, fix: str) -> Any:
    """The JSON in ``path``: a missing, unreadable, non-UTF-8, malformed or absurdly nested
    file is a one-line :class:`LorankError` naming ``what`` it is and the ``fix``."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text)
    except FileNotFoundError:
        raise LorankError(f"{what} {path} not found; {fix}") from None
    except IsADirectoryError:
        raise LorankError(f"{what} {path} is a directory, not a file; {fix}") from None
    except OSError as e:
        raise LorankError(f"{what} {path} cannot be read ({e.strerror}); {fix}") from None
    except UnicodeDecodeError:
        raise LorankError(f"{what} {path} is corrupt: not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as e:
        raise LorankError(f"{what} {path} is corrupt: not valid JSON ({e}); {fix}") from None
    except RecursionError:
        raise LorankError(f"{what} {path} nests too deeply to read; {fix}") from None
    check_depth(value, f"{what} {path}")
    return value


def validation_message(error: ValidationError, where: str, fix: str) -> str:
    """One line for the first problem pydantic found in a file: the file, the field (dotted
    path), what is wrong with the value, and how to fix it."""
    err = error.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(the whole file)"
    value = err.get("input")
    shown = "" if isinstance(value, dict | list) else f" (got {_short(value)})"
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: field {field}: {message}{shown}; {fix}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------ model.json schema

# Sizes a saved layer may claim: a model.json is read before any weight, and the layer it
# describes is allocated from it, so these bound what a forged file can make lorank allocate.
MAX_FEATURES = 2**20
MAX_LAYER_PARAMS = 2**31

_Size = Annotated[int, Field(ge=1, le=MAX_FEATURES, strict=True)]
_Pair = Annotated[
    list[Annotated[int, Field(ge=1, le=1024, strict=True)]], Field(min_length=2, max_length=2)
]


class _Spec(BaseModel):
    # Other keys are allowed: a layer subclass may describe itself further (nn-svd's
    # symmetric layers add ``symmetric``), and :func:`layer_from_spec` reads only these.
    model_config = ConfigDict(extra="allow")

    rank: Annotated[int, Field(ge=1, le=MAX_FEATURES, strict=True)]
    core: Literal["full", "diag", "none"]
    bias: Annotated[bool, Field(strict=True)] = False  # embeddings have none
    frozen: list[Literal["U", "S", "V", "bias"]] = []

    def _check_rank(self, rows: int, cols: int) -> None:
        if self.rank > min(rows, cols):
            raise ValueError(f"rank {self.rank} exceeds min({rows}, {cols})")
        if self.rank * (rows + cols + self.rank) > MAX_LAYER_PARAMS:
            raise ValueError(f"a layer of rank {self.rank} and shape {rows}x{cols} is too large")


class LinearSpec(_Spec):
    type: Literal["linear"]
    in_features: _Size
    out_features: _Size

    @model_validator(mode="after")
    def _rank_fits(self) -> LinearSpec:
        self._check_rank(self.out_features, self.in_features)
        return self


class Conv2dSpec(_Spec):
    type: Literal["conv2d"]
    in_channels: _Size
    out_channels: _Size
    kernel_size: _Pair
    stride: _Pair
    padding: Literal["same", "valid"] | list[Annotated[int, Field(ge=0, le=1024, strict=True)]]
    dilation: _Pair

    @model_validator(mode="after")
    def _rank_fits(self) -> Conv2dSpec:
        if isinstance(self.padding, list) and len(self.padding) != 2:
            raise ValueError("padding must be two integers or 'same'/'valid'")
        kh, kw = self.kernel_size
        self._check_rank(self.out_channels, self.in_channels * kh * kw)
        return self


class HFConv1DSpec(LinearSpec):
    type: Literal["hf_conv1d"]  # type: ignore[assignment]


class Conv1dSpec(_Spec):
    type: Literal["conv1d"]
    in_channels: _Size
    out_channels: _Size
    kernel_size: Annotated[int, Field(ge=1, le=1024, strict=True)]
    stride: Annotated[int, Field(ge=1, le=1024, strict=True)]
    padding: Literal["same", "valid"] | Annotated[int, Field(ge=0, le=1024, strict=True)]
    dilation: Annotated[int, Field(ge=1, le=1024, strict=True)]

    @model_validator(mode="after")
    def _rank_fits(self) -> Conv1dSpec:
        self._check_rank(self.out_channels, self.in_channels * self.kernel_size)
        return self


class EmbeddingSpec(_Spec):
    type: Literal["embedding"]
    num_embeddings: Annotated[int, Field(ge=1, le=2**26, strict=True)]
    embedding_dim: _Size
    padding_idx: Annotated[int, Field(strict=True)] | None = None
    scale_grad_by_freq: Annotated[bool, Field(strict=True)] = False

    @model_validator(mode="after")
    def _rank_fits(self) -> EmbeddingSpec:
        self._check_rank(self.num_embeddings, self.embedding_dim)
        return self


class AttentionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["multihead_attention"] = "multihead_attention"
    qkv: Literal["packed", "separate"] = "packed"


class DataInfoSpec(BaseModel):
    """``data_info``: the fields of :class:`lorank.data.DatasetInfo`, bounded."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)]
    task: Literal["classification", "language_model", "forecast"]
    input_shape: Annotated[
        list[Annotated[int, Field(ge=1, le=2**16, strict=True)]], Field(min_length=1, max_length=3)
    ]
    num_classes: Annotated[int, Field(ge=0, le=2**20, strict=True)]  # 0: forecasting
    vocab: Annotated[str, Field(max_length=2**20)] | None
    train_size: Annotated[int, Field(ge=0, le=2**40, strict=True)]
    test_size: Annotated[int, Field(ge=0, le=2**40, strict=True)]
    horizon: Annotated[int, Field(ge=1, le=2**20, strict=True)] | None = None  # forecasting


class HuggingFaceInfo(BaseModel):
    """``huggingface``: the transformers class and config a compressed model is rebuilt from."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class_: Annotated[str, Field(alias="class", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,100}$")]
    config: dict[str, Any]


class ModelFile(BaseModel):
    """The schema of ``model.json`` (format ``lorank-model/1``); unknown top-level keys are
    allowed (callers store their own metadata), the ones lorank reads are checked."""

    model_config = ConfigDict(extra="allow")

    format: Literal["lorank-model/1"]
    low_rank_layers: dict[
        Annotated[str, Field(max_length=1000)],
        Annotated[
            LinearSpec | HFConv1DSpec | Conv2dSpec | Conv1dSpec | EmbeddingSpec,
            Field(discriminator="type"),
        ],
    ] = {}
    attention: dict[Annotated[str, Field(max_length=1000)], AttentionSpec] = {}
    model: dict[str, Any] | None = None
    data_info: DataInfoSpec | None = None
    method: str | None = None
    huggingface: HuggingFaceInfo | None = None


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


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (temp file, fsync, rename), with the same mode as
    every JSON file beside it: safetensors creates its files 0600 whatever the umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb") as f:
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
    atomic_save_tensors(_unshare(tensors), weights, {"format": FORMAT})
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
    """The JSON side-car of a saved model, validated against :class:`ModelFile`."""
    meta_path = _stem(path).with_suffix(".json")
    if not meta_path.is_file():
        raise LorankError(
            f"checkpoint metadata {meta_path} not found; pass a run directory or "
            "the path of a model saved with lorank.save"
        )
    meta = read_json_file(meta_path, "checkpoint metadata", "re-save the model")
    if not isinstance(meta, dict):
        raise LorankError(
            f"checkpoint metadata {meta_path} is corrupt (a JSON {type(meta).__name__}, not an "
            "object); re-save the model"
        )
    if meta.get("format") != FORMAT:
        raise LorankError(
            f"{meta_path} is not a lorank checkpoint (format "
            f"{_short(meta.get('format'))}, expected {FORMAT!r})"
        )
    try:
        ModelFile.model_validate(meta)
    except ValidationError as e:
        raise LorankError(
            validation_message(e, f"checkpoint metadata {meta_path}", "re-save the model")
        ) from None
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
        try:
            model = build_from_metadata(meta)
        except LorankError as e:
            raise LorankError(f"{stem}.json: {e}") from None
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
