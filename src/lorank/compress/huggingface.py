r"""Hugging Face models in ``lorank compress``: the class, head and format they came with.

**Loading.** A Hugging Face model folder (``config.json`` with a ``model_type``) is loaded as
the class its ``config.json`` names in ``architectures`` (``BertModel`` stays a
``BertModel``, ``BertForMaskedLM`` keeps its MLM head, ``T5ForConditionalGeneration`` its LM
head), not as whatever an ``AutoModel*`` guess returns. A folder without ``architectures``
falls back to ``AutoModel``; a class this transformers does not have, or a folder its class
cannot load, is one ``lorank: error:`` line naming the class.

**Calibration forward.** :func:`forward_fn` runs a batch the way the model takes it: token ids
as ``input_ids`` (or the model's ``main_input_name``: ``pixel_values`` for a vision
transformer, given as a float tensor N×C×H×W), and for an encoder-decoder (T5) the same
sequence shifted right as ``decoder_input_ids``, so calibration hooks see both stacks. A
failure of the model's own forward is one error line naming the class and transformers' own
first line of explanation.

**Loss.** :func:`calibration_loss` picks the loss lorank's searches, ``svd_comparison`` and
``--loss-tolerance`` measure, and says which it is (``calibration_loss_kind`` in
``summary.json``):

* a causal language model (a class transformers registers for causal LM) uses its own LM
  loss on the calibration windows (``"lm"``);
* every other model (encoders with or without a head, encoder-decoders, vision models) uses
  an **output-preservation loss**: the relative squared error of the model's output against
  the uncompressed model's on the same batch,
  :math:`\|y - y_0\|_F^2 / \|y_0\|_F^2`, where y is the ``logits`` of a model with a head and
  the ``last_hidden_state`` otherwise (``"relative_output_mse:<which>"``). It is 0 for the
  uncompressed model, so ``--loss-tolerance 0.01`` asks for at most 1% output error.

**Writing.** :func:`write_folder` puts the Hugging Face ``config.json`` (the same class in
``architectures``), the tokenizer/processor files of the source folder and
``generation_config.json`` beside lorank's ``lorank.safetensors`` (the factors) and
``lorank.json`` (the class, the config and each layer's rank). :func:`load_huggingface_compressed`
rebuilds the same class from that folder, with outputs identical to the compressed model.
A sentence-transformers folder (``modules.json``; the transformer at the root or in a
subfolder) is compressed through its transformer and written back in its own layout
(:func:`write_sentence_transformer`), loadable with ``SentenceTransformer``.
The weights hold factors, not dense matrices. They are deliberately not named
``model.safetensors``: transformers' ``from_pretrained`` would load such a file with every
factorized weight "missing", randomly initialised, and only a warning; without it,
``from_pretrained`` stops with an error instead (load with lorank, or ``lorank.merge`` and
``save_pretrained`` for a dense copy).

Long because Hugging Face models need their own loading, calibration forward, losses and
saving, kept out of the generic pipeline.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorank.core.io import load, read_metadata, save
from lorank.errors import LorankError

__all__ = [
    "AUX_FILES",
    "architecture",
    "calibration_loss",
    "compressed_stem",
    "float_inputs",
    "forward_fn",
    "load_huggingface_compressed",
    "load_pretrained",
    "main_input_name",
    "quiet_transformers",
    "sentence_transformer_module",
    "write_folder",
    "write_sentence_transformer",
]

#: the stem of the factors (``.safetensors``) and the rank metadata (``.json``) in an output
STEM = "lorank"

#: files of a Hugging Face folder that describe inputs, not weights: copied to the output
AUX_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "generation_config.json",
    "chat_template.jinja",
)


def _transformers(path: Path) -> Any:
    try:
        import transformers
    except ImportError:
        raise LorankError(
            f"{path} is a Hugging Face model directory; install the optional "
            "extra (pip install 'lorank[hf]') to compress it"
        ) from None
    return transformers


@contextlib.contextmanager
def quiet_transformers(transformers: Any) -> Iterator[None]:
    """Silence transformers' progress bars and config warnings (they would bury lorank's
    one-line errors)."""
    logging = transformers.utils.logging
    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def architecture(path: str | Path) -> str | None:
    """The first class ``config.json`` names in ``architectures`` (None when it names none)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    names = config.get("architectures") or []
    return names[0] if names and isinstance(names[0], str) else None


def load_pretrained(path: str | Path) -> nn.Module:
    """The model in the Hugging Face folder ``path``, as the class its config names."""
    path = Path(path)
    transformers = _transformers(path)
    name = architecture(path)
    cls = transformers.AutoModel if name is None else getattr(transformers, name, None)
    if cls is None:
        raise LorankError(
            f"{path}/config.json names the class {name!r}, which transformers "
            f"{transformers.__version__} does not have; install a version that has it"
        )
    shown = name or "AutoModel"
    with quiet_transformers(transformers):
        try:
            return cls.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any failure to load is one user-facing line
            raise LorankError(f"cannot load {path} as {shown}: {_first_line(e)}") from None


def main_input_name(model: nn.Module) -> str:
    """The keyword the model's forward takes its main input as (``input_ids``,
    ``pixel_values``, ...)."""
    return str(getattr(model, "main_input_name", "input_ids"))


def takes_tokens(model: nn.Module) -> bool:
    return main_input_name(model) == "input_ids"


def float_inputs(model: nn.Module, content: str | Tensor, path: Any) -> Tensor:
    """A calibration tensor for a model that takes floats (``pixel_values``): N×C×H×W."""
    name = main_input_name(model)
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", None)
    size = getattr(config, "image_size", None)
    expected = f"(N, {channels or 'C'}, {size or 'H'}, {size or 'W'})"
    if isinstance(content, str) or not content.is_floating_point():
        raise LorankError(
            f"`calibration_file` {path}: {type(model).__name__} takes {name}; pass a "
            f".pt/.safetensors/.npy float tensor shaped {expected}"
        )
    x = content if content.ndim == 4 else content.unsqueeze(0)
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        raise LorankError(
            f"`calibration_file` {path} holds a tensor of shape {tuple(content.shape)}; "
            f"{type(model).__name__} takes {name} shaped {expected}"
        )
    dtype = next(model.parameters()).dtype
    return x.to(dtype)


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _shift_right(model: nn.Module, ids: Tensor) -> Tensor:
    config = model.config
    start = config.decoder_start_token_id
    if start is None:
        start = config.pad_token_id if config.pad_token_id is not None else 0
    out = ids.new_full(ids.shape, start)
    out[:, 1:] = ids[:, :-1]
    return out


def model_kwargs(model: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
    """The forward's keyword arguments for one batch of main inputs."""
    kwargs = {main_input_name(model): inputs}
    if _is_encoder_decoder(model) and takes_tokens(model):
        # Teacher forcing on the same text: the decoder stack sees real tokens too.
        kwargs["decoder_input_ids"] = _shift_right(model, inputs)
    return kwargs


def _call(model: nn.Module, kwargs: dict[str, Tensor]) -> Any:
    try:
        return model(**kwargs)
    except LorankError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own failure, reported in one line
        given = ", ".join(f"{k} {tuple(v.shape)}" for k, v in kwargs.items())
        raise LorankError(
            f"{type(model).__name__}'s forward failed on the calibration batch ({given}): "
            f"{_first_line(e)}"
        ) from None


def forward_fn(model: nn.Module) -> Callable[[nn.Module, tuple[Tensor, ...]], Any]:
    """``forward(model, batch)`` for calibration hooks: the model's forward on ``batch[0]``."""

    def forward(m: nn.Module, batch: tuple[Tensor, ...]) -> Any:
        return _call(m, model_kwargs(m, batch[0]))

    return forward


def _is_causal_lm(model: nn.Module) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - very old transformers
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _primary_output(out: Any) -> tuple[str, Tensor]:
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, Tensor):
            return key, value
    if isinstance(out, Tensor):
        return "output", out
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return "output", out[0]
    raise LorankError(
        f"the model returned {type(out).__name__} with no logits or last_hidden_state to "
        "compare; lorank cannot measure an output-preservation loss for it"
    )


class OutputPreservationLoss:
    """``‖y − y₀‖²_F / ‖y₀‖²_F`` of the model's output y against the uncompressed output y₀
    on the same batch (references computed once, when built, from the model as it is)."""

    def __init__(self, model: nn.Module, batches: list[tuple[Tensor, ...]]) -> None:
        self.references: dict[int, Tensor] = {}
        self.output = ""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    key, y = _primary_output(_call(model, model_kwargs(model, batch[0])))
                    self.output = key
                    self.references[id(batch[0])] = y.detach().double()
        finally:
            model.train(was_training)

    @property
    def kind(self) -> str:
        return f"relative_output_mse:{self.output}"

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        reference = self.references.get(id(batch[0]))
        if reference is None:
            raise LorankError("output-preservation loss asked for a batch it has no reference for")
        _, y = _primary_output(_call(model, model_kwargs(model, batch[0])))
        error = (y.double() - reference).pow(2).sum()
        return error / reference.pow(2).sum().clamp_min(1e-300)


def calibration_loss(
    model: nn.Module, batches: list[tuple[Tensor, ...]]
) -> tuple[Callable[[nn.Module, tuple[Tensor, ...]], Tensor], str]:
    """The loss on calibration ``batches`` and its kind (module docstring): a causal LM's
    own loss, else the output-preservation loss against the model as it is now."""
    if _is_causal_lm(model):
        transformers = _transformers(Path("."))

        def lm_loss(m: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
            with quiet_transformers(transformers):
                out = _call(m, {"input_ids": batch[0], "labels": batch[0]})
            return out.loss

        return lm_loss, "lm"
    loss = OutputPreservationLoss(model, batches)
    return loss, loss.kind


def write_folder(
    model: nn.Module, source: Path, out: Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write a compressed Hugging Face model to the folder ``out`` (module docstring):
    ``config.json``, the source's tokenizer/processor files, ``lorank.safetensors`` and
    ``lorank.json`` (with ``metadata``). Returns the weights' path."""
    config = model.config
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    for name in AUX_FILES:
        if (source / name).is_file() and not (out / name).exists():
            shutil.copy2(source / name, out / name)
    hf = {"class": type(model).__name__, "config": config.to_dict()}
    return save(model, out / STEM, {**(metadata or {}), "huggingface": hf})


def compressed_stem(path: str | Path) -> Path | None:
    """The lorank stem of a compressed Hugging Face model at ``path`` (its folder, or the
    weights/metadata file), or None when ``path`` is not one. Also reads run directories
    written before the folder layout (``model.json`` with a ``huggingface`` entry)."""
    path = Path(path)
    stems = [path / STEM, path / "model"] if path.is_dir() else [path.with_suffix("")]
    for stem in stems:
        meta_path = stem.with_suffix(".json")
        if not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("huggingface"), dict):
            return stem
    return None


def load_huggingface_compressed(path: str | Path) -> nn.Module:
    """Reload a Hugging Face model compressed by ``lorank compress`` from its folder: the
    same transformers class, its low-rank layers rebuilt by :func:`lorank.core.io.load`, in
    eval mode."""
    stem = compressed_stem(path)
    if stem is None:
        raise LorankError(
            f"{path} is not a Hugging Face model compressed by lorank (no {STEM}.json); "
            "pass the folder lorank compress wrote, or use lorank.load"
        )
    hf = read_metadata(stem)["huggingface"]
    transformers = _transformers(Path(path))
    cls = getattr(transformers, hf["class"], None)
    if cls is None:
        raise LorankError(
            f"transformers {transformers.__version__} has no class {hf['class']!r}; "
            "install the version that wrote the model"
        )
    with quiet_transformers(transformers):
        config = cls.config_class.from_dict(hf["config"])
        model = cls(config)
    return load(stem, model).eval()


# ---------------------------------------------------------------------- sentence-transformers

#: the ``modules.json`` type of a compressed transformer module (:mod:`lorank.compress.sbert`)
ST_TRANSFORMER = "lorank.compress.sbert.LowRankTransformer"


def sentence_transformer_module(path: str | Path) -> tuple[Path, str] | None:
    """``(folder of its transformer, that module's path in modules.json)`` when ``path`` is a
    sentence-transformers model folder (the transformer in a subfolder or at the root);
    None otherwise."""
    path = Path(path)
    try:
        modules = json.loads((path / "modules.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    for entry in modules if isinstance(modules, list) else []:
        kind = str(entry.get("type", "")) if isinstance(entry, dict) else ""
        if kind == ST_TRANSFORMER or (
            kind.startswith("sentence_transformers.") and kind.endswith(".Transformer")
        ):
            sub = str(entry.get("path", ""))
            return path / sub, sub
    return None


def load_sentence_transformer_model(folder: Path) -> nn.Module:
    """The transformers model of a sentence-transformers transformer module's ``folder``
    (dense, or one lorank compressed before)."""
    if compressed_stem(folder) is not None:
        return load_huggingface_compressed(folder)
    return load_pretrained(folder)


def write_sentence_transformer(
    model: nn.Module, source: Path, out: Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write a compressed sentence-transformers model: every module of ``source`` as it was
    (pooling, normalisation, dense heads, their configs), the transformer module's folder as
    :func:`write_folder` writes it, and its ``modules.json`` type :data:`ST_TRANSFORMER`, the
    module class that loads the factors (``SentenceTransformer(out, trust_remote_code=True)``:
    sentence-transformers ≥ 6 asks for the flag for any module class outside its package)."""
    found = sentence_transformer_module(source)
    assert found is not None
    folder, sub = found
    weights = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}
    weights |= {f"{STEM}.safetensors", f"{STEM}.json"}

    def skip(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if n in weights} if Path(directory) == folder else set()

    shutil.copytree(source, out, ignore=skip, dirs_exist_ok=True)
    path = write_folder(model, folder, out / sub, metadata)
    modules = json.loads((source / "modules.json").read_text())
    for entry in modules:
        if str(entry.get("path", "")) == sub:
            entry["type"] = ST_TRANSFORMER
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else "") or type(e).__name__
