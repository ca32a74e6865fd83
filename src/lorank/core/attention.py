r"""``LowRankMultiheadAttention``: ``nn.MultiheadAttention`` with its projections as layers.

PyTorch's attention keeps the query/key/value projection as one packed parameter
``in_proj_weight`` :math:`\in \mathbb{R}^{3E\times E}` that no ``nn.Linear`` owns, so
conversion cannot swap it for a factorized layer. This module computes exactly what
``nn.MultiheadAttention`` computes, but with every projection a submodule that may be a dense
``nn.Linear`` or a :class:`~lorank.core.layers.LowRankLinear`:

* ``qkv="packed"`` (the default): one ``in_proj`` of shape 3E×E, as PyTorch (and timm's ViT,
  on which OIALR was shown) stores it. Factorized, q, k and v share one input basis
  :math:`V \in \mathbb{R}^{E\times r}`: :math:`[W_q; W_k; W_v] = U S V^\top` with
  :math:`U \in \mathbb{R}^{3E\times r}`, costing :math:`4Er` (+ :math:`r^2`) instead of
  :math:`3E^2`. It is the default because the dense ``in_proj`` can *reuse* the original
  ``in_proj_weight``/``in_proj_bias`` Parameters, so re-expressing an attention module
  mid-training (OIALR's switch, hybrid's) keeps the optimizer's parameters and state valid.
* ``qkv="separate"``: ``q_proj``, ``k_proj``, ``v_proj`` (E×E, E×kdim, E×vdim), each with its
  own rank; three bases instead of one. Attention with ``kdim``/``vdim`` different from
  ``embed_dim`` is always separate (PyTorch stores it that way too).

``out_proj`` is an E×E projection either way. The forward follows
``torch.nn.functional.multi_head_attention_forward`` step by step (batch_first both ways,
unbatched inputs, boolean or additive ``attn_mask`` of shape (L, S) or (N·H, L, S), boolean
or additive ``key_padding_mask``, the ``is_causal`` hint, ``need_weights`` /
``average_attn_weights``, attention dropout in training), so at full rank the outputs equal
PyTorch's. ``add_bias_kv`` and ``add_zero_attn`` are not supported: such modules stay dense.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorank.core.layers import LowRankLinear
from lorank.errors import LorankError

QKVLayout = Literal["packed", "separate"]
QKV_LAYOUTS: tuple[str, ...] = ("packed", "separate")


class LowRankMultiheadAttention(nn.Module):
    """Drop-in ``nn.MultiheadAttention`` whose projections are (possibly low-rank) layers.

    Example::

        attn = LowRankMultiheadAttention.from_mha(nn.MultiheadAttention(64, 4))
        attn.in_proj = LowRankLinear.from_linear(attn.in_proj, rank=16)
        plain = attn.to_mha()          # nn.MultiheadAttention with the merged weights

    :func:`lorank.convert` does this for every ``nn.MultiheadAttention`` it targets.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        qkv: QKVLayout = "packed",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise LorankError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if qkv not in QKV_LAYOUTS:
            raise LorankError(f"qkv must be one of {', '.join(QKV_LAYOUTS)}, got {qkv!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if not self._qkv_same_embed_dim:
            qkv = "separate"
        self.dropout, self.batch_first, self.qkv = dropout, batch_first, qkv
        self.has_bias = bias
        kw = {"device": device, "dtype": dtype}
        if qkv == "packed":
            self.in_proj: nn.Module = nn.Linear(embed_dim, 3 * embed_dim, bias, **kw)
        else:
            self.q_proj: nn.Module = nn.Linear(embed_dim, embed_dim, bias, **kw)
            self.k_proj: nn.Module = nn.Linear(self.kdim, embed_dim, bias, **kw)
            self.v_proj: nn.Module = nn.Linear(self.vdim, embed_dim, bias, **kw)
        self.out_proj: nn.Module = nn.Linear(embed_dim, embed_dim, bias, **kw)

    # ------------------------------------------------------------------ conversion
    @classmethod
    @torch.no_grad()
    def from_mha(
        cls, mha: nn.MultiheadAttention, qkv: QKVLayout = "packed"
    ) -> LowRankMultiheadAttention:
        """The same attention with dense ``nn.Linear`` projections.

        Where the layout allows, the projections *reuse* ``mha``'s Parameter objects (packed:
        all of them; separate: ``out_proj`` and, when kdim/vdim differ, the q/k/v weights),
        so an optimizer holding them stays consistent. Separate q/k/v slices of a packed
        ``in_proj_weight`` are new Parameters.
        """
        if mha.bias_k is not None or mha.add_zero_attn:
            raise LorankError(
                "nn.MultiheadAttention with add_bias_kv or add_zero_attn cannot be converted; "
                "exclude it from conversion (exclude_modules)"
            )
        bias = mha.in_proj_bias is not None
        ref = mha.out_proj.weight
        attn = cls(
            mha.embed_dim,
            mha.num_heads,
            mha.dropout,
            bias,
            mha.kdim,
            mha.vdim,
            mha.batch_first,
            qkv,
            device="meta",  # every Parameter is replaced below; allocate nothing
        )
        _reuse(attn.out_proj, mha.out_proj.weight, mha.out_proj.bias)
        e = mha.embed_dim
        if attn.qkv == "packed":
            _reuse(attn.in_proj, mha.in_proj_weight, mha.in_proj_bias)
        else:
            if mha._qkv_same_embed_dim:
                weights = [nn.Parameter(w.clone()) for w in mha.in_proj_weight.detach().split(e)]
            else:
                weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
            projs = (attn.q_proj, attn.k_proj, attn.v_proj)
            biases = [None] * 3 if not bias else list(mha.in_proj_bias.detach().split(e))
            for proj, w, b in zip(projs, weights, biases, strict=True):
                _reuse(proj, w, None if b is None else nn.Parameter(b.clone()))
        assert not any(p.is_meta for p in attn.parameters()), "a projection kept meta weights"
        attn.train(mha.training)
        return attn.to(device=ref.device)

    @torch.no_grad()
    def to_mha(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` with the (merged) weights of this module."""
        ref = next(self.parameters())
        mha = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            self.dropout,
            self.has_bias,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device=ref.device,
            dtype=ref.dtype,
        )
        e = self.embed_dim
        if self.qkv == "packed":
            mha.in_proj_weight.copy_(dense_weight(self.in_proj))
            if self.has_bias:
                mha.in_proj_bias.copy_(self.in_proj.bias)
        else:
            projs = (self.q_proj, self.k_proj, self.v_proj)
            if self._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([dense_weight(p) for p in projs]))
            else:
                for name, p in zip(("q", "k", "v"), projs, strict=True):
                    getattr(mha, f"{name}_proj_weight").copy_(dense_weight(p))
            if self.has_bias:
                for i, p in enumerate(projs):
                    mha.in_proj_bias[i * e : (i + 1) * e].copy_(p.bias)
        mha.out_proj.weight.copy_(dense_weight(self.out_proj))
        if self.has_bias:
            mha.out_proj.bias.copy_(self.out_proj.bias)
        mha.train(self.training)
        return mha

    def projections(self) -> dict[str, nn.Module]:
        """``{name: layer}`` of the projections (``in_proj`` or ``q/k/v_proj``, ``out_proj``)."""
        names = ("in_proj",) if self.qkv == "packed" else ("q_proj", "k_proj", "v_proj")
        return {n: getattr(self, n) for n in (*names, "out_proj")}

    def spec(self) -> dict:
        """What rebuilds this module's structure (the projections have their own specs)."""
        return {"type": "multihead_attention", "qkv": self.qkv}

    # nn.TransformerEncoderLayer reads these to decide on its fused inference path, which
    # needs the packed dense parameters; None makes it take the ordinary path through us.
    @property
    def in_proj_bias(self) -> Tensor | None:
        return None

    @property
    def in_proj_weight(self) -> Tensor | None:
        return None

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same signature, shapes and results as ``nn.MultiheadAttention.forward``."""
        self_attention = query is key and key is value
        kv_same = key is value
        batched = query.dim() == 3
        if batched and not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        elif not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        n, tgt_len, _ = query.shape
        src_len = key.shape[1]
        h, hd = self.num_heads, self.head_dim

        q, k, v = self._project(query, key, value, self_attention, kv_same)
        q = q.view(n, tgt_len, h, hd).transpose(1, 2)
        k = k.view(n, src_len, h, hd).transpose(1, 2)
        v = v.view(n, src_len, h, hd).transpose(1, 2)

        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            # As PyTorch: the hint alone drives the kernel; the given mask is assumed causal.
            mask = None
        else:
            mask = self._merged_mask(attn_mask, key_padding_mask, q.dtype, n, tgt_len, src_len)
            if key_padding_mask is not None:
                is_causal = False  # a padded causal mask is no longer purely causal
        dropout_p = self.dropout if self.training else 0.0

        weights: Tensor | None = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                probs = F.dropout(probs, p=dropout_p)
            out = probs @ v
            weights = probs.mean(dim=1) if average_attn_weights else probs
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)

        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt_len, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, kv_same: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        if self.qkv == "separate":
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self_attention:
            return self.in_proj(query).chunk(3, dim=-1)
        e = self.embed_dim
        q = _rows(self.in_proj, query, 0, e)
        if kv_same:
            k, v = _rows(self.in_proj, key, e, 3 * e).chunk(2, dim=-1)
            return q, k, v
        return q, _rows(self.in_proj, key, e, 2 * e), _rows(self.in_proj, value, 2 * e, 3 * e)

    def _merged_mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        dtype: torch.dtype,
        n: int,
        tgt_len: int,
        src_len: int,
    ) -> Tensor | None:
        """One additive mask broadcastable to (N, H, L, S), as PyTorch builds it."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, "attn_mask", dtype)
            if mask.dim() == 2:
                if mask.shape != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {tuple(mask.shape)}, but should be "
                        f"{(tgt_len, src_len)}."
                    )
                mask = mask.view(1, 1, tgt_len, src_len)
            elif mask.dim() == 3:
                if mask.shape != (n * self.num_heads, tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {tuple(mask.shape)}, but should be "
                        f"{(n * self.num_heads, tgt_len, src_len)}."
                    )
                mask = mask.view(n, self.num_heads, tgt_len, src_len)
            else:
                raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (n, src_len):
                raise RuntimeError(
                    f"expecting key_padding_mask shape of {(n, src_len)}, but got "
                    f"{tuple(key_padding_mask.shape)}"
                )
            kpm = _additive(key_padding_mask, "key_padding_mask", dtype).view(n, 1, 1, src_len)
            mask = kpm if mask is None else mask + kpm
        return mask

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, qkv={self.qkv}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}"
        )


def dense_weight(layer: nn.Module) -> Tensor:
    """The m×n weight of a dense or low-rank Linear projection."""
    if isinstance(layer, LowRankLinear):
        return layer.weight_matrix()
    return layer.weight


def expand_attention(
    model: nn.Module, qkv: QKVLayout = "packed", names: set[str] | None = None
) -> list[str]:
    """Re-express every ``nn.MultiheadAttention`` of ``model`` (or those in ``names``) as a
    :class:`LowRankMultiheadAttention` with dense projections, in place; return their names.

    The model computes the same function, and in the packed layout with the same Parameter
    objects. Modules with ``add_bias_kv``/``add_zero_attn`` are left as they are.
    """
    done = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.MultiheadAttention or (names is not None and name not in names):
            continue
        if module.bias_k is not None or module.add_zero_attn:
            continue
        if not name:
            raise LorankError("cannot replace the root module; wrap the attention in a container")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LowRankMultiheadAttention.from_mha(module, qkv))
        done.append(name)
    return done


def apply_attention_specs(model: nn.Module, specs: dict[str, dict]) -> None:
    """Give the named attention modules of ``model`` the saved layout (see :meth:`spec`)."""
    modules = dict(model.named_modules())
    for name, spec in specs.items():
        module = modules.get(name)
        qkv = spec.get("qkv", "packed")
        if isinstance(module, LowRankMultiheadAttention):
            if module.qkv == qkv:
                continue
            module = module.to_mha()
        if not isinstance(module, nn.MultiheadAttention):
            raise LorankError(
                f"checkpoint has an attention module {name!r} that this model lacks; "
                "load it with the architecture it was trained with"
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LowRankMultiheadAttention.from_mha(module, qkv))


def _reuse(linear: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
    if bias is not None:
        linear.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)


def _rows(layer: nn.Module, x: Tensor, start: int, stop: int) -> Tensor:
    """Output features ``start:stop`` of ``layer(x)`` without computing the others."""
    bias = None if layer.bias is None else layer.bias[start:stop]
    if type(layer) is nn.Linear:
        return F.linear(x, layer.weight[start:stop], bias)
    if type(layer).forward is LowRankLinear.forward and not layer.kls_gradients:
        return F.linear(F.linear(x, layer.V.T), layer.output_factor()[start:stop], bias)
    # An unknown subclass, or DLRT's K/L/S gradient mode (its own backward): run it whole.
    return layer(x)[..., start:stop]


def _additive(mask: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask
