r"""Distillation on unlabeled data: the compressed model learns the uncompressed model's outputs.

The calibration batches are split: the last ``holdout`` fraction (at least one batch) is held
out, the rest is cycled for at most ``steps`` AdamW steps (linear warm-up over the first 5% of
the steps, then cosine decay). Each step minimises the distance of
:mod:`lorank.compress.outputs` between the student's output and the teacher's (the model as it
was before compression) on one batch: KL of the softmax of the logits for language models and
classifiers, 1 − cosine (or relative MSE) of the hidden states for encoders. No labels are
used.

Only the factors of the low-rank layers (U, S, V), the biases of every layer and the weights
of normalisation layers (LayerNorm, RMSNorm, BatchNorm, GroupNorm) train; embeddings and
layers kept dense stay frozen, so the parameter count is unchanged. Every ``eval_every`` steps
the held-out distance is measured (the student runs in eval mode throughout: no dropout, no
batch-norm statistics updates); the parameters of the best evaluation are restored at the
end, and training stops after ``patience`` evaluations without improvement. The held-out
distance before training is the first evaluation, so distillation never leaves the model worse
on the held-out split than it found it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lorank.compress.config import DistillFinetune
from lorank.compress.outputs import distance, output_kind, output_tensor
from lorank.core.layers import LowRankLayer
from lorank.errors import LorankError

__all__ = ["distill", "split_holdout", "trainable_parameters"]

Forward = Callable[[nn.Module, Any], Any]
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORMS) or "norm" in type(module).__name__.lower()


def trainable_parameters(model: nn.Module, norms: bool = True) -> list[nn.Parameter]:
    """The low-rank factors, every bias, and (with ``norms``) normalisation weights."""
    chosen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, LowRankLayer) or (norms and _is_norm(module)):
            picked = own.values()
        else:
            picked = [p for n, p in own.items() if n == "bias"]
        for p in picked:
            chosen[id(p)] = p
    return list(chosen.values())


def split_holdout(batches: Sequence[Any], fraction: float) -> tuple[list[Any], list[Any]]:
    """``(train, held_out)``: the last ``fraction`` of the batches (at least one) held out."""
    batches = list(batches)
    if len(batches) < 2:
        raise LorankError(
            f"distillation needs at least 2 calibration batches (one held out), got "
            f"{len(batches)}; give more `calibration` samples"
        )
    held = min(max(1, round(len(batches) * fraction)), len(batches) - 1)
    return batches[:-held], batches[-held:]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Any],
    forward: Forward,
    options: DistillFinetune,
    progress: bool = True,
) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` in place (see the module doc); what happened."""
    from tqdm.auto import tqdm

    train, held = split_holdout(batches, options.holdout)
    teacher.eval()
    with torch.no_grad():
        probe = forward(teacher, held[0])
        kind = output_kind(probe, options.loss)
        held_targets = [output_tensor(forward(teacher, b)).detach() for b in held]
    params = trainable_parameters(student, options.train_norms)
    if not params:
        raise LorankError("the compressed model has no low-rank factor, bias or norm to distil")
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optim = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    warmup = max(1, options.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, options.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)

    @torch.no_grad()
    def held_out() -> float:
        student.eval()
        total = sum(
            float(distance(output_tensor(forward(student, b)), t, kind))
            for b, t in zip(held, held_targets, strict=True)
        )
        return total / len(held)

    start = time.perf_counter()
    before = held_out()
    best, best_step = before, 0
    best_state = {id(p): p.detach().clone() for p in params}
    history = [{"step": 0, "held_out": before}]
    bad, step, train_loss = 0, 0, float("nan")
    bar = tqdm(total=options.steps, desc="distill", unit="step", disable=not progress)
    try:
        while step < options.steps and bad < options.patience:
            for batch in train:
                # eval mode: no dropout noise, and batch-norm statistics stay the teacher's
                student.eval()
                with torch.no_grad():
                    target = output_tensor(forward(teacher, batch))
                loss = distance(output_tensor(forward(student, batch)), target, kind)
                if not torch.isfinite(loss):
                    raise LorankError(
                        f"distillation diverged at step {step} (loss {float(loss)}); lower "
                        "`finetune.lr`"
                    )
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optim.step()
                sched.step()
                step += 1
                train_loss = float(loss.detach())
                bar.update(1)
                if step % options.eval_every == 0 or step == options.steps:
                    value = held_out()
                    history.append({"step": step, "held_out": value, "train": train_loss})
                    bar.set_postfix(held_out=f"{value:.4g}")
                    if value < best:
                        best, best_step, bad = value, step, 0
                        best_state = {id(p): p.detach().clone() for p in params}
                    else:
                        bad += 1
                if step >= options.steps or bad >= options.patience:
                    break
    finally:
        bar.close()
        with torch.no_grad():
            for p in params:
                p.copy_(best_state[id(p)])
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), True))
        student.eval()
    return {
        "loss": kind,
        "steps": step,
        "best_step": best_step,
        "held_out_before": before,
        "held_out_after": best,
        "train_batches": len(train),
        "held_out_batches": len(held),
        "trainable_params": sum(p.numel() for p in params),
        "history": history,
        "time_s": time.perf_counter() - start,
    }


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with no gradients: the teacher."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
