"""Plain vs activation-aware SVD × uniform vs greedy allocation, at several budgets, with and
without a short fine-tune.

Usage (the model is a finished lorank run directory):

    python experiments/activation_svd.py RUN_DIR OUT.md [--calibration 512] [--budgets ...]
        [--finetune-epochs 1 --set data.train_subset=2048 --set optim.lr=1e-3 ...]

Each combination is what ``lorank compress RUN_DIR --svd S --budget B --allocation A
--calibration N`` computes before any fine-tuning; here the calibration statistics and
spectra are computed once and reused, and the test loss (perplexity for the language model)
is measured for every combination. With ``--finetune-epochs E`` each compressed model is then
fine-tuned exactly as ``lorank compress ... --finetune-epochs E --set ...`` does (the same
trainer, method ``dense`` on the low-rank model, the source's config with the ``--set``
overrides, e.g. a training subset for a short fine-tune), and the dense model gets the same
fine-tune as the reference: the source may be under-trained, so the fine-tuned losses are to
be compared with it, not with the dense loss before.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import torch

from lorank.compress.allocation import allocate
from lorank.compress.calibration import activation_spectra, collect_second_moments
from lorank.compress.pipeline import _finetune, apply_ranks, load_source
from lorank.core.metrics import parameter_counts
from lorank.core.search import layer_spectra
from lorank.data import load_dataset
from lorank.training.evaluate import evaluate


def _fmt(loss: float) -> str:
    return f"{loss:.4f} | {math.exp(min(loss, 50)):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("out")
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--budgets", default="0.75,0.5,0.35,0.25")
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    torch.set_num_threads(1)
    src = load_source(args.run, None, args.overrides, args.data_dir)
    data = load_dataset(src.config.data, device=torch.device("cpu"), data_dir=args.data_dir)
    model = src.model.eval()
    base = evaluate(model, data.eval_batches("test"))
    t0 = time.time()
    plain = layer_spectra(model)
    moments = collect_second_moments(
        model, {s.name: s.module for s in plain}, data.train_subset_batches(args.calibration)
    )
    kinds = {"plain": plain, "activation": activation_spectra(plain, moments)}
    prep = time.time() - t0
    dense_params = parameter_counts(model)["params_eval"]
    ft = args.finetune_epochs

    def finetune(trial: torch.nn.Module) -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.time()
            res = _finetune(trial, src.config, ft, Path(tmp), args.data_dir, quiet=True)
            return res["finetune"]["test_loss"], time.time() - t

    ft_note = ""
    if ft:
        dense_ft, dense_ft_s = finetune(copy.deepcopy(model))
        ft_note = (
            f" Fine-tune: {ft} epoch(s) of `lorank compress --finetune-epochs {ft}` with "
            f"{' '.join('--set ' + o for o in args.overrides) or 'the source config'} "
            f"({data.info.train_size} training windows per epoch); the dense model given the "
            f"same fine-tune reaches test loss {_fmt(dense_ft).replace(' | ', ' (ppl ')}) "
            f"in {dense_ft_s:.0f} s."
        )
    lines = [
        f"# {args.run}: plain vs activation-aware SVD, uniform vs greedy allocation",
        "",
        f"Dense: test loss {base['loss']:.4f} (ppl {math.exp(base['loss']):.2f}), "
        f"acc {base['acc']:.4f}, params_eval {dense_params}. Calibration: "
        f"{args.calibration} training samples; statistics + SVDs in {prep:.1f} s." + ft_note,
        "",
    ]
    if ft:
        lines += [
            "| budget | svd | allocation | params_eval | test loss | ppl | test acc "
            "| fine-tuned test loss | ppl | fine-tune s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines += [
            "| budget | svd | allocation | params_eval | test loss | ppl | test acc |",
            "|---|---|---|---|---|---|---|",
        ]
    for budget in [float(b) for b in args.budgets.split(",")]:
        for svd in ("plain", "activation"):
            for allocation in ("uniform", "greedy"):
                ranks = allocate(kinds[svd], budget, allocation)
                trial = copy.deepcopy(model)
                spectra = [
                    type(s)(s.name, trial.get_submodule(s.name), s.u, s.sigma, s.v, s.max_rank)
                    for s in kinds[svd]
                ]
                apply_ranks(trial, spectra, ranks, exact_factors=svd == "activation")
                res = evaluate(trial, data.eval_batches("test"))
                params = parameter_counts(trial)["params_eval"]
                row = (
                    f"| {budget} | {svd} | {allocation} | {params} | {_fmt(res['loss'])} | "
                    f"{res['acc']:.4f} |"
                )
                if ft:
                    loss, seconds = finetune(trial)
                    row += f" {_fmt(loss)} | {seconds:.0f} |"
                print(row, flush=True)
                lines.append(row)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
