r"""How far a compressed model's outputs are from the original's, with no labels.

A model's output is reduced to one tensor (:func:`output_tensor`): a plain tensor as it is,
else the ``logits`` of a Hugging Face output (language models, classifiers), else its
``last_hidden_state`` (encoders). The distances, averaged over every position:

* ``kl``: :math:`\mathrm{KL}(p_\text{orig} \,\|\, p_\text{comp})` of the softmax of the
  logits over the last dimension (for outputs that are logits);
* ``cosine``: :math:`1 - \cos(h_\text{orig}, h_\text{comp})` per position (for hidden states,
  where the direction is what sentence embeddings and retrieval use);
* ``mse``: relative squared error :math:`\|h_\text{comp} - h_\text{orig}\|^2 / \|h_\text{orig}\|^2`.

``auto`` takes ``kl`` for logits (a plain tensor or ``.logits``) and ``cosine`` for hidden
states.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from lorank.errors import LorankError

__all__ = ["DISTANCES", "distance", "output_kind", "output_tensor"]

DISTANCES = ("kl", "cosine", "mse")


def output_tensor(out: Any) -> Tensor:
    """The one tensor of a model output the distances compare (see the module doc)."""
    if isinstance(out, Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise LorankError(
        f"cannot compare the model's outputs ({type(out).__name__}): return a tensor, or an "
        "output with .logits or .last_hidden_state"
    )


def output_kind(out: Any, kind: str = "auto") -> str:
    """The distance ``auto`` stands for with this output."""
    if kind != "auto":
        return kind
    if isinstance(out, Tensor):
        return "kl"
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    return "kl" if isinstance(logits, Tensor) else "cosine"


def distance(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """The mean distance of ``student`` from ``teacher`` outputs (differentiable in student)."""
    teacher = teacher.detach()
    if kind == "kl":
        log_q = F.log_softmax(student.float(), dim=-1)
        log_p = F.log_softmax(teacher.float(), dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    if kind == "mse":
        t = teacher.float()
        return (student.float() - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)
    raise LorankError(f"unknown output distance {kind!r}; choose one of {', '.join(DISTANCES)}")
