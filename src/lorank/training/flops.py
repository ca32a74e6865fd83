"""The training loop's FLOP bookkeeping: FLOPs per training step and per inference sample,
counted on one real batch, and the cumulative training FLOPs of a run.

**What a training step counts.** The method's own ``train_step`` (all its forward/backward
passes, e.g. the three of DLRT's KLS integrator, its regularizers, and the small linear
algebra it does in the step: DLRT's QRs, Gram matrices and core SVDs), run under
:class:`lorank.core.flops.FlopCounter` on *copies* of the model, optimizer and method, so the
run itself is untouched (the RNG state is restored too): matrix products and convolutions
counted, decompositions estimated, element-wise work not counted (see
:mod:`lorank.core.flops`). Work a method does only every k steps (OIALR's basis rotation,
its one-time switch) is reported by the method itself through :meth:`Method.extra_flops
<lorank.methods.base.Method.extra_flops>`: it is taken out of the counted step, so it is
never charged to every step, and added once per epoch as it happened. ``on_epoch_end``
(pruning, rank searches with their forward passes, switches) and ``prepare`` (conversion,
SVD initialisations) run for real under the counter and are added where they happen. A
gradient-free method's ``fit`` is counted as it runs. Evaluation is not training: it is not
in ``train_flops``.

**When it counts.** On one fixed real batch (the first ``batch_size`` training samples,
without augmentation), whenever the parameters' shapes or trainability differ from the last
count (a rank change, a switch, frozen bases): checked before each epoch, at its end, and
within it after 8, 16, 32, ... steps (the gap doubles after every check that found a
change, so a rank-adaptive run is counted O(log steps) times, a fixed one once). The steps
between two check points are charged the mean of the step FLOPs at both (the trapezoid
rule), every step as a full batch. Counting is measurement, not training: its time
(``flop_count_s`` in ``summary.json``) is kept out of the epoch times and the energy.

**Inference** FLOPs per sample: one forward pass in eval mode without gradients on (up to
:data:`INFERENCE_SAMPLES` samples of) the first test batch, divided by the number of samples
(a sequence for the language model), re-counted when the structure changed. A layer with a
core forms U·S once per forward, so that product is shared by the samples of the batch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from lorank.core.flops import FlopCounter, count_flops

INFERENCE_SAMPLES = 64  # FLOPs are linear in the batch; a slice is as exact and cheaper


def structure(model: nn.Module) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
    """What a step's FLOPs depend on: every parameter's name, shape and trainability."""
    return tuple((n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters())


def _rng_state() -> tuple[Any, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Any, Any]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def train_step_flops(
    method: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
) -> tuple[int, int]:
    """FLOPs of one ``method.train_step`` on ``batch``, taken on copies of ``method``,
    ``model`` and ``optimizer``, less what the method reports as periodic work
    (:meth:`~lorank.methods.base.Method.extra_flops`); and the estimated part of them."""
    rng = _rng_state()
    was_training = model.training
    try:
        m, mod, opt = copy.deepcopy((method, model, optimizer))
        # An LR scheduler patches ``optimizer.step`` on the instance with a wrapper that
        # holds a reference to the original optimizer: drop it so the copy steps itself.
        opt.__dict__.pop("step", None)
        mod.train()
        m.extra_flops()  # drop what the original had pending: only this step's counts
        with FlopCounter() as counter:
            m.train_step(mod, opt, batch, loss_fn)
        periodic = int(m.extra_flops())
        # Periodic work is matrix decompositions and products; take it from the estimated
        # part first (it is never more than the whole).
        return counter.total - periodic, max(counter.estimated - periodic, 0)
    finally:
        _set_rng_state(rng)
        model.train(was_training)


@torch.no_grad()
def inference_flops(model: nn.Module, inputs: torch.Tensor) -> float:
    """Forward FLOPs per sample of ``model`` in eval mode on ``inputs`` (a batch)."""
    was_training = model.training
    model.eval()
    try:
        x = inputs[:INFERENCE_SAMPLES]
        _, flops = count_flops(model, x)
        return flops / max(len(x), 1)
    finally:
        model.train(was_training)


FIRST_CHECK = 8
"""Steps from an epoch's start to the first structure check; the gap doubles after every
check that found a change, so a rank-adaptive run is counted O(log steps) times."""


class FlopMeter:
    """Per-run FLOP bookkeeping for the trainer (see the module docstring).

    ``total`` starts at the training FLOPs already done (a resumed run's last record);
    ``pause`` is entered around each count (the trainer pauses the energy meter there)."""

    def __init__(
        self,
        method: Any,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        batch: Any,
        inputs: torch.Tensor | None,
        total: float = 0.0,
    ) -> None:
        self.method, self.loss_fn, self.batch, self.inputs = method, loss_fn, batch, inputs
        self.total = float(total)
        self.pause: Callable[[], AbstractContextManager[Any]] = nullcontext
        self.seconds = 0.0  # spent counting on copies (not training)
        self.counts = 0
        self.step_flops: float | None = None  # per step at the current structure
        self.step_estimated: float | None = None  # the decompositions' (estimated) part
        self.inference: float | None = None
        self._counted: tuple | None = None  # structure of the last training count
        self._inference_counted: tuple | None = None
        self._segment: float | None = None  # step FLOPs at the last check point
        self._since = 0  # steps since the last check point
        self._gap = FIRST_CHECK

    def _count(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Count a step if the structure changed since the last count; whether it did."""
        now = structure(model)
        if now == self._counted and self.step_flops is not None:
            return False
        start = time.perf_counter()
        with self.pause():
            self.step_flops, self.step_estimated = train_step_flops(
                self.method, model, optimizer, self.batch, self.loss_fn
            )
        self._counted = now
        self.counts += 1
        self.seconds += time.perf_counter() - start
        return True

    def _check(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """Charge the steps since the last check point at the mean of the step FLOPs there
        and here (the trapezoid rule); returns the seconds spent counting."""
        before = self.seconds
        changed = self._count(model, optimizer)
        assert self._segment is not None and self.step_flops is not None
        self.total += self._since * 0.5 * (self._segment + self.step_flops)
        self._segment, self._since = self.step_flops, 0
        if changed:
            self._gap *= 2
        return self.seconds - before

    def begin_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Before an epoch's first step: count if the structure changed since the last."""
        self._count(model, optimizer)
        self._segment, self._since = self.step_flops, 0

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """After every step: an integer compare, except every so many steps (see
        :data:`FIRST_CHECK`) a structure check, and a count if it changed. Returns the
        seconds spent counting (to keep out of the epoch's time)."""
        self._since += 1
        if self._since < self._gap:
            return 0.0
        return self._check(model, optimizer)

    def end_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """After an epoch's last step (before ``on_epoch_end``): charge its remaining steps
        and the method's periodic work; returns the seconds spent counting."""
        if self._segment is None:
            return 0.0
        spent = self._check(model, optimizer)
        self.total += float(self.method.extra_flops())
        self._segment = None
        return spent

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to count exactly as an uninterrupted one (JSON-able)."""
        return {
            "total": self.total,
            "seconds": self.seconds,
            "counts": self.counts,
            "gap": self._gap,
            "step_flops": self.step_flops,
            "step_estimated": self.step_estimated,
            "counted": self._counted,
            "inference": self.inference,
            "inference_counted": self._inference_counted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def as_structure(value: Any) -> tuple | None:
            # JSON turned the tuples into lists. A malformed one (a hand-edited file) only
            # means the step is counted again.
            try:
                return tuple((str(n), tuple(int(d) for d in s), bool(g)) for n, s, g in value)
            except (TypeError, ValueError):
                return None

        self.total = float(state.get("total", self.total))
        self.seconds = float(state.get("seconds", 0.0))
        self.counts = int(state.get("counts", 0))
        self._gap = int(state.get("gap", FIRST_CHECK))

        def number(key: str) -> float | None:
            value = state.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise ValueError(f"{key} = {value!r} is not a number")
            return value

        self.step_flops, self.step_estimated = number("step_flops"), number("step_estimated")
        self._counted = as_structure(state.get("counted"))
        self.inference = number("inference")
        self._inference_counted = as_structure(state.get("inference_counted"))

    def counted(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` (real training work outside the steps, e.g. ``on_epoch_end``) under the
        counter and add its FLOPs to the training total."""
        with FlopCounter() as counter:
            out = fn(*args, **kwargs)
        self.total += counter.total
        return out

    def record(self, model: nn.Module) -> dict[str, float]:
        """The FLOP fields of an epoch record: ``train_flops`` (cumulative),
        ``step_flops`` (per training step, at the last count) with its estimated part
        ``step_flops_estimated`` (the decompositions), and ``inference_flops`` (per
        sample, re-counted when the structure changed)."""
        out: dict[str, float] = {"train_flops": self.total}
        if self.step_flops is not None:
            out["step_flops"] = self.step_flops
            out["step_flops_estimated"] = self.step_estimated or 0
        now = structure(model)
        if self.inputs is not None and (now != self._inference_counted or self.inference is None):
            self.inference = inference_flops(model, self.inputs)
            self._inference_counted = now
        if self.inference is not None:
            out["inference_flops"] = self.inference
        return out
