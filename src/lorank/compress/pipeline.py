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
``x @ weight``, the same X as for the Linear ``W = weightᵀ``), and when it has a
language-model head its loss on the calibration windows stands in for the training loss
(``calibration_loss_before/after``, ``svd_comparison``, loss tolerances). An output layer
whose weight is tied to the input embedding stays dense (``tied_layers_kept``): factorizing
it would add parameters. :func:`load_huggingface_compressed` rebuilds a compressed Hugging
Face model from its run directory.

**Layout.** This module is the path-in, path-out wrapper: it loads the source
(:mod:`lorank.compress.sources`), builds the calibration batches (the training data, or
:mod:`lorank.compress.calibration_files`), runs the in-memory core
:func:`lorank.compress.api.compress_model` with a :class:`~lorank.compress.config.CompressConfig`
and writes the run directory. ``options_config`` maps the flat options of ``lorank compress``
(and of this function's keyword arguments) to that config.

**Ranks.** ``--budget B`` allocates a global budget (:mod:`lorank.compress.allocation`);
``--loss-tolerance ε`` searches the smallest budget whose allocation keeps the loss change
below ε (:func:`lorank.compress.allocation.budget_search`), while ``--rule loss-tolerance=ε`` is the
per-layer δ-rule search above.
"""

from __future__ import annotations

import copy
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorank.compress import huggingface
from lorank.compress.api import compress_model, default_forward, drop_tied
from lorank.compress.calibration import DEFAULT_DAMPING, read_calibration_file
from lorank.compress.calibration_files import calibration_file_batches
from lorank.compress.config import (
    CompressConfig,
    DistillFinetune,
    EpochFinetune,
    compress_config,
)
from lorank.compress.rules import CompressionRule, rule_help
from lorank.compress.sources import Source, load_huggingface_compressed, load_source
from lorank.compress.surgery import apply_ranks
from lorank.core.io import save
from lorank.core.metrics import parameter_counts, ranks
from lorank.core.search import max_input_norm, max_output_difference, theorem1_bound
from lorank.data import Dataset, load_dataset
from lorank.errors import LorankError, TrainingDiverged
from lorank.training.config import MAX_EPOCHS, RunConfig, validate_config
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

__all__ = [
    "CompressionRule",
    "Source",
    "apply_ranks",
    "calibration_file_batches",
    "compress",
    "drop_tied",
    "load_huggingface_compressed",
    "load_source",
    "options_config",
    "rule_help",
]

SVD_KINDS: tuple[str, ...] = ("plain", "activation")
# How output-directory errors name compress()'s arguments (the CLI turns them into flags).
OUT_ARGUMENTS = {"option": "`out`", "overwrite_option": "`overwrite`"}
# Samples a compression may ask to run through the model (samples, calibration).
MAX_SAMPLES = 2**24


def options_config(
    rule: str | CompressionRule | None = None,
    *,
    svd: str = "plain",
    budget: float | None = None,
    loss_tolerance: float | None = None,
    allocation: str = "greedy",
    precision: float = 0.01,
    calibration: int | None = None,
    samples: int = 2048,
    damping: float = DEFAULT_DAMPING,
    error_propagation: bool = False,
    refit: bool = False,
    finetune_epochs: int = 0,
    distill: DistillFinetune | dict[str, Any] | None = None,
    objective: str = "params",
    latency_mode: str = "forward",
    latency_margin: float = 0.05,
) -> CompressConfig:
    """The :class:`CompressConfig` of flat options (those of ``lorank compress``): a budget or
    a loss tolerance overrides the rule; one-line errors name the config fields."""
    if budget is not None and loss_tolerance is not None:
        raise LorankError(
            "`ranks.budget` and `ranks.loss_tolerance` both choose the global budget; "
            "pass one of them"
        )
    if budget is not None:
        ranks_: dict[str, Any] = {"kind": "budget", "budget": budget, "allocation": allocation}
    elif loss_tolerance is not None:
        ranks_ = {
            "kind": "loss_tolerance",
            "loss_tolerance": loss_tolerance,
            "allocation": allocation,
            "precision": precision,
        }
    else:
        ranks_ = {"kind": "rule", "rule": str(rule or "tolerance=0.1"), "precision": precision}
    if not 0 <= finetune_epochs <= MAX_EPOCHS:
        raise LorankError(f"`finetune.epochs` {finetune_epochs} must be in [0, {MAX_EPOCHS}]")
    if not 1 <= samples <= MAX_SAMPLES:
        raise LorankError(f"`samples` {samples} must be in [1, {MAX_SAMPLES}]")
    if calibration is not None and calibration > MAX_SAMPLES:
        raise LorankError(f"`calibration` {calibration} must be at most {MAX_SAMPLES}")
    if not math.isfinite(precision):
        raise LorankError(f"`precision` {precision} must be a number in (0, 1), e.g. 0.01")
    if not (math.isfinite(damping) and damping >= 0):
        raise LorankError(f"`damping` {damping} must be a finite number >= 0, e.g. 1e-4")
    finetune: Any = None
    if finetune_epochs and distill is not None:
        raise LorankError("`finetune` is either epochs or distill; pass one of them")
    if finetune_epochs:
        finetune = {"kind": "epochs", "epochs": finetune_epochs}
    elif distill is not None:
        finetune = (
            distill if isinstance(distill, DistillFinetune) else {"kind": "distill", **distill}
        )
    return compress_config(
        {
            "svd": svd,
            "ranks": ranks_,
            "calibration": calibration,
            "samples": samples,
            "damping": damping,
            "error_propagation": error_propagation,
            "refit": refit,
            "finetune": finetune,
            "objective": objective,
            "latency_mode": latency_mode,
            "latency_margin": latency_margin,
        }
    )


def compress(
    source: str | Path,
    rule: str | CompressionRule | CompressConfig | None,
    out: str | Path,
    *,
    model_config: str | Path | None = None,
    data_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    calibration_file: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    **options: Any,
) -> Path:
    """Compress ``source`` into the run directory ``out``; return its path.

    ``rule`` is a :class:`CompressConfig`, or a rank rule with the flat ``options`` of
    :func:`options_config` (``svd=``, ``budget=``, ``allocation=``, ``calibration=``,
    ``finetune_epochs=``, ...). Example::

        lorank.compress.compress("runs/mlp-dense", "tolerance=0.3", "runs/mlp-tol0.3")
        lorank.compress.compress("runs/char", CompressConfig(svd="activation",
            ranks=BudgetRanks(budget=0.5)), "runs/char-b0.5")
    """
    if isinstance(rule, CompressConfig):
        if options:
            raise LorankError(
                f"options {', '.join(sorted(options))} given with a CompressConfig; set them "
                "in the config"
            )
        config = rule
    else:
        config = options_config(rule, **options)
    out = Path(out)
    # `out` may never be, hold or sit inside what compress reads (see check_output_dir).
    inputs = [p for p in (source, model_config, calibration_file) if p is not None]
    check_output_dir(out, overwrite, protect=inputs, **OUT_ARGUMENTS)
    file_content = read_calibration_file(calibration_file) if calibration_file else None
    src = load_source(source, model_config, overrides, data_dir)
    if src.config is not None and src.config.train.threads:
        torch.set_num_threads(src.config.train.threads)
    hf = src.kind == "huggingface"
    epochs = config.finetune.epochs if isinstance(config.finetune, EpochFinetune) else 0
    if hf:
        if epochs:
            raise LorankError(
                "`finetune.epochs` is not available for a Hugging Face model (lorank has no "
                "training data for it); use finetune distill on the calibration file, or "
                "fine-tune the saved model with lorank.integrations.huggingface"
            )
        if (config.needs_calibration or config.needs_loss) and file_content is None:
            raise LorankError(
                "a Hugging Face model has no lorank training data: pass a `calibration_file` "
                "(a text file, encoded with the model's tokenizer, or a tensor of token ids) "
                "for svd activation, calibration, propagation, refit, distillation or a loss "
                "tolerance"
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
            model, file_content, config.calibration, data, src.path or Path(source),
            calibration_file,
        )  # fmt: skip
    forward: Any = default_forward
    loss: Any = task_loss
    loss_kind = None
    if hf:
        # The model's own LM loss, or the output-preservation loss (compress/huggingface.py).
        forward, loss = huggingface.forward_fn(model), None
        if file_batches is not None:
            loss, loss_kind = huggingface.calibration_loss(model, file_batches)

    summary: dict[str, Any] = {
        "status": "completed",
        "source": str(source),
        "source_kind": src.kind,
        "rule": config.label(),
        "svd": config.svd,
        "error_propagation": config.error_propagation,
        "refit": config.refit,
        "objective": config.objective,
    }
    if loss_kind is not None:
        summary["calibration_loss_kind"] = loss_kind
    before = _measure(model, data)
    summary.update({f"{k}_before": v for k, v in before.items()})
    calibration_batches = file_batches
    if calibration_batches is None and data is not None and config.needs_calibration:
        calibration_batches = data.train_subset_batches(config.calibration or config.samples)
    # Batches (with targets, or token ids for a HF language model) the loss is measured on.
    if data is not None:
        loss_batches = data.train_subset_batches(config.samples)
    else:
        loss_batches = file_batches if loss is not None else None
    original = copy.deepcopy(model) if loss_batches is not None and not hf else None
    evaluate_fn = None
    if data is not None:

        def evaluate_fn(m: nn.Module) -> dict[str, float]:
            return prefixed("test", evaluate_split(m, data, "test"))

    in_memory = config.model_copy(update={"finetune": None}) if epochs else config
    report = compress_model(
        model,
        in_memory,
        calibration_batches,
        loss_fn=loss,
        forward=forward,
        loss_batches=loss_batches,
        evaluate=evaluate_fn,
        progress=not quiet,
    )
    if report.tied_layers_kept:
        summary["tied_layers_kept"] = report.tied_layers_kept
    if report.calibration_rows is not None:
        summary["calibration_rows"] = report.calibration_rows
    if report.svd_comparison is not None:
        summary["svd_comparison"] = report.svd_comparison
    after = _measure(model, data)
    summary.update({f"{k}_after": v for k, v in after.items()})
    summary["layers"] = report.layers
    summary["search"] = report.search
    if report.allocation_measurements is not None:
        summary["allocation_measurements"] = report.allocation_measurements
    if report.distill is not None:
        summary["distill"] = {k: v for k, v in report.distill.items()}
    if report.latency is not None:
        summary["latency"] = report.latency
    summary["timings"] = report.timings
    if loss_batches is not None and report.calibration_loss_before is not None:
        summary["calibration_samples"] = sum(len(b[0]) for b in loss_batches)
        summary["calibration_loss_before"] = report.calibration_loss_before
        summary["calibration_loss_after"] = report.calibration_loss_after
        if original is not None:
            summary["output_diff_max"] = max_output_difference(original, model, loss_batches)
            truncated_ranks = {e["name"]: e["rank"] for e in report.layers if e["status"] != "kept"}
            summary["theorem1"] = theorem1_bound(
                original, truncated_ranks, max_input_norm(loss_batches), report.spectra
            )
    del original

    options_written = {
        "source": str(source),
        "config": config.model_dump(mode="json"),
        "rule": config.label(),
        "finetune_epochs": epochs,
        "model_config": str(model_config) if model_config else None,
        "overrides": list(overrides or []),
        "samples": config.samples,
        "svd": config.svd,
        "calibration": calibration_batches and sum(len(b[0]) for b in calibration_batches),
        "calibration_file": str(calibration_file) if calibration_file else None,
        "damping": config.damping,
    }
    tmp = temp_dir_beside(out, option=OUT_ARGUMENTS["option"])  # same file system: atomic rename
    try:
        if epochs and src.config is not None:
            try:
                summary.update(_finetune(model, src.config, epochs, tmp, data_dir, quiet))
            except TrainingDiverged as e:
                # Keep the diverged fine-tune (its summary and last good checkpoint) at `out`,
                # and say so: the temporary folder the trainer saw is about to disappear.
                Run(tmp).write_json(COMPRESS, options_written)
                replace_dir(tmp, out, overwrite, protect=inputs, **OUT_ARGUMENTS)
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
        run.write_json(COMPRESS, options_written)
        run.write_json(SUMMARY, summary)
        replace_dir(tmp, out, overwrite, protect=inputs, **OUT_ARGUMENTS)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
