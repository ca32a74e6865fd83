"""Multi-process training with PyTorch's ``DistributedDataParallel`` (DDP).

``torchrun --nproc_per_node=N -m lorank train CONFIG`` (or ``lorank train --nproc N``, which
launches the same through ``python -m torch.distributed.run``) starts N copies of the trainer.
Each reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment, joins a process group
(``gloo`` on CPU, ``nccl`` on CUDA, one GPU per process: ``cuda:LOCAL_RANK``) and trains its
shard of every batch:

* **The global batch is** ``data.batch_size``. Every process draws the same shuffled
  permutation (same seed) and builds the same global batch, then keeps its contiguous slice
  (:func:`torch.tensor_split`), so augmentation and the order of samples are those of a
  single-process run. Each local loss is scaled by ``n_local * world / n_global`` so DDP's
  gradient average is exactly the gradient of the global-batch mean, also for a short last
  batch.
* **Gradients** are averaged by DDP during ``loss.backward()``: the task loss a method calls
  (``loss_fn(model, batch)``) runs its forward through the DDP wrapper, while the method's
  hooks get the bare module for surgery (``set_factors``, ``swap_parameters``, SVDs). A
  method that takes gradients with ``torch.autograd.grad`` (DLRT's KLS integrator) bypasses
  DDP's reducer; an optimizer pre-step hook then averages the ``.grad`` fields itself, so every
  ``optimizer.step()`` sees averaged gradients (there gradient clipping acts on the local
  gradients before averaging, a small difference to a single-process run).
* **Rank and basis changes** (DLRT adaptive, OIALR, svd pruning, the hybrid switch) are
  computed on every process from identical parameters and identical averaged gradients, so
  every process takes the same decision and builds the same factors (SVD/QR on the same
  input and the same thread count is deterministic). After every step and epoch hook the
  tuple of parameter identities (and ``requires_grad`` flags) is compared with the one DDP
  was built on; when it changed, DDP is rebuilt on the new parameters. Rebuilding also
  broadcasts rank 0's parameters and buffers, a safety net against any drift.
* **Checking**: with ``LORANK_DEBUG_DDP=1`` every step ends with an all-gather of a checksum
  of each parameter, raising :class:`~lorank.errors.LorankError` if processes disagree.
* Only rank 0 writes the run directory and prints; per-epoch training losses are averaged
  over processes, so ``metrics.jsonl`` and ``summary.json`` have the single-process format.

Not supported under DDP: ``train.nonfinite = "skip"`` (the skip is a local decision; a
process that skipped its backward would leave the others waiting), use ``"stop"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lorank.errors import LorankError

DEBUG_ENV = "LORANK_DEBUG_DDP"


def launched() -> bool:
    """True when this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0, or the only process (what decides who writes files and prints)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def parameter_signature(model: nn.Module) -> tuple[tuple[int, bool], ...]:
    """Identities and trainability of the parameters: changes whenever a method swaps one."""
    return tuple((id(p), p.requires_grad) for p in model.parameters())


@dataclass
class _ReduceState:
    world_size: int
    reduced: bool = False  # did DDP's backward already average the gradients of this step?


def _averaging_comm_hook(state, bucket):  # noqa: ANN001, ANN202 (DDP inspects annotations)
    """DDP's plain all-reduce average, which also notes that this step was reduced."""
    state.reduced = True
    buffer = bucket.buffer().div_(state.world_size)
    work = dist.all_reduce(buffer, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


@dataclass
class Distributed:
    """One process of a DDP run: its place in the group and the step wrapper around a method."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool = False
    debug: bool = field(default_factory=lambda: os.environ.get(DEBUG_ENV, "") not in ("", "0"))

    def __post_init__(self) -> None:
        self.ddp: DistributedDataParallel | None = None
        self._signature: tuple[tuple[int, bool], ...] = ()
        self._reduce = _ReduceState(self.world_size)
        self._scale = 1.0
        self._hooked: set[int] = set()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ set-up
    def wrap(self, model: nn.Module) -> DistributedDataParallel:
        """(Re)build the DDP wrapper around ``model``'s current parameters."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=ids)
        self.ddp.register_comm_hook(self._reduce, _averaging_comm_hook)
        self._signature = parameter_signature(model)
        return self.ddp

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Average any gradient DDP did not average (``autograd.grad`` paths) before a step."""
        if id(optimizer) in self._hooked:
            return
        self._hooked.add(id(optimizer))

        def pre_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if not self._reduce.reduced:
                grads = [
                    p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None
                ]
                for grad in grads:
                    dist.all_reduce(grad)
                    grad.div_(self.world_size)

        def post_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._reduce.reduced = False

        optimizer.register_step_pre_hook(pre_step)
        optimizer.register_step_post_hook(post_step)

    def sync_structure(self, model: nn.Module) -> bool:
        """Rebuild DDP when a hook replaced parameters; returns whether it did."""
        if parameter_signature(model) == self._signature:
            return False
        self.wrap(model)
        return True

    # ------------------------------------------------------------------ the step
    def shard(self, batch: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], float]:
        """This process's contiguous slice of a global batch and its loss scale."""
        n = batch[0].shape[0]
        parts = [torch.tensor_split(t, self.world_size)[self.rank] for t in batch]
        local = parts[0].shape[0]
        if local == 0:  # a last batch smaller than the world: a zero-weight stand-in sample
            return tuple(t[:1] for t in batch), 0.0
        return tuple(parts), local * self.world_size / n

    def loss_fn(self, task_loss: Any) -> Any:
        """``task_loss`` with its forward through DDP and the shard's scale applied."""

        def distributed_loss(model: nn.Module, batch: Any) -> Tensor:
            assert self.ddp is not None
            forward = self.ddp if model is self.ddp.module else model
            return task_loss(forward, batch) * self._scale

        return distributed_loss

    def train_step(
        self,
        method: Any,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch: Any,
        task_loss: Any,
    ) -> dict[str, Tensor]:
        """``method.train_step`` on this process's shard, keeping processes in agreement."""
        if self.ddp is None or self.ddp.module is not model:
            self.wrap(model)
        self.attach_optimizer(optimizer)
        local, self._scale = self.shard(batch)
        self._reduce.reduced = False
        stats = method.train_step(model, optimizer, local, self.loss_fn(task_loss))
        self.sync_structure(model)
        if self.debug:
            check_agreement(model)
        return stats

    # ------------------------------------------------------------------ reductions
    def average(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over processes of per-process scalars (same keys on every process)."""
        if not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        t /= self.world_size
        return dict(zip(keys, t.tolist(), strict=True))

    def any_true(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (e.g. the run directory's timestamped name)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device_name: str = "auto") -> Distributed | None:
    """Join the process group torchrun describes in the environment; ``None`` when the run
    is a single process. An already initialised group (e.g. from ``mp.spawn``) is reused."""
    if not (dist.is_available() and (dist.is_initialized() or launched())):
        return None
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        raise LorankError(
            "train.device = 'cuda' but no CUDA device is available; use device = 'auto' or 'cpu'"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        backend=dist.get_backend(),
        owns_group=owns,
    )


@torch.no_grad()
def checksums(model: nn.Module) -> Tensor:
    """Per parameter: its sum, a position-weighted sum, its size and first dimension; enough
    to tell processes that hold different factors or different ranks apart."""
    rows = []
    for p in model.parameters():
        flat = p.detach().double().flatten()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        weighted = (flat * weights).sum() / max(flat.numel(), 1)
        shape0 = float(p.shape[0]) if p.dim() else 1.0
        rows.append(torch.stack([flat.sum(), weighted]).cpu().tolist() + [flat.numel(), shape0])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def check_agreement(model: nn.Module, atol: float = 0.0) -> None:
    """Raise if the processes' parameters (values or shapes) differ; every process calls it."""
    device = next(model.parameters()).device
    mine = checksums(model).to(device)
    sizes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, tuple(mine.shape))
    if len(set(sizes)) > 1:
        raise LorankError(
            f"DDP processes hold different numbers of parameters {sizes}: a method changed "
            "its structure on some processes only; report this with the config"
        )
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    names = [n for n, _ in model.named_parameters()]
    for other_rank, other in enumerate(gathered):
        diff = (other - gathered[0]).abs().amax(dim=1)
        bad = (diff > atol).nonzero()
        if bad.numel():
            name = names[int(bad[0, 0])]
            raise LorankError(
                f"DDP processes 0 and {other_rank} disagree on parameter {name!r} "
                f"(checksum difference {float(diff[bad[0, 0]]):.3g}); a method's decision "
                "is not deterministic across processes; report this with the config"
            )
