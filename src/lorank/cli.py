"""The ``lorank`` command line: ``train``, ``eval``, ``compress``, ``sweep``, ``report``
and ``compare``.

Every user error (bad config key or value, missing or corrupt file, incompatible checkpoint)
is printed as one line, ``lorank: error: ...``, with exit status 2 and no traceback; a run
that diverged exits 1; anything unexpected (a bug) exits 3 with one line naming the
exception and the file its traceback was written to. A closed stdout (``| head``) is silent.

Long because it holds one argument parser per subcommand; each handler is a few lines that
call the library.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from lorank.errors import LorankError
from lorank.training.rundir import SUMMARY

CONFIG_HELP = """\
config sections (TOML) and their keys; override any with --set section.key=value:
  [data]   name (mnist|fashion-mnist|cifar10|tinyshakespeare|synthetic), dir, batch_size,
           eval_batch_size, train_subset, test_subset, augment, block_size, synthetic_*
  [model]  name (mlp|lenet5|resnet20|vgg|vit|phil_kim_cnn|char_transformer) and its options
           (mlp: hidden, activation, dropout; char_transformer: n_layer, n_head, d_model, ...)
  [method] name (%(methods)s) and its options: `lorank methods NAME`
  [optim]  name (sgd|adam|adamw), lr, momentum, nesterov, weight_decay, betas, schedule
           (constant|step|cosine), warmup_steps, step_size, gamma, min_lr_ratio, grad_clip
  [train]  epochs, seed, device (auto|cpu|cuda), eval_every, threads
"""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (plus where to look), not a usage dump."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --overwrit must not mean --overwrite
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        text = f"lorank: error: {message} (see `{self.prog} --help`)"
        self.exit(2, _printable(text) + "\n")


def _add_set_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _parser() -> argparse.ArgumentParser:
    from lorank.experiments.compare import default_methods, presets
    from lorank.methods import METHODS

    parser = _OneLineParser(
        prog="lorank", description="Low-rank training and compression of neural networks."
    )
    parser.add_argument("-V", "--version", action="version", version=_version())
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print the library's log messages (INFO)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model from a TOML config into a run directory",
        description="Train a model from a TOML config. Writes config.json, metrics.jsonl, "
        "summary.json, model.safetensors/model.json and env.json into the run directory.",
        epilog=CONFIG_HELP % {"methods": "|".join(METHODS)},
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config",
        nargs="?",
        help="a TOML config, a run's config.json, or a packaged config by name "
        "(`lorank init` lists them); omit with --resume",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its newest checkpoint (its config.json is used; "
        "--set may change e.g. train.epochs)",
    )
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: let --set change the data, model, method or seed (recorded in "
        "config.json's resumes); without it only train.* and optim.* may change",
    )
    _add_set_option(p, "override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/<config-stem>-<timestamp>)")
    p.add_argument("--data-dir", help="dataset root (else data.dir, $LORANK_DATA, ~/.cache/lorank)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing run directory at --out"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train with N processes on this machine (DistributedDataParallel through torchrun; "
        "data.batch_size stays the global batch)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate a run directory or a saved checkpoint",
        description="Evaluate a trained model on its test split and print JSON.",
    )
    p.add_argument("path", help="run directory, or the path of model.safetensors/model.json")
    p.add_argument("--data-dir", help="dataset root")
    p.add_argument(
        "--config",
        help="TOML config for the data section when the checkpoint is not inside a run directory",
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "compress",
        help="compress a trained model by truncated SVD (nn-svd), then evaluate",
        description="Replace every Linear/Conv2d of a trained model by its truncated SVD, with "
        "ranks from a rank rule or the loss-bounded search; evaluate it with no training, "
        "optionally fine-tune, and write a run directory (summary.json holds accuracy and "
        "parameters before and after).",
    )
    p.add_argument(
        "path",
        help="lorank run directory or checkpoint, a PyTorch state_dict file "
        "(.pt/.pth/.bin; needs --model-config), or a Hugging Face model directory",
    )
    p.add_argument(
        "--rule",
        default="tolerance=0.1",
        metavar="RULE",
        help="rank rule: rank=N | fraction=F | tolerance=T | abs-tolerance=T | "
        "cutoff=B | energy=E | stable-rank | delta=D | loss-tolerance=EPS "
        "(default tolerance=0.1)",
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        metavar="N",
        help="fine-tune the compressed model for N epochs (default 0)",
    )
    p.add_argument(
        "--model-config",
        help="TOML config ([model], [data]) describing a plain "
        "state_dict, or a checkpoint outside a run directory",
    )
    _add_set_option(p, "override the source's config, e.g. --set optim.lr=1e-4 for fine-tuning")
    p.add_argument(
        "--samples",
        type=int,
        default=2048,
        help="training samples for loss-tolerance and diagnostics (default 2048)",
    )
    p.add_argument(
        "--precision",
        type=float,
        default=0.01,
        help="loss tolerance: precision of the search on delta (--rule) or on the budget "
        "(--loss-tolerance) (default 0.01)",
    )
    p.add_argument(
        "--svd",
        choices=("plain", "activation"),
        default="plain",
        help="plain truncated SVD of W, or activation-aware: the SVD of W·L with "
        "C = XᵀX/N = LLᵀ from calibration inputs, minimising the error on them (default plain)",
    )
    p.add_argument(
        "--calibration",
        type=int,
        metavar="N",
        help="training samples (or the first N of --calibration-file) run through the model "
        "to collect each layer's input second moment (default: --samples when --svd "
        "activation, the whole --calibration-file); also compares plain vs activation SVD in "
        "summary.json",
    )
    p.add_argument(
        "--calibration-file",
        metavar="PATH",
        help="calibrate on this file instead of the training data: UTF-8 text (encoded with "
        "the model's characters, or the tokenizer in a Hugging Face directory) or a "
        ".pt/.safetensors/.npy tensor of inputs (token ids for a language model); needed for "
        "--svd activation on a Hugging Face model",
    )
    p.add_argument(
        "--budget",
        type=float,
        metavar="B",
        help="keep B (0-1] of the compressed layers' weights, ranks chosen by --allocation "
        "(overrides --rule)",
    )
    p.add_argument(
        "--loss-tolerance",
        type=float,
        metavar="EPS",
        help="instead of --budget: the smallest budget (to --precision) whose --allocation "
        "changes the loss on --samples training samples (a Hugging Face model: on the "
        "--calibration-file) by less than EPS (overrides --rule)",
    )
    p.add_argument(
        "--allocation",
        choices=("uniform", "greedy", "measured"),
        default="greedy",
        help="--budget/--loss-tolerance: same fraction in every layer, greedy removal of "
        "the rank-1 component with the least output error per parameter saved (default "
        "greedy), or (--budget only) measured: greedy weighted by each layer's measured "
        "effect on the model's outputs",
    )
    p.add_argument(
        "--error-propagation",
        action="store_true",
        help="--svd activation: truncate layers in forward order, each from the inputs the "
        "already-compressed layers before it produce (closed form)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="after truncation, refit each layer's output factor and bias by least squares "
        "on the calibration inputs (closed form)",
    )
    p.add_argument(
        "--distill",
        action="store_true",
        help="distil the original model's outputs into the compressed one on the calibration "
        "data (no labels; factors, norms and biases train)",
    )
    p.add_argument(
        "--distill-steps",
        type=int,
        default=200,
        metavar="N",
        help="--distill: at most N steps (default 200)",
    )
    p.add_argument(
        "--distill-lr",
        type=float,
        default=1e-4,
        metavar="LR",
        help="--distill: AdamW learning rate (default 1e-4)",
    )
    p.add_argument(
        "--distill-holdout",
        type=float,
        default=0.1,
        metavar="F",
        help="--distill: fraction of the calibration batches held out to stop on (default 0.1)",
    )
    p.add_argument(
        "--distill-loss",
        choices=("auto", "kl", "cosine", "mse"),
        default="auto",
        help="--distill: output distance (default auto: KL for logits, cosine for hidden states)",
    )
    p.add_argument(
        "--damping",
        type=float,
        default=1e-4,
        help="--svd activation: Cholesky damping relative to mean(diag C) (default 1e-4)",
    )
    p.add_argument(
        "--objective",
        choices=("params", "latency"),
        default="params",
        help="params: factorize every layer the ranks make smaller (default); latency: only "
        "where the low-rank layer measures faster on this device at its real input shape, "
        "a --budget spent on those layers, ranks rounded to faster sizes when measured "
        "faster (summary.json: per-layer ms, predicted and measured speed-up)",
    )
    p.add_argument(
        "--latency-mode",
        choices=("forward", "train"),
        default="forward",
        help="--objective latency: time the forward pass (default) or forward+backward",
    )
    p.add_argument(
        "--latency-margin",
        type=float,
        default=0.05,
        help="--objective latency: a layer counts as faster low-rank only when it measures at "
        "least this fraction below dense (default 0.05: timings vary by a few percent)",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--data-dir", help="dataset root")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no fine-tuning epoch lines")
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser(
        "sweep",
        help="run a config over a grid of values x seeds, in parallel, resumable",
        description="Run CONFIG for every combination of the --grid values (and the TOML's "
        "[sweep] grid) and every seed, each into its own run directory under --out, with a "
        "pool of worker processes. Finished runs are skipped on a rerun, half-written ones "
        "restarted; OUT/sweep.json indexes the runs.",
    )
    p.add_argument("config", help="path to a TOML config, optionally with a [sweep] section")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="grid values of a config key, e.g. --grid optim.lr=1e-2,1e-3 (repeatable)",
    )
    p.add_argument("--seeds", help="seeds, e.g. 0,1,2 or 0-4 (default: [sweep] seeds or 0)")
    _add_set_option(p, "override a base config value for every run (repeatable)")
    p.add_argument(
        "--workers",
        type=int,
        help="parallel worker processes (default: as many as fit the CPU cores, "
        "each with cores/workers torch threads)",
    )
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--data-dir", help="dataset root")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "report",
        help="aggregate runs and sweeps into tables, figures and an HTML report",
        description="Aggregate run and sweep directories (mean ± std over seeds) into "
        "OUT/summary.md, OUT/report.html (self-contained) and OUT/figures/*.png.",
    )
    p.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--title", help="report title")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "compare",
        help="train every method on the same model and budget, then write the report",
        description="Train every method of the default set on the same MLP and data budget "
        "(gradient-free ones fitted in closed form), compress the dense run by truncated SVD "
        "(nnsvd), and write the report into --out. The defaults finish in a few minutes on a "
        "2-core CPU. Presets: lorank/configs/compare/<method>.toml.",
    )
    p.add_argument("--dataset", default="mnist", help="mnist | fashion-mnist | synthetic")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 5)")
    p.add_argument("--seeds", default="0", help="seeds, e.g. 0,1,2 (default 0)")
    p.add_argument(
        "--hidden", default=None, help="MLP hidden widths, e.g. 256,256 (default 256,256)"
    )
    p.add_argument("--train-subset", type=int, default=None, help="training samples (default: all)")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma list of {', '.join(presets())} (default {','.join(default_methods())})",
    )
    p.add_argument("--workers", type=int, help="parallel worker processes")
    _add_set_option(p, "override the shared base config, e.g. --set data.batch_size=128")
    p.add_argument("--out", required=True, help="output directory (runs/ and the report)")
    p.add_argument("--data-dir", help="dataset root")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser(
        "profile",
        help="time each layer dense vs low-rank on this device (break-even ranks)",
        description="Per layer: dense and low-rank time at the layer's real input shape, the "
        "speed-up, the largest rank that is still faster (break-even) and the FLOP ratio. A "
        "run directory is profiled at its trained ranks, a config at --rank.",
    )
    p.add_argument("source", metavar="RUN_OR_CONFIG")
    p.add_argument("--rank", type=float, help="rank (int) or fraction of full rank for a config")
    p.add_argument("--batch", type=int, help="batch size of the timed input (default: data's)")
    p.add_argument("--mode", choices=("forward", "train"), default="forward")
    p.add_argument("--threads", type=int, help="torch threads while timing")
    p.add_argument("--data-dir", help="dataset root")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser(
        "export",
        help="write a run with each low-rank layer in its faster form (factorized or dense)",
        description="Measure each low-rank layer of RUN factorized and merged to dense at "
        "batch 1 (--for latency) or 1024 (--for throughput) and write --out with the faster "
        "form per layer (same function: merging is exact), plus export.json with the table.",
    )
    p.add_argument("source", metavar="RUN")
    p.add_argument("--for", dest="target", choices=("latency", "throughput"), default="latency")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out")
    p.add_argument("--threads", type=int, help="torch threads while timing")
    p.add_argument("--data-dir", help="dataset root")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "init",
        help="copy a packaged example config into the working directory (or list them)",
        description="Without NAME: list the example configs shipped with lorank. With NAME: "
        "copy it to --out (default NAME.toml here), to edit and pass to `lorank train`.",
    )
    p.add_argument("name", nargs="?", help="a packaged config, e.g. mnist-mlp-dense")
    p.add_argument("--out", help="where to write it (default: ./NAME.toml)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser(
        "methods",
        help="list the training methods, or every option of one",
        description="Without NAME: every registered method with its summary. With NAME: each "
        "option of its [method] table (type, default, description), from the config schema.",
    )
    p.add_argument("name", nargs="?", help="a method name, e.g. dlrt")
    p.set_defaults(func=_cmd_methods)
    return parser


def _cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from lorank.experiments.profile import format_profile, profile, profile_json

    if args.threads:
        torch.set_num_threads(args.threads)
    rank = args.rank
    if rank is not None and rank >= 1:
        rank = int(rank)
    rows = profile(args.source, rank, args.batch, args.mode, args.data_dir)
    print(json.dumps(profile_json(rows)) if args.json else format_profile(rows, args.mode))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from lorank.experiments.export import export, format_export

    if args.threads:
        torch.set_num_threads(args.threads)
    summary = export(args.source, args.out, args.target, args.overwrite, args.data_dir)
    print(format_export(summary))
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from lorank.training.config import packaged_configs

    known = packaged_configs()
    if args.name is None:
        for name, path in known.items():
            first = path.read_text().splitlines()[0].lstrip("# ").strip()
            print(f"{name:<28}  {first}")
        return 0
    name = args.name.removesuffix(".toml")
    if name not in known:
        raise LorankError(f"no packaged config {name!r}; `lorank init` lists them")
    out = Path(args.out or f"{name}.toml")
    if out.exists() and not args.overwrite:
        raise LorankError(f"{out} exists; choose another --out or pass --overwrite")
    try:
        out.write_text(known[name].read_text())
    except OSError as e:
        raise LorankError(f"cannot write {out} ({e.strerror}); choose a writable --out") from None
    print(out)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from lorank.methods import METHODS
    from lorank.methods.reference import method_options, method_summary

    if args.name is None:
        width = max(map(len, METHODS))
        for name in METHODS:
            print(f"{name:<{width}}  {method_summary(name)}")
        return 0
    if args.name not in METHODS:
        raise LorankError(f"unknown method {args.name!r}; choose one of {', '.join(METHODS)}")
    print(method_options(args.name))
    return 0


def _version() -> str:
    from lorank import __version__

    return f"lorank {__version__}"


def _launch_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Re-run ``lorank train`` (without ``--nproc``) under torchrun with ``nproc`` processes."""
    import subprocess

    if not 1 <= nproc <= 256:
        raise LorankError(f"--nproc must be between 1 and 256, not {nproc}")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", "-m", "lorank", *rest]
    return subprocess.run(cmd, check=False).returncode


def _cmd_train(args: argparse.Namespace) -> int:
    from lorank.training.config import load_config, load_run_config
    from lorank.training.distributed import is_main_process
    from lorank.training.trainer import train

    if args.nproc is not None:
        return _launch_torchrun(args.nproc, args.argv)
    if args.resume:
        if args.config or args.out:
            raise LorankError(
                "--resume RUN_DIR takes the run's own config.json and directory; "
                "drop the CONFIG argument and --out"
            )
        config = load_run_config(args.resume, args.overrides)
        out, name = args.resume, Path(args.resume).name
    elif args.config:
        config = load_config(args.config, args.overrides)
        out, name = args.out, Path(args.config).stem
    else:
        raise LorankError("lorank train needs a CONFIG file (or --resume RUN_DIR)")
    path = train(
        config,
        out,
        config_name=name,
        data_dir=args.data_dir,
        overwrite=args.overwrite,
        quiet=args.quiet,
        resume=bool(args.resume),
        allow_changes=args.allow_changes,
    )
    if is_main_process():
        summary = json.loads((path / SUMMARY).read_text())
        _print_json({"run_dir": str(path), **summary})
    return 0


def _print_json(obj: Any, indent: int | None = 2) -> None:
    """Print ``obj`` as strict JSON: NaN/inf (a diverged loss) become null, since ``NaN``
    is not JSON and would break whatever reads lorank's output."""
    print(json.dumps(_finite(obj), indent=indent, allow_nan=False))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _cmd_eval(args: argparse.Namespace) -> int:
    from lorank.training.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.path, data_dir=args.data_dir, config_path=args.config)
    _print_json(result)
    return 0


# Config fields (as library errors name them, in backquotes) and the flags that set them.
COMPRESS_FLAGS = {
    "ranks.rule": "--rule",
    "ranks.budget": "--budget",
    "ranks.loss_tolerance": "--loss-tolerance",
    "ranks.allocation": "--allocation",
    "ranks.precision": "--precision",
    "precision": "--precision",
    "svd": "--svd",
    "calibration": "--calibration",
    "calibration_file": "--calibration-file",
    "samples": "--samples",
    "damping": "--damping",
    "error_propagation": "--error-propagation",
    "refit": "--refit",
    "finetune.epochs": "--finetune-epochs",
    "finetune.steps": "--distill-steps",
    "finetune.lr": "--distill-lr",
    "finetune.holdout": "--distill-holdout",
    "finetune.loss": "--distill-loss",
    "finetune": "--finetune-epochs/--distill",
    "out": "--out",
    "overwrite": "--overwrite",
    "model_config": "--model-config",
    "objective": "--objective",
    "latency_mode": "--latency-mode",
    "latency_margin": "--latency-margin",
}


def flags_for_fields(message: str, flags: dict[str, str] = COMPRESS_FLAGS) -> str:
    """A library message with its `config.field` names replaced by the CLI's flags."""
    return re.sub(r"`([a-z_.]+)`", lambda m: flags.get(m.group(1), m.group(0)), message)


def _cmd_compress(args: argparse.Namespace) -> int:
    from lorank.compress import compress
    from lorank.compress.pipeline import options_config

    try:
        distill = None
        if args.distill:
            distill = {
                "steps": args.distill_steps,
                "lr": args.distill_lr,
                "holdout": args.distill_holdout,
                "loss": args.distill_loss,
            }
        config = options_config(
            args.rule,
            svd=args.svd,
            budget=args.budget,
            loss_tolerance=args.loss_tolerance,
            allocation=args.allocation,
            precision=args.precision,
            calibration=args.calibration,
            samples=args.samples,
            damping=args.damping,
            error_propagation=args.error_propagation,
            refit=args.refit,
            finetune_epochs=args.finetune_epochs,
            distill=distill,
            objective=args.objective,
            latency_mode=args.latency_mode,
            latency_margin=args.latency_margin,
        )
        path = compress(
            args.path,
            config,
            args.out,
            model_config=args.model_config,
            data_dir=args.data_dir,
            overrides=args.overrides,
            overwrite=args.overwrite,
            quiet=args.quiet,
            calibration_file=args.calibration_file,
        )
    except LorankError as e:
        raise type(e)(flags_for_fields(str(e))) from None
    summary = json.loads((path / SUMMARY).read_text())
    keys = (
        "test_acc_before",
        "test_acc_after",
        "test_acc",
        "params_eval_before",
        "params_eval_after",
        "compression",
        "ranks",
    )
    shown = {k: summary.get(k) for k in keys}
    if "test_mse" in summary:  # a forecaster: its errors, not an accuracy
        shown = {k: v for k, v in shown.items() if not k.startswith("test_acc")}
        shown |= {k: summary[k] for k in summary if k.startswith(("test_mse", "test_mae"))}
    # A Hugging Face model has no test set: its loss on the calibration windows says more.
    for key in ("calibration_loss_before", "calibration_loss_after"):
        if key in summary:
            shown[key] = summary[key]
    if "latency" in summary:  # --objective latency: predicted and measured speed-ups
        shown["latency"] = summary["latency"]
    _print_json({"run_dir": str(path)} | shown)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from lorank.experiments.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.config, args.grid, args.seeds, args.overrides)
    out = run_sweep(sweep, args.out, workers=args.workers, data_dir=args.data_dir, quiet=args.quiet)
    index = json.loads((out / "sweep.json").read_text())
    _print_json({"sweep_dir": str(out), **index["counts"]})
    return 0 if index["counts"]["failed"] == 0 else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from lorank.experiments.report import report

    out = report(args.paths, args.out, title=args.title)
    _print_json({"report": str(out / "report.html"), "summary": str(out / "summary.md")}, None)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from lorank.experiments.compare import compare, parse_hidden
    from lorank.experiments.sweep import parse_seeds

    out = compare(
        dataset=args.dataset,
        epochs=args.epochs,
        seeds=parse_seeds(args.seeds),
        hidden=parse_hidden(args.hidden) if args.hidden else None,
        train_subset=args.train_subset,
        methods=args.methods.split(",") if args.methods else None,
        workers=args.workers,
        overrides=args.overrides,
        out=args.out,
        data_dir=args.data_dir,
        quiet=args.quiet,
    )
    print((out / "summary.md").read_text().split("\n## ", 2)[1].split("\n", 1)[1].strip())
    print(f"\nreport: {out / 'report.html'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lorank`` command; returns the exit status (0 ok, 1 diverged, 2 bad input,
    3 an internal error, i.e. a bug in lorank, whose traceback goes to a file)."""
    try:
        parser = _parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2)
            return e.code if isinstance(e.code, int) else 2
        args.argv = list(sys.argv[1:] if argv is None else argv)
        if args.verbose:
            _log_to_stderr()
        func: Callable[[argparse.Namespace], int] = args.func
        code = func(args)
        sys.stdout.flush()  # a full or closed stdout fails here, inside the boundary
        return code
    except LorankError as e:
        _error_line(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        print("lorank: interrupted; finished epochs are kept in the run directory", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `lorank ... | head`: the reader left; that is its choice, not an error to report.
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
            where = f" ({e.filename})" if e.filename else " (standard output)"
            _error_line(
                f"cannot write{where}: {e.strerror}; free some space or choose another place"
            )
            if e.filename is None:
                _silence_stdout()
            return 2
        return _internal_error(e)
    except Exception as e:  # noqa: BLE001 - the boundary: a bug must not look like bad input
        return _internal_error(e)


def _log_to_stderr() -> None:
    """``lorank -v``: the library's log messages (INFO and up) on stderr."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lorank: %(message)s"))
    logging.getLogger("lorank").addHandler(handler)
    logging.getLogger("lorank").setLevel(logging.INFO)


def _error_line(message: str) -> None:
    try:
        print(_printable(f"lorank: error: {message}"), file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr itself is gone: nothing more can be said


def _printable(text: str) -> str:
    """One line even when the message quotes a multi-line value, and no control characters
    from a file's contents (a stray escape sequence could rewrite the terminal)."""
    text = " ".join(text.split("\n"))
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (e.g. captured by a test): nothing to silence


def _internal_error(error: BaseException) -> int:
    """Write the traceback to a file and say in one line what happened and where it is."""
    if os.environ.get("LORANK_TRACEBACK"):
        raise error  # developers: the traceback on the terminal instead
    text = "".join(traceback.format_exception(error))
    try:
        fd, path = tempfile.mkstemp(prefix="lorank-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(f"{_version()}: lorank {' '.join(sys.argv[1:])}\n{text}")
        where = f"the traceback is in {path}"
    except OSError as e:
        where = f"the traceback could not be written ({e.strerror})"
    name = type(error).__name__
    first = " ".join(str(error).split())[:200]
    _error_line(
        f"internal error {name}: {first}; this is a bug in lorank, not in your input; "
        f"{where} (please include it in a bug report)"
    )
    return 3


if __name__ == "__main__":
    sys.exit(main())
