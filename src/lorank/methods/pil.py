r"""``pil``: pseudoinverse learning (Guo & Lyu, 1995 onwards), gradient-free training of an MLP
or of Phil Kim's CNN, in two variants: lorank's truncated, whitened PIL (the default, below)
and the original algorithm (``variant = "original"``, further down).

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

All of the above is ``variant = "whitened"``, the default: lorank's own design in the spirit
of PIL, not the published algorithm.

**``variant = "original"``: Guo & Lyu's PIL** (P. Guo, M. R. Lyu, "A pseudoinverse learning
algorithm for feedforward neural networks with stacked generalization applications to
software reliability growth data", Neurocomputing 56, 2004). On the first ``samples``
training samples, :math:`H_0` (N×d) the inputs and :math:`T` (N×C) the one-hot targets:
while :math:`E_l = \|H_lH_l^+ - I_N\|_F >` ``tolerance`` and fewer than ``max_depth`` layers
exist, add a hidden layer with weights :math:`W_{l+1} = H_l^+` (d_l×N, so **N hidden units**)
and outputs :math:`H_{l+1} = \sigma(H_lW_{l+1})`; then the output weights are
:math:`W_o = H_L^+T`. :math:`H_lH_l^+` is the orthogonal projector onto the column space of
:math:`H_l`, so :math:`E_l^2 = N - \operatorname{rank}H_l`: the stop test asks for full row
rank, where :math:`H_LW_o = T` fits every training sample exactly. :math:`H^+` comes from an
SVD with singular values below ``pinv_rtol``·σ_max treated as zero (that cut defines the
numerical rank). Its default, 1e-6, is about where float32 (the model's precision, ε ≈ 1.2e-7)
stops resolving a direction; the result is sensitive to it (Phil Kim's CNN, 2000 fitted
MNIST samples, test accuracy: 14% at 1e-10, where the tiny singular values of the pooled
features blow the weights up, 83% at 1e-7, 85% at 1e-6, 40% at 1e-3). No biases (all
zero), no centring, no ridge term, the model's activation (the paper used a sigmoid;
``activation = "tanh"`` is the closest choice on the mlp).
Deviations forced by scale: PIL needs an N×N matrix, so it fits only the first ``samples``
training samples (default 2000) rather than the whole set, and the saved model has N-wide
hidden layers (``summary.json``: ``pil_hidden``; the checkpoint's model config takes them).

**Phil Kim's CNN** (``model.name = "phil_kim_cnn"``: conv, ReLU, 2×2 mean pooling, then an
MLP-shaped fully connected part). Its convolution is fitted first, as a PIL hidden layer over
image patches with shared weights: every k×k patch of the first ``patch_images`` training
images (k the filter size, 400 patches per 28×28 image) is a row of :math:`H_0`, and the
filters and biases are :func:`~lorank.methods._ridge.principal_projection` of those patches
(``rule``, ``whiten``, ``signed_pairs`` and ``seed`` as for the hidden layers: with the
defaults, the ± top principal components of the patches, each scaled to unit variance and
centred, and random combinations of them for any filters left over). This is unsupervised
and is the same for both variants. The pooled feature maps of all training images are then
the input :math:`H_0` of the fully connected part, fitted as for the MLP. Choices here that
no paper fixes: patch PCA rather than a pseudoinverse fit of patch targets (a filter's
receptive field does not see the label), the patch subsample, and one rule for the
convolution and the hidden layers. Models other than the mlp and phil_kim_cnn, and
phil_kim_cnn with ``bias = false`` or converted layers, are refused with a LorankError.

The model is the configured lorank MLP or CNN (``nn.Linear``/``nn.Conv2d`` layers, widths from
``model.hidden``), so checkpoints, ``lorank eval`` and parameter counts work as for any other
method. The whole fit is logged as epoch 1 (``train.epochs`` and ``[optim]`` are ignored).
Memory is :math:`O(N \cdot \max_l m_l)` float32 for one layer's cached outputs plus
:math:`O(m^2)` float64 for the Gram matrices (``original``: :math:`O(N^2)` float64).

One method, one file: both PIL variants and the convolution front end share the closed-form
layer fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    variant: Literal["whitened", "original"] = Field(
        "whitened",
        description="whitened: lorank's truncated PCA-whitened layers and ridge output; "
        "original: Guo & Lyu's H⁺ layers (N units) until ‖HH⁺ − I‖ ≤ tolerance",
    )
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
    patch_images: int = Field(
        5000, ge=1, description="phil_kim_cnn: images whose patches give the conv filters"
    )
    samples: int = Field(
        2000, ge=1, description="original: training samples fitted (= hidden units per layer)"
    )
    tolerance: float = Field(
        1e-3, ge=0, description="original: stop adding layers once ‖HH⁺ − I‖_F ≤ tolerance"
    )
    max_depth: int = Field(4, ge=0, description="original: at most this many hidden layers")
    pinv_rtol: float = Field(
        1e-6, gt=0, lt=1, description="original: singular values below rtol·σ_max are zero in H⁺"
    )


@dataclass
class Parts:
    """What a closed-form method fits: an optional convolution front end (``phil_kim_cnn``'s
    ``features``), the fully connected ``layers`` and their activation type."""

    features: nn.Sequential | None
    linears: list[nn.Linear]
    act: type[nn.Module]


def closed_form_parts(model: nn.Module, method: str) -> Parts:
    """The layers a gradient-free method fits, or a one-line LorankError for other models."""
    from lorank.models import MLP, PhilKimCNN

    if not isinstance(model, MLP | PhilKimCNN):
        raise LorankError(
            f"method {method!r} fits only the mlp and phil_kim_cnn models, not "
            f"{type(model).__name__}; set model.name = 'mlp' or 'phil_kim_cnn', or choose a "
            "gradient-based method"
        )
    modules = list(model.layers)
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    others = [m for m in modules if not isinstance(m, nn.Linear | nn.Dropout)]
    features = None
    if isinstance(model, PhilKimCNN):
        features = model.features
        conv = features[0]
        plain = [type(m) for m in features] == [nn.Conv2d, nn.ReLU, nn.AvgPool2d]
        if not plain or conv.bias is None or any(lin.bias is None for lin in linears):
            raise LorankError(
                f"method {method!r} needs a fresh phil_kim_cnn with biases (conv, ReLU, mean "
                "pool; Linear layers); set model.bias = true and do not convert it"
            )
    if len(linears) != len(others) + 1 or any(type(m) is not type(others[0]) for m in others[1:]):
        raise LorankError(
            f"method {method!r} needs a plain dense MLP (Linear/activation layers); "
            "this one was converted or changed, so build a fresh mlp"
        )
    act = type(others[0]) if others else nn.ReLU
    return Parts(features, linears, act)


def mlp_layers(model: nn.Module, method: str) -> tuple[list[nn.Linear], type[nn.Module]]:
    """The ``nn.Linear`` layers of the fully connected part and their activation type."""
    parts = closed_form_parts(model, method)
    return parts.linears, parts.act


@torch.no_grad()
def fit_conv(
    conv: nn.Conv2d, batches: Sequence[Batch], cfg: PILConfig, generator: torch.Generator
) -> int:
    """Fit ``conv`` as a PIL hidden layer over the image patches; returns the kept rank.

    The patches of the first ``cfg.patch_images`` images are the rows of the layer's input
    (F.unfold orders a patch's values as C, kh, kw, the layout of ``conv.weight``)."""
    d = conv.weight[0].numel()
    gram = Gram(d)
    seen = 0
    for x, _ in batches:
        x = x[: cfg.patch_images - seen].float()
        # Chunks of 250 images keep the float64 patch matrix near 100k × d (~65 MB at d=81).
        for chunk in x.split(250):
            patches = F.unfold(chunk, conv.kernel_size, padding=conv.padding, stride=conv.stride)
            gram.update(patches.transpose(1, 2).reshape(-1, d))
        seen += len(x)
        if seen >= cfg.patch_images:
            break
    w, b, k = principal_projection(
        gram,
        conv.out_channels,
        cfg.rule,
        whiten=cfg.whiten,
        signed_pairs=cfg.signed_pairs,
        generator=generator,
    )
    conv.weight.copy_(w.T.reshape(conv.weight.shape).to(conv.weight.dtype))
    conv.bias.copy_(b.to(conv.bias.dtype))
    return k


@torch.no_grad()
def fit_inputs(
    parts: Parts, batches: Sequence[Batch], cfg: PILConfig, generator: torch.Generator
) -> tuple[list[Tensor], int | None]:
    """The inputs of the fully connected part for every batch, fitting the convolution first
    when there is one; also returns the convolution's kept rank (None without one)."""
    if parts.features is None:
        return [x.flatten(1).float() for x, _ in batches], None
    k = fit_conv(parts.features[0], batches, cfg, generator)
    parts.features.eval()
    return [parts.features(x.float()).flatten(1) for x, _ in batches], k


def head_like(model: nn.Module, widths: Sequence[int], in_features: int) -> nn.Sequential:
    """A fresh fully connected part for ``model`` with hidden ``widths``, laid out as the
    model class builds it (so the saved checkpoint, with ``hidden = widths``, reloads)."""
    from lorank.models import MLP, MLPConfig, PhilKimCNN

    linears, act = mlp_layers(model, "pil")
    n_classes = linears[-1].out_features
    if isinstance(model, PhilKimCNN):
        modules: list[nn.Module] = []
        width = in_features
        for w in widths:
            modules += [nn.Linear(width, w), nn.ReLU()]
            width = w
        return nn.Sequential(*modules, nn.Linear(width, n_classes))
    assert isinstance(model, MLP)
    dropout = next((m.p for m in model.layers if isinstance(m, nn.Dropout)), 0.0)
    names = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.GELU: "gelu"}
    cfg = MLPConfig(hidden=list(widths), activation=names[act], dropout=dropout)
    return MLP(cfg, in_features, n_classes).layers


def pinv_and_error(h: Tensor, rtol: float) -> tuple[Tensor, float]:
    """``H⁺`` (d×N, float64) and ``‖H H⁺ − I‖_F``, singular values below rtol·σ_max cut."""
    u, sv, vh = torch.linalg.svd(h.double(), full_matrices=False)
    keep = sv > rtol * sv[0] if sv.numel() and sv[0] > 0 else torch.zeros_like(sv, dtype=bool)
    u, sv, vh = u[:, keep], sv[keep], vh[keep]
    pinv = vh.T @ (u / sv).T
    # H H⁺ = U_k U_kᵀ; computed as such (not as sqrt(N − k)) so the test is the paper's.
    err = torch.linalg.matrix_norm(u @ u.T - torch.eye(len(h), dtype=u.dtype))
    return pinv, float(err)


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
        self.conv_rank: int | None = None
        self.errors: list[float] = []
        self.hidden: list[int] = []

    def prepare(self, model: nn.Module) -> ConversionReport:
        closed_form_parts(model, self.name)  # refuse other models before any data pass
        return ConversionReport()

    @torch.no_grad()
    def fit(self, model: nn.Module, batches: Sequence[Batch]) -> dict[str, Any]:
        cfg = self.config
        parts = closed_form_parts(model, self.name)
        act = parts.act()
        model.eval()
        generator = torch.Generator().manual_seed(cfg.seed)
        feats, self.conv_rank = fit_inputs(parts, batches, cfg, generator)
        labels = [y for _, y in batches]
        if cfg.variant == "original":
            return self._fit_original(model, parts, feats, labels)
        self.kept_ranks = []
        for layer in parts.linears[:-1]:
            feats, k = fit_hidden(
                layer, act, feats, cfg.rule, cfg.whiten, generator, cfg.signed_pairs
            )
            self.kept_ranks.append(k)
        fit_output(parts.linears[-1], feats, labels, cfg.lam)
        return scores(apply(parts.linears[-1], None, feats), labels)

    def _fit_original(
        self, model: nn.Module, parts: Parts, feats: list[Tensor], labels: list[Tensor]
    ) -> dict[str, Any]:
        """Guo & Lyu: W_{l+1} = H_l⁺ until ‖H_l H_l⁺ − I‖ ≤ tolerance, then W_o = H_L⁺ T."""
        cfg = self.config
        act = parts.act()
        n_classes = parts.linears[-1].out_features
        h = torch.cat(feats)[: cfg.samples].to("cpu", torch.float64)
        t = one_hot(torch.cat(labels)[: cfg.samples].cpu(), n_classes)
        weights: list[Tensor] = []
        self.errors = []
        while True:
            pinv, err = pinv_and_error(h, cfg.pinv_rtol)
            self.errors.append(err)
            if err <= cfg.tolerance or len(weights) == cfg.max_depth:
                break
            weights.append(pinv)  # d_l × N: one hidden unit per fitted sample
            h = act(h @ pinv)
        weights.append(pinv @ t)
        self.hidden = [len(h)] * (len(weights) - 1)
        head = head_like(model, self.hidden, feats[0].shape[1])
        dev = parts.linears[0].weight.device
        for layer, w in zip((m for m in head if isinstance(m, nn.Linear)), weights, strict=True):
            set_linear(layer, w, torch.zeros(w.shape[1], dtype=w.dtype))
        model.layers = head.to(dev).eval()
        # Scored by the installed float32 layers on the whole training set, not only the
        # `samples` it interpolates.
        out = [model.layers(f) for f in feats]
        return scores(out, labels) | {"model": {"hidden": self.hidden}}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pil_variant": self.config.variant}
        if self.conv_rank is not None:
            out["pil_conv_rank"] = self.conv_rank
        if self.config.variant == "original":
            return out | {"pil_hidden": self.hidden, "pil_errors": self.errors}
        return out | {"pil_kept_ranks": self.kept_ranks}
