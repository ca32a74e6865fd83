"""Run configuration: TOML files validated by pydantic, with dotted command-line overrides.

Each component owns its small config (``DataConfig`` in ``data.py``, model configs in
``models.py``, ``OptimConfig`` in ``optim.py``, method configs beside each method); this file
only composes them and turns validation failures into one-line messages.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorank.core.optim import OptimConfig
from lorank.core.reference import document_fields
from lorank.data import DataConfig
from lorank.errors import LorankError
from lorank.methods import AnyMethodConfig
from lorank.methods.dense import DenseConfig
from lorank.models import MLPConfig, ModelConfig
from lorank.training.rundir import CONFIG
from lorank.training.sinks import LogConfig


class TrainConfig(BaseModel):
    """The training loop's own settings."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=0, description="passes over the training set")
    seed: int = Field(0, ge=0, description="seeds Python, NumPy, torch and the data order")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present")
    eval_every: int = Field(1, ge=1, description="evaluate on the test split every N epochs")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    checkpoint_every: int = Field(
        1, ge=0, description="write a resumable checkpoint every N epochs (0: never)"
    )
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="on a NaN/inf loss: stop the run (diverged) or skip that batch"
    )
    measure_energy: bool = Field(
        False, description="read RAPL/NVML energy counters while training (energy_j)"
    )


class RunConfig(BaseModel):
    """A whole run: ``[data]``, ``[model]``, ``[method]``, ``[optim]``, ``[train]``."""

    model_config = ConfigDict(extra="forbid")

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=MLPConfig)
    method: AnyMethodConfig = Field(default_factory=DenseConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    log: LogConfig = Field(default_factory=LogConfig)


for _section in (RunConfig, DataConfig, OptimConfig, TrainConfig, LogConfig):
    document_fields(_section)  # help(TrainConfig) lists every option


#: The example configs shipped inside the package (``lorank init`` copies one out).
PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def packaged_configs() -> dict[str, Path]:
    """``{name: path}`` of the configs shipped in the package, e.g. ``mnist-mlp-dense``."""
    return {p.stem: p for p in sorted(PACKAGED_CONFIGS.glob("*.toml"))}


def find_config(name_or_path: str | Path) -> Path:
    """A config file by path, or a packaged config by name (``mnist-mlp-dense``, also written
    ``configs/mnist-mlp-dense.toml`` as in a clone of the repository)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise LorankError(
            f"{path} is a directory; pass a config file (a .toml, or a run's config.json)"
        )
    known = packaged_configs()
    parts = path.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "configs"):
        name = path.name.removesuffix(".toml")
        if name in known:
            return known[name]
    raise LorankError(
        f"config file {path} does not exist; pass the path to a .toml file, a run's "
        "config.json, or the name of a packaged config (`lorank init` lists them)"
    )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw tables of a TOML config, or of a run's ``config.json`` (which re-runs it)."""
    path = find_config(path)
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise LorankError(f"config file {path} is not valid {kind}: {e}") from None
    if not isinstance(raw, dict):
        raise LorankError(f"config file {path} holds a {type(raw).__name__}, not a table")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML file (or start from defaults), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw)


# A [model] or [method] section without ``name`` means the default variant.
SECTION_DEFAULT_NAMES = {"model": "mlp", "method": "dense"}


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The resolved config a run directory was trained with, plus ``key=value`` overrides."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise LorankError(f"{path} not found; --resume needs a lorank run directory")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LorankError(f"{path} is unreadable ({e}); the run cannot be resumed") from None
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw)


def validate_config(raw: dict[str, Any]) -> RunConfig:
    raw = dict(raw)
    for section, default in SECTION_DEFAULT_NAMES.items():
        if isinstance(raw.get(section), dict) and "name" not in raw[section]:
            raw[section] = {"name": default, **raw[section]}
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise LorankError(describe_validation_error(e, raw)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in the nested dict; the value is parsed as a TOML value when it
    can be (numbers, booleans, lists, quoted strings), else kept as a bare string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise LorankError(
            f"override {item!r} is not of the form section.key=value (e.g. --set optim.lr=3e-4)"
        )
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise LorankError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def describe_validation_error(error: ValidationError, raw: dict[str, Any]) -> str:
    """One line for the first problem: the dotted key, what is wrong, what is allowed."""
    err = error.errors()[0]
    loc = [str(p) for p in err["loc"] if not _is_union_tag(p, raw)]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1], raw)
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"config error: unknown key '{key}'{hint}"
    if err["type"] == "union_tag_invalid":
        return f"config error: {key}.name: {err['msg']}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    message = err["msg"].removeprefix("Value error, ")
    return f"config error: {key}: {message}{shown}"


def _is_union_tag(part: Any, raw: dict[str, Any]) -> bool:
    # pydantic inserts the discriminator value ("svd", "mlp") into error locations.
    return isinstance(part, str) and part in _union_tags()


def _model_classes() -> dict[str, type[BaseModel]]:
    """``{name: config class}`` of the model zoo, read off the ``ModelConfig`` union."""
    union = get_args(ModelConfig)[0]
    return {cls.model_fields["name"].default: cls for cls in get_args(union)}


def _union_tags() -> set[str]:
    from lorank.methods import METHODS

    return set(METHODS) | set(_model_classes())


def _allowed_keys(loc: tuple, raw: dict[str, Any]) -> list[str]:
    """Field names of the config section at ``loc`` (following discriminators in ``raw``)."""
    from lorank.methods import METHODS

    model: type[BaseModel] | None = RunConfig
    node: Any = raw
    for part in loc:
        if model is None or _is_union_tag(part, raw):
            continue
        node = node.get(part, {}) if isinstance(node, dict) else {}
        if part == "method" and model is RunConfig:
            name = node.get("name", "dense") if isinstance(node, dict) else "dense"
            model = METHODS[name].config_class if name in METHODS else None
        elif part == "model" and model is RunConfig:
            name = node.get("name", "mlp") if isinstance(node, dict) else "mlp"
            model = _model_classes().get(name)
        else:
            annotation = model.model_fields[part].annotation if part in model.model_fields else None
            model = (
                annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel)
                else None
            )
    return sorted(model.model_fields) if model is not None else []
