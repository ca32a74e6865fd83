"""The layer-adapter registry: every layer kind converts exactly at full rank, merges back to
its own class, has a read-only ``weight``, calibrates on the right rows; tied and shared
Parameters stay dense; the report lists every layer with its reason."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorank
from lorank import LorankError, LowRankConfig
from lorank.core.adapters import (
    adapter_for,
    dense_matrix,
    input_rows,
    low_rank_from,
    low_rank_from_factors,
)
from lorank.core.convert import plan
from lorank.core.layers import (
    LowRankConv1d,
    LowRankConv2d,
    LowRankEmbedding,
    LowRankHFConv1D,
    LowRankLinear,
)
from lorank.core.metrics import parameter_counts


class Conv1D(nn.Module):
    """The shape contract of transformers.pytorch_utils.Conv1D: weight (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).reshape(
            *x.shape[:-1], self.nf
        )


def _cases():
    torch.manual_seed(0)
    return [
        (nn.Linear(9, 7), torch.randn(3, 4, 9), LowRankLinear),
        (nn.Conv2d(3, 5, 3, stride=2, padding=1), torch.randn(2, 3, 9, 8), LowRankConv2d),
        (nn.Conv1d(4, 6, 3, padding=2, dilation=2), torch.randn(2, 4, 11), LowRankConv1d),
        (nn.Conv1d(4, 6, 3, padding="same", bias=False), torch.randn(2, 4, 10), LowRankConv1d),
        (nn.Conv1d(4, 6, 5, stride=2), torch.randn(2, 4, 12), LowRankConv1d),
        (nn.Embedding(11, 6, padding_idx=0), torch.randint(0, 11, (3, 5)), LowRankEmbedding),
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("core", ["full", "diag", "none"])
def test_every_kind_is_exact_at_full_rank_and_merges_back(case, core):
    dense, x, low_rank_type = _cases()[case]
    dense = dense.double()
    x = x.double() if x.is_floating_point() else x
    layer = low_rank_from(dense, 1.0, core)
    assert type(layer) is low_rank_type
    torch.testing.assert_close(layer(x), dense(x), atol=1e-12, rtol=0)
    # weight: U S Vᵀ in the dense layout, read-only, no Parameter and no state_dict entry
    torch.testing.assert_close(layer.weight, dense.weight, atol=1e-12, rtol=0)
    assert layer.weight.dtype == layer.U.dtype and "weight" not in layer.state_dict()
    back = layer.to_dense()
    assert type(back) is type(dense)
    torch.testing.assert_close(back(x), dense(x), atol=1e-12, rtol=0)
    fresh = type(dense)(*_ctor_args(dense)).double()
    fresh.load_state_dict(back.state_dict())  # the merged layer loads into the original class
    torch.testing.assert_close(fresh(x), dense(x), atol=1e-12, rtol=0)


def _ctor_args(m):
    if isinstance(m, nn.Embedding):
        return m.num_embeddings, m.embedding_dim, m.padding_idx
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, 1,
            m.bias is not None)  # fmt: skip


def test_hf_conv1d_keeps_its_transposed_layout():
    torch.manual_seed(1)
    dense = Conv1D(6, 10).double()
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    layer = low_rank_from(dense, 1.0)
    assert type(layer) is LowRankHFConv1D and isinstance(layer, LowRankLinear)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-12, rtol=0)
    assert layer.weight.shape == (10, 6)  # Conv1D's (in, out)
    torch.testing.assert_close(layer.weight, dense.weight, atol=1e-12, rtol=0)
    torch.testing.assert_close(dense_matrix(dense), dense.weight.T)


def test_weight_is_read_only_and_parameters_stay_the_factors():
    layer = LowRankLinear.from_linear(nn.Linear(8, 6), 3)
    with pytest.raises(LorankError, match="weight is U S Vᵀ"):
        layer.weight = nn.Parameter(torch.zeros(6, 8))
    with pytest.raises(LorankError, match="weight is U S Vᵀ"):
        layer.weight = torch.zeros(6, 8)
    assert sorted(n for n, _ in layer.named_parameters()) == ["S", "U", "V", "bias"]
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 4
    layer.weight.sum().backward()  # gradients flow to the factors through the property
    assert layer.U.grad is not None and layer.V.grad is not None


class SeqNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.out = nn.Linear(8, 4)

    def forward(self, ids):
        return self.out(self.conv(self.emb(ids).transpose(1, 2)).mean(-1))


def test_weight_follows_dtype_and_save_load_rebuilds_new_kinds(tmp_path):
    model = SeqNet()
    lorank.convert(
        model, LowRankConfig(rank=3, skip_if_no_savings=False, target_modules=["emb", "conv"])
    )
    model.to(torch.float64)
    assert model.emb.weight.dtype == torch.float64 and model.emb.weight.shape == (10, 8)
    lorank.save(model, tmp_path / "m")
    loaded = lorank.load(tmp_path / "m", SeqNet().double())
    assert type(loaded.emb) is LowRankEmbedding and type(loaded.conv) is LowRankConv1d
    ids = torch.randint(0, 10, (2, 6))
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_embedding_lookup_never_forms_the_table():
    emb = nn.Embedding(1000, 16)
    layer = low_rank_from(emb, 4)
    ids = torch.randint(0, 1000, (3, 7))
    # the forward gathers rows of V (vocab×r) and maps them by (U S)ᵀ (dim×r)
    expected = layer.V[ids] @ layer.output_factor().T
    torch.testing.assert_close(layer(ids), expected)
    assert layer.params_eval == 4 * (1000 + 16)


@settings(max_examples=25, deadline=None)
@given(
    cin=st.integers(1, 5),
    cout=st.integers(1, 5),
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    length=st.integers(8, 14),
)
def test_conv1d_rows_times_weight_are_the_conv_output(
    cin, cout, k, stride, padding, dilation, length
):
    torch.manual_seed(cin * 7 + cout)
    conv = nn.Conv1d(cin, cout, k, stride, padding, dilation, bias=False).double()
    x = torch.randn(2, cin, length, dtype=torch.float64)
    rows = input_rows(conv, x)  # (B·L_out) × (C_in·k)
    y = conv(x)  # B × C_out × L_out
    torch.testing.assert_close(rows @ dense_matrix(conv).T, y.transpose(1, 2).reshape(-1, cout))
    low = low_rank_from(conv, 1.0)
    torch.testing.assert_close(input_rows(low, x), rows)


class TiedNet(nn.Module):
    """Conv2d, depthwise Conv2d, Conv1d, ConvTranspose2d, BatchNorm, an Embedding and a head
    tied to it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.seq = nn.Conv1d(4, 16, 3, padding=1)
        self.emb = nn.Embedding(30, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 30, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, image, ids):
        h = self.up(self.depthwise(torch.relu(self.bn(self.conv(image)))))  # B×4×16×16
        h = self.seq(h.flatten(2)).mean(-1)  # B×16
        t = self.emb(ids) + h[:, None]  # B×T×16
        return self.head(torch.tanh(self.mix(t)))


def _unique(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_custom_net_every_layer_converted_or_listed_and_ties_hold():
    torch.manual_seed(0)
    model = TiedNet().double().eval()
    original = TiedNet().double().eval()
    original.load_state_dict(model.state_dict())
    image, ids = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(0, 30, (2, 5))
    before = model(image, ids)
    n_before = _unique(model)
    report = lorank.convert(model, LowRankConfig(rank=1.0, skip_if_no_savings=False))
    status = {e.name: (e.status, e.reason) for e in report.layers}
    assert {n for n, (s, _) in status.items() if s == "converted"} == {"conv", "seq", "mix"}
    assert "depthwise" in status["depthwise"][1]
    assert "no low-rank adapter for ConvTranspose2d" in status["up"][1]
    assert status["head"][1] == "tied: its weight is emb.weight; kept dense so the tie holds"
    assert "only when named in target_modules" in status["emb"][1]
    assert set(status) == {"conv", "depthwise", "up", "seq", "emb", "mix", "head"}  # BN: no W
    assert model.head.weight is model.emb.weight  # the tie holds
    torch.testing.assert_close(model(image, ids), before, atol=1e-10, rtol=0)
    # counts over unique Parameters: the shared table once, low-rank layers by their factors
    assert report.model_params_before == n_before == parameter_counts(original)["params_eval"]
    counts = parameter_counts(model)
    assert report.model_params_after == counts["params_eval"]  # r(m+n)+bias, a diagonal S free
    assert _unique(model) == counts["params_train"]  # every unique Parameter, S included
    assert report.model_params_after - report.model_params_before == sum(
        e.params_after - e.params_before for e in report.layers
    )
    lorank.merge(model)
    assert type(model.seq) is nn.Conv1d and model.head.weight is model.emb.weight
    fresh = TiedNet().double().eval()
    fresh.load_state_dict(model.state_dict())
    assert fresh.head.weight is fresh.emb.weight
    torch.testing.assert_close(fresh(image, ids), before, atol=1e-10, rtol=0)


def test_naming_a_tied_or_unsupported_layer_is_an_error():
    with pytest.raises(LorankError, match="cannot convert 'head': tied: its weight is emb.weight"):
        lorank.convert(TiedNet(), LowRankConfig(rank=2, target_modules=["head"]))
    with pytest.raises(LorankError, match="cannot convert 'emb': tied: its weight is head.weight"):
        lorank.convert(TiedNet(), LowRankConfig(rank=2, target_modules=["emb"]))
    with pytest.raises(LorankError, match="no low-rank adapter for ConvTranspose2d"):
        lorank.convert(TiedNet(), LowRankConfig(rank=2, target_modules=["up"]))


def test_shared_module_is_kept_dense():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(6, 2))
    report = lorank.convert(model, LowRankConfig(rank=2, keep_last_dense=False))
    assert report.layers[0].reason.startswith("module shared with 2")
    assert model[0] is model[2] and type(model[0]) is nn.Linear


def test_filter_fn_and_targeted_embedding():
    model = nn.Sequential(nn.Embedding(40, 12), nn.Linear(12, 12), nn.Linear(12, 12))
    report = lorank.convert(
        model,
        LowRankConfig(rank=2, keep_last_dense=False, filter_fn=lambda m, fqn: fqn != "1"),
    )
    assert [e.name for e in report.converted] == ["2"]
    assert "only when named in target_modules" in report.layers[0].reason
    report = lorank.convert(model, LowRankConfig(rank=2, target_modules=["0"]))
    assert [e.name for e in report.converted] == ["0"] and type(model[0]) is LowRankEmbedding


def test_one_output_layer_default_and_method_validated():
    assert LowRankConfig().keep_last_dense is True
    for name in lorank.methods.registry.METHODS:
        config = lorank.methods.build({"name": name}).config
        if hasattr(config, "keep_last_dense"):
            assert config.keep_last_dense is True, name
    with pytest.raises(ValueError, match="unknown method 'dlrtt'"):
        LowRankConfig(method="dlrtt")
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    assert [p.reason for p in plan(model, LowRankConfig())][1].startswith("kept dense")


def test_every_registered_kind_has_an_adapter_for_its_low_rank_layer():
    for dense, _, low_rank_type in _cases():
        adapter = adapter_for(dense)
        assert adapter is not None and adapter.low_rank_type is low_rank_type
        assert adapter_for(low_rank_from(dense, 1)) is adapter


def test_a_subclass_of_a_low_rank_layer_uses_its_parents_adapter():
    from lorank.methods.nnsvd import SymmetricLowRankLinear

    layer = SymmetricLowRankLinear.from_linear(nn.Linear(6, 6), 2)
    assert adapter_for(layer).name == "linear"
    assert adapter_for(LowRankHFConv1D(4, 3, 2)).name == "hf_conv1d"


@pytest.mark.parametrize("case", range(6))
def test_a_layer_from_given_factors_equals_the_one_from_its_own_svd(case):
    # low_rank_from_factors skips the SVD and the random init; the layer must be the same.
    dense, x, _ = _cases()[case]
    dense = dense.double()
    x = x.double() if x.is_floating_point() else x
    u, sigma, vh = torch.linalg.svd(dense_matrix(dense), full_matrices=False)
    layer = low_rank_from_factors(dense, u[:, :3], sigma[:3], vh[:3].T)
    reference = low_rank_from(dense, 3)
    assert type(layer) is type(reference) and layer.U.dtype == torch.float64
    torch.testing.assert_close(layer(x), reference(x), atol=1e-12, rtol=0)
