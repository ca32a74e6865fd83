"""Run configuration: TOML files validated by pydantic, with dotted command-line overrides.

Each component owns its small config (``DataConfig`` in ``data.py``, model configs in
``models.py``, ``OptimConfig`` in ``optim.py``, method configs beside each method); this file
only composes them and turns validation failures into one-line messages.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorank.core.io import MAX_DEPTH, check_depth, read_json_file
from lorank.core.optim import OptimConfig
from lorank.core.reference import document_fields
from lorank.data import DataConfig
from lorank.errors import LorankError
from lorank.methods import AnyMethodConfig
from lorank.methods.dense import DenseConfig
from lorank.models import MLPConfig, ModelConfig
from lorank.training.rundir import CONFIG, flat_config
from lorank.training.schemas import CONFIG_FORMAT, MAX_EPOCHS
from lorank.training.sinks import LogConfig

# Bounds on every number that sizes memory or time, checked before anything is allocated
# or written: beyond them a value is a typo (an extra zero, a seed of 2**64), not a plan.
MAX_SEED = 2**32 - 1  # NumPy's seed range; torch and Python take it as well
MAX_THREADS = 1024
MAX_INT = 2**31 - 1  # any other integer setting (ranks, steps, sample counts)
# Per dotted key; the data section's belong to lorank.data but are bounded here, where the
# run's config is composed.
BOUNDS: dict[str, int] = {
    "data.batch_size": 2**20,
    "data.eval_batch_size": 2**20,
    "data.block_size": 2**16,
    "data.synthetic_train": 2**24,
    "data.synthetic_test": 2**24,
    "data.synthetic_classes": 2**16,
    "data.synthetic_seed": MAX_SEED,
    "method.seed": MAX_SEED,
    "method.finetune_epochs": MAX_EPOCHS,
    "method.switch_epoch": MAX_EPOCHS,
}
# Elements of the synthetic problem (samples × features): 2**28 float32 values are 1 GiB.
MAX_SYNTHETIC_VALUES = 2**28


class TrainConfig(BaseModel):
    """The training loop's own settings."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=0, le=MAX_EPOCHS, description="passes over the training set")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seeds Python, NumPy, torch and the data order"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present")
    eval_every: int = Field(
        1, ge=1, le=MAX_EPOCHS, description="evaluate on the test split every N epochs"
    )
    threads: int | None = Field(
        None, ge=1, le=MAX_THREADS, description="torch CPU threads (default: torch's)"
    )
    checkpoint_every: int = Field(
        1, ge=0, le=MAX_EPOCHS, description="write a resumable checkpoint every N epochs (0: never)"
    )
    keep_checkpoints: int = Field(
        2, ge=1, le=1000, description="how many recent checkpoints to keep"
    )
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
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_bytes().decode("utf-8")
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except OSError as e:
        raise LorankError(f"config file {path} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise LorankError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise LorankError(f"config file {path} is not valid {kind}: {e}") from None
    except RecursionError:
        raise LorankError(
            f"config file {path} nests tables or lists too deeply to read; flatten it"
        ) from None
    if not isinstance(raw, dict):
        raise LorankError(f"config file {path} holds a {type(raw).__name__}, not a table")
    check_depth(raw, f"config file {path}")
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
    raw = read_json_file(path, "run config", "the run cannot be resumed; start it again")
    if not isinstance(raw, dict):
        raise LorankError(
            f"run config {path} holds a JSON {type(raw).__name__}, not an object; the run "
            "cannot be resumed; start it again"
        )
    for item in overrides or []:
        apply_override(raw, item)
    try:
        return validate_config(raw)
    except LorankError as e:
        raise LorankError(f"{path}: {e}") from None


def validate_config(raw: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from raw tables (a TOML file or a run's ``config.json``, whose
    ``resumes`` list is the run's history, not a setting), with every bound checked."""
    check_depth(raw, "the config")
    raw = dict(raw)
    if isinstance(raw.get("resumes"), list):
        raw.pop("resumes")
    if "format" in raw:  # a run's config.json (a TOML config has no format)
        if raw["format"] != CONFIG_FORMAT:
            raise LorankError(
                f"config error: format {str(raw['format'])[:40]!r} is not {CONFIG_FORMAT!r}; "
                "the file was written by another lorank version, or is not a lorank config"
            )
        raw.pop("format")
    for section, default in SECTION_DEFAULT_NAMES.items():
        if isinstance(raw.get(section), dict) and "name" not in raw[section]:
            raw[section] = {"name": default, **raw[section]}
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise LorankError(describe_validation_error(e, raw)) from None
    check_values(raw, config)
    return config


def check_values(raw: dict[str, Any], config: RunConfig) -> None:
    """What pydantic's lax parsing lets through: ``true`` or ``"10"`` read as a number, NaN
    and infinity, and numbers past the bounds of :data:`BOUNDS`."""
    given = flat_config(raw)
    for key, value in flat_config(config.model_dump()).items():
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise LorankError(f"config error: {key}: must be a finite number (got {v})")
            if isinstance(v, int) and not isinstance(v, bool):
                limit = BOUNDS.get(key, MAX_INT)
                if abs(v) > limit:
                    raise LorankError(f"config error: {key}: must be at most {limit:,} (got {v:,})")
        original = given.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(original, bool | str):
                raise LorankError(f"config error: {key}: a number is expected (got {original!r})")
    data = config.data
    values = data.synthetic_train * math.prod(data.synthetic_shape)
    if data.name == "synthetic" and values > MAX_SYNTHETIC_VALUES:
        raise LorankError(
            f"config error: data.synthetic_train x synthetic_shape is {values:,} values, more "
            f"than {MAX_SYNTHETIC_VALUES:,} (1 GiB); use fewer samples or smaller samples"
        )


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
    except RecursionError:
        raise LorankError(f"override {key}: the value nests too deeply; flatten it") from None
    check_depth(value, f"override {key}")
    parts = key.split(".")
    if len(parts) > MAX_DEPTH or not all(parts):
        raise LorankError(
            f"override {item[:80]!r}: {key[:80]!r} is not a dotted key such as optim.lr"
        )
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
