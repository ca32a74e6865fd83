"""Shared pieces of the benchmark suite: method variants, step timing, the environment."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lorank
import lorank.methods as methods
from lorank.methods.base import Method

# Every low-rank training method, as the suite runs it. OIALR is measured after its switch
# (dense before it), with the bases frozen and only S trained; its basis update every
# ``frequency`` steps is amortised away here. The adaptive DLRT variants use τ = 0 with
# r_min = r_max = r, so each step augments to 2r and truncates back to r: the full cost of
# rank adaptivity at rank r. ``dlrt-<integrator>-<mode>`` for the parallel (default), BUG
# and KLS integrators and the non-DLRT one-step retraction.
VARIANTS = (
    "dense",
    "factorized",
    "svd",
    "dlrt-parallel-fixed",
    "dlrt-parallel-adaptive",
    "dlrt-bug-fixed",
    "dlrt-bug-adaptive",
    "dlrt-kls-fixed",
    "dlrt-kls-adaptive",
    "dlrt-retraction-fixed",
    "dlrt-retraction-adaptive",
    "oialr",
)
# The variants the slow whole-model cases (seconds per dense step) run.
MAIN_VARIANTS = ("dense", "factorized", "svd", "dlrt-parallel-fixed", "dlrt-parallel-adaptive")


def method_config(variant: str, rank: int | float, last_dense: bool) -> dict[str, Any]:
    """The ``[method]`` table of ``variant`` at ``rank`` (int or fraction of full rank)."""
    convert = {"rank": rank, "keep_last_dense": last_dense, "skip_if_no_savings": False}
    if variant == "dense":
        return {"name": "dense"}
    if variant == "factorized":
        return {"name": "factorized", **convert}
    if variant == "svd":
        # Random init like the others: the default (SVD of the dense init) takes minutes at
        # width 4096 and does not change the step's cost.
        return {
            "name": "svd",
            "lambda_orth": 1.0,
            "lambda_sparsity": 0.01,
            "init": "random",
            **convert,
        }
    if variant.startswith("dlrt-"):
        _, integrator, mode = variant.removesuffix("-per-layer").split("-")
        return {
            "name": "dlrt",
            "integrator": integrator,
            "adaptive": mode == "adaptive",
            "tolerance": 0.0,
            "init_rank": rank,
            "r_min": rank if isinstance(rank, int) else 1,
            "r_max": rank,
            "dense_layers": None if last_dense else [],
        }
    if variant == "oialr":
        return {"name": "oialr", "delay": 0, "frequency": 10**9, "keep_last_dense": last_dense}
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def prepare(model: nn.Module, variant: str, rank: int | float, last_dense: bool) -> Method:
    """Build ``variant``'s method and make ``model`` ready for it (OIALR: switched, at rank)."""
    method = methods.build(method_config(variant, rank, last_dense))
    method.prepare(model)
    if variant.endswith("-per-layer"):  # DLRT without batching equal-shape layers
        method.batch_layers = False  # type: ignore[attr-defined]
    if variant == "oialr":
        for layer in lorank.low_rank_layers(model).values():
            r = rank if isinstance(rank, int) else max(1, round(rank * layer.full_rank))
            layer.truncate(r)  # keeps requires_grad: U, V stay frozen
    return method


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def mse(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Wall time by default. ``--clock cpu`` (process CPU time) gives stable ratios on a machine
# shared with other jobs, where waiting for a core would otherwise count as work.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def median_time(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds (of ``clock``) of ``fn()`` over ``steps`` calls after ``warmup`` calls."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = clock()
        fn()
        sync(device)
        if i >= warmup:
            times.append(clock() - start)
    return statistics.median(times)


class PassCounter:
    """Counts forward calls of a model (each training forward is followed by one backward)."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self.count += 1

    def remove(self) -> None:
        self.handle.remove()


def time_train_step(
    model: nn.Module,
    method: Method,
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    steps: int,
    warmup: int,
    device: torch.device,
) -> tuple[float, int]:
    """Median seconds of one ``method.train_step`` with Adam, and its forward passes per batch."""
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-4)
    method.attach(loss_fn=loss_fn)
    counter = PassCounter(model)
    seconds = median_time(
        lambda: method.train_step(model, optimizer, batch, loss_fn), steps, warmup, device
    )
    counter.remove()
    return seconds, round(counter.count / (steps + warmup))


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "lorank": lorank.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
