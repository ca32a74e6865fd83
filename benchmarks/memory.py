"""Section 4, training memory of the MLP 784-w×4-10 at width 4096 per method.

Two figures per method: the bytes of the training state (parameters + gradients + optimizer
state, counted from the tensors after a few steps) and the measured peak resident memory of
a fresh process while it runs those steps, above the process's resident memory before the
model existed (torch itself); the peak mark is reset after the model is built and converted,
so the dense weights a conversion starts from do not count. On CUDA (``--device cuda``) the
peak is the CUDA caching allocator's peak of allocated memory above what was allocated after
the conversion (``torch.cuda.max_memory_allocated``). Each method runs in its own process so
the peaks do not mask each other.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
from typing import Any

import torch
from torch import nn

from benchmarks.common import VARIANTS, cross_entropy, prepare

STEPS = 3
BATCH = 256


def mlp(width: int) -> nn.Module:
    layers: list[nn.Module] = []
    prev = 784
    for _ in range(4):
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, 10))
    return nn.Sequential(*layers)


def _peak_rss_mb() -> float:
    """Peak resident memory since the last :func:`_reset_peak` (Linux ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark, so building the dense model before converting it
    does not count as training memory (Linux ≥ 4.0; a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:  # Linux: pages of the resident set
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure_one(variant: str, width: int, rank: int, device: str = "cpu") -> dict[str, Any]:
    """Run in a fresh process: build, train STEPS steps, count the state and the peak."""
    torch.manual_seed(0)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    x = torch.randn(BATCH, 784, device=dev)
    y = torch.randint(0, 10, (BATCH,), device=dev)
    before = _current_rss_mb()
    model = mlp(width).to(dev)
    method = prepare(model, variant, rank, last_dense=True)
    model.to(dev)
    gc.collect()
    _reset_peak()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev) / 2**20
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-4)
    method.attach(loss_fn=cross_entropy)
    for _ in range(STEPS):
        method.train_step(model, optimizer, (x, y), cross_entropy)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(
        p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
    )
    state = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    return {
        "variant": variant,
        "width": width,
        "rank": rank,
        "params_mb": params / 2**20,
        "grads_mb": grads / 2**20,
        "optimizer_mb": state / 2**20,
        "state_mb": (params + grads + state) / 2**20,
        "peak_mb": (torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else _peak_rss_mb())
        - before,
        "device": dev.type,
    }


def run(
    width: int, rank: int, threads: int | None, device: torch.device | str = "cpu"
) -> list[dict[str, Any]]:
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "benchmarks.memory", variant, str(width), str(rank)]
        if threads:
            cmd.append(str(threads))  # the optional positional, before any option
        cmd += ["--device", str(device)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        dense = rows[0]["state_mb"], rows[0]["peak_mb"]
        rows[-1]["state_x_dense"] = rows[-1]["state_mb"] / dense[0]
        rows[-1]["peak_x_dense"] = rows[-1]["peak_mb"] / dense[1]
        print(_format(rows[-1]), flush=True)
    return rows


HEADER = f"{'variant':<18} {'state MB':>9} {'x dense':>8} {'peak MB':>9} {'x dense':>8}"


def _format(row: dict[str, Any]) -> str:
    return (
        f"{row['variant']:<18} {row['state_mb']:>9.1f} {row['state_x_dense']:>8.3f} "
        f"{row['peak_mb']:>9.1f} {row['peak_x_dense']:>8.3f}"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| method | params MB | grads MB | optimizer MB | state MB | × dense | measured peak MB "
        "| × dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['variant']} | {r['params_mb']:.1f} | {r['grads_mb']:.1f} "
            f"| {r['optimizer_mb']:.1f} | {r['state_mb']:.1f} | {r['state_x_dense']:.3f} "
            f"| {r['peak_mb']:.1f} | {r['peak_x_dense']:.3f} |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("variant")
    parser.add_argument("width", type=int)
    parser.add_argument("rank", type=int)
    parser.add_argument("threads", type=int, nargs="?")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure_one(args.variant, args.width, args.rank, args.device)))
