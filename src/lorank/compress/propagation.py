r"""Error-propagation-aware truncation and the closed-form refit, layer by layer in forward order.

**The objective.** Let a layer compute :math:`y = W x + b` on the inputs x it sees in the
original model, and let :math:`\tilde x` be what it sees once every layer before it has been
compressed (same calibration sample, same position). The compressed layer
:math:`\hat y = W_r \tilde x + \hat b` should reproduce the *original* output from the
*perturbed* input:

.. math:: J(W_r, \hat b) = \mathbb{E}\,\|W x + b - W_r \tilde x - \hat b\|^2
          + \lambda \|W - W_r\|_F^2 ,

the expectation over calibration rows, λ the damping of :mod:`lorank.compress.calibration`
(λ = damping·mean diag C̃). Everything needed is in the paired second moments
:math:`C = \mathbb{E}[x x^\top]`, :math:`\tilde C = \mathbb{E}[\tilde x \tilde x^\top]`,
:math:`M = \mathbb{E}[x \tilde x^\top]` and the means :math:`\bar x, \bar{\tilde x}`.

**Truncation with error propagation** (``error_propagation``, bias kept: :math:`\hat b = b`).
With :math:`\tilde C_\lambda = \tilde C + \lambda I = \tilde L \tilde L^\top` and
:math:`M_\lambda = M + \lambda I`,
:math:`J = \operatorname{tr}(W_r \tilde C_\lambda W_r^\top)
- 2\operatorname{tr}(W M_\lambda W_r^\top) + \text{const}
= \|W_r \tilde L - W M_\lambda \tilde L^{-\top}\|_F^2 + \text{const}`, so by
Eckart–Young the best rank-r :math:`W_r` comes from the SVD
:math:`A = W M_\lambda \tilde L^{-\top} = P \Sigma Q^\top`:
:math:`W_r = P_r \Sigma_r (\tilde L^{-\top} Q_r)^\top` (one triangular solve each way). When
:math:`\tilde x = x` (nothing upstream compressed), :math:`A = W L`: exactly the independent
activation-aware SVD. This is the global minimum of J over rank-r matrices, so it is never
above J of the independent factors (or of any other rank-r choice).

**Refit** (``refit``, SVD-LLM's closed-form update, here with the bias). Keep the input factor
:math:`V` (n×r) of whatever truncation was made and re-solve the output factor and the bias by
least squares on the calibration rows: with :math:`z = [V^\top \tilde x;\ 1]`,
:math:`[U\ \hat b] = R G^{-1}`,
:math:`G = \begin{pmatrix} V^\top \tilde C V + \lambda V^\top V & V^\top \bar{\tilde x} \\
\bar{\tilde x}^\top V & 1 \end{pmatrix}`,
:math:`R = [\,W M V + b\,\bar{\tilde x}^\top V + \lambda W V,\ \ W \bar x + b\,]` (without a
bias, the last row and column are dropped). The previous (U, b) is one candidate of this
least-squares problem, so the refit never increases J. After an error-propagation truncation
the U part is already optimal; what the refit adds there is the bias, which absorbs the mean
shift of :math:`\tilde x - x`. After a plain or independent truncation it also re-fits U to
the inputs the layer really sees.

**Order.** Layers are visited in the order the forward pass first calls them. Consecutive
layers that receive the very same input tensor (q, k and v after one LayerNorm) cannot affect
each other's inputs, so they are one group: one pass of the calibration data (original and
compressed model side by side, stopped by an exception as soon as the group has its inputs)
collects the statistics for the whole group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorank.compress.calibration import damped_cholesky, layer_input_rows
from lorank.compress.surgery import install_factors
from lorank.core.layers import LowRankLayer
from lorank.core.search import LayerSpectrum, dense_weight_matrix
from lorank.errors import LorankError

__all__ = [
    "PairedMoments",
    "objective",
    "propagate",
    "propagated_svd",
    "refit",
]

Forward = Callable[[nn.Module, Any], Any]


@dataclass
class PairedMoments:
    """Sums over paired rows of a layer's original inputs X and perturbed inputs X̃ (float64)."""

    xx: Tensor  # Σ x xᵀ
    tt: Tensor  # Σ x̃ x̃ᵀ
    xt: Tensor  # Σ x x̃ᵀ
    x_sum: Tensor
    t_sum: Tensor
    rows: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device | None = None) -> PairedMoments:
        z = torch.zeros(n, n, dtype=torch.float64, device=device)
        v = torch.zeros(n, dtype=torch.float64, device=device)
        return cls(z, z.clone(), z.clone(), v, v.clone())

    @classmethod
    def of(cls, x: Tensor, xt: Tensor) -> PairedMoments:
        pm = cls.zeros(x.shape[1], x.device)
        pm.add(x, xt)
        return pm

    def add(self, x: Tensor, xt: Tensor, chunk_rows: int = 8192) -> None:
        if x.shape != xt.shape:
            raise LorankError(
                f"paired calibration rows differ in shape ({tuple(x.shape)} vs "
                f"{tuple(xt.shape)}); does the model's forward depend on its weights' layout?"
            )
        # products per chunk in float32 (float64 inputs stay float64), sums in float64
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        for s in range(0, x.shape[0], chunk_rows):
            a = x[s : s + chunk_rows].detach().to(dtype)
            t = xt[s : s + chunk_rows].detach().to(dtype)
            self.xx += (a.T @ a).double()
            self.tt += (t.T @ t).double()
            self.xt += (a.T @ t).double()
            self.x_sum += a.sum(0).double()
            self.t_sum += t.sum(0).double()
        self.rows += x.shape[0]

    def means(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(C, C̃, M, x̄, x̃̄)``, each divided by the row count."""
        n = max(self.rows, 1)
        return self.xx / n, self.tt / n, self.xt / n, self.x_sum / n, self.t_sum / n


def _lam(pm: PairedMoments, damping: float) -> tuple[Tensor, float]:
    _, c_t, _, _, _ = pm.means()
    return damped_cholesky(c_t, damping)


@torch.no_grad()
def propagated_svd(
    weight: Tensor, pm: PairedMoments, damping: float
) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(u, sigma, v, λ)``: truncating to the first r columns minimises J over rank-r W_r."""
    chol, lam = _lam(pm, damping)
    _, _, m, _, _ = pm.means()
    w = weight.double().to(chol.device)
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    b = w @ (m + lam * eye)  # W M_λ
    a = torch.linalg.solve_triangular(chol, b.T, upper=False).T  # W M_λ L̃^{-T}
    p, sigma, qh = torch.linalg.svd(a, full_matrices=False)
    v = torch.linalg.solve_triangular(chol.T, qh.T, upper=True)  # L̃^{-T} Q
    return p, sigma, v, lam


@torch.no_grad()
def refit(
    weight: Tensor,
    bias: Tensor | None,
    v: Tensor,
    pm: PairedMoments,
    lam: float,
) -> tuple[Tensor, Tensor | None]:
    """The least-squares ``(U, b̂)`` for a fixed input factor ``v`` (see the module doc)."""
    c, c_t, m, x_bar, t_bar = pm.means()
    w, v = weight.double().to(c.device), v.double().to(c.device)
    g = v.T @ c_t @ v + lam * (v.T @ v)
    r = w @ m @ v + lam * (w @ v)
    if bias is not None:
        b = bias.double().to(c.device)
        tv = v.T @ t_bar
        g = torch.cat([torch.cat([g, tv[:, None]], 1), torch.cat([tv, tv.new_ones(1)])[None]], 0)
        r = torch.cat([r + b[:, None] * tv[None], (w @ x_bar + b)[:, None]], 1)
    solution, info = torch.linalg.solve_ex(g, r.T)
    if int(info) != 0 or not torch.isfinite(solution).all():
        solution = torch.linalg.pinv(g, hermitian=True) @ r.T
    p = solution.T
    if bias is not None:
        return p[:, :-1], p[:, -1]
    return p, None


def objective(
    weight: Tensor,
    bias: Tensor | None,
    w_r: Tensor,
    b_r: Tensor | None,
    pm: PairedMoments,
    lam: float,
) -> tuple[float, float]:
    """``(J, E‖y‖²)``: the objective of the module doc and the output energy it is relative to."""
    c, c_t, m, x_bar, t_bar = pm.means()
    w, wr = weight.double().to(c.device), w_r.double().to(c.device)
    energy = torch.trace(w @ c @ w.T)
    cross = torch.trace(w @ m @ wr.T)
    pred = torch.trace(wr @ c_t @ wr.T)
    if bias is not None:
        b = bias.double().to(c.device)
        br = b if b_r is None else b_r.double().to(c.device)
        energy = energy + 2 * b @ (w @ x_bar) + b @ b
        cross = cross + br @ (w @ x_bar) + b @ (wr @ t_bar) + b @ br
        pred = pred + 2 * br @ (wr @ t_bar) + br @ br
    j = energy - 2 * cross + pred + lam * (w - wr).pow(2).sum()
    return float(j), float(energy)


# ---------------------------------------------------------------------- the layer-by-layer pass


class _Stop(Exception):
    pass


def _run(model: nn.Module, batch: Any, forward: Forward) -> None:
    try:
        forward(model, batch)
    except _Stop:
        pass


def forward_groups(
    model: nn.Module, names: Sequence[str], batch: Any, forward: Forward
) -> list[list[str]]:
    """``names`` in the order the forward first calls them, consecutive layers that receive the
    same input tensor grouped together."""
    calls: list[tuple[str, Tensor]] = []
    seen: set[str] = set()
    handles = []
    for name in names:

        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if name not in seen:
                seen.add(name)
                calls.append((name, args[0]))

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _run(model, batch, forward)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise LorankError(
            f"calibration never reached layer(s) {', '.join(missing[:3])}; are they used in "
            "the model's forward?"
        )
    groups: list[list[str]] = []
    first: Tensor | None = None
    for name, x in calls:
        if groups and x is first:
            groups[-1].append(name)
        else:
            groups.append([name])
            first = x
    return groups


def _geometry(module: nn.Module) -> Any:
    if isinstance(module, nn.Conv2d) or hasattr(module, "kernel_size"):
        return tuple(
            str(getattr(module, a)) for a in ("kernel_size", "stride", "padding", "dilation")
        )
    return "rows"


def _capture(
    model: nn.Module, names: Sequence[str], batch: Any, forward: Forward
) -> dict[str, Tensor]:
    """Each layer's input rows for one batch; the forward stops once all of them are seen."""
    got: dict[str, Tensor] = {}
    cache: dict[Any, Tensor] = {}
    handles = []
    for name in names:

        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if name in got:
                return
            key = (id(args[0]), _geometry(mod))
            if key not in cache:
                cache[key] = layer_input_rows(mod, args[0])
            got[name] = cache[key]
            if len(got) == len(names):
                raise _Stop

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        _run(model, batch, forward)
    finally:
        for h in handles:
            h.remove()
    return got


def _weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    if isinstance(module, LowRankLayer):
        w = module.weight_matrix().detach()
        return w.reshape(w.shape[0], -1), module.bias
    return dense_weight_matrix(module), getattr(module, "bias", None)


@torch.no_grad()
def propagate(
    model: nn.Module,
    original: nn.Module,
    spectra: Sequence[LayerSpectrum],
    chosen: dict[str, int],
    batches: Sequence[Any],
    forward: Forward,
    *,
    error_propagation: bool,
    refit_factors: bool,
    damping: float,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Compress the layers of ``spectra`` to ``chosen`` ranks in forward order, each from the
    inputs the already-compressed upstream of ``model`` produces (``original``: the model as it
    was). Returns one report row per truncated layer, with the relative objective J/E‖y‖² of
    the independent factors (``spectra``'s own) and of the final ones."""
    from tqdm.auto import tqdm

    by_name = {s.name: s for s in spectra}
    targets = [s.name for s in spectra if s.name in chosen]
    if not targets:
        return []
    was = model.training, original.training
    model.eval(), original.eval()
    rows: list[dict[str, Any]] = []
    try:
        groups = forward_groups(model, targets, batches[0], forward)
        bar = tqdm(total=len(targets), desc="propagate", unit="layer", disable=not progress)
        for group in groups:
            stats: dict[str, PairedMoments] = {}
            shared: dict[Any, PairedMoments] = {}
            for batch in batches:
                xs = _capture(original, group, batch, forward)
                ts = _capture(model, group, batch, forward)
                done: dict[int, PairedMoments] = {}
                for name in group:
                    key = id(xs[name])
                    if key in done:
                        stats[name] = done[key]
                        continue
                    if name not in stats:
                        pm = PairedMoments.zeros(xs[name].shape[1], xs[name].device)
                        geometry = (_geometry(model.get_submodule(name)), xs[name].shape[1])
                        stats[name] = shared.setdefault(geometry, pm)
                    stats[name].add(xs[name], ts[name])
                    done[key] = stats[name]
            for name in group:
                rows.append(
                    _compress_one(
                        model,
                        by_name[name],
                        chosen[name],
                        stats[name],
                        error_propagation,
                        refit_factors,
                        damping,
                    )
                )
                bar.update(1)
        bar.close()
    finally:
        model.train(was[0])
        original.train(was[1])
    return rows


def _compress_one(
    model: nn.Module,
    spec: LayerSpectrum,
    k: int,
    pm: PairedMoments,
    error_propagation: bool,
    refit_factors: bool,
    damping: float,
) -> dict[str, Any]:
    weight, bias = _weight(spec.module)
    bias = bias.detach() if bias is not None else None
    _, lam = _lam(pm, damping)
    dtype = weight.dtype
    u, sigma, v = spec.u[:, :k].double(), spec.sigma[:k].double(), spec.v[:, :k].double()
    w_ind = (u * sigma) @ v.T
    j_ind, energy = objective(weight, bias, w_ind, bias, pm, lam)
    if error_propagation:
        p, s, vv, lam = propagated_svd(weight, pm, damping)
        u, sigma, v = p[:, :k], s[:k], vv[:, :k]
    new_bias = bias
    if refit_factors:
        out, new_bias = refit(weight, bias, v, pm, lam)
        norms = out.norm(dim=0).clamp_min(1e-30)
        u, sigma = out / norms, norms
    w_r = (u * sigma) @ v.T
    j, _ = objective(weight, bias, w_r, new_bias, pm, lam)
    device = weight.device
    row = install_factors(
        model,
        spec,
        u.to(device, dtype),
        sigma.to(device, dtype),
        v.to(device, dtype),
        new_bias.to(device, dtype) if new_bias is not None and refit_factors else None,
    )
    scale = max(energy, 1e-300)
    row["objective_independent"] = j_ind / scale
    row["objective"] = j / scale
    return row
