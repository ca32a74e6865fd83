r"""The layer-adapter registry: everything lorank knows about one kind of dense layer.

Every part of lorank that looks at a dense layer (the conversion planner, the SVD of a weight,
calibration, rank allocation, the methods that factorize later) asks this registry, the way
peft dispatches layer types once. An adapter says, for its layer kind:

* ``matches(module)``: whether a module is of its kind;
* ``skip_reason(module)``: why this particular layer cannot be factorized ("" if it can);
* ``matrix_shape`` and ``matrix_view``: the m×n matrix W the low-rank layer approximates
  (m outputs, n inputs: ``y = W x``), and how a tensor shaped like ``module.weight`` (the
  weight itself, or its optimizer state) reads as that matrix;
* ``build(module, rank, core)``: the low-rank layer of the same geometry (SVD-initialised by
  :func:`low_rank_from`); the low-rank layer's ``to_dense()`` merges back to this kind;
* ``input_rows(module, x)``: the rows X (N×n) the layer multiplies by Wᵀ for its input ``x``
  (what activation-aware calibration accumulates).

Adapters, by kind:

=====================  ==========================  ====================================
dense layer            matrix W (m×n)              low-rank layer
=====================  ==========================  ====================================
``nn.Linear``          ``weight`` (out × in)       :class:`LowRankLinear`
``nn.Conv2d``          C_out × C_in·kh·kw          :class:`LowRankConv2d` (groups 1)
``nn.Conv1d``          C_out × C_in·k              :class:`LowRankConv1d` (groups 1)
HF ``Conv1D``          ``weightᵀ`` (out × in)      :class:`LowRankHFConv1D`
``nn.Embedding``       ``weightᵀ`` (dim × vocab)   :class:`LowRankEmbedding`
=====================  ==========================  ====================================

Grouped and depthwise convolutions, and convolutions with non-zero padding modes, are not
factorized over channels: their skip reason says so. A module with a ≥2-D ``weight`` and no
adapter (``nn.ConvTranspose2d``, ``nn.Conv3d``, ``nn.Bilinear``, ...) is reported by
:func:`unsupported_reason`. Embeddings are factorized only when named in ``target_modules``
(``targeted_only``): a default conversion leaves the vocabulary table alone.

Adding a layer kind is one :class:`LayerAdapter` subclass and one :func:`register_adapter`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorank.core.layers import (
    CoreKind,
    LowRankConv1d,
    LowRankConv2d,
    LowRankEmbedding,
    LowRankHFConv1D,
    LowRankLayer,
    LowRankLinear,
    without_init,
)
from lorank.errors import LorankError

__all__ = [
    "ADAPTERS",
    "LayerAdapter",
    "adapter_for",
    "dense_matrix",
    "input_rows",
    "is_convertible",
    "low_rank_from",
    "low_rank_from_factors",
    "matrix_shape",
    "register_adapter",
    "set_dense_matrix",
    "unsupported_reason",
]


class LayerAdapter:
    """How lorank reads, factorizes and calibrates one kind of dense layer (module docstring)."""

    name: ClassVar[str]
    low_rank_type: ClassVar[type[LowRankLayer]]
    #: factorized only when ``target_modules`` names the layer (embeddings)
    targeted_only: ClassVar[bool] = False
    #: an affine map of the last dimension, like a Linear (what feed-forward chains are made of)
    acts_on_features: ClassVar[bool] = False

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def skip_reason(self, module: nn.Module) -> str:
        """Why ``module`` cannot be factorized, or "" when it can."""
        return ""

    def matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        return tuple(self.matrix_view(module, module.weight).shape)  # type: ignore[return-value]

    def matrix_view(self, module: nn.Module, t: Tensor) -> Tensor:
        """``t`` (shaped like ``module.weight``) as the m×n matrix W."""
        return t

    def weight_from_matrix(self, module: nn.Module, matrix: Tensor) -> Tensor:
        """The inverse of :meth:`matrix_view`."""
        return matrix.reshape(module.weight.shape)

    def build(self, module: nn.Module, rank: int | float, core: CoreKind) -> LowRankLayer:
        """An uninitialised low-rank layer of ``module``'s geometry."""
        raise NotImplementedError

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        """The rows X (N×n) that ``module`` (dense or low-rank) multiplies by Wᵀ."""
        return x.reshape(-1, x.shape[-1])


class LinearAdapter(LayerAdapter):
    name = "linear"
    low_rank_type = LowRankLinear
    acts_on_features = True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def build(self, module: nn.Module, rank: int | float, core: CoreKind) -> LowRankLayer:
        return LowRankLinear(
            module.in_features, module.out_features, rank, module.bias is not None, core
        )


class HFConv1DAdapter(LayerAdapter):
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2): ``y = x @ weight + b`` with
    ``weight`` (in, out) = Wᵀ. Matched by name, so transformers stays optional."""

    name = "hf_conv1d"
    low_rank_type = LowRankHFConv1D
    acts_on_features = True

    def matches(self, module: nn.Module) -> bool:
        return (
            type(module).__name__ == "Conv1D"
            and hasattr(module, "nf")
            and isinstance(getattr(module, "weight", None), Tensor)
        )

    def matrix_view(self, module: nn.Module, t: Tensor) -> Tensor:
        return t.T

    def weight_from_matrix(self, module: nn.Module, matrix: Tensor) -> Tensor:
        return matrix.T

    def build(self, module: nn.Module, rank: int | float, core: CoreKind) -> LowRankLayer:
        n_in, n_out = module.weight.shape
        return LowRankHFConv1D(n_in, n_out, rank, module.bias is not None, core)


class _ConvAdapter(LayerAdapter):
    """Convolutions factorized over channels: W = weight.flatten(1) (C_out × C_in·kernel)."""

    dims: ClassVar[int]

    def skip_reason(self, module: nn.Module) -> str:
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return (
                f"{kind} {type(module).__name__} (groups={module.groups}) cannot be factorized "
                "over channels"
            )
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only zero padding is factorized)"
        return ""

    def matrix_view(self, module: nn.Module, t: Tensor) -> Tensor:
        return t.flatten(1)

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        if self.dims == 1:  # a 1-D conv is a 2-D conv over a height-1 image
            x = x.unsqueeze(-2)
        kernel = _tuple(module.kernel_size, self.dims)
        dilation = _tuple(module.dilation, self.dims)
        stride = _tuple(module.stride, self.dims)
        padding: Any = module.padding
        if isinstance(padding, str):
            if padding == "same":  # PyTorch puts the odd pixel of "same" padding on the right
                pads = []
                for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
            padding = (0,) * self.dims
        padding = _tuple(padding, self.dims)
        if self.dims == 1:
            kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
            padding = (0, *padding)
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def build(self, module: nn.Module, rank: int | float, core: CoreKind) -> LowRankLayer:
        # Random factors of the dense layer's geometry; the caller loads the SVD.
        return self.low_rank_type(  # type: ignore[call-arg]
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            rank,
            module.stride,
            module.padding,
            module.dilation,
            module.bias is not None,
            core,
        )


class Conv2dAdapter(_ConvAdapter):
    name = "conv2d"
    low_rank_type = LowRankConv2d
    dims = 2

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)


class Conv1dAdapter(_ConvAdapter):
    name = "conv1d"
    low_rank_type = LowRankConv1d
    dims = 1

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv1d)


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding``: a Linear map of one-hot rows, W = weightᵀ (dim × vocabulary)."""

    name = "embedding"
    low_rank_type = LowRankEmbedding
    targeted_only = True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def skip_reason(self, module: nn.Module) -> str:
        if module.max_norm is not None:
            return "Embedding with max_norm renormalises its rows in place"
        if module.sparse:
            return "Embedding with sparse gradients"
        return ""

    def matrix_view(self, module: nn.Module, t: Tensor) -> Tensor:
        return t.T

    def weight_from_matrix(self, module: nn.Module, matrix: Tensor) -> Tensor:
        return matrix.T

    def build(self, module: nn.Module, rank: int | float, core: CoreKind) -> LowRankLayer:
        return LowRankEmbedding(
            module.num_embeddings,
            module.embedding_dim,
            rank,
            module.padding_idx,
            core,
            module.scale_grad_by_freq,
        )

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        # One-hot rows: XᵀX is the diagonal of token counts (a frequency-weighted SVD).
        vocab = module.num_embeddings
        dtype = module.U.dtype if isinstance(module, LowRankLayer) else module.weight.dtype
        return F.one_hot(x.reshape(-1).long(), vocab).to(dtype)


ADAPTERS: list[LayerAdapter] = []


def register_adapter(adapter: LayerAdapter) -> None:
    """Make lorank convert, calibrate and merge one more layer kind."""
    if any(a.name == adapter.name for a in ADAPTERS):
        raise LorankError(f"a layer adapter named {adapter.name!r} is already registered")
    ADAPTERS.append(adapter)


for _adapter in (
    LinearAdapter(),
    HFConv1DAdapter(),
    Conv2dAdapter(),
    Conv1dAdapter(),
    EmbeddingAdapter(),
):
    register_adapter(_adapter)


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of a dense layer, or of the low-rank layer one became; None if neither."""
    if isinstance(module, LowRankLayer):
        # The nearest class in the MRO: a subclass of LowRankLinear (nn-svd's symmetric layer)
        # is a Linear, while LowRankHFConv1D, itself a LowRankLinear, has its own adapter.
        for cls in type(module).__mro__:
            for adapter in ADAPTERS:
                if cls is adapter.low_rank_type:
                    return adapter
        return None
    for adapter in ADAPTERS:
        if adapter.matches(module):
            return adapter
    return None


def _adapter_or_error(module: nn.Module, what: str) -> LayerAdapter:
    adapter = adapter_for(module)
    if adapter is None:
        raise LorankError(
            f"cannot {what} a {type(module).__name__}: no layer adapter for it "
            f"(lorank knows {', '.join(a.name for a in ADAPTERS)})"
        )
    return adapter


def is_convertible(module: nn.Module) -> bool:
    """Whether ``module`` is a dense layer of a registered kind (eligible or not)."""
    return not isinstance(module, LowRankLayer) and adapter_for(module) is not None


def unsupported_reason(module: nn.Module) -> str:
    """Why a module holding a weight matrix is not a candidate ("" for any other module)."""
    weight = module.__dict__.get("_parameters", {}).get("weight")
    if isinstance(module, LowRankLayer) or adapter_for(module) is not None:
        return ""
    if isinstance(weight, Tensor) and weight.ndim >= 2:
        return f"no low-rank adapter for {type(module).__name__}"
    return ""


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(m, n) of the matrix W a dense or low-rank layer applies."""
    if isinstance(module, LowRankLayer):
        return module.out_dim, module.in_dim
    return _adapter_or_error(module, "read the weight matrix of").matrix_shape(module)


def dense_matrix(module: nn.Module) -> Tensor:
    """The m×n matrix view of a dense layer's weight (detached; a view where possible)."""
    return _adapter_or_error(module, "take the SVD of").matrix_view(module, module.weight.detach())


def set_dense_matrix(module: nn.Module, matrix: Tensor) -> None:
    """Copy the m×n ``matrix`` into a dense layer's weight (in its own layout)."""
    adapter = _adapter_or_error(module, "write the weight matrix of")
    with torch.no_grad():
        module.weight.copy_(adapter.weight_from_matrix(module, matrix))


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows X (N×n) that a dense or low-rank layer multiplies by Wᵀ for input ``x``."""
    adapter = _adapter_or_error(module, "calibrate")
    if not isinstance(module, LowRankLayer):
        reason = adapter.skip_reason(module)
        if reason:
            raise LorankError(f"cannot calibrate this layer: {reason}")
    return adapter.input_rows(module, x)


@torch.no_grad()
def low_rank_from(
    module: nn.Module, rank: int | float, core: CoreKind = "diag", init: str = "svd"
) -> LowRankLayer:
    """The low-rank version of one dense layer: the truncated SVD of its matrix (or random
    factors with ``init="random"``), same dtype and device, same bias."""
    adapter = _adapter_or_error(module, "factorize")
    reason = adapter.skip_reason(module)
    if reason:
        raise LorankError(f"{reason}; exclude it from conversion (exclude_modules)")
    layer = adapter.build(module, rank, core)
    weight = module.weight.detach()
    layer.to(device=weight.device, dtype=weight.dtype)
    if init == "random":
        layer.reset_parameters()
        return layer
    layer.init_from_matrix_(adapter.matrix_view(module, weight), getattr(module, "bias", None))
    return layer


@torch.no_grad()
def low_rank_from_factors(
    module: nn.Module, u: Tensor, sigma: Tensor, v: Tensor, core: CoreKind = "diag"
) -> LowRankLayer:
    """The low-rank version of one dense layer with the given factors ``u diag(sigma) vᵀ``
    (rank = columns of u) and the layer's bias, same dtype and device.

    For callers that already hold the (truncated) SVD they want: no SVD is taken, and the
    layer's random initialisation (two QRs) is skipped too.
    """
    adapter = _adapter_or_error(module, "factorize")
    reason = adapter.skip_reason(module)
    if reason:
        raise LorankError(f"{reason}; exclude it from conversion (exclude_modules)")
    with without_init():
        layer = adapter.build(module, int(u.shape[1]), core)
    weight = module.weight.detach()
    layer.to(device=weight.device, dtype=weight.dtype)
    layer.load_svd_(u, sigma, v)
    bias = getattr(module, "bias", None)
    if bias is not None and layer.bias is not None:
        layer.bias.copy_(bias)
    return layer


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return (int(v),) * n if isinstance(v, int) else tuple(int(i) for i in v)
