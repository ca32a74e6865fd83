r"""Calibration statistics and activation-aware truncated SVD.

**Why.** Plain truncated SVD keeps the directions of largest singular value of W, minimising
:math:`\|W - W_r\|_F`. What a compressed network needs is a small error on the inputs the
layer actually sees: for the calibration activations :math:`X \in \mathbb{R}^{N\times n}`
(one row per sample, token or conv patch),

.. math:: \min_{\operatorname{rank} W_r \le r} \|(W - W_r) X^\top\|_F^2
          = \min \operatorname{tr}\big((W - W_r)\, C\, (W - W_r)^\top\big),
          \qquad C = X^\top X / N .

**Closed form.** With a Cholesky factor :math:`C = L L^\top` (L lower triangular, invertible),
:math:`\operatorname{tr}(E C E^\top) = \|E L\|_F^2`. Substituting :math:`Z = W_r L` (rank is
unchanged by the invertible L), the problem becomes the Eckart–Young problem
:math:`\min \|W L - Z\|_F`, solved by the truncated SVD :math:`W L = P \Sigma Q^\top`,
:math:`Z = P_r \Sigma_r Q_r^\top`. Mapping back,

.. math:: W_r = P_r \Sigma_r Q_r^\top L^{-1} = P_r\, \operatorname{diag}(\Sigma_r)\, V_r^\top,
          \qquad V = L^{-\top} Q \ \ (\text{solve } L^\top V = Q),

and the error is :math:`\|(W - W_r) X^\top\|_F^2 / N = \sum_{i>r} \sigma_i(WL)^2`. So the
triple :math:`(P, \Sigma, L^{-\top}Q)` plays the role of ``(u, sigma, v)`` of a plain SVD
(``W = u diag(sigma) vᵀ`` holds exactly; only v is no longer orthonormal): every rank rule,
the loss-bounded search and the greedy allocation apply to the activation-weighted singular
values unchanged. With C = I it is exactly the plain SVD. L is never inverted explicitly:
V comes from one triangular solve.

**Damping.** C is singular when the calibration set has fewer rows than n or some inputs are
constant (e.g. dead ReLUs, padding). We factor :math:`C + \lambda I` with
:math:`\lambda = \text{damping}\cdot\operatorname{mean}(\operatorname{diag} C)` (default
damping 1e-4; multiplied by 10 until the Cholesky succeeds). The damping adds a small plain
Frobenius term :math:`\lambda\|W - W_r\|_F^2` to the objective, which also decides directions
the calibration data never excites.

**Collecting C.** :func:`collect_second_moments` registers forward pre-hooks on the target
layers, runs the calibration batches once (eval mode, no gradient) and accumulates
:math:`X^\top X` chunk by chunk: the product of at most ``chunk_rows`` rows in float32 (float64
inputs stay float64), the sum across chunks in float64, so memory is O(n² + chunk·n) whatever N
is. Layers fed the very same tensor in one forward (q, k and v after one LayerNorm) share one
product per batch. Each layer's adapter (:mod:`lorank.core.adapters`) says what its rows are:
a Linear (and Hugging Face ``Conv1D``)
sees the rows of its input flattened over every leading dimension (tokens count as rows);
a convolution sees its unfolded patches (``F.unfold`` orders them as C_in × kh × kw, the same
order as ``weight.flatten(1)``); an embedding sees one-hot rows.
The hooks are removed afterwards, even on error.

**Calibration files.** :func:`read_calibration_file` reads a ``calibration_file`` (the CLI's
``--calibration-file``):
a tensor of model inputs (``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=True)``,
``.safetensors``, ``.npy``; a mapping or pair holds them under ``inputs``/``input_ids``/``x``
or first), or any other file as UTF-8 text, which the caller encodes with the model's
vocabulary or tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorank.core.adapters import input_rows
from lorank.core.layers import LowRankLayer
from lorank.core.search import (
    LayerSpectrum,
    dense_weight_matrix,
    layer_spectra,
    savings_rank,
    thin_svd,
)
from lorank.errors import LorankError

__all__ = [
    "DEFAULT_DAMPING",
    "SecondMoment",
    "activation_layer_spectra",
    "activation_spectra",
    "activation_svd",
    "collect_second_moments",
    "damped_cholesky",
    "layer_input_rows",
    "read_calibration_file",
]

DEFAULT_DAMPING = 1e-4
TENSOR_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".safetensors", ".npy")
INPUT_KEYS: tuple[str, ...] = ("inputs", "input_ids", "x")


@dataclass
class SecondMoment:
    """The accumulated ``XᵀX`` (float64, n×n) of one layer's inputs over ``rows`` rows."""

    xtx: Tensor
    rows: int = 0

    @property
    def mean(self) -> Tensor:
        """C = XᵀX / N, the per-row second moment."""
        return self.xtx / max(self.rows, 1)

    def add(self, x: Tensor, chunk_rows: int = 4096) -> None:
        self.add_product(gram(x, chunk_rows, self.xtx.device), x.shape[0])

    def add_product(self, xtx: Tensor, rows: int) -> None:
        """Add a precomputed ``XᵀX`` of ``rows`` rows (shared by layers with the same input).

        A float32 product is widened element by element into the float64 sum (no float64
        copy of it is made: for a 2048-wide layer that copy cost as much as a third of the
        product itself)."""
        self.xtx += xtx
        self.rows += rows


def gram(x: Tensor, chunk_rows: int = 4096, device: Any = None) -> Tensor:
    """``XᵀX``: float32 products per chunk of rows (float64 inputs stay float64), summed in
    float64 across chunks. One chunk's product is returned as it is (float32 for float32
    rows), for :meth:`SecondMoment.add_product` to add into its float64 sum."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    device = device or x.device
    if x.shape[0] <= chunk_rows:
        chunk = x.detach().to(device, dtype)
        return chunk.T @ chunk
    out = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], chunk_rows):
        chunk = x[start : start + chunk_rows].detach().to(device, dtype)
        out += chunk.T @ chunk
    return out


def _geometry_key(module: nn.Module) -> Any:
    if hasattr(module, "kernel_size"):
        return tuple(
            str(getattr(module, a, None)) for a in ("kernel_size", "stride", "padding", "dilation")
        )
    return "rows"


def layer_input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows X (N×n) that ``module`` multiplies by its weight matrix (m×n) for input ``x``
    (the layer's adapter: :func:`lorank.core.adapters.input_rows`)."""
    return input_rows(module, x)


@torch.no_grad()
def collect_second_moments(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    chunk_rows: int = 4096,
) -> dict[str, SecondMoment]:
    """Run ``batches`` through ``model`` once and return ``{name: XᵀX}`` for ``layers``.

    ``forward(model, batch)`` runs one batch (default: ``model(batch[0])`` for an
    ``(inputs, targets)`` pair, else ``model(batch)``). The model is run in eval mode and left
    in the mode it had; every hook is removed before returning.
    """
    stats: dict[str, SecondMoment] = {}
    handles = []
    # Layers fed the very same tensor (q, k, v after one norm) share one XᵀX per batch.
    shared: dict[Any, tuple[Tensor, Tensor, int]] = {}

    def hook_for(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            key = (id(args[0]), _geometry_key(mod))
            hit = shared.get(key)
            if hit is None or hit[0] is not args[0]:
                rows = layer_input_rows(mod, args[0])
                hit = (args[0], gram(rows, chunk_rows), rows.shape[0])
                shared[key] = hit
            _, xtx, count = hit
            if name not in stats:
                stats[name] = SecondMoment(torch.zeros_like(xtx, dtype=torch.float64))
            stats[name].add_product(xtx, count)

        return hook

    run = forward or (lambda m, b: m(b[0]) if isinstance(b, tuple | list) else m(b))
    was_training = model.training
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(hook_for(name, module)))
        model.eval()
        for batch in batches:
            run(model, batch)
            shared.clear()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name in layers if name not in stats]
    if missing:
        raise LorankError(
            f"calibration never reached layer(s) {', '.join(missing[:3])}; are they used in "
            "the model's forward? (exclude them or check the calibration data)"
        )
    return stats


def damped_cholesky(c: Tensor, damping: float = DEFAULT_DAMPING) -> tuple[Tensor, float]:
    """Lower-triangular L with ``L Lᵀ = C + λI``; λ = damping·mean(diag C), ×10 until it works.

    Returns ``(L, λ)``. ``damping=0`` tries the undamped factor first.
    """
    c = c.double()
    n = c.shape[0]
    scale = float(c.diagonal().mean()) if n else 0.0
    scale = scale if scale > 0 else 1.0
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    lam = damping * scale
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(c + lam * eye)
        if int(info) == 0:
            return chol, lam
        lam = max(lam * 10, 1e-10 * scale)
    raise LorankError(
        "the calibration second moment is not positive definite even with damping; "
        "check the calibration data for NaN/inf"
    )


@torch.no_grad()
def activation_svd(
    weight_or_layer: Tensor | LowRankLayer,
    c: Tensor,
    damping: float = DEFAULT_DAMPING,
    svd_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, sigma, v)`` with ``W = u diag(sigma) vᵀ`` and sigma the singular values of W·L.

    Truncating to the first r columns gives the rank-r W_r minimising
    ``tr((W − W_r)(C + λI)(W − W_r)ᵀ)``. ``weight_or_layer`` is the m×n weight matrix, or a
    low-rank layer (its U S Vᵀ is never formed: the SVD is of the r×n matrix R S VᵀL, after
    a QR of U). Returned in the dtype of the weight.

    Precision: the Cholesky factor, the whitened matrix W·L and the triangular solve for V
    are float64 (they are where the conditioning of C matters); the SVD of W·L, the costly
    step, runs in ``svd_dtype`` (default: the weight's dtype). A float32 SVD of the whitened
    matrix is as accurate as the float32 factors it produces (relative error ~1e-6 of σ₁,
    checked against float64 in tests/test_calibration.py) at half the time.
    """
    chol, _ = damped_cholesky(c, damping)
    device = (
        weight_or_layer.U.device
        if isinstance(weight_or_layer, LowRankLayer)
        else weight_or_layer.device
    )
    chol = chol.to(device)
    if isinstance(weight_or_layer, LowRankLayer):
        layer = weight_or_layer
        dtype = layer.U.dtype
        q_u, r_u = torch.linalg.qr(layer.U.detach().double())
        left = r_u @ layer.core_matrix().detach().double()
        small = left @ (layer.V.detach().double().T @ chol)  # r×n
        p, sigma, q = thin_svd(small.to(svd_dtype or dtype))
        u = q_u @ p.double()
    else:
        weight = weight_or_layer.detach()
        dtype = weight.dtype
        u, sigma, q = thin_svd((weight.double() @ chol).to(svd_dtype or dtype))
    # V = L^{-T} Q: one triangular solve of Lᵀ V = Q, never an explicit inverse.
    v = torch.linalg.solve_triangular(chol.T, q.double(), upper=True)
    return u.to(dtype), sigma.to(dtype), v.to(dtype)


def _is_symmetric(module: nn.Module) -> bool:
    """A tied symmetric low-rank layer (V is U), whose factors cannot differ."""
    return isinstance(module, LowRankLayer) and module.V is module.U


@torch.no_grad()
def activation_spectra(
    spectra: Sequence[LayerSpectrum],
    moments: dict[str, SecondMoment],
    damping: float = DEFAULT_DAMPING,
) -> list[LayerSpectrum]:
    """The activation-weighted version of plain spectra (:func:`~lorank.core.search.layer_spectra`).

    A layer without calibration statistics, or a tied symmetric layer (V is U, whose factors
    cannot differ), keeps its plain SVD.
    """
    out = []
    for spec in spectra:
        module = spec.module
        if spec.name not in moments or _is_symmetric(module):
            out.append(spec)
            continue
        source = module if isinstance(module, LowRankLayer) else dense_weight_matrix(module)
        u, sigma, v = activation_svd(source, moments[spec.name].mean, damping)
        out.append(LayerSpectrum(spec.name, module, u, sigma, v, spec.max_rank))
    return out


@torch.no_grad()
def activation_layer_spectra(
    layers: dict[str, nn.Module],
    moments: dict[str, SecondMoment],
    damping: float = DEFAULT_DAMPING,
) -> list[LayerSpectrum]:
    """The activation-aware spectra of ``layers``, taken straight from the layers: a plain
    SVD is only computed for the layers :func:`activation_spectra` would keep plain (no
    statistics, tied symmetric). The same spectra as
    ``activation_spectra(layer_spectra(None, layers), moments)``, one SVD per layer fewer."""
    out = []
    for name, module in layers.items():
        if name not in moments or _is_symmetric(module):
            out.extend(layer_spectra(None, {name: module}))
            continue
        if isinstance(module, LowRankLayer):
            source: Tensor | LowRankLayer = module
            max_rank = module.rank
        else:
            source = dense_weight_matrix(module)
            max_rank = savings_rank(*source.shape)
        u, sigma, v = activation_svd(source, moments[name].mean, damping)
        out.append(LayerSpectrum(name, module, u, sigma, v, max_rank))
    return out


def read_calibration_file(path: str | Path) -> str | Tensor:
    """The inputs tensor (``.pt``/``.pth``/``.bin``/``.safetensors``/``.npy``) or the text
    (any other suffix, UTF-8) of a calibration file; a one-line error if it cannot be read."""
    path = Path(path)
    fix = "pass a UTF-8 text file or a .pt/.safetensors/.npy file holding an inputs tensor"
    if not path.is_file():
        raise LorankError(f"`calibration_file` {path} not found; {fix}")
    suffix = path.suffix.lower()
    if suffix not in TENSOR_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LorankError(
                f"`calibration_file` {path} is not readable UTF-8 text ({type(e).__name__}); {fix}"
            ) from None
        if not text:
            raise LorankError(f"`calibration_file` {path} is empty; {fix}")
        return text
    try:
        if suffix == ".npy":
            import numpy as np

            loaded: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(path)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LorankError(
            f"cannot read `calibration_file` {path} ({type(e).__name__}: {first[:200]}); {fix}"
        ) from None
    tensor = _inputs_of(loaded)
    if tensor is None:
        raise LorankError(
            f"`calibration_file` {path} holds no inputs tensor (a tensor, a pair whose first "
            f"item is one, or a mapping with a key {'/'.join(INPUT_KEYS)} or one tensor)"
        )
    if tensor.numel() == 0:
        raise LorankError(f"`calibration_file` {path} holds an empty tensor; {fix}")
    return tensor


def _inputs_of(loaded: Any) -> Tensor | None:
    if isinstance(loaded, Tensor):
        return loaded
    if isinstance(loaded, tuple | list) and loaded and isinstance(loaded[0], Tensor):
        return loaded[0]
    if isinstance(loaded, Mapping):
        for key in INPUT_KEYS:
            if isinstance(loaded.get(key), Tensor):
                return loaded[key]
        tensors = [v for v in loaded.values() if isinstance(v, Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    return None
