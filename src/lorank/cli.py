"""The ``lorank`` command line: ``train``, ``eval`` and ``compress``.

Every user error (bad config key or value, missing or corrupt file, incompatible checkpoint)
is printed as one line, ``lorank: error: ...``, with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lorank.errors import LorankError

CONFIG_HELP = """\
config sections (TOML) and their keys; override any with --set section.key=value:
  [data]   name (mnist|fashion-mnist|cifar10|tinyshakespeare|synthetic), dir, batch_size,
           eval_batch_size, train_subset, test_subset, augment, block_size, synthetic_*
  [model]  name (mlp|lenet5|resnet20|vgg|char_transformer) and its options
           (mlp: hidden, activation, dropout; char_transformer: n_layer, n_head, d_model, ...)
  [method] name (%(methods)s) and its options (see configs/ and README)
  [optim]  name (sgd|adam|adamw), lr, momentum, nesterov, weight_decay, betas, schedule
           (constant|step|cosine), warmup_steps, step_size, gamma, min_lr_ratio, grad_clip
  [train]  epochs, seed, device (auto|cpu|cuda), eval_every, threads
"""


def _parser() -> argparse.ArgumentParser:
    from lorank.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="lorank", description="Low-rank training and compression of neural networks."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model from a TOML config into a run directory",
        description="Train a model from a TOML config. Writes config.json, metrics.jsonl, "
        "summary.json, model.safetensors/model.json and env.json into the run directory.",
        epilog=CONFIG_HELP % {"methods": "|".join(METHODS)},
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="path to a TOML config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)",
    )
    p.add_argument("--out", help="run directory (default: runs/<config-stem>-<timestamp>)")
    p.add_argument("--data-dir", help="dataset root (else data.dir, $LORANK_DATA, ~/.cache/lorank)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing run directory at --out"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
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
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the source's config, e.g. --set optim.lr=1e-4 for fine-tuning",
    )
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
        help="loss-tolerance: precision of the search on delta (default 0.01)",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--data-dir", help="dataset root")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no fine-tuning epoch lines")
    p.set_defaults(func=_cmd_compress)
    return parser


def _version() -> str:
    from lorank import __version__

    return f"lorank {__version__}"


def _cmd_train(args: argparse.Namespace) -> int:
    from lorank.config import load_config
    from lorank.train import train

    config = load_config(args.config, args.overrides)
    path = train(
        config,
        args.out,
        config_name=Path(args.config).stem,
        data_dir=args.data_dir,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    summary = json.loads((path / "summary.json").read_text())
    print(json.dumps({"run_dir": str(path), **summary}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lorank.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.path, data_dir=args.data_dir, config_path=args.config)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from lorank.compress import compress

    path = compress(
        args.path,
        args.rule,
        args.out,
        finetune_epochs=args.finetune_epochs,
        model_config=args.model_config,
        data_dir=args.data_dir,
        overrides=args.overrides,
        samples=args.samples,
        precision=args.precision,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    summary = json.loads((path / "summary.json").read_text())
    keys = (
        "test_acc_before",
        "test_acc_after",
        "test_acc",
        "params_eval_before",
        "params_eval_after",
        "compression",
        "ranks",
    )
    print(json.dumps({"run_dir": str(path)} | {k: summary.get(k) for k in keys}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LorankError as e:
        print(f"lorank: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorank: interrupted; finished epochs are kept in the run directory", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
