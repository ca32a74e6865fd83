"""Time per training step of dense, factorized and DLRT training on the MLP benchmark.

Measures, in one process and one run, a full training step (forward, backward, optimizer and
the integrator's QR/SVD work) of the MLP 784-w-w-w-w-10 at batch 256 for

* ``dense``: plain ``nn.Linear`` layers and Adam;
* ``factorized``: the hidden layers as ``U Vᵀ`` at rank r (core ``"none"``), plain Adam;
* ``dlrt-<integrator>-<fixed|adaptive>``: DLRT at rank r. The adaptive variants run with
  ``tolerance = 0`` and ``r_min = r_max = r``, so every step augments to 2r and truncates back
  to r: the cost of rank adaptivity at rank r.

The output layer stays dense everywhere. Ratios are to dense and to factorized at the same
width and rank, measured in the same run::

    .venv/bin/python -m benchmarks.bench_dlrt            # widths 500/2048/4096, ranks 16/64/128
    .venv/bin/python -m benchmarks.bench_dlrt --quick    # width 500, ranks 16/64, few steps
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import lorank.methods as methods
from lorank.convert import LowRankConfig, convert

VARIANTS = ("dlrt-bug-fixed", "dlrt-bug-adaptive", "dlrt-kls-fixed", "dlrt-kls-adaptive")


def mlp(width: int) -> nn.Module:
    layers: list[nn.Module] = []
    prev = 784
    for _ in range(4):
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, 10))
    return nn.Sequential(*layers)


def build(variant: str, width: int, rank: int) -> tuple[nn.Module, methods.Method]:
    model = mlp(width)
    if variant == "dense":
        method = methods.build({"name": "dense"})
    elif variant == "factorized":
        convert(
            model,
            LowRankConfig(
                rank=rank,
                core="none",
                init="random",
                keep_last_dense=True,
                skip_if_no_savings=False,
            ),
        )
        method = methods.build({"name": "dense"})  # the default one-backward Adam step
    else:
        _, integrator, mode = variant.split("-")
        method = methods.build(
            {
                "name": "dlrt",
                "integrator": integrator,
                "adaptive": mode == "adaptive",
                "tolerance": 0.0,
                "init_rank": rank,
                "r_min": rank,
                "r_max": rank,
            }
        )
        method.prepare(model)
    return model, method


def time_step(
    variant: str, width: int, rank: int, steps: int, warmup: int, device: torch.device
) -> float:
    """Median seconds per training step."""
    torch.manual_seed(0)
    model, method = build(variant, width, rank)
    model.to(device)
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-3)
    x = torch.randn(256, 784, device=device)
    y = torch.randint(0, 10, (256,), device=device)

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        method.train_step(model, optimizer, (x, y), loss_fn)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="width 500, ranks 16/64, 3 steps")
    parser.add_argument("--widths", type=int, nargs="+", default=[500, 2048, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.ranks, args.steps, args.warmup = [500], [16, 64], 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device {device}, threads {torch.get_num_threads()}, batch 256, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    header = f"{'width':>6} {'rank':>5} {'variant':<18} {'ms/step':>9} {'x dense':>8} {'x fact':>8}"
    print(header)
    print("-" * len(header))
    worst: dict[str, float] = {}
    for width in args.widths:
        dense = time_step("dense", width, 0, args.steps, args.warmup, device)
        print(
            f"{width:>6} {'-':>5} {'dense':<18} {1e3 * dense:>9.2f} {1.0:>8.2f} {'':>8}", flush=True
        )
        for rank in args.ranks:
            fact = time_step("factorized", width, rank, args.steps, args.warmup, device)
            print(
                f"{width:>6} {rank:>5} {'factorized':<18} {1e3 * fact:>9.2f} "
                f"{fact / dense:>8.2f} {1.0:>8.2f}",
                flush=True,
            )
            for variant in VARIANTS:
                t = time_step(variant, width, rank, args.steps, args.warmup, device)
                worst[variant] = max(worst.get(variant, 0.0), t / fact)
                print(
                    f"{width:>6} {rank:>5} {variant:<18} {1e3 * t:>9.2f} {t / dense:>8.2f} "
                    f"{t / fact:>8.2f}",
                    flush=True,
                )
    print()
    for variant in VARIANTS:
        note = " (target <= 1.3)" if variant.startswith("dlrt-bug") else ""
        print(f"worst {variant} / factorized: {worst[variant]:.2f}{note}")


if __name__ == "__main__":
    main()
