"""A per-layer cost model measured on the user's device: how long a dense layer and its
low-rank replacement take at the layer's real input shape, and the rank below which low rank
is faster (the break-even rank).

Fewer parameters do not mean less time: ``r(m+n) < mn`` halves the FLOPs only when ``r`` is
well below ``mn/(m+n)``, and two small GEMMs (or a k×k and a 1×1 convolution) pay launch and
memory overheads that one large GEMM does not. So every decision that is meant to make a
model *faster* is taken from measurements, not from the FLOP count:

* :meth:`CostModel.time` times one layer kind at one shape: the median of ``repeats`` runs
  after ``warmup`` runs (``torch.cuda.synchronize`` around each on CUDA), of the forward pass
  (``mode="forward"``) or the forward and backward passes (``mode="train"``; the backward
  computes the input gradient too unless ``input_grad=False``: inside a network every layer
  whose input depends on a trainable parameter does, the first layer does not —
  :func:`layer_inputs` tells which), with the input in the memory format the network gives
  the layer (``channels_last=True`` for a channels-last 4-D input: on a CPU it changes
  which form is faster, e.g. for a first convolution with few channels). Results are
  cached by a :class:`CostKey` covering device, dtype, layer kind, shape, input shape, rank and
  mode, in memory and optionally in a JSON file, so a profile is measured once per device.
* :meth:`CostModel.faster` is the one test of "faster" every decision uses: the low-rank time
  below the dense time by more than ``margin`` (default 5%). Repeated timings of the same
  call differ by a few percent, so a layer measured 1–2% faster is as likely to be slower
  inside the model; converting it would make "never slower than dense" a coin toss.
* :meth:`CostModel.break_even_rank` is the largest rank whose low-rank time is faster in
  that sense (binary search: time grows with the rank); ``None`` when no rank is.
* :meth:`CostModel.fastest_rank_near` looks at ``r`` and at ``r`` rounded up to the
  multiples of 8, 16 and 64 that devices often run faster (never down, so never at a cost in
  accuracy), and keeps the fastest — it rounds only when the measurement says so.

The timer is injectable (``timer(fn) -> seconds``), which is how the tests make every
decision deterministic.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lorank.core.layers import LowRankConv2d, LowRankLinear
from lorank.errors import LorankError

Mode = Literal["forward", "train"]
Timer = Callable[[Callable[[], object]], float]


@dataclass(frozen=True)
class CostKey:
    """Everything a measured time depends on."""

    device: str
    dtype: str
    kind: str  # "linear" or "conv2d(k,stride,padding,dilation)"
    out_features: int
    in_features: int
    input_shape: tuple[int, ...]
    rank: int | None  # None: the dense layer
    mode: str
    #: mode "train": the backward computes the input gradient (keys of caches written before
    #: it was recorded differ, so an old cache is not read for new measurements)
    input_grad: bool = False
    #: a 4-D input in torch.channels_last memory format
    channels_last: bool = False

    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def wall_timer(repeats: int = 7, warmup: int = 2) -> Timer:
    """The median wall time of ``repeats`` calls after ``warmup`` calls, synchronising CUDA."""

    def measure(fn: Callable[[], object]) -> float:
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return measure


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d | LowRankConv2d):
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
        return f"conv2d(k={tuple(k)},stride={tuple(s)},padding={p},dilation={tuple(d)})"
    if isinstance(module, nn.Linear | LowRankLinear):
        return "linear"
    raise LorankError(f"no cost model for a {type(module).__name__}; only Linear and Conv2d")


def _dims(module: nn.Module) -> tuple[int, int]:
    """The matrix view m×n (a Conv2d's is C_out × C_in·kh·kw)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels, module.in_channels * kh * kw // module.groups
    return module.out_dim, module.in_dim  # type: ignore[return-value]


#: a low-rank layer counts as faster only below (1 - margin) × its dense time
DEFAULT_MARGIN = 0.05


class CostModel:
    """Measured dense and low-rank times of layers on one device (see module doc)."""

    def __init__(
        self,
        timer: Timer | None = None,
        cache_file: str | Path | None = None,
        core: Literal["full", "diag", "none"] = "none",
        margin: float = DEFAULT_MARGIN,
    ) -> None:
        if not 0 <= margin < 1:
            raise LorankError(f"latency margin {margin} must be in [0, 1) (0.05: 5% faster)")
        self.timer = timer or wall_timer()
        self.margin = margin
        self.core = core
        self.cache_file = Path(cache_file) if cache_file else None
        self.cache: dict[str, float] = {}
        if self.cache_file and self.cache_file.is_file():
            try:
                self.cache = {
                    k: float(v) for k, v in json.loads(self.cache_file.read_text()).items()
                }
            except (ValueError, AttributeError, UnicodeDecodeError):
                self.cache = {}  # a corrupt cache is only a cache: measure again

    def key(
        self,
        module: nn.Module,
        input_shape: Sequence[int],
        rank: int | None,
        mode: Mode,
        input_grad: bool = True,
        channels_last: bool = False,
    ) -> CostKey:
        weight = next(module.parameters())
        m, n = _dims(module)
        return CostKey(
            str(weight.device), str(weight.dtype).removeprefix("torch."), _kind(module),
            m, n, tuple(int(s) for s in input_shape), rank, mode,
            mode == "train" and input_grad, channels_last and len(input_shape) == 4,
        )  # fmt: skip

    def time(
        self, module: nn.Module, input_shape: Sequence[int], rank: int | None = None,
        mode: Mode = "forward", input_grad: bool = True, channels_last: bool = False,
    ) -> float:  # fmt: skip
        """Seconds per call of ``module`` (``rank=None``) or of its rank-``rank`` replacement
        (random factors: time does not depend on the values) on inputs of ``input_shape``."""
        key = self.key(module, input_shape, rank, mode, input_grad, channels_last)
        text = key.text()
        if text not in self.cache:
            layer = module if rank is None else self._low_rank(module, rank)
            run = self._call(layer, input_shape, mode, key.input_grad, key.channels_last)
            self.cache[text] = self.measure(key, run)
            self._save()
        return self.cache[text]

    def measure(self, key: CostKey, run: Callable[[], object]) -> float:
        """Seconds per call of ``run`` (what ``key`` describes); tests override this."""
        return self.timer(run)

    def faster(self, low_rank: float, dense: float) -> bool:
        """Whether a low-rank time beats the dense one by more than ``margin`` (any unit)."""
        return low_rank < (1 - self.margin) * dense

    def break_even_rank(
        self,
        module: nn.Module,
        input_shape: Sequence[int],
        mode: Mode = "forward",
        input_grad: bool = True,
        channels_last: bool = False,
    ) -> int | None:
        """The largest rank whose low-rank layer is :meth:`faster` than the dense one, or
        None."""
        dense = self.time(module, input_shape, None, mode, input_grad, channels_last)
        lo, hi = 0, min(_dims(module))
        while lo < hi:  # invariant: ranks ≤ lo are faster (0 trivially), ranks > hi are not
            mid = (lo + hi + 1) // 2
            if self.faster(
                self.time(module, input_shape, mid, mode, input_grad, channels_last), dense
            ):
                lo = mid
            else:
                hi = mid - 1
        return lo or None

    def fastest_rank_near(
        self,
        module: nn.Module,
        input_shape: Sequence[int],
        rank: int,
        mode: Mode = "forward",
        input_grad: bool = True,
        channels_last: bool = False,
    ) -> int:
        """``rank``, or the multiple of 8, 16 or 64 just above it when that measures faster
        (never below ``rank``, so rounding never costs accuracy; at most 1/8 more rank, or
        the next multiple of 8, and never above full rank)."""
        full = min(_dims(module))
        ceiling = min(full, max(-(-rank // 8) * 8, rank + rank // 8))
        candidates = {rank} | {
            r for step in (8, 16, 64) for r in range(-(-rank // step) * step, ceiling + 1, step)
        }
        return min(
            sorted(candidates),
            key=lambda r: (self.time(module, input_shape, r, mode, input_grad, channels_last), r),
        )

    # ------------------------------------------------------------------ internals
    def _low_rank(self, module: nn.Module, rank: int) -> nn.Module:
        # Random factors: the time of a layer does not depend on its values.
        bias = getattr(module, "bias", None) is not None
        if isinstance(module, nn.Conv2d):
            layer: nn.Module = LowRankConv2d(
                module.in_channels, module.out_channels, module.kernel_size, rank,
                module.stride, module.padding, module.dilation, bias, self.core,
            )  # fmt: skip
        else:
            m, n = _dims(module)
            layer = LowRankLinear(n, m, rank, bias, self.core)
        return layer.to(next(module.parameters()))

    @staticmethod
    def _call(
        layer: nn.Module,
        input_shape: Sequence[int],
        mode: Mode,
        input_grad: bool = False,
        channels_last: bool = False,
    ) -> Callable[[], object]:
        ref = next(layer.parameters())
        x = torch.randn(*input_shape, device=ref.device, dtype=ref.dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            # a copy: the dense layer timed may be the caller's own
            layer = copy.deepcopy(layer).to(memory_format=torch.channels_last)
        if mode == "train" and input_grad:
            x.requires_grad_(True)  # a layer inside a network passes its input gradient on
        if mode == "forward":

            def forward() -> object:
                with torch.no_grad():
                    return layer(x)

            return forward

        def train_step() -> object:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            out = layer(x)
            out.backward(torch.ones_like(out))
            return out

        return train_step

    def _save(self) -> None:
        if self.cache_file is None:
            return
        from lorank.core.io import atomic_write_json

        atomic_write_json(self.cache_file, self.cache)


@dataclass(frozen=True)
class LayerInput:
    """What a layer's time depends on besides the layer: its input as the network gives it."""

    shape: tuple[int, ...]
    #: the input depends on trainable parameters: a training backward computes its gradient
    needs_grad: bool = True
    #: a 4-D input in torch.channels_last memory format (and not also contiguous)
    channels_last: bool = False

    def options(self) -> dict[str, bool]:
        """The keyword arguments of :meth:`CostModel.time` (and the other timings)."""
        return {"input_grad": self.needs_grad, "channels_last": self.channels_last}


def layer_inputs(
    model: nn.Module,
    example: object,
    forward: Callable[[nn.Module, object], object] | None = None,
) -> dict[str, LayerInput]:
    """``{layer name: LayerInput}`` of every Linear/Conv2d/low-rank layer, from one forward
    of ``example`` (a tensor or a tuple of model arguments; or whatever ``forward(model,
    example)`` takes) with autograd on: the first layer's input needs no gradient, a layer
    after a trainable one does (its backward then computes it)."""
    found: dict[str, LayerInput] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d | LowRankLinear | LowRankConv2d):

            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                x = args[0]
                last = (
                    x.dim() == 4
                    and x.is_contiguous(memory_format=torch.channels_last)
                    and not x.is_contiguous()
                )
                found.setdefault(name, LayerInput(tuple(x.shape), bool(x.requires_grad), last))

            hooks.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()  # no BatchNorm statistics change; shapes and autograd are the same
    try:
        with torch.enable_grad():
            if forward is not None:
                forward(model, example)
            elif isinstance(example, tuple):
                model(*example)
            else:
                model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def layer_input_shapes(
    model: nn.Module,
    example: object,
    forward: Callable[[nn.Module, object], object] | None = None,
) -> dict[str, tuple[int, ...]]:
    """``{layer name: input shape}`` of every Linear/Conv2d/low-rank layer (the shapes of
    :func:`layer_inputs`)."""
    return {name: i.shape for name, i in layer_inputs(model, example, forward).items()}
