"""Section 2, training-step cost of whole models on real data shapes.

The MNIST MLP 784-500×4-10 and LeNet-5 (one batch of real MNIST), and the small VGG-style CNN
on CIFAR-10-shaped input (the channel-factorized convolutions of the issue's conv target), per
method at a fixed rank fraction, with the forward passes each method runs per batch.
The classifier stays dense, as in the methods' defaults. ``vgg-cl`` is the same VGG with the
model and its batch in ``torch.channels_last`` memory format, dense and low-rank alike (on a
CPU the max-pooling, BatchNorm and the small-channel convolutions run much faster in it).
``mlp-512x12`` times the parallel DLRT step batched over its eleven equal hidden layers against
the same step one layer at a time (``-per-layer``): batching saves kernel launches and host
reads, which matter far more on a GPU than on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import MAIN_VARIANTS, VARIANTS, cross_entropy, prepare, time_train_step
from lorank.core.metrics import parameter_counts
from lorank.data import DataConfig, load_dataset
from lorank.models import build_model, model_config_from_dict

MODELS = {
    # name: (dataset, model config, batch size, rank fraction)
    "mlp-500x4": ("mnist", {"name": "mlp", "hidden": [500] * 4}, 256, 0.1),
    "lenet5": ("mnist", {"name": "lenet5"}, 128, 0.25),
    # The DLRT paper's LeNet-5 (20-50 channels, fc 800-500): the parallel-step target.
    "lenet5-paper": (
        "mnist",
        {"name": "lenet5", "channels": [20, 50], "hidden": [500], "pad": False},
        128,
        0.25,
    ),
    "vgg": ("cifar10", {"name": "vgg"}, 128, 0.25),
    "vgg-cl": ("cifar10", {"name": "vgg"}, 128, 0.25),
    "mlp-4096x4": ("mnist", {"name": "mlp", "hidden": [4096] * 4}, 256, 64),
    # Eleven equal 512×512 layers: the parallel DLRT step batched over them vs one at a time.
    "mlp-512x12": ("mnist", {"name": "mlp", "hidden": [512] * 12}, 256, 8),
}

#: The cases that measure something specific run their own variants.
CASE_VARIANTS = {
    "mlp-512x12": (
        "dense",
        "factorized",
        "dlrt-parallel-fixed",
        "dlrt-parallel-fixed-per-layer",
        "dlrt-parallel-adaptive",
        "dlrt-parallel-adaptive-per-layer",
    ),
}


CHANNELS_LAST = {"vgg-cl"}


def run(
    models: list[str], steps: int, warmup: int, device: torch.device, data_dir: str | None
) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        dataset, model_cfg, batch_size, rank = MODELS[name]
        data = load_dataset(
            DataConfig(name=dataset, batch_size=batch_size, augment=False), device, data_dir
        )
        batch = next(data.train_batches(torch.Generator().manual_seed(0)))
        layout = torch.channels_last if name in CHANNELS_LAST else torch.contiguous_format
        batch = (batch[0].contiguous(memory_format=layout), *batch[1:])
        dense_seconds = None
        # The slow cases (seconds per dense step) run the main methods only.
        variants = VARIANTS if name in ("mlp-500x4", "lenet5", "lenet5-paper") else MAIN_VARIANTS
        variants = CASE_VARIANTS.get(name, variants)
        for variant in variants:
            torch.manual_seed(0)
            model = build_model(model_config_from_dict(model_cfg), data.info).to(device)
            method = prepare(model, variant, rank, last_dense=True)
            model.to(device, memory_format=layout)
            counts = parameter_counts(model)
            seconds, passes = time_train_step(
                model, method, batch, cross_entropy, steps, warmup, device
            )
            dense_seconds = dense_seconds or seconds
            rows.append(
                {
                    "model": name,
                    "variant": variant,
                    "rank": "full" if variant == "dense" else rank,
                    "batch": batch_size,
                    "ms": 1e3 * seconds,
                    "x_dense": seconds / dense_seconds,
                    "passes": passes,
                    "params_train": counts["params_train"],
                }
            )
            print(_format(rows[-1]), flush=True)
    return rows


HEADER = f"{'model':<10} {'variant':<18} {'ms/step':>9} {'x dense':>8} {'passes':>6}"


def _format(row: dict[str, Any]) -> str:
    return (
        f"{row['model']:<10} {row['variant']:<18} {row['ms']:>9.2f} {row['x_dense']:>8.3f} "
        f"{row['passes']:>6}"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| model | method | rank | batch | ms/step | × dense | fwd/bwd passes | trainable params |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['variant']} | {r['rank']} | {r['batch']} | {r['ms']:.1f} "
            f"| {r['x_dense']:.3f} | {r['passes']} | {r['params_train']:,} |"
        )
    return "\n".join(out) + "\n"
