r"""``lorank compress``: post-training compression by truncated SVD (nn-svd, seed 001).

Every Linear/Conv2d of a trained model (and every low-rank layer, which is truncated further)
is replaced by its best rank-k approximation :math:`W_k = U_k \Sigma_k V_k^\top`
(Eckart–Young: :math:`\|W - W_k\|_2 = \sigma_{k+1}`), stored as a ``LowRankLinear`` /
``LowRankConv2d`` with a diagonal core. The rank of each layer comes from

* a rank rule on that layer's singular values (``rank=16``, ``tolerance=0.1``,
  ``energy=0.01``, ``cutoff=0.1``, ... see :mod:`lorank.core.rank`), or
* ``loss-tolerance=ε``: seed 003's loss-bounded search (:mod:`lorank.core.search`), the largest δ
  whose ``delta(δ)`` truncation changes the training loss on a fixed subset by less than ε.

A dense layer whose chosen rank would not save parameters (r(m+n) ≥ mn) is left dense. The
compressed model is evaluated with no training (test loss/accuracy and parameter counts
before and after, per-layer ranks, the largest output change on the calibration subset and,
for MLPs, seed 003's Theorem-1 bound), optionally fine-tuned for N epochs with the ordinary
trainer (:func:`lorank.training.trainer.train`, method ``dense`` on the already-low-rank model), and
written as a run directory:

* ``summary.json`` the figures above (``test_acc_before``/``test_acc_after``,
  ``params_eval_before``/``params_eval_after``, ``ranks``, ``layers``, ``search``,
  ``theorem1``, and ``test_acc`` / ``params_eval`` of the final model),
* ``compress.json`` the options, ``config.json`` a run config that rebuilds and evaluates the
  model (``lorank eval OUT``), ``metrics.jsonl``, ``env.json``, ``model.safetensors/json``.

The directory is assembled beside ``--out`` and renamed into place at the end, so an
interrupted compression never leaves a half-written run.

Sources: a lorank run directory or checkpoint; a plain PyTorch ``state_dict`` file
(``torch.load(weights_only=True)``; the architecture and dataset come from ``--model-config``);
or a Hugging Face model directory (needs ``transformers``; compressed and saved, not
evaluated on a test set, since lorank has no data pipeline for it).

**Calibration data.** ``--calibration N`` takes the first N training samples; with
``--calibration-file`` it takes them from a file instead (:func:`calibration_file_batches`:
text encoded with the model's characters or the Hugging Face directory's tokenizer, or a
tensor of inputs). A Hugging Face model is calibrated through its own forward
(``model(input_ids=...)``, hooks on its GPT-2 ``Conv1D`` layers see the rows x of
``x @ weight``, the same X as for the Linear ``W = weightᵀ``); a causal LM's own loss on the
calibration windows, or for any other model the relative error of its output against the
uncompressed model, stands in for the training loss (``calibration_loss_before/after``,
``calibration_loss_kind``, ``svd_comparison``, loss tolerances). An output layer whose weight
is tied to the input embedding stays dense (``tied_layers_kept``): factorizing it would add
parameters. Loading as the class ``config.json`` names, the output folder's layout and
:func:`load_huggingface_compressed` are in :mod:`lorank.compress.huggingface`.

**Ranks.** ``--budget B`` allocates a global budget (:mod:`lorank.compress.allocation`);
``--loss-tolerance ε`` searches the smallest budget whose allocation keeps the loss change
below ε (:func:`lorank.compress.allocation.budget_search`), while ``--rule loss-tolerance=ε`` is the
per-layer δ-rule search above.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorank.compress import huggingface
from lorank.compress.allocation import ALLOCATIONS, allocate, budget_search
from lorank.compress.calibration import (
    DEFAULT_DAMPING,
    activation_spectra,
    collect_second_moments,
    read_calibration_file,
)
from lorank.compress.huggingface import load_huggingface_compressed
from lorank.core.adapters import low_rank_from
from lorank.core.convert import LayerSelection, candidate_layers, replace_module, shared_parameters
from lorank.core.io import load, read_metadata, save
from lorank.core.layers import LowRankLayer
from lorank.core.metrics import parameter_counts, ranks
from lorank.core.rank import RULE_FORMS, RankRule
from lorank.core.search import (
    LayerSpectrum,
    layer_spectra,
    loss_bounded_search,
    max_input_norm,
    max_output_difference,
    mean_loss,
    rule_ranks,
    theorem1_bound,
    truncated,
)
from lorank.data import Dataset, load_dataset
from lorank.errors import LorankError, TrainingDiverged
from lorank.training.config import (
    MAX_EPOCHS,
    RunConfig,
    apply_override,
    load_config,
    validate_config,
)
from lorank.training.environment import environment, resolve_device
from lorank.training.evaluate import evaluate_split, prefixed, task_loss
from lorank.training.flops import inference_flops
from lorank.training.rundir import (
    COMPRESS,
    CONFIG,
    ENV,
    MODEL,
    SUMMARY,
    Run,
    check_output_dir,
    read_json,
    replace_dir,
    temp_dir_beside,
)
from lorank.training.trainer import train

LOSS_TOLERANCE_KEY = "loss-tolerance"
SVD_KINDS: tuple[str, ...] = ("plain", "activation")


@dataclass
class CompressionRule:
    """A rank rule, or the loss-bounded search with tolerance ``epsilon``."""

    rule: RankRule | None = None
    epsilon: float | None = None

    @classmethod
    def parse(cls, text: str) -> CompressionRule:
        key, sep, value = text.strip().partition("=")
        if key.strip().lower().replace("_", "-") == LOSS_TOLERANCE_KEY:
            try:
                epsilon = float(value)
            except ValueError:
                epsilon = float("nan")
            if not sep or not epsilon > 0 or epsilon == float("inf"):
                raise LorankError(
                    f"rank rule {text!r}: loss-tolerance needs a number > 0, "
                    "e.g. loss-tolerance=0.01"
                )
            return cls(epsilon=epsilon)
        try:
            return cls(rule=RankRule.parse(text))
        except LorankError as e:
            raise LorankError(str(e).replace(RULE_FORMS, rule_help())) from None

    def __str__(self) -> str:
        return f"{LOSS_TOLERANCE_KEY}={self.epsilon!r}" if self.rule is None else str(self.rule)


@dataclass
class Source:
    """A loaded model with what is known about it."""

    model: nn.Module
    kind: str  # "lorank" | "state_dict" | "huggingface"
    config: RunConfig | None
    data: Dataset | None = None
    path: Path | None = None  # a Hugging Face folder: where its tokenizer files are
    sentence_transformer: Path | None = None  # the sentence-transformers folder it came from


# Samples a compression may ask to run through the model (--samples, --calibration).
MAX_SAMPLES = 2**24


def compress(
    source: str | Path,
    rule: str | CompressionRule,
    out: str | Path,
    *,
    finetune_epochs: int = 0,
    model_config: str | Path | None = None,
    data_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    samples: int = 2048,
    precision: float = 0.01,
    overwrite: bool = False,
    quiet: bool = True,
    svd: str = "plain",
    calibration: int | None = None,
    budget: float | None = None,
    allocation: str = "greedy",
    damping: float = DEFAULT_DAMPING,
    calibration_file: str | Path | None = None,
    loss_tolerance: float | None = None,
) -> Path:
    """Compress ``source`` by truncated SVD into the run directory ``out``; return its path.

    Example::

        lorank.compress.compress("runs/mlp-dense", "tolerance=0.3", "runs/mlp-tol0.3")
    """
    rule = rule if isinstance(rule, CompressionRule) else CompressionRule.parse(rule)
    out = Path(out)
    if not 0 <= finetune_epochs <= MAX_EPOCHS:
        raise LorankError(f"--finetune-epochs {finetune_epochs} must be in [0, {MAX_EPOCHS}]")
    if not 1 <= samples <= MAX_SAMPLES:
        raise LorankError(f"--samples {samples} must be in [1, {MAX_SAMPLES}]")
    if calibration is not None and calibration > MAX_SAMPLES:
        raise LorankError(f"--calibration {calibration} must be at most {MAX_SAMPLES}")
    if not math.isfinite(precision):
        raise LorankError(f"--precision {precision} must be a number in (0, 1), e.g. 0.01")
    if svd not in SVD_KINDS:
        raise LorankError(f"--svd {svd!r}: choose one of {', '.join(SVD_KINDS)}")
    if calibration is not None and calibration < 1:
        raise LorankError(f"--calibration {calibration} must be >= 1 samples")
    if budget is not None and not 0 < budget <= 1:
        raise LorankError(f"--budget {budget} must be in (0, 1], e.g. --budget 0.5")
    if loss_tolerance is not None:
        if budget is not None:
            raise LorankError(
                "--budget and --loss-tolerance both choose the global budget; pass one of them"
            )
        if not 0 < loss_tolerance < float("inf"):
            raise LorankError(f"--loss-tolerance {loss_tolerance} must be > 0, e.g. 0.05")
        if not 0 < precision < 1:
            raise LorankError(f"--precision {precision} must be in (0, 1), e.g. 0.01")
    if allocation not in ALLOCATIONS:
        raise LorankError(f"--allocation {allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
    if not (math.isfinite(damping) and damping >= 0):
        raise LorankError(f"--damping {damping} must be a finite number >= 0, e.g. 1e-4")
    # --out may never be, hold or sit inside what compress reads (see check_output_dir).
    inputs = [p for p in (source, model_config, calibration_file) if p is not None]
    check_output_dir(out, overwrite, protect=inputs)
    file_content = read_calibration_file(calibration_file) if calibration_file else None
    src = load_source(source, model_config, overrides, data_dir)
    if src.config is not None and src.config.train.threads:
        torch.set_num_threads(src.config.train.threads)
    hf = src.kind == "huggingface"
    needs_loss = loss_tolerance is not None or rule.epsilon is not None
    if hf:
        if finetune_epochs:
            raise LorankError(
                "--finetune-epochs is not available for a Hugging Face model (lorank has no "
                "training data for it); fine-tune the saved model with "
                "lorank.integrations.huggingface"
            )
        if (svd == "activation" or calibration or needs_loss) and file_content is None:
            raise LorankError(
                "a Hugging Face model has no lorank training data: pass --calibration-file "
                "(a text file, encoded with the model's tokenizer, or a tensor of token ids) "
                "for --svd activation, --calibration or a loss tolerance"
            )
        data = None
    else:
        assert src.config is not None
        device = resolve_device(src.config.train.device)
        data = src.data or load_dataset(src.config.data, device=device, data_dir=data_dir)
        src.model.to(device)
    model = src.model
    file_batches = None
    if file_content is not None:
        assert calibration_file is not None
        file_batches = calibration_file_batches(  # src.path: where a HF tokenizer is
            model, file_content, calibration, data, src.path or Path(source), calibration_file
        )
    forward, loss_fn, loss_kind = None, task_loss, None
    if hf:
        # The model's own LM loss, or the output-preservation loss (compress/huggingface.py).
        forward, loss_fn = huggingface.forward_fn(model), None
        if file_batches is not None:
            loss_fn, loss_kind = huggingface.calibration_loss(model, file_batches)

    summary: dict[str, Any] = {
        "status": "completed",
        "source": str(source),
        "source_kind": src.kind,
        "rule": str(rule),
        "svd": svd,
    }
    if loss_kind is not None:
        summary["calibration_loss_kind"] = loss_kind
    if budget is not None:
        summary["rule"] = f"budget={budget} ({allocation})"
    elif loss_tolerance is not None:
        summary["rule"] = f"loss-tolerance={loss_tolerance} (budget search, {allocation})"
    before = _measure(model, data)
    summary.update({f"{k}_before": v for k, v in before.items()})

    spectra, tied = _drop_tied(model, layer_spectra(model))
    if tied:
        summary["tied_layers_kept"] = tied
    if not spectra:
        raise LorankError(f"{source} has no Linear/Conv2d or low-rank layer to compress")
    calibration_batches = file_batches
    if calibration_batches is None and data is not None and (calibration or svd == "activation"):
        calibration_batches = data.train_subset_batches(calibration or samples)
    plain_spectra = spectra
    activation = None
    if calibration_batches is not None:
        moments = collect_second_moments(
            model, {s.name: s.module for s in spectra}, calibration_batches, forward
        )
        activation = activation_spectra(plain_spectra, moments, damping)
        summary["calibration_rows"] = {n: m.rows for n, m in moments.items()}
        del moments
    if svd == "activation":
        assert activation is not None
        spectra = activation
    # Batches (with targets, or token ids for a HF language model) the loss is measured on.
    if data is not None:
        loss_batches = data.train_subset_batches(samples)
    else:
        loss_batches = file_batches if loss_fn is not None else None
    search = None
    if budget is not None:
        chosen = allocate(spectra, budget, allocation)  # type: ignore[arg-type]
    elif loss_tolerance is not None:
        assert loss_batches is not None and loss_fn is not None
        search = budget_search(
            model, loss_batches, loss_fn, loss_tolerance, spectra, allocation, precision
        )
        chosen = search.ranks
    elif rule.rule is not None:
        chosen = rule_ranks(spectra, rule.rule)
    else:
        assert loss_batches is not None and loss_fn is not None and rule.epsilon is not None
        search = loss_bounded_search(model, loss_batches, loss_fn, rule.epsilon, precision, spectra)
        chosen = search.ranks
    if activation is not None and loss_batches is not None and loss_fn is not None:
        summary["svd_comparison"] = _compare_svd(
            model,
            {"plain": plain_spectra, "activation": activation},
            chosen,
            data,
            loss_batches,
            loss_fn,
        )
    original = copy.deepcopy(model) if loss_batches is not None else None
    layers = apply_ranks(model, spectra, chosen, exact_factors=svd == "activation")
    for row, spec in zip(layers, spectra, strict=True):
        energy = spec.sigma.double().pow(2)
        row["relative_error"] = float(energy[row["rank"] :].sum() / energy.sum().clamp_min(1e-300))
        row["relative_error_kind"] = svd
    after = _measure(model, data)
    summary.update({f"{k}_after": v for k, v in after.items()})
    summary["layers"] = layers
    summary["search"] = search.to_dict() if search is not None else None
    if loss_batches is not None and original is not None:
        assert loss_fn is not None
        summary["calibration_samples"] = sum(len(b[0]) for b in loss_batches)
        summary["calibration_loss_before"] = (
            search.loss_before if search else mean_loss(original, loss_batches, loss_fn)
        )
        summary["calibration_loss_after"] = mean_loss(model, loss_batches, loss_fn)
        if not hf:
            summary["output_diff_max"] = max_output_difference(original, model, loss_batches)
            truncated_ranks = {e["name"]: e["rank"] for e in layers if e["status"] != "kept"}
            summary["theorem1"] = theorem1_bound(
                original, truncated_ranks, max_input_norm(loss_batches), spectra
            )
    del original

    options = {
        "source": str(source),
        "rule": str(rule),
        "finetune_epochs": finetune_epochs,
        "model_config": str(model_config) if model_config else None,
        "overrides": list(overrides or []),
        "samples": samples,
        "precision": precision,
        "svd": svd,
        "calibration": calibration_batches and sum(len(b[0]) for b in calibration_batches),
        "calibration_file": str(calibration_file) if calibration_file else None,
        "budget": budget,
        "loss_tolerance": loss_tolerance,
        "allocation": allocation if budget is not None or loss_tolerance is not None else None,
        "damping": damping,
    }
    tmp = temp_dir_beside(out)  # same file system as --out: the final rename is atomic
    try:
        if finetune_epochs and src.config is not None:
            try:
                summary.update(_finetune(model, src.config, finetune_epochs, tmp, data_dir, quiet))
            except TrainingDiverged as e:
                # Keep the diverged fine-tune (its summary and last good checkpoint) at --out,
                # and say so: the temporary folder the trainer saw is about to disappear.
                Run(tmp).write_json(COMPRESS, options)
                replace_dir(tmp, out, overwrite, protect=inputs)
                raise TrainingDiverged(str(e).replace(str(tmp), str(out))) from None
        else:
            _write_untrained(model, src, data, tmp)
        final = summary.get("finetune") or after
        # The task's figures: accuracy, or the errors of a regression (forecasting).
        figures = [k for k in final if k.startswith(("test_acc", "test_mse", "test_mae"))]
        summary.update(
            {
                **{k: final[k] for k in figures},
                "test_loss": final.get("test_loss"),
                "params_eval": after["params_eval"],
                "params_dense": after["params_dense"],
                "compression": 1.0 - after["params_eval"] / before["params_eval"],
                "ranks": after["ranks"],
            }
        )
        # The cost of the model: its source's training (plus any fine-tuning); the SVDs of
        # the compression itself are not counted.
        source_flops = (read_json(Path(source) / SUMMARY) or {}).get("train_flops")
        if source_flops is not None:
            tuned = (summary.get("finetune") or {}).get("train_flops") or 0
            summary["train_flops"] = source_flops + tuned
        if after.get("inference_flops") is not None:
            summary["inference_flops"] = after["inference_flops"]
        run = Run(tmp)
        run.write_json(COMPRESS, options)
        run.write_json(SUMMARY, summary)
        replace_dir(tmp, out, overwrite, protect=inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------- loading


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
            f"{path} is a plain state_dict: pass --model-config with a TOML "
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


def _is_hf_directory(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(config, dict) and "model_type" in config


@contextlib.contextmanager
def _quiet_transformers(transformers: Any) -> Iterator[None]:
    # Loading bars and config warnings on stderr would bury lorank's one-line errors.
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


# ---------------------------------------------------------------------- calibration files

HF_BLOCK = 128  # tokens per calibration window of a Hugging Face model (capped by its context)
HF_BATCH = 8
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
)


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
                    f"--calibration-file {path} has {len(unknown)} character(s) the model's "
                    f"vocabulary lacks (e.g. {unknown[0]!r}); remove them or pass token ids"
                )
            ids = torch.tensor([index[ch] for ch in content], dtype=torch.long)
        else:
            ids = _token_ids(content, info.num_classes, path)
        return _windows(ids, block, block, path)
    if isinstance(content, str):
        raise LorankError(
            f"--calibration-file {path} is text, but this {info.name} model takes tensors; "
            "pass a .pt/.safetensors/.npy of inputs shaped "
            f"(N, {', '.join(map(str, info.input_shape))})"
        )
    shape = tuple(info.input_shape)
    x = content
    if not x.is_floating_point():
        raise LorankError(
            f"--calibration-file {path} holds {x.dtype} values; pass the float inputs the "
            "model sees (normalised as in training)"
        )
    if tuple(x.shape) == shape:
        x = x.unsqueeze(0)
    per_sample = torch.Size(shape).numel()
    if x.ndim < 2 or x.shape[1:].numel() != per_sample:
        raise LorankError(
            f"--calibration-file {path} holds a tensor of shape {tuple(content.shape)}; "
            f"this model takes inputs shaped (N, {', '.join(map(str, shape))})"
        )
    dtype = next(model.parameters()).dtype
    return x.reshape(-1, *shape).to(dtype)


def _token_ids(t: Tensor, vocab_size: int | None, path: Any) -> Tensor:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise LorankError(
            f"--calibration-file {path} holds {t.dtype} values; a language model needs "
            "integer token ids"
        )
    if t.ndim not in (1, 2):
        raise LorankError(
            f"--calibration-file {path} holds a tensor of shape {tuple(t.shape)}; pass token "
            "ids shaped (N, T) or one 1-D stream"
        )
    low, high = int(t.min()), int(t.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise LorankError(
            f"--calibration-file {path} has token ids in [{low}, {high}], outside the model's "
            f"vocabulary [0, {vocab_size}); encode it with the model's tokenizer"
        )
    return t.long()


def _windows(ids: Tensor, block: int, context: int, path: Any) -> Tensor:
    """(N, T) ids as they are (T ≤ context), or a 1-D stream cut into windows of ``block``."""
    if ids.ndim == 2:
        if ids.shape[1] > context:
            raise LorankError(
                f"--calibration-file {path} has sequences of {ids.shape[1]} tokens, longer "
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
                f"--calibration-file {path} encodes to no tokens with the tokenizer in {source}"
            )
        ids = _token_ids(ids, vocab_size, path)
    else:
        ids = _token_ids(content, vocab_size, path)
    return _windows(ids, min(HF_BLOCK, context), context, path)


def _hf_tokenizer(source: Path) -> Any:
    import transformers

    fix = "save one there or pass a .pt/.safetensors/.npy tensor of token ids"
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        # AutoTokenizer may otherwise build an empty tokenizer from the model type alone.
        raise LorankError(
            f"{source} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) to "
            f"encode a text --calibration-file; {fix}"
        )
    try:
        with _quiet_transformers(transformers):
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - no/unreadable tokenizer files: one user error
        reason = str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__
        raise LorankError(
            f"{source} has no usable tokenizer to encode a text --calibration-file ({reason}); "
            f"{fix}"
        ) from None
    # Calibration text is cut into windows afterwards: a long text is not an error.
    tokenizer.model_max_length = int(1e30)
    return tokenizer


# ---------------------------------------------------------------------- surgery


@torch.no_grad()
def apply_ranks(
    model: nn.Module,
    spectra: list[LayerSpectrum],
    chosen: dict[str, int],
    exact_factors: bool = False,
) -> list[dict[str, Any]]:
    """Truncate every layer of ``spectra`` to ``chosen[name]`` in place; one report row each.

    Dense layers become diagonal-core low-rank layers (or stay dense at full rank); low-rank
    layers are truncated to their exact rank-k SVD. With ``exact_factors`` the first k columns
    of each spectrum's ``(u, sigma, v)`` are used as they are (the activation-aware factors of
    :mod:`lorank.compress.calibration`, whose v is not orthonormal) instead of a plain SVD.
    """
    rows = []
    for spec in spectra:
        k = chosen.get(spec.name, spec.full_rank)
        module = spec.module
        shape = [int(spec.u.shape[0]), int(spec.v.shape[0])]
        before = sum(p.numel() for p in module.parameters())
        row = {
            "name": spec.name,
            "type": type(module).__name__,
            "shape": shape,
            "full_rank": spec.full_rank,
            "rank": k,
            "params_before": before,
            "sigma_1": float(spec.sigma[0]),
            "sigma_next": float(spec.sigma[k]) if k < spec.full_rank else 0.0,
        }
        if isinstance(module, LowRankLayer):
            before, old_rank = module.params_eval, module.rank
            if k < old_rank and exact_factors:
                module.load_svd_(spec.u[:, :k], spec.sigma[:k], spec.v[:, :k])
            elif k < old_rank:
                module.truncate(k)
            row.update(
                params_before=before,
                params_after=module.params_eval,
                status="truncated" if k < old_rank else "kept",
            )
        elif k >= spec.full_rank:
            row.update(params_after=before, status="kept")
        else:
            layer = low_rank_from(module, k, core="diag")
            if exact_factors:
                layer.load_svd_(spec.u[:, :k], spec.sigma[:k], spec.v[:, :k])
            replace_module(model, spec.name, layer)
            row.update(params_after=layer.params_eval, status="converted")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- outputs


def _compare_svd(
    model: nn.Module,
    kinds: dict[str, list[LayerSpectrum]],
    chosen: dict[str, int],
    data: Dataset | None,
    batches: list[Any],
    loss_fn: Any,
) -> dict[str, dict[str, float]]:
    """Test (with ``data``) and calibration loss of the model truncated at ``chosen`` by each
    kind of SVD.

    The truncations are trials in place (:func:`lorank.core.search.truncated`), so the model is
    unchanged afterwards.
    """
    out: dict[str, dict[str, float]] = {}
    for kind, spectra in kinds.items():
        with truncated(spectra, chosen):
            row = {"calibration_loss": mean_loss(model, batches, loss_fn)}
            if data is not None:
                row |= prefixed("test", evaluate_split(model, data, "test"))
        out[kind] = row
    return out


def _drop_tied(
    model: nn.Module, spectra: list[LayerSpectrum]
) -> tuple[list[LayerSpectrum], list[str]]:
    """``spectra`` without layers that share a Parameter with another module (a tied output
    head), and the names of the tied layers :func:`~lorank.core.convert.plan` keeps dense.

    Factorizing a tied head saves nothing (the embedding still holds the matrix) and adds
    the factors, so such a layer stays dense.
    """
    shared = shared_parameters(model)
    tied = [name for name, _ in candidate_layers(model, LayerSelection(keep_last_dense=False))]
    return [s for s in spectra if s.name not in shared], [n for n in tied if n in shared]


def _measure(model: nn.Module, data: Dataset | None) -> dict[str, Any]:
    out: dict[str, Any] = dict(parameter_counts(model))
    out["ranks"] = ranks(model)
    if data is not None:
        out |= prefixed("test", evaluate_split(model, data, "test"))
        first = next(iter(data.eval_batches("test")), None)
        if first is not None:
            out["inference_flops"] = inference_flops(model, first[0])
    return out


def _finetune_config(config: RunConfig, epochs: int) -> RunConfig:
    raw = config.model_dump(mode="json")
    raw["method"] = {"name": "dense"}  # the model is already low-rank: train it as it is
    raw["train"]["epochs"] = epochs
    return validate_config(raw)


def _finetune(
    model: nn.Module,
    config: RunConfig,
    epochs: int,
    tmp: Path,
    data_dir: str | Path | None,
    quiet: bool,
) -> dict[str, Any]:
    ft_config = _finetune_config(config, epochs)
    train(
        ft_config,
        tmp,
        config_name="compress",
        data_dir=data_dir,
        overwrite=True,
        quiet=quiet,
        model=model,
    )
    ft = read_json(tmp / SUMMARY) or {}
    keys = ("test_loss", "train_loss", "epochs", "train_time_s", "train_flops")
    figures = [k for k in ft if k.startswith(("test_acc", "test_mse", "test_mae"))] or ["test_acc"]
    return {"finetune": {k: ft.get(k) for k in (*figures, *keys)}, "finetune_epochs": epochs}


def _write_untrained(model: nn.Module, src: Source, data: Dataset | None, tmp: Path) -> None:
    run = Run(tmp)
    run.write_json(ENV, environment(torch.device("cpu")))
    meta: dict[str, Any] = {"method": "compress"}
    if src.config is not None and data is not None:
        config = _finetune_config(src.config, 0)
        run.write_json(CONFIG, config.model_dump(mode="json"))
        meta |= {"model": config.model.model_dump(mode="json"), "data_info": asdict(data.info)}
        run.log({"epoch": 0, **_measure(model, data), "time_s": 0.0})
    if src.kind == "huggingface" and hasattr(model, "config"):
        # The Hugging Face folder layout: config.json, tokenizer files, lorank.safetensors/json.
        assert src.path is not None
        if src.sentence_transformer is not None:
            huggingface.write_sentence_transformer(model, src.sentence_transformer, tmp, meta)
        else:
            huggingface.write_folder(model, src.path, tmp, meta)
        return
    save(model, tmp / MODEL, meta)


def rule_help() -> str:
    return f"{RULE_FORMS} | loss-tolerance=EPS"
