r"""``bipil``: bidirectional gradient-free learning (Bi-PIL; Wang, Liu, Liu, Shi, Guo, Li, Xu,
IEEE TNNLS 2025, doi 10.1109/TNNLS.2025.3564654), for the MLP model and Phil Kim's CNN.

Three stages, all closed-form (the solves of :mod:`lorank.methods._ridge`, float64 Gram
matrices accumulated over batches, never an N×N matrix):

1. **Forward training, greedy depth.** A held-out ``holdout`` fraction of the training set
   (its last samples) is set aside. Forward layers are added one at a time, each a PIL hidden
   layer (:mod:`lorank.methods.pil`: truncated pseudoinverse of the previous layer's output,
   signed pairs, random fill, the model's activation) of the next width in ``model.hidden``;
   after each addition a ridge output layer is fitted on the new features and scored on the
   held-out samples. The depth is the last layer count whose addition raised held-out accuracy
   by more than ``min_gain`` (at least one layer, at most ``len(model.hidden)``). The forward
   twin is then refitted at that depth on the whole training set.
2. **Backward training.** The backward twin shares the forward twin's architecture and is
   trained from the labels down: the one-hot targets of the C classes are pulled back through
   the forward output layer and then through each forward layer by pseudoinverses,
   :math:`h^*_{l} = (\sigma^{-1}(h^*_{l+1}) - b_{l+1})W_{l+1}^+` with
   :math:`h^*_{L+1} = I_C` (:math:`\sigma^{-1}` is the identity for ReLU/GELU and
   :math:`\operatorname{artanh}` of the clipped target for tanh), giving one target prototype
   per class and layer. Each backward layer :math:`l`, bottom-up, is then the ridge regression
   (``backward_lam``) of its class's prototype :math:`\sigma^{-1}(h^*_l)` on the backward twin's
   own previous output. Because the targets are one prototype per class, every backward layer
   has rank at most C: the backward twin is a stack of supervised, label-shaped layers next to
   the forward twin's unsupervised, data-shaped ones.
3. **Fusion.** The classifier is a ridge regression (``lam``) of the one-hot targets on the
   concatenated last-layer features of the two twins.

**As a lorank MLP.** The twins run side by side in one MLP: layer 1 stacks both twins' first
layers (both read the input), deeper layers are block-diagonal, the output layer reads the
concatenation, so the result is exactly the twin network and is a plain MLP of ``nn.Linear``
layers (checkpoints, ``lorank eval`` and parameter counts work). With ``twin_width = "half"``
(default) each twin layer has half the configured width, so at full depth the MLP has exactly
the configured architecture ``model.hidden``; ``"full"`` gives each twin the configured width
(an MLP twice as wide). The greedy depth may be smaller than ``len(model.hidden)``: the saved
checkpoint's model config then lists the built widths (``summary.json``:
``bipil_hidden``), while ``config.json`` keeps the requested ones. The block-diagonal zeros
are stored, so the dense parameter count includes them (``bipil_nonzero_params`` counts the
others). ``backward = false`` gives greedy forward-only PIL with full-width layers.

**Phil Kim's CNN** (``phil_kim_cnn``). The paper's twins are fully connected. Here the
convolution is fitted first, once, as in :mod:`lorank.methods.pil` (filters from the
principal components of image patches, unsupervised, on the whole training set including
the held-out part, which it never sees the labels of), and the twins are the fully connected
part on the pooled feature maps: both twins read the same 2000 pooled features, the greedy
depth is chosen over ``model.hidden`` (the book's single 100-unit layer: 50 + 50 with
``twin_width = "half"``), and the fused classifier replaces the output layer. The saved CNN
keeps the convolution and has ``hidden`` set to the built widths.

**Choices where the paper's description leaves it open** (each an option): the held-out split
and stopping rule (first non-improving layer), twin widths, pulling the targets back through
the forward weights and fitting the backward layers bottom-up on their own inputs, fusion
by concatenation, and, for the CNN, the shared patch-PCA convolution.
``variant = "original"`` is for ``pil`` only (Bi-PIL's twins are built from the whitened
layers) and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from lorank.core.convert import ConversionReport
from lorank.errors import LorankError
from lorank.methods._ridge import ridge
from lorank.methods.pil import (
    PIL,
    Batch,
    PILConfig,
    apply,
    as_features,
    closed_form_parts,
    fit_hidden,
    fit_inputs,
    fit_output,
    gram_of,
    head_like,
    scores,
    set_linear,
)
from lorank.methods.registry import register


class BiPILConfig(PILConfig):
    """Bi-PIL: greedy forward PIL twin, label-driven backward twin, fused classifier."""

    name: Literal["bipil"] = "bipil"  # type: ignore[assignment]
    backward: bool = Field(True, description="train the backward twin and fuse (else forward)")
    backward_lam: float = Field(
        1e-3, ge=0, description="ridge λ of the backward twin's layer regressions"
    )
    holdout: float = Field(
        0.1, gt=0, lt=1, description="fraction of training samples held out to choose the depth"
    )
    min_gain: float = Field(
        0.0, ge=0, description="add a layer only if held-out accuracy rises by more than this"
    )
    twin_width: Literal["half", "full"] = Field(
        "half", description="each twin layer gets half the configured width, or all of it"
    )


def _split(batches: Sequence[Batch], n_fit: int) -> tuple[list[Batch], list[Batch]]:
    """The first ``n_fit`` samples and the rest, cutting the batch that straddles them."""
    head: list[Batch] = []
    tail: list[Batch] = []
    seen = 0
    for x, y in batches:
        cut = min(max(n_fit - seen, 0), len(y))
        if cut:
            head.append((x[:cut], y[:cut]))
        if cut < len(y):
            tail.append((x[cut:], y[cut:]))
        seen += len(y)
    return head, tail


def _inverse_activation(act: type[nn.Module], h: Tensor) -> Tensor:
    if act is nn.Tanh:
        return torch.atanh(h.clamp(-0.95, 0.95))
    return h  # ReLU/GELU: the target itself (a negative target means "off")


def _accuracy(logits: Sequence[Tensor], labels: Sequence[Tensor]) -> float:
    return scores(logits, labels)["train_acc"]


@register
class BiPIL(PIL):
    name = "bipil"
    config_class = BiPILConfig
    config: BiPILConfig

    def __init__(self, config: BiPILConfig) -> None:
        super().__init__(config)
        self.holdout_acc: list[float] = []
        self.hidden: list[int] = []
        self.nonzero = 0

    def _check_variant(self) -> None:
        if self.config.variant != "whitened":
            raise LorankError(
                "bipil builds its twins from the whitened PIL layers; variant 'original' is "
                "for method 'pil' only"
            )

    def prepare(self, model: nn.Module) -> ConversionReport:
        self._check_variant()
        return super().prepare(model)

    @torch.no_grad()
    def fit(self, model: nn.Module, batches: Sequence[Batch]) -> dict[str, Any]:
        cfg = self.config
        self._check_variant()
        parts = closed_form_parts(model, self.name)
        linears, act_type = parts.linears, parts.act
        if len(linears) < 2:
            raise LorankError("bipil needs at least one hidden layer; set model.hidden")
        act = act_type()
        twins = cfg.backward
        widths = [
            lin.out_features // 2 if twins and cfg.twin_width == "half" else lin.out_features
            for lin in linears[:-1]
        ]
        if min(widths) < 2:
            raise LorankError(
                f"bipil twin layers would be narrower than 2 units (model.hidden "
                f"{[lin.out_features for lin in linears[:-1]]}); use wider layers"
            )
        n_classes = linears[-1].out_features
        dev = batches[0][0].device
        n = sum(len(y) for _, y in batches)
        n_fit = n - max(1, round(cfg.holdout * n))
        if n_fit < 2:
            raise LorankError(f"bipil holdout={cfg.holdout} leaves no training samples")

        # The convolution (if any) first: unsupervised, so fitted once on every image.
        model.eval()
        inputs, self.conv_rank = fit_inputs(
            parts, batches, cfg, torch.Generator().manual_seed(cfg.seed)
        )
        batches = [(f, y) for f, (_, y) in zip(inputs, batches, strict=True)]

        # 1. Forward twin, greedy depth on the held-out split.
        fit_part, held_part = _split(batches, n_fit)
        feats, labels = as_features(fit_part)
        held, held_labels = as_features(held_part)
        depth, best = 0, -1.0
        self.holdout_acc = []
        generator = torch.Generator().manual_seed(cfg.seed)
        for width in widths:
            layer = nn.Linear(feats[0].shape[1], width, device=dev)
            feats, _ = fit_hidden(
                layer, act, feats, cfg.rule, cfg.whiten, generator, cfg.signed_pairs
            )
            held = apply(layer, act, held)
            out = nn.Linear(width, n_classes, device=dev)
            fit_output(out, feats, labels, cfg.lam)
            acc = _accuracy(apply(out, None, held), held_labels)
            self.holdout_acc.append(acc)
            if depth and acc <= best + cfg.min_gain:
                break
            depth, best = depth + 1, acc
        widths = widths[:depth]

        # Refit the forward twin at that depth on the whole training set.
        x, labels = as_features(batches)
        generator = torch.Generator().manual_seed(cfg.seed)
        forward: list[nn.Linear] = []
        feats = x
        self.kept_ranks = []
        for width in widths:
            layer = nn.Linear(feats[0].shape[1], width, device=dev)
            feats, k = fit_hidden(
                layer, act, feats, cfg.rule, cfg.whiten, generator, cfg.signed_pairs
            )
            forward.append(layer)
            self.kept_ranks.append(k)
        forward_out = nn.Linear(widths[-1], n_classes, device=dev)
        fit_output(forward_out, feats, labels, cfg.lam)

        backward: list[nn.Linear] = []
        if twins:
            backward = self._backward_twin(x, labels, forward, forward_out, act_type)
            feats = [
                torch.cat([f, b], 1)
                for f, b in zip(feats, self._run(backward, act, x), strict=True)
            ]
        classifier = nn.Linear(feats[0].shape[1], n_classes, device=dev)
        fit_output(classifier, feats, labels, cfg.lam)
        stats = scores(apply(classifier, None, feats), labels)

        self._install(model, forward, backward, classifier)
        self.hidden = [2 * w if twins else w for w in widths]
        return stats | {"model": {"hidden": self.hidden}}

    @staticmethod
    def _run(layers: Sequence[nn.Linear], act: nn.Module, x: list[Tensor]) -> list[Tensor]:
        feats = x
        for layer in layers:
            feats = apply(layer, act, feats)
        return feats

    def _backward_twin(
        self,
        x: list[Tensor],
        labels: list[Tensor],
        forward: list[nn.Linear],
        forward_out: nn.Linear,
        act_type: type[nn.Module],
    ) -> list[nn.Linear]:
        """Pull the class targets back through the forward twin, then fit bottom-up."""
        n_classes = forward_out.out_features
        # Per-class targets (C × width) for each layer's output, from the top down.
        target = torch.eye(n_classes, dtype=torch.float64)
        layers = [*forward, forward_out]
        pre_targets: list[Tensor] = []
        for upper in reversed(layers[1:]):
            w = upper.weight.to("cpu", torch.float64)  # out × in, so h @ w.T + b
            h = (target - upper.bias.to("cpu", torch.float64)) @ torch.linalg.pinv(w.T)
            target = _inverse_activation(act_type, h)
            pre_targets.append(target)
        pre_targets.reverse()

        act = act_type()
        backward: list[nn.Linear] = []
        feats = x
        for layer_targets in pre_targets:
            gram = gram_of(feats, labels, n_classes)
            a, a0 = ridge(gram, self.config.backward_lam)
            layer = nn.Linear(feats[0].shape[1], layer_targets.shape[1], device=x[0].device)
            set_linear(layer, a @ layer_targets, a0 @ layer_targets)
            feats = apply(layer, act, feats)
            backward.append(layer)
        return backward

    def _install(
        self,
        model: nn.Module,
        forward: list[nn.Linear],
        backward: list[nn.Linear],
        classifier: nn.Linear,
    ) -> None:
        """Replace the model's fully connected layers by the twin network as one
        (block-diagonal) MLP."""
        hidden = [
            f.out_features + (b.out_features if backward else 0)
            for f, b in _pairs(forward, backward)
        ]
        built = head_like(model, hidden, forward[0].in_features)
        linears = [m for m in built if isinstance(m, nn.Linear)]
        for i, (target, (f, b)) in enumerate(
            zip(linears[:-1], _pairs(forward, backward), strict=True)
        ):
            target.weight.zero_()
            fo = f.out_features
            if i == 0:
                target.weight[:fo] = f.weight
                if b is not None:
                    target.weight[fo:] = b.weight
            else:
                fi = f.in_features
                target.weight[:fo, :fi] = f.weight
                if b is not None:
                    target.weight[fo:, fi:] = b.weight
            target.bias.copy_(torch.cat([f.bias, b.bias]) if b is not None else f.bias)
        linears[-1].weight.copy_(classifier.weight)
        linears[-1].bias.copy_(classifier.bias)
        model.layers = built.to(next(model.parameters()).device)
        self.nonzero = sum(int((p != 0).sum()) for p in model.parameters())

    def summary(self) -> dict[str, Any]:
        conv = {} if self.conv_rank is None else {"bipil_conv_rank": self.conv_rank}
        return conv | {
            "bipil_depth": len(self.hidden),
            "bipil_hidden": self.hidden,
            "bipil_holdout_acc": self.holdout_acc,
            "bipil_kept_ranks": self.kept_ranks,
            "bipil_nonzero_params": self.nonzero,
        }


def _pairs(
    forward: list[nn.Linear], backward: list[nn.Linear]
) -> list[tuple[nn.Linear, nn.Linear | None]]:
    return [(f, backward[i] if backward else None) for i, f in enumerate(forward)]
