r"""``pil``: pseudoinverse learning (Guo & Lyu, 1995 onwards), gradient-free training of an MLP.

No optimizer and no gradient: the network is fitted layer by layer in closed form, in one
pass over the training set per layer (see :mod:`lorank.methods._ridge` for the solves).

**Hidden layers.** With :math:`H_0 = X` the flattened inputs, layer :math:`l` of width
:math:`m_l` is built from the pseudoinverse of its input :math:`H_{l-1}`: for the centred
:math:`H_{l-1} - \mathbf 1\bar h^\top = U\Sigma V^\top`, PIL's hidden output
:math:`H_{l-1}H_{l-1}^+ = UU^\top` is truncated to its top :math:`k` directions, whose
coordinates are :math:`U_k = (H_{l-1} - \mathbf 1\bar h^\top)V_k\Sigma_k^{-1}`. So the layer's
weights are :math:`W_l = \sqrt N\,V_k\Sigma_k^{-1}` (each unit then has unit variance on the
training set), its bias centres the input, and :math:`H_l = \sigma(H_{l-1}W_l + b_l)` with the
model's activation. It keeps :math:`k = \min(m_l/2, r)` directions, :math:`r` the rank that
``rule`` picks from the singular values :math:`\Sigma` (default ``energy=0.2``: the top
directions holding 80% of the centred input's energy, 44 on MNIST pixels). Each kept direction
gives two units, :math:`+u` and :math:`-u` (``signed_pairs``): with ReLU, :math:`\sigma(u) -
\sigma(-u) = u`, so a layer passes its input's kept coordinates on unchanged besides adding the
nonlinear :math:`|u|`; without the pairs ReLU drops the negative half of every coordinate and
each added layer loses accuracy (MNIST, 4×500: 77% instead of 91%). The remaining :math:`m_l -
2k` units are random unit-variance combinations of the :math:`r` whitened directions (the
extreme learning machine's random hidden units, ``seed``), so the layer keeps the configured
width; these random units carry most of the nonlinearity, which is why a small ``r`` works
better than keeping every direction (MNIST, one layer of 500: 93.6% with ``energy=0.2``, 90.6%
with ``delta=0.001``, which keeps about 500 directions). ``whiten = false`` scales all
directions by one common factor instead of each to unit variance (the same features up to
per-unit scale for ReLU; it matters for tanh and for λ).

**Output layer.** Ridge regression of the one-hot targets on :math:`H_L`:
:math:`\min \tfrac1N\|H_LW + \mathbf 1b^\top - Y\|^2 + \lambda\|W\|^2` (``lam``, relative to
unit-variance features; the bias is not penalised), solved from float64 accumulated
:math:`H^\top H` and :math:`H^\top Y`, never an N×N matrix. The logits are the regression
outputs, so ``lorank eval`` reports the usual accuracy (the cross-entropy it reports is of
these least-squares scores, not of a trained softmax).

**Choices where the papers leave it open.** Truncation by width and a singular-value rule
rather than PIL's original N hidden units (which needs an N×N pseudoinverse); centring by the
bias (principal components rather than raw second moments); unit-variance scaling so that
tanh and GELU see inputs of order one; signed pairs; random fill for units beyond the rank.

The model is the configured lorank MLP (``nn.Linear`` layers, widths from ``model.hidden``),
so checkpoints, ``lorank eval`` and parameter counts work as for any other method. The whole
fit is logged as epoch 1 (``train.epochs`` and ``[optim]`` are ignored). Memory is
:math:`O(N \cdot \max_l m_l)` float32 for one layer's cached outputs plus :math:`O(m^2)`
float64 for the Gram matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lorank.core.convert import ConversionReport
from lorank.core.rank import RankRule, RankRuleField, energy
from lorank.errors import LorankError
from lorank.methods._ridge import Gram, principal_projection, ridge
from lorank.methods.base import Method, MethodConfig
from lorank.methods.registry import register

Batch = tuple[Tensor, Tensor]


class PILConfig(MethodConfig):
    """Pseudoinverse learning: closed-form hidden layers and a ridge output layer."""

    name: Literal["pil"] = "pil"
    lam: float = Field(
        1e-3, ge=0, description="ridge λ of the output layer, relative to unit-variance features"
    )
    rule: RankRuleField = Field(
        energy(0.2),
        description="singular-value rule truncating each hidden layer's pseudoinverse "
        "(then capped at the layer's width)",
    )
    whiten: bool = Field(
        True, description="scale each kept direction to unit variance (else one common scale)"
    )
    signed_pairs: bool = Field(
        True, description="each kept direction gives two units, +p and -p (width/2 directions)"
    )
    seed: int = Field(0, ge=0, description="seed of the random units beyond the kept rank")


def mlp_layers(model: nn.Module, method: str) -> tuple[list[nn.Linear], type[nn.Module]]:
    """The ``nn.Linear`` layers of a lorank MLP and its activation type, or a LorankError."""
    from lorank.models import MLP

    if not isinstance(model, MLP):
        raise LorankError(
            f"method {method!r} trains only the mlp model, not {type(model).__name__}; "
            "set model.name = 'mlp' or choose a gradient-based method"
        )
    modules = list(model.layers)
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    others = [m for m in modules if not isinstance(m, nn.Linear | nn.Dropout)]
    if len(linears) != len(others) + 1 or any(type(m) is not type(others[0]) for m in others[1:]):
        raise LorankError(
            f"method {method!r} needs a plain dense MLP (Linear/activation layers); "
            "this one was converted or changed, so build a fresh mlp"
        )
    act = type(others[0]) if others else nn.ReLU
    return linears, act


def as_features(batches: Sequence[Batch]) -> tuple[list[Tensor], list[Tensor]]:
    """Flattened float inputs and labels of every batch."""
    return [x.flatten(1).float() for x, _ in batches], [y for _, y in batches]


def one_hot(y: Tensor, num_classes: int) -> Tensor:
    return F.one_hot(y.long(), num_classes).to(torch.float64)


def gram_of(feats: Sequence[Tensor], labels: Sequence[Tensor] | None, num_classes: int) -> Gram:
    gram = Gram(feats[0].shape[1], num_classes if labels is not None else 0)
    for i, h in enumerate(feats):
        gram.update(h, one_hot(labels[i], num_classes) if labels is not None else None)
    return gram


@torch.no_grad()
def set_linear(layer: nn.Linear, w: Tensor, b: Tensor) -> None:
    """Copy a solve's ``(W, b)`` (in ``h @ W + b`` orientation) into an ``nn.Linear``."""
    layer.weight.copy_(w.T.to(layer.weight.dtype))
    layer.bias.copy_(b.to(layer.bias.dtype))


@torch.no_grad()
def apply(layer: nn.Linear, act: nn.Module | None, feats: Sequence[Tensor]) -> list[Tensor]:
    out = [layer(h) for h in feats]
    return [act(h) for h in out] if act is not None else out


@torch.no_grad()
def fit_hidden(
    layer: nn.Linear,
    act: nn.Module,
    feats: Sequence[Tensor],
    rule: RankRule,
    whiten: bool,
    generator: torch.Generator,
    signed_pairs: bool = False,
) -> tuple[list[Tensor], int]:
    """Fit one PIL hidden layer on ``feats``; returns its outputs and the kept rank."""
    gram = gram_of(feats, None, 0)
    w, b, k = principal_projection(
        gram,
        layer.out_features,
        rule,
        whiten=whiten,
        signed_pairs=signed_pairs,
        generator=generator,
    )
    set_linear(layer, w, b)
    return apply(layer, act, feats), k


@torch.no_grad()
def fit_output(
    layer: nn.Linear, feats: Sequence[Tensor], labels: Sequence[Tensor], lam: float
) -> None:
    w, b = ridge(gram_of(feats, labels, layer.out_features), lam)
    set_linear(layer, w, b)


@torch.no_grad()
def scores(logits: Sequence[Tensor], labels: Sequence[Tensor]) -> dict[str, float]:
    """Mean cross-entropy and accuracy of per-batch logits."""
    n = sum(len(y) for y in labels)
    loss = sum(
        float(F.cross_entropy(z, y, reduction="sum")) for z, y in zip(logits, labels, strict=True)
    )
    correct = sum(int((z.argmax(-1) == y).sum()) for z, y in zip(logits, labels, strict=True))
    return {"loss_task": loss / max(n, 1), "train_acc": correct / max(n, 1)}


@register
class PIL(Method):
    name = "pil"
    config_class = PILConfig
    config: PILConfig
    gradient_free = True

    def __init__(self, config: PILConfig) -> None:
        super().__init__(config)
        self.kept_ranks: list[int] = []

    def prepare(self, model: nn.Module) -> ConversionReport:
        mlp_layers(model, self.name)  # refuse anything but a dense MLP before any data pass
        return ConversionReport()

    @torch.no_grad()
    def fit(self, model: nn.Module, batches: Sequence[Batch]) -> dict[str, Any]:
        cfg = self.config
        linears, act_type = mlp_layers(model, self.name)
        act = act_type()
        model.eval()
        generator = torch.Generator().manual_seed(cfg.seed)
        feats, labels = as_features(batches)
        self.kept_ranks = []
        for layer in linears[:-1]:
            feats, k = fit_hidden(
                layer, act, feats, cfg.rule, cfg.whiten, generator, cfg.signed_pairs
            )
            self.kept_ranks.append(k)
        fit_output(linears[-1], feats, labels, cfg.lam)
        return scores(apply(linears[-1], None, feats), labels)

    def summary(self) -> dict[str, Any]:
        return {"pil_kept_ranks": self.kept_ranks}
