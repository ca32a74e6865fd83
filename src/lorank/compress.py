r"""``lorank compress``: post-training compression by truncated SVD (nn-svd, seed 001).

Every Linear/Conv2d of a trained model (and every low-rank layer, which is truncated further)
is replaced by its best rank-k approximation :math:`W_k = U_k \Sigma_k V_k^\top`
(Eckart–Young: :math:`\|W - W_k\|_2 = \sigma_{k+1}`), stored as a ``LowRankLinear`` /
``LowRankConv2d`` with a diagonal core. The rank of each layer comes from

* a rank rule on that layer's singular values (``rank=16``, ``tolerance=0.1``,
  ``energy=0.01``, ``cutoff=0.1``, ... see :mod:`lorank.rank`), or
* ``loss-tolerance=ε``: seed 003's loss-bounded search (:mod:`lorank.search`), the largest δ
  whose ``delta(δ)`` truncation changes the training loss on a fixed subset by less than ε.

A dense layer whose chosen rank would not save parameters (r(m+n) ≥ mn) is left dense. The
compressed model is evaluated with no training (test loss/accuracy and parameter counts
before and after, per-layer ranks, the largest output change on the calibration subset and,
for MLPs, seed 003's Theorem-1 bound), optionally fine-tuned for N epochs with the ordinary
trainer (:func:`lorank.train.train`, method ``dense`` on the already-low-rank model), and
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
evaluated, since lorank has no data pipeline for its tokenizer).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorank.allocation import ALLOCATIONS, allocate
from lorank.calibration import DEFAULT_DAMPING, activation_spectra, collect_second_moments
from lorank.config import RunConfig, apply_override, load_config, validate_config
from lorank.convert import _set_submodule, low_rank_from
from lorank.data import Dataset, load_dataset
from lorank.errors import LorankError
from lorank.io import atomic_write_json, atomic_write_text, load, read_metadata, save
from lorank.layers import LowRankLayer
from lorank.metrics import parameter_counts, ranks
from lorank.rank import RULE_FORMS, RankRule
from lorank.search import (
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
from lorank.train import environment, evaluate, resolve_device, task_loss, train

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
) -> Path:
    """Compress ``source`` by truncated SVD into the run directory ``out``; return its path.

    Example::

        lorank.compress.compress("runs/mlp-dense", "tolerance=0.3", "runs/mlp-tol0.3")
    """
    rule = rule if isinstance(rule, CompressionRule) else CompressionRule.parse(rule)
    out = Path(out)
    if finetune_epochs < 0:
        raise LorankError(f"--finetune-epochs {finetune_epochs} must be >= 0")
    if samples < 1:
        raise LorankError(f"--samples {samples} must be >= 1")
    if svd not in SVD_KINDS:
        raise LorankError(f"--svd {svd!r}: choose one of {', '.join(SVD_KINDS)}")
    if calibration is not None and calibration < 1:
        raise LorankError(f"--calibration {calibration} must be >= 1 samples")
    if budget is not None and not 0 < budget <= 1:
        raise LorankError(f"--budget {budget} must be in (0, 1], e.g. --budget 0.5")
    if allocation not in ALLOCATIONS:
        raise LorankError(f"--allocation {allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
    if damping < 0:
        raise LorankError(f"--damping {damping} must be >= 0")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LorankError(
            f"output directory {out} already exists; choose another --out or "
            "pass --overwrite to replace it"
        )
    src = load_source(source, model_config, overrides, data_dir)
    if src.config is not None and src.config.train.threads:
        torch.set_num_threads(src.config.train.threads)
    if src.kind == "huggingface":
        if rule.rule is None or finetune_epochs or svd != "plain" or calibration:
            raise LorankError(
                "a Hugging Face model can only be compressed with a rank rule or --budget "
                "and --svd plain (no loss-tolerance, --calibration or --finetune-epochs): "
                "lorank has no data pipeline for its tokenizer"
            )
        data = None
    else:
        assert src.config is not None
        device = resolve_device(src.config.train.device)
        data = src.data or load_dataset(src.config.data, device=device, data_dir=data_dir)
        src.model.to(device)
    model = src.model

    summary: dict[str, Any] = {
        "status": "completed",
        "source": str(source),
        "source_kind": src.kind,
        "rule": str(rule) if budget is None else f"budget={budget} ({allocation})",
        "svd": svd,
    }
    before = _measure(model, data)
    summary.update({f"{k}_before": v for k, v in before.items()})

    spectra = layer_spectra(model)
    if not spectra:
        raise LorankError(f"{source} has no Linear/Conv2d or low-rank layer to compress")
    calibration_batches = None
    if data is not None and (calibration or svd == "activation"):
        calibration_batches = data.train_subset_batches(calibration or samples)
    plain_spectra = spectra
    activation = None
    if svd == "activation" or calibration_batches is not None:
        assert calibration_batches is not None
        moments = collect_second_moments(
            model, {s.name: s.module for s in spectra}, calibration_batches
        )
        activation = activation_spectra(plain_spectra, moments, damping)
        summary["calibration_rows"] = {n: m.rows for n, m in moments.items()}
        del moments
    if svd == "activation":
        assert activation is not None
        spectra = activation
    calibration = data.train_subset_batches(samples) if data is not None else None
    search = None
    if budget is not None:
        chosen = allocate(spectra, budget, allocation)  # type: ignore[arg-type]
    elif rule.rule is not None:
        chosen = rule_ranks(spectra, rule.rule)
    else:
        assert calibration is not None
        search = loss_bounded_search(
            model, calibration, task_loss, rule.epsilon, precision, spectra
        )
        chosen = search.ranks
    if activation is not None and data is not None and calibration is not None:
        summary["svd_comparison"] = _compare_svd(
            model, {"plain": plain_spectra, "activation": activation}, chosen, data, calibration
        )
    original = copy.deepcopy(model) if calibration is not None else None
    layers = apply_ranks(model, spectra, chosen, exact_factors=svd == "activation")
    for row, spec in zip(layers, spectra, strict=True):
        energy = spec.sigma.double().pow(2)
        row["relative_error"] = float(energy[row["rank"] :].sum() / energy.sum().clamp_min(1e-300))
        row["relative_error_kind"] = svd
    after = _measure(model, data)
    summary.update({f"{k}_after": v for k, v in after.items()})
    summary["layers"] = layers
    summary["search"] = search.to_dict() if search is not None else None
    if calibration is not None and original is not None:
        summary["calibration_samples"] = sum(len(b[0]) for b in calibration)
        summary["calibration_loss_before"] = (
            search.loss_before if search else mean_loss(original, calibration, task_loss)
        )
        summary["calibration_loss_after"] = mean_loss(model, calibration, task_loss)
        summary["output_diff_max"] = max_output_difference(original, model, calibration)
        truncated_ranks = {e["name"]: e["rank"] for e in layers if e["status"] != "kept"}
        summary["theorem1"] = theorem1_bound(
            original, truncated_ranks, max_input_norm(calibration), spectra
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
        "budget": budget,
        "allocation": allocation if budget is not None else None,
        "damping": damping,
    }
    tmp = Path(
        tempfile.mkdtemp(
            dir=out.parent if out.parent.exists() else None, prefix=f".{out.name}.", suffix=".tmp"
        )
    )
    _chmod_like_mkdir(tmp)
    try:
        if finetune_epochs and src.config is not None:
            summary.update(_finetune(model, src.config, finetune_epochs, tmp, data_dir, quiet))
        else:
            _write_untrained(model, src, data, tmp)
        final = summary.get("finetune") or after
        summary.update(
            {
                "test_acc": final.get("test_acc"),
                "test_loss": final.get("test_loss"),
                "params_eval": after["params_eval"],
                "params_dense": after["params_dense"],
                "compression": 1.0 - after["params_eval"] / before["params_eval"],
                "ranks": after["ranks"],
            }
        )
        atomic_write_json(tmp / "compress.json", options)
        atomic_write_json(tmp / "summary.json", summary)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _chmod_like_mkdir(path: Path) -> None:
    # mkdtemp creates 0700 directories; a run directory should get the umask's usual mode.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)


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
    if path.is_dir() and not (path / "model.json").is_file():
        if _is_hf_directory(path):
            return Source(_load_huggingface(path), "huggingface", None)
        raise LorankError(
            f"{path} holds no model.json/model.safetensors; is it a finished lorank run directory?"
        )
    lorank_stem = _lorank_stem(path)
    if lorank_stem is not None:
        from lorank.evaluate import run_config_of

        read_metadata(lorank_stem)
        run_dir = lorank_stem.parent if (lorank_stem.parent / "config.json").is_file() else None
        config = _with_overrides(
            run_config_of(run_dir, model_config and str(model_config)), overrides
        )
        return Source(load(lorank_stem).cpu(), "lorank", config)
    return _load_state_dict(path, model_config, overrides, data_dir)


def _lorank_stem(path: Path) -> Path | None:
    if path.is_dir():
        return path / "model"
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
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _load_huggingface(
    path: Path,
) -> nn.Module:  # transformers is optional (the dev extra installs it)
    try:
        import transformers
    except ImportError:
        raise LorankError(
            f"{path} is a Hugging Face model directory; install the optional "
            "extra (pip install 'lorank[hf]') to compress it"
        ) from None
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError):
        return transformers.AutoModel.from_pretrained(path)


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
    :mod:`lorank.calibration`, whose v is not orthonormal) instead of a plain SVD.
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
            _set_submodule(model, spec.name, layer)
            row.update(params_after=layer.params_eval, status="converted")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- outputs


def _compare_svd(
    model: nn.Module,
    kinds: dict[str, list[LayerSpectrum]],
    chosen: dict[str, int],
    data: Dataset,
    calibration: list[Any],
) -> dict[str, dict[str, float]]:
    """Test and calibration loss of the model truncated at ``chosen`` by each kind of SVD.

    The truncations are trials in place (:func:`lorank.search.truncated`), so the model is
    unchanged afterwards.
    """
    out = {}
    for kind, spectra in kinds.items():
        with truncated(spectra, chosen):
            test = evaluate(model, data.eval_batches("test"))
            loss = mean_loss(model, calibration, task_loss)
        out[kind] = {"test_loss": test["loss"], "test_acc": test["acc"], "calibration_loss": loss}
    return out


def _measure(model: nn.Module, data: Dataset | None) -> dict[str, Any]:
    out: dict[str, Any] = dict(parameter_counts(model))
    out["ranks"] = ranks(model)
    if data is not None:
        test = evaluate(model, data.eval_batches("test"))
        out["test_loss"], out["test_acc"] = test["loss"], test["acc"]
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
    ft = json.loads((tmp / "summary.json").read_text())
    keys = ("test_acc", "test_loss", "train_loss", "epochs", "train_time_s")
    return {"finetune": {k: ft.get(k) for k in keys}, "finetune_epochs": epochs}


def _write_untrained(model: nn.Module, src: Source, data: Dataset | None, tmp: Path) -> None:
    atomic_write_json(tmp / "env.json", environment(torch.device("cpu")))
    meta: dict[str, Any] = {"method": "compress"}
    if src.config is not None and data is not None:
        config = _finetune_config(src.config, 0)
        atomic_write_json(tmp / "config.json", config.model_dump(mode="json"))
        meta |= {"model": config.model.model_dump(mode="json"), "data_info": asdict(data.info)}
        record = {"epoch": 0, **_measure(model, data), "time_s": 0.0}
        atomic_write_text(tmp / "metrics.jsonl", json.dumps(record) + "\n")
    save(model, tmp / "model", meta)


def rule_help() -> str:
    return f"{RULE_FORMS} | loss-tolerance=EPS"
