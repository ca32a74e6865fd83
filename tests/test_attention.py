"""LowRankMultiheadAttention: PyTorch's attention semantics, conversion, merge, save/load."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorank
from lorank.core.attention import LowRankMultiheadAttention, expand_attention
from lorank.core.convert import LowRankConfig, convert, low_rank_layers, merge
from lorank.core.layers import LowRankLinear
from lorank.errors import LorankError

torch.set_num_threads(1)

E, H, N, L, S = 16, 4, 3, 5, 6


class Wrap(nn.Module):
    """A container so the attention is not the (unreplaceable) root module."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, *args, **kwargs):
        return self.attn(*args, **kwargs)


def masks(src_len: int) -> dict[str, dict]:
    """Every kind of mask nn.MultiheadAttention takes, for L queries and src_len keys."""
    g = torch.Generator().manual_seed(1)
    kpm = torch.rand(N, src_len, generator=g) > 0.6
    kpm[:, 0] = False  # no row fully masked (PyTorch's two paths disagree on those: NaN vs 0)
    bool_mask = torch.rand(L, src_len, generator=g) > 0.6
    bool_mask[:, 0] = False
    out = {
        "none": {},
        "key_padding_bool": {"key_padding_mask": kpm},
        "key_padding_float": {"key_padding_mask": torch.randn(N, src_len, generator=g)},
        "attn_bool": {"attn_mask": bool_mask},
        "attn_float": {"attn_mask": torch.randn(L, src_len, generator=g)},
        "attn_3d_per_head": {
            "attn_mask": torch.randn(N * H, L, src_len, generator=g),
            "average_attn_weights": False,
        },
        "both": {"attn_mask": bool_mask, "key_padding_mask": kpm},
    }
    if src_len == L:
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
        out["causal"] = {"attn_mask": causal, "is_causal": True}
        out["causal_padded"] = {"attn_mask": causal, "is_causal": True, "key_padding_mask": kpm}
    return out


def inputs(batch_first: bool, self_attention: bool):
    g = torch.Generator().manual_seed(2)

    def t(length):
        shape = (N, length, E) if batch_first else (length, N, E)
        return torch.randn(*shape, generator=g)

    if self_attention:
        x = t(L)
        return x, x, x
    return t(L), t(S), t(S)


def assert_same(mha, attn, q, k, v, kwargs, case=""):
    out1, w1 = mha(q, k, v, **kwargs)
    out2, w2 = attn(q, k, v, **kwargs)
    assert out1.shape == out2.shape, case
    assert torch.isfinite(out1).all(), case
    torch.testing.assert_close(out2, out1, atol=1e-5, rtol=1e-4, msg=case)
    if w1 is None:
        assert w2 is None, case
    else:
        torch.testing.assert_close(w2, w1, atol=1e-5, rtol=1e-4, msg=case)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("qkv", ["packed", "separate"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_wrapper_equals_pytorch_with_masks(batch_first, qkv, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    attn = LowRankMultiheadAttention.from_mha(mha, qkv)
    for self_attention in (True, False):
        q, k, v = inputs(batch_first, self_attention)
        for name, kwargs in masks(L if self_attention else S).items():
            assert_same(mha, attn, q, k, v, {"need_weights": need_weights, **kwargs}, name)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("qkv", ["packed", "separate"])
def test_converted_at_full_rank_equals_original(batch_first, qkv):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    model = Wrap(mha)
    original = Wrap(nn.MultiheadAttention(E, H, batch_first=batch_first))
    original.load_state_dict(model.state_dict())
    report = convert(
        model,
        LowRankConfig(
            keep_last_dense=False,
            rank=1.0,
            core="full",
            skip_if_no_savings=False,
            attention_qkv=qkv,
        ),
    )
    expected = {"in_proj", "out_proj"} if qkv == "packed" else {"q_proj", "k_proj", "v_proj"}
    names = {e.name.split(".")[-1] for e in report.converted}
    assert expected <= names
    assert isinstance(model.attn, LowRankMultiheadAttention)
    assert all(isinstance(m, LowRankLinear) for m in model.attn.projections().values())
    assert set(low_rank_layers(model)) == {f"attn.{n}" for n in model.attn.projections()}
    for self_attention in (True, False):
        q, k, v = inputs(batch_first, self_attention)
        for name, kwargs in masks(L if self_attention else S).items():
            for need_weights in (True, False):
                kwargs = {"need_weights": need_weights, **kwargs}
                assert_same(original, model, q, k, v, kwargs, name)


def test_packed_conversion_reuses_the_parameters():
    """Re-expressing attention mid-training keeps the optimizer's Parameters."""
    model = Wrap(nn.MultiheadAttention(E, H, batch_first=True))
    before = {id(p) for p in model.parameters()}
    expand_attention(model)
    assert {id(p) for p in model.parameters()} == before
    assert type(model.attn.in_proj) is nn.Linear


def test_low_rank_forward_matches_its_merged_weights():
    """Below full rank the module computes attention with W = U S Vᵀ (cross-attention path
    slices the packed factor; self-attention runs the layer whole)."""
    torch.manual_seed(0)
    model = Wrap(nn.MultiheadAttention(E, H, batch_first=True))
    convert(model, LowRankConfig(keep_last_dense=False, rank=3, core="diag"))
    assert model.attn.in_proj.rank == 3
    merged = Wrap(model.attn.to_mha())
    for same in (True, False):
        q, k, v = inputs(True, same)
        assert_same(merged, model, q, k, v, masks(L if same else S)["key_padding_bool"])
    q, k, _ = inputs(True, False)
    assert_same(merged, model, q, k, k, {})  # key is value: the k/v rows in one product


def test_dropout_in_training_matches_pytorch():
    mha = nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True)
    attn = LowRankMultiheadAttention.from_mha(mha)
    mha.train(), attn.train()
    q, _, _ = inputs(True, True)
    for need_weights in (True, False):
        torch.manual_seed(5)
        out1, _ = mha(q, q, q, need_weights=need_weights)
        torch.manual_seed(5)
        out2, _ = attn(q, q, q, need_weights=need_weights)
        torch.testing.assert_close(out2, out1)
    torch.manual_seed(6)
    out3, _ = attn(q, q, q)
    assert not torch.allclose(out3, out2)  # dropout is really on in training
    attn.eval()
    assert torch.equal(attn(q, q, q)[0], attn(q, q, q)[0])


def test_unbatched_inputs():
    mha = nn.MultiheadAttention(E, H)
    attn = LowRankMultiheadAttention.from_mha(mha)
    x = torch.randn(L, E)
    kpm = torch.tensor([False, True, False, False, True])
    assert_same(mha, attn, x, x, x, {"key_padding_mask": kpm})


def test_kdim_vdim_is_separate():
    mha = nn.MultiheadAttention(E, H, kdim=7, vdim=9, batch_first=True)
    attn = LowRankMultiheadAttention.from_mha(mha)
    assert attn.qkv == "separate"
    q, k, v = torch.randn(N, L, E), torch.randn(N, S, 7), torch.randn(N, S, 9)
    assert_same(mha, attn, q, k, v, {})
    back = attn.to_mha()
    torch.testing.assert_close(back.k_proj_weight, mha.k_proj_weight)


@pytest.mark.parametrize("qkv", ["packed", "separate"])
@pytest.mark.parametrize("bias", [True, False])
def test_merge_round_trips_to_plain_mha(qkv, bias):
    torch.manual_seed(0)
    model = Wrap(nn.MultiheadAttention(E, H, bias=bias, batch_first=True))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    convert(
        model,
        LowRankConfig(keep_last_dense=False, rank=1.0, skip_if_no_savings=False, attention_qkv=qkv),
    )
    merge(model)
    assert type(model.attn) is nn.MultiheadAttention
    assert model.attn.batch_first
    assert set(model.state_dict()) == set(state)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=1e-5, rtol=1e-4)


def test_targets_and_exclusions_by_attention_name():
    model = nn.Sequential(
        nn.MultiheadAttention(E, H, batch_first=True),
        nn.MultiheadAttention(E, H, batch_first=True),
    )
    # Sequential would call them with one input; only the module surgery is tested here.
    convert(model, LowRankConfig(keep_last_dense=False, rank=2, exclude_modules=["0"]))
    assert type(model[0]) is nn.MultiheadAttention  # excluded: untouched, out_proj too
    assert type(model[0].out_proj) is not LowRankLinear
    assert set(low_rank_layers(model)) == {"1.in_proj", "1.out_proj"}
    model = nn.Sequential(nn.MultiheadAttention(E, H), nn.MultiheadAttention(E, H))
    convert(model, LowRankConfig(rank=2, target_modules=["1"], rank_pattern={"in_proj": 5}))
    assert set(low_rank_layers(model)) == {"1.in_proj", "1.out_proj"}
    assert model[1].in_proj.rank == 5 and model[1].out_proj.rank == 2


def test_unsupported_attention_is_left_alone():
    model = Wrap(nn.MultiheadAttention(E, H, add_bias_kv=True))
    report = convert(model, LowRankConfig(keep_last_dense=False, rank=2))
    assert not report.converted and type(model.attn) is nn.MultiheadAttention
    with pytest.raises(LorankError, match="add_bias_kv"):
        convert(model, LowRankConfig(rank=2, target_modules=["attn"]))


def test_transformer_encoder_layer_eval_takes_the_ordinary_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    ref = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    ref.load_state_dict(layer.state_dict())
    convert(layer, LowRankConfig(keep_last_dense=False, rank=1.0, skip_if_no_savings=False))
    layer.eval(), ref.eval()
    x = torch.randn(N, L, E)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("qkv", ["packed", "separate"])
def test_save_load_round_trip(tmp_path, qkv):
    torch.manual_seed(0)
    model = Wrap(nn.MultiheadAttention(E, H, batch_first=True))
    convert(model, LowRankConfig(keep_last_dense=False, rank=3, core="full", attention_qkv=qkv))
    model.attn.out_proj.freeze_bases()
    lorank.save(model, tmp_path / "m")
    fresh = lorank.load(tmp_path / "m", Wrap(nn.MultiheadAttention(E, H, batch_first=True)))
    assert isinstance(fresh.attn, LowRankMultiheadAttention) and fresh.attn.qkv == qkv
    assert {n: m.rank for n, m in low_rank_layers(fresh).items()} == {
        n: m.rank for n, m in low_rank_layers(model).items()
    }
    assert not fresh.attn.out_proj.U.requires_grad
    q, k, v = inputs(True, True)
    torch.testing.assert_close(fresh(q, k, v)[0], model(q, k, v)[0])


def test_save_load_of_expanded_dense_attention(tmp_path):
    """A model whose attention was re-expressed but not factorized (OIALR before its switch)
    saves with the wrapper's keys and loads into a plain model."""
    model = Wrap(nn.MultiheadAttention(E, H, batch_first=True))
    expand_attention(model)
    lorank.save(model, tmp_path / "m")
    fresh = lorank.load(tmp_path / "m", Wrap(nn.MultiheadAttention(E, H, batch_first=True)))
    q, k, v = inputs(True, True)
    torch.testing.assert_close(fresh(q, k, v)[0], model(q, k, v)[0])


@settings(max_examples=15, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.integers(1, 6),
    rank=st.floats(0.1, 1.0),
    qkv=st.sampled_from(["packed", "separate"]),
    core=st.sampled_from(["full", "diag", "none"]),
    batch_first=st.booleans(),
)
def test_property_low_rank_attention_is_its_merged_attention(
    heads, head_dim, rank, qkv, core, batch_first
):
    """For any shape, rank and core the converted attention equals the plain attention that
    ``merge`` gives back, and its projections have the requested ranks."""
    e = heads * head_dim
    model = Wrap(nn.MultiheadAttention(e, heads, batch_first=batch_first))
    convert(
        model,
        LowRankConfig(
            keep_last_dense=False, rank=rank, core=core, skip_if_no_savings=False, attention_qkv=qkv
        ),
    )
    layers = low_rank_layers(model)
    assert len(layers) == (2 if qkv == "packed" else 4)
    for layer in layers.values():
        assert layer.full_rank == e
        assert layer.rank == math.ceil(rank * e - 1e-9) or layer.rank == math.ceil(rank * e)
    x = torch.randn(2, 3, e)
    out = model(x, x, x)[0]
    merge(model)
    assert type(model.attn) is nn.MultiheadAttention
    torch.testing.assert_close(model(x, x, x)[0], out, atol=1e-5, rtol=1e-4)
