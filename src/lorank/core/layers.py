r"""Factorized layers: ``LowRankLinear``, ``LowRankConv2d``, ``LowRankConv1d``,
``LowRankEmbedding`` (and ``LowRankHFConv1D`` for Hugging Face's transposed ``Conv1D``).

A dense layer with weight :math:`W \in \mathbb{R}^{m \times n}` (m outputs, n inputs) is stored
as

.. math:: W = U\,S\,V^\top,\qquad U \in \mathbb{R}^{m\times r},\ V \in \mathbb{R}^{n\times r},

where the core ``S`` is one of

* ``"full"``: a trainable r×r matrix (DLRT, OIALR),
* ``"diag"``: a vector of r singular values, ``S = diag(s)`` (Yang et al.'s SVD training),
* ``"none"``: no core, ``W = U Vᵀ`` (vanilla factorization).

The forward never forms W: for a batch ``x`` (b×n) it computes ``(x V)(U S)ᵀ + bias``, costing
about ``2b·r(m+n)`` multiply-adds instead of ``2b·mn``. A Conv2d with a k×k kernel is
factorized over channels: ``Vᵀ`` is a k×k convolution from ``C_in`` to r channels (keeping
stride, padding and dilation), the core and ``U`` act as one 1×1 convolution from r to
``C_out``. For every SVD the conv weight is viewed as the matrix ``C_out × (C_in·k·k)``.

An embedding table ``E`` (vocabulary × dim) is the matrix of a Linear map applied to one-hot
rows, so its matrix view is ``W = Eᵀ`` (dim × vocabulary): a lookup is ``V[ids] (U S)ᵀ``, which
never forms E.

Every low-rank layer has a read-only ``weight`` property: ``U S Vᵀ`` in the layout of the dense
layer it replaces (``(out, in)``, ``(C_out, C_in, kh, kw)``, the embedding's ``(vocab, dim)``,
Conv1D's ``(in, out)``), with the factors' dtype and device, so code that reads
``module.weight`` keeps working. It is computed on each read (no stored copy); assigning to it
is an error, since the factors are the parameters.

The active rank is the number of columns of ``U``; methods change it with
:meth:`LowRankLayer.set_factors`, which returns the ``{old: new}`` parameter mapping that
:func:`lorank.core.optim.swap_parameters` needs to keep the optimizer consistent.

All factorized layer kinds live here because they share :class:`LowRankLayer`'s machinery
(factors, SVD, rank changes, the spec registry) and the K/L/S gradient functions; splitting
them would scatter one abstraction over several files.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorank.core.rank import resolve_rank
from lorank.errors import LorankError

CoreKind = Literal["full", "diag", "none"]
CORE_KINDS: tuple[str, ...] = ("full", "diag", "none")

# ``spec["type"]`` → low-rank layer class; each class registers itself (``spec_type``).
LAYER_TYPES: dict[str, type[LowRankLayer]] = {}


_INIT = threading.local()


@contextmanager
def without_init() -> Iterator[None]:
    """Low-rank layers built inside skip their random initialisation (two QRs): for callers
    that set every factor and the bias right after (e.g. from an SVD they already hold)."""
    before = getattr(_INIT, "skip", False)
    _INIT.skip = True
    try:
        yield
    finally:
        _INIT.skip = before


def factor_params(m: int, n: int, rank: int, core: str) -> int:
    """Weights of an m×n matrix as rank-``rank`` factors: r(m + n), plus r² for a full core."""
    return rank * (m + n) + (rank * rank if core == "full" else 0)


def orthonormal_(n_rows: int, n_cols: int, generator: torch.Generator | None = None) -> Tensor:
    """An n_rows×n_cols matrix with orthonormal columns (QR of a Gaussian matrix)."""
    g = torch.randn(n_rows, n_cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    # Fix the sign ambiguity of QR so the distribution is Haar.
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(torch.get_default_dtype())


class LowRankLayer(nn.Module):
    """Shared machinery of factorized layers (factors, rank, SVD, counts, rank changes).

    Subclasses define :meth:`forward`, :meth:`to_dense` and how the matrix view maps to their
    dense counterpart.
    """

    U: nn.Parameter
    V: nn.Parameter
    S: nn.Parameter | None
    bias: nn.Parameter | None
    kls_gradients: bool = False
    """When true (set by DLRT around its passes; full core only), the backward writes
    ``∇_K = ∇W V``, ``∇_S = Uᵀ ∇W V`` and ``∇_L = ∇Wᵀ U`` into the ``U``, ``S`` and ``V``
    gradients instead of the factors' own gradients (see :class:`_KLSLinear`)."""
    kls_stash: list[tuple[Any, ...]] | None = None
    """In K/L/S gradient mode, a list the backward appends the layer's input and output
    gradient to (one entry per call), for :func:`kls_cross_gradient`; None: keep nothing."""
    spec_type: str = ""  # the "type" of :meth:`spec`; set by each concrete class

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("spec_type"):
            LAYER_TYPES[cls.spec_type] = cls

    def __init__(self, out_dim: int, in_dim: int, rank: int, core: CoreKind, bias: bool) -> None:
        super().__init__()
        if core not in CORE_KINDS:
            raise LorankError(f"core must be one of {', '.join(CORE_KINDS)}, got {core!r}")
        self.out_dim, self.in_dim, self.core = out_dim, in_dim, core
        rank = resolve_rank(rank, min(out_dim, in_dim))
        self.U = nn.Parameter(torch.empty(out_dim, rank))
        self.V = nn.Parameter(torch.empty(in_dim, rank))
        if core == "full":
            self.S = nn.Parameter(torch.empty(rank, rank))
        elif core == "diag":
            self.S = nn.Parameter(torch.empty(rank))
        else:
            self.register_parameter("S", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_dim))
        else:
            self.register_parameter("bias", None)
        if not getattr(_INIT, "skip", False):
            self.reset_parameters()

    # ------------------------------------------------------------------ initialisation
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random init: orthonormal U, V; S scaled so the output variance matches the dense
        PyTorch default (weights uniform in ±1/√n, i.e. ‖W‖²_F ≈ m/3)."""
        r = self.rank
        scale = math.sqrt(self.out_dim / (3.0 * r))
        with torch.no_grad():
            self.U.copy_(orthonormal_(self.out_dim, r, generator))
            self.V.copy_(orthonormal_(self.in_dim, r, generator))
            if self.core == "full":
                self.S.copy_(torch.eye(r) * scale)
            elif self.core == "diag":
                self.S.fill_(scale)
            else:
                self.U.mul_(math.sqrt(scale))
                self.V.mul_(math.sqrt(scale))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_dim)
                if generator is None:
                    self.bias.uniform_(-bound, bound)
                else:
                    self.bias.copy_((torch.rand(self.out_dim, generator=generator) * 2 - 1) * bound)

    def load_svd_(self, u: Tensor, sigma: Tensor, v: Tensor) -> None:
        """Set the factors from a (truncated) SVD ``W ≈ u diag(sigma) vᵀ`` of matching rank."""
        self.set_factors(*self._factors_from_svd(u, sigma, v))

    def _factors_from_svd(
        self, u: Tensor, sigma: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        if self.core == "full":
            return u, torch.diag(sigma), v
        if self.core == "diag":
            return u, sigma, v
        root = sigma.clamp_min(0).sqrt()
        return u * root, None, v * root

    # ------------------------------------------------------------------ views
    @property
    def rank(self) -> int:
        """The active rank r (columns of U)."""
        return self.U.shape[1]

    @property
    def full_rank(self) -> int:
        return min(self.out_dim, self.in_dim)

    def core_matrix(self) -> Tensor:
        """The r×r core S (identity when the layer has no core)."""
        if self.core == "full":
            return self.S
        if self.core == "diag":
            return torch.diag(self.S)
        return torch.eye(self.rank, dtype=self.U.dtype, device=self.U.device)

    def output_factor(self) -> Tensor:
        """U S (m×r), the factor the forward applies after projecting onto V."""
        if self.core == "full":
            return self.U @ self.S
        if self.core == "diag":
            return self.U * self.S
        return self.U

    def weight_matrix(self) -> Tensor:
        """The dense m×n matrix U S Vᵀ (for diagnostics and merging; not used in forward)."""
        return self.output_factor() @ self.V.T

    @property
    def weight(self) -> Tensor:
        """U S Vᵀ in the dense layer's weight layout (read-only; formed on each read)."""
        return self.dense_weight(self.weight_matrix())

    @weight.setter
    def weight(self, value: object) -> None:
        raise LorankError(self._weight_is_read_only())

    def __setattr__(self, name: str, value: object) -> None:
        # nn.Module.__setattr__ registers a Parameter before any property setter runs.
        if name == "weight":
            raise LorankError(self._weight_is_read_only())
        super().__setattr__(name, value)

    def _weight_is_read_only(self) -> str:
        return (
            f"{type(self).__name__}.weight is U S Vᵀ, computed from the factors; set the "
            "factors (load_svd_/set_factors) or lorank.merge the model to edit a dense weight"
        )

    def dense_weight(self, matrix: Tensor) -> Tensor:
        """The m×n matrix view ``matrix`` in the layout of the dense layer's ``weight``."""
        return matrix

    @torch.no_grad()
    def init_from_matrix_(self, matrix: Tensor, bias: Tensor | None = None) -> None:
        """Set the factors to the best rank-``rank`` approximation of the m×n ``matrix``
        (truncated SVD in float64) and copy ``bias``."""
        u, sigma, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
        r, like = self.rank, self.U
        self.load_svd_(u[:, :r].to(like), sigma[:r].to(like), vh[:r].T.to(like))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

    @torch.no_grad()
    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Exact thin SVD of U S Vᵀ, returning (Uo m×r, σ r, Vo n×r) without forming W.

        QR of U and V (O((m+n)r²)), then the SVD of the small r×r matrix R_U S R_Vᵀ.
        """
        qu, ru = torch.linalg.qr(self.U.double())
        qv, rv = torch.linalg.qr(self.V.double())
        p, sigma, qt = torch.linalg.svd(ru @ self.core_matrix().double() @ rv.T)
        dtype = self.U.dtype
        return (qu @ p).to(dtype), sigma.to(dtype), (qv @ qt.T).to(dtype)

    def singular_values(self) -> Tensor:
        """Singular values of U S Vᵀ in descending order."""
        return self.svd()[1]

    # ------------------------------------------------------------------ counts
    @property
    def params_eval(self) -> int:
        """What inference needs: r(m+n) (+r² for a full core) + bias."""
        n = factor_params(self.out_dim, self.in_dim, self.rank, self.core)
        return n + (self.out_dim if self.bias is not None else 0)

    @property
    def params_train(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def params_dense(self) -> int:
        return self.out_dim * self.in_dim + (self.out_dim if self.bias is not None else 0)

    # ------------------------------------------------------------------ rank changes
    def set_factors(
        self, U: Tensor, S: Tensor | None, V: Tensor
    ) -> dict[nn.Parameter, nn.Parameter]:
        """Replace the factors (any rank) by new parameters; return ``{old: new}``.

        The new parameters keep the old ones' ``requires_grad`` flags, so a frozen basis stays
        frozen. Pass the mapping to :func:`lorank.core.optim.swap_parameters`.
        """
        r = U.shape[1]
        if U.shape != (self.out_dim, r) or V.shape != (self.in_dim, r):
            raise ValueError(f"factor shapes {tuple(U.shape)}, {tuple(V.shape)} do not fit")
        if not 1 <= r <= self.full_rank:
            raise LorankError(f"rank {r} is outside [1, {self.full_rank}] for this layer")
        expected = {"full": (r, r), "diag": (r,), "none": None}[self.core]
        if (None if S is None else tuple(S.shape)) != expected:
            raise ValueError(
                f"core of shape {None if S is None else tuple(S.shape)} for core "
                f"kind {self.core!r}, expected {expected}"
            )
        mapping: dict[nn.Parameter, nn.Parameter] = {}
        for name, value in (("U", U), ("S", S), ("V", V)):
            if value is None:
                continue
            old = getattr(self, name)
            new = nn.Parameter(
                value.detach().to(old).contiguous().clone(), requires_grad=old.requires_grad
            )
            setattr(self, name, new)
            mapping[old] = new
        return mapping

    @torch.no_grad()
    def truncate(self, rank: int) -> dict[nn.Parameter, nn.Parameter]:
        """Keep the best rank-``rank`` approximation (Eckart–Young) in SVD form.

        Afterwards U and V have orthonormal columns and S holds the kept singular values, so
        the spectral error is exactly σ_{rank+1}.
        """
        u, sigma, v = self.svd()
        rank = max(1, min(rank, sigma.numel()))
        return self.set_factors(*self._factors_from_svd(u[:, :rank], sigma[:rank], v[:, :rank]))

    def freeze_bases(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) U and V; S and the bias stay trainable."""
        self.U.requires_grad_(not frozen)
        self.V.requires_grad_(not frozen)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: ANN001
        # A checkpoint may hold a different active rank: resize our factors to match it
        # before the copy, so shapes rebuild from the weights themselves.
        for name in ("U", "S", "V"):
            key = prefix + name
            param = getattr(self, name)
            if key in state_dict and param is not None and state_dict[key].shape != param.shape:
                setattr(
                    self,
                    name,
                    nn.Parameter(
                        torch.empty_like(state_dict[key], dtype=param.dtype, device=param.device),
                        requires_grad=param.requires_grad,
                    ),
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"out={self.out_dim}, in={self.in_dim}, rank={self.rank}, core={self.core}"


class LowRankLinear(LowRankLayer):
    """A Linear layer stored as ``W = U S Vᵀ``; forward ``y = (x V)(U S)ᵀ + b``.

    Example::

        layer = LowRankLinear.from_linear(nn.Linear(784, 500), rank=32)
        dense = layer.to_dense()       # nn.Linear with W = U S Vᵀ
    """

    spec_type = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | float,
        bias: bool = True,
        core: CoreKind = "diag",
    ) -> None:
        self.in_features, self.out_features = in_features, out_features
        super().__init__(out_features, in_features, rank, core, bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.kls_gradients and self.core == "full":
            return _KLSLinear.apply(x, self.U, self.S, self.V, self.bias, self.kls_stash)
        return F.linear(F.linear(x, self.V.T), self.output_factor(), self.bias)

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Linear, rank: int | float, core: CoreKind = "diag"
    ) -> LowRankLinear:
        """Best rank-``rank`` approximation of ``linear`` by truncated SVD of its weight."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, core)
        layer.to(device=weight.device, dtype=weight.dtype)
        layer.init_from_matrix_(weight, linear.bias)
        return layer

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W = U S Vᵀ``."""
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        dense.to(device=self.U.device, dtype=self.U.dtype)
        dense.weight.copy_(self.weight_matrix())
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense

    def spec(self) -> dict:
        return {
            "type": self.spec_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "core": self.core,
            "bias": self.bias is not None,
            "frozen": _frozen_names(self),
        }

    @classmethod
    def from_spec(cls, spec: dict) -> LowRankLinear:
        return cls(
            spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], spec["core"]
        )


class LowRankHFConv1D(LowRankLinear):
    """A Hugging Face ``Conv1D`` (GPT-2's projections: ``y = x @ weight + bias`` with
    ``weight`` of shape (in, out), i.e. Wᵀ) as a low-rank Linear; ``weight`` and
    :meth:`to_dense` give back Conv1D's transposed layout."""

    spec_type = "hf_conv1d"

    def dense_weight(self, matrix: Tensor) -> Tensor:
        return matrix.T

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """A ``transformers.pytorch_utils.Conv1D`` with ``weight = (U S Vᵀ)ᵀ``."""
        from transformers.pytorch_utils import Conv1D  # only reached for a transformers model

        dense = Conv1D(self.out_features, self.in_features)
        dense.to(device=self.U.device, dtype=self.U.dtype)
        dense.weight.copy_(self.weight_matrix().T)
        if self.bias is None:
            dense.bias = None
        else:
            dense.bias.copy_(self.bias)
        return dense


class _ChannelFactorizedConv:
    """What a convolution factorized over channels (Conv1d, Conv2d) shares: built from the
    dense layer's flattened weight ``C_out × (C_in·kernel)``, merged back by reshaping it."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]

    @classmethod
    def _from_dense_conv(cls, conv: nn.Module, rank: int | float, core: CoreKind) -> Any:
        layer = cls(  # type: ignore[call-arg]
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            rank,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.bias is not None,
            core,
        )
        weight = conv.weight.detach()
        layer.to(device=weight.device, dtype=weight.dtype)
        layer.init_from_matrix_(weight.flatten(1), conv.bias)
        return layer

    def dense_weight(self, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    @torch.no_grad()
    def _to_dense_conv(self, dense_class: type[nn.Module]) -> nn.Module:
        dense = dense_class(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,  # type: ignore[attr-defined]
            self.padding,  # type: ignore[attr-defined]
            self.dilation,  # type: ignore[attr-defined]
            bias=self.bias is not None,  # type: ignore[attr-defined]
        )
        dense.to(device=self.U.device, dtype=self.U.dtype)  # type: ignore[attr-defined]
        dense.weight.copy_(self.weight_matrix().reshape(dense.weight.shape))  # type: ignore[attr-defined]
        if self.bias is not None:  # type: ignore[attr-defined]
            dense.bias.copy_(self.bias)  # type: ignore[attr-defined]
        return dense


class LowRankConv2d(_ChannelFactorizedConv, LowRankLayer):
    """A Conv2d factorized over channels: k×k conv C_in→r (Vᵀ), then 1×1 conv r→C_out (U S).

    The matrix view is ``W ∈ ℝ^{C_out × (C_in·kh·kw)}``, i.e. ``conv.weight.flatten(1)``.
    Only ``groups=1`` and ``padding_mode="zeros"`` are supported.
    """

    spec_type = "conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int | float,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        core: CoreKind = "diag",
    ) -> None:
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (int(kh), int(kw))
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        super().__init__(out_channels, in_channels * kh * kw, rank, core, bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.kls_gradients and self.core == "full":
            x, padding = _explicit_padding(x, self.padding, self.kernel_size, self.dilation)
            geometry = (self.in_channels, self.kernel_size, self.stride, padding, self.dilation)
            return _KLSConv2d.apply(x, self.U, self.S, self.V, self.bias, geometry, self.kls_stash)
        r = self.rank
        spatial = self.V.T.reshape(r, self.in_channels, *self.kernel_size)
        h = F.conv2d(x, spatial, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.output_factor().reshape(self.out_channels, r, 1, 1), self.bias)

    @classmethod
    @torch.no_grad()
    def from_conv(
        cls, conv: nn.Conv2d, rank: int | float, core: CoreKind = "diag"
    ) -> LowRankConv2d:
        """Best rank-``rank`` channel factorization of ``conv`` by truncated SVD."""
        if conv.groups != 1:
            raise LorankError(
                f"Conv2d with groups={conv.groups} cannot be factorized over channels; "
                "exclude it from conversion (exclude_modules) or use groups=1"
            )
        if conv.padding_mode != "zeros":
            raise LorankError(
                f"Conv2d with padding_mode={conv.padding_mode!r} is not supported; "
                "exclude it from conversion or use padding_mode='zeros'"
            )
        return cls._from_dense_conv(conv, rank, core)

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with weight U S Vᵀ reshaped to (C_out, C_in, kh, kw)."""
        return self._to_dense_conv(nn.Conv2d)  # type: ignore[return-value]

    def spec(self) -> dict:
        return {
            "type": self.spec_type,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "rank": self.rank,
            "core": self.core,
            "bias": self.bias is not None,
            "frozen": _frozen_names(self),
        }

    @classmethod
    def from_spec(cls, spec: dict) -> LowRankConv2d:
        padding = spec["padding"]
        return cls(
            spec["in_channels"],
            spec["out_channels"],
            tuple(spec["kernel_size"]),
            spec["rank"],
            tuple(spec["stride"]),
            padding if isinstance(padding, str) else tuple(padding),
            tuple(spec["dilation"]),
            spec["bias"],
            spec["core"],
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, rank={self.rank}, "
            f"core={self.core}"
        )


class LowRankConv1d(_ChannelFactorizedConv, LowRankLayer):
    """A Conv1d factorized over channels, like :class:`LowRankConv2d`: a size-k conv
    C_in→r (Vᵀ), then a size-1 conv r→C_out (U S). Matrix view ``C_out × (C_in·k)``."""

    spec_type = "conv1d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int],
        rank: int | float,
        stride: int | tuple[int] = 1,
        padding: int | tuple[int] | str = 0,
        dilation: int | tuple[int] = 1,
        bias: bool = True,
        core: CoreKind = "diag",
    ) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (_single(kernel_size),)
        self.stride = (_single(stride),)
        self.padding = padding if isinstance(padding, str) else (_single(padding),)
        self.dilation = (_single(dilation),)
        super().__init__(out_channels, in_channels * self.kernel_size[0], rank, core, bias)

    def forward(self, x: Tensor) -> Tensor:
        r = self.rank
        spatial = self.V.T.reshape(r, self.in_channels, *self.kernel_size)
        h = F.conv1d(x, spatial, None, self.stride, self.padding, self.dilation)
        return F.conv1d(h, self.output_factor().reshape(self.out_channels, r, 1), self.bias)

    @classmethod
    @torch.no_grad()
    def from_conv(
        cls, conv: nn.Conv1d, rank: int | float, core: CoreKind = "diag"
    ) -> LowRankConv1d:
        """Best rank-``rank`` channel factorization of ``conv`` (groups 1, zero padding)."""
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise LorankError(
                f"Conv1d with groups={conv.groups}, padding_mode={conv.padding_mode!r} cannot "
                "be factorized over channels; exclude it (exclude_modules)"
            )
        return cls._from_dense_conv(conv, rank, core)

    def to_dense(self) -> nn.Conv1d:
        """A plain ``nn.Conv1d`` with weight U S Vᵀ reshaped to (C_out, C_in, k)."""
        return self._to_dense_conv(nn.Conv1d)  # type: ignore[return-value]

    def spec(self) -> dict:
        return {
            "type": self.spec_type,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size[0],
            "stride": self.stride[0],
            "padding": self.padding if isinstance(self.padding, str) else self.padding[0],
            "dilation": self.dilation[0],
            "rank": self.rank,
            "core": self.core,
            "bias": self.bias is not None,
            "frozen": _frozen_names(self),
        }

    @classmethod
    def from_spec(cls, spec: dict) -> LowRankConv1d:
        return cls(
            spec["in_channels"],
            spec["out_channels"],
            spec["kernel_size"],
            spec["rank"],
            spec["stride"],
            spec["padding"],
            spec["dilation"],
            spec["bias"],
            spec["core"],
        )


class LowRankEmbedding(LowRankLayer):
    """An embedding table ``E`` (num_embeddings × embedding_dim) stored as ``Eᵀ = U S Vᵀ``.

    ``U`` is dim×r and ``V`` vocabulary×r: a lookup gathers rows of V and maps them by
    ``(U S)ᵀ``, so ``forward(ids) = V[ids] (U S)ᵀ`` costs r·(1 + dim) per token and never
    forms E. ``padding_idx`` keeps its row of V out of the gradient (a zero row stays zero).
    """

    spec_type = "embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int | float,
        padding_idx: int | None = None,
        core: CoreKind = "diag",
        scale_grad_by_freq: bool = False,
    ) -> None:
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.scale_grad_by_freq = padding_idx, scale_grad_by_freq
        super().__init__(embedding_dim, num_embeddings, rank, core, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(
            ids, self.V, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq
        )
        return F.linear(rows, self.output_factor())

    @classmethod
    @torch.no_grad()
    def from_embedding(
        cls, embedding: nn.Embedding, rank: int | float, core: CoreKind = "diag"
    ) -> LowRankEmbedding:
        """Best rank-``rank`` approximation of the table (max_norm and sparse unsupported)."""
        if embedding.max_norm is not None or embedding.sparse:
            raise LorankError(
                "an Embedding with max_norm (renormalises rows in place) or sparse gradients "
                "cannot be factorized; exclude it (exclude_modules)"
            )
        padding_idx = embedding.padding_idx
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            rank,
            padding_idx,
            core,
            embedding.scale_grad_by_freq,
        )
        weight = embedding.weight.detach()
        layer.to(device=weight.device, dtype=weight.dtype)
        layer.init_from_matrix_(weight.T)
        return layer

    def dense_weight(self, matrix: Tensor) -> Tensor:
        return matrix.T

    @torch.no_grad()
    def to_dense(self) -> nn.Embedding:
        dense = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            self.padding_idx,
            scale_grad_by_freq=self.scale_grad_by_freq,
        )
        dense.to(device=self.U.device, dtype=self.U.dtype)
        dense.weight.copy_(self.weight)
        return dense

    def spec(self) -> dict:
        return {
            "type": self.spec_type,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
            "scale_grad_by_freq": self.scale_grad_by_freq,
            "rank": self.rank,
            "core": self.core,
            "frozen": _frozen_names(self),
        }

    @classmethod
    def from_spec(cls, spec: dict) -> LowRankEmbedding:
        return cls(
            spec["num_embeddings"],
            spec["embedding_dim"],
            spec["rank"],
            spec["padding_idx"],
            spec["core"],
            spec.get("scale_grad_by_freq", False),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, core={self.core}"
            + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
        )


def layer_from_spec(spec: dict) -> LowRankLayer:
    """Rebuild an (uninitialised) low-rank layer from :meth:`LowRankLayer.spec`."""
    cls = LAYER_TYPES.get(spec.get("type", ""))
    if cls is None:
        raise LorankError(
            f"unknown low-rank layer type {spec.get('type')!r} in checkpoint metadata"
        )
    layer = cls.from_spec(spec)
    for name in spec.get("frozen", []):
        getattr(layer, name).requires_grad_(False)
    return layer


def _frozen_names(layer: nn.Module) -> list[str]:
    return [n for n, p in layer.named_parameters(recurse=False) if not p.requires_grad]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


# ---------------------------------------------------------------------- K/L/S gradients
# DLRT's integrators need, at the point (U, S, V), the gradients of the loss with respect to
# K = U S (with V fixed), L = V Sᵀ (with U fixed) and S (with U, V fixed):
#     ∇_K = ∇W V = gᵀ (x V),   ∇_L = ∇Wᵀ U = xᵀ (g U),   ∇_S = Uᵀ ∇W V = (g U)ᵀ (x V),
# with x the layer input and g the gradient at its output. Autograd through the factorized
# forward gives ∇_U = ∇_K Sᵀ and ∇_V = ∇_L S instead, from which ∇_K, ∇_L would need S⁻¹;
# these functions compute the three directly, with the same GEMMs as the factorized backward
# (g U, gᵀ h, xᵀ (g U), and the input gradient) and the same saved tensors (x and h = x V).


class _KLSLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, U, S, V, bias, stash=None):  # noqa: ANN001, ANN205
        h = F.linear(x, V.T)
        ctx.save_for_backward(x, h, U, S, V)
        ctx.has_bias, ctx.stash = bias is not None, stash
        return F.linear(h, U @ S, bias)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, h, U, S, V = ctx.saved_tensors
        g2, h2, x2 = (
            g.reshape(-1, g.shape[-1]),
            h.reshape(-1, h.shape[-1]),
            x.reshape(-1, x.shape[-1]),
        )
        gu = g2 @ U
        grad_x = ((gu @ S) @ V.T).reshape(x.shape) if ctx.needs_input_grad[0] else None
        grad_k = g2.T @ h2 if ctx.needs_input_grad[1] else None
        grad_s = gu.T @ h2 if ctx.needs_input_grad[2] else None
        grad_l = x2.T @ gu if ctx.needs_input_grad[3] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        if ctx.stash is not None:
            ctx.stash.append(("linear", x2, g2))
        return grad_x, grad_k, grad_s, grad_l, grad_b, None


class _KLSConv2d(torch.autograd.Function):
    """The same for the channel factorization: ``h = conv(x, Vᵀ)`` (k×k), ``y = conv1×1(h,
    U S)``; g U is a 1×1 convolution, ∇_L the weight gradient of the k×k convolution for
    the output gradient g U."""

    @staticmethod
    def forward(ctx, x, U, S, V, bias, geometry, stash=None):  # noqa: ANN001, ANN205
        c_in, kernel, stride, padding, dilation = geometry
        r = U.shape[1]
        spatial = V.T.reshape(r, c_in, *kernel)
        h = F.conv2d(x, spatial, None, stride, padding, dilation)
        ctx.save_for_backward(x, h, U, S, V)
        ctx.geometry, ctx.has_bias, ctx.stash = geometry, bias is not None, stash
        return F.conv2d(h, (U @ S).reshape(U.shape[0], r, 1, 1), bias)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, h, U, S, V = ctx.saved_tensors
        c_in, kernel, stride, padding, dilation = ctx.geometry
        m, r = U.shape
        gu = F.conv2d(g, U.T.reshape(r, m, 1, 1))  # (b, r, H', W')
        grad_x = grad_k = grad_s = grad_l = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = F.conv2d(gu, S.T.reshape(r, r, 1, 1))
            spatial = V.T.reshape(r, c_in, *kernel)
            grad_x = torch.nn.grad.conv2d_input(x.shape, spatial, grad_h, stride, padding, dilation)
        if ctx.needs_input_grad[1]:
            grad_k = g.transpose(0, 1).reshape(m, -1) @ h.transpose(0, 1).reshape(r, -1).T
        if ctx.needs_input_grad[2]:
            grad_s = gu.transpose(0, 1).reshape(r, -1) @ h.transpose(0, 1).reshape(r, -1).T
        if ctx.needs_input_grad[3]:
            grad_l = (
                torch.nn.grad.conv2d_weight(x, (r, c_in, *kernel), gu, stride, padding, dilation)
                .reshape(r, -1)
                .T
            )
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_b = g.sum((0, 2, 3))
        if ctx.stash is not None:
            ctx.stash.append(("conv2d", x, g, ctx.geometry))
        return grad_x, grad_k, grad_s, grad_l, grad_b, None, None


def kls_cross_gradient(stash: list[tuple[Any, ...]], left: Tensor, right: Tensor) -> Tensor:
    """``leftᵀ ∇W right`` (k×l) from the inputs and output gradients a K/L/S backward
    stashed (summed over the layer's calls), without forming the m×n ``∇W = Σ gᵀ x``: two
    products at rank k and l, as in the factorized backward. ``left`` is m×k, ``right`` n×l
    (Conv2d: W viewed as C_out × C_in·kh·kw)."""
    total = left.new_zeros(left.shape[1], right.shape[1])
    for entry in stash:
        if entry[0] == "linear":
            _, x, g = entry
            total += (g @ left).T @ (x @ right)
        else:
            _, x, g, (c_in, kernel, stride, padding, dilation) = entry
            k, m = left.shape[1], left.shape[0]
            filters = right.T.reshape(right.shape[1], c_in, *kernel)
            xr = F.conv2d(x, filters, None, stride, padding, dilation)
            gl = F.conv2d(g, left.T.reshape(k, m, 1, 1))
            total += (
                gl.transpose(0, 1).reshape(k, -1) @ xr.transpose(0, 1).reshape(xr.shape[1], -1).T
            )
    return total


def _explicit_padding(
    x: Tensor,
    padding: tuple[int, int] | str,
    kernel: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[Tensor, tuple[int, int]]:
    """``padding`` as integers (the gradient helpers take no strings); an asymmetric
    ``"same"`` padding is applied to ``x`` itself, as ``F.conv2d`` does internally."""
    if not isinstance(padding, str):
        return x, padding
    if padding == "valid":
        return x, (0, 0)
    totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
    if all(t % 2 == 0 for t in totals):
        return x, (totals[0] // 2, totals[1] // 2)
    (th, tw) = totals
    return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2)), (0, 0)


def _single(v: int | tuple[int, ...]) -> int:
    return int(v) if isinstance(v, int) else int(v[0])
