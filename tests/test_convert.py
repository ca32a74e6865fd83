"""Model surgery: convert, merge, save/load round trips, conversion reports."""

import pytest
import torch
from torch import nn

import lorank
from lorank import LorankError, LowRankConfig, LowRankLinear
from lorank.data import DatasetInfo
from lorank.models import LeNet5Config, MLPConfig, ResNet20Config, build_model


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 5)
    )


def test_full_rank_conversion_keeps_outputs_and_merge_round_trips():
    model = mlp().double()
    x = torch.randn(7, 20, dtype=torch.float64)
    before = model(x)
    report = lorank.convert(
        model, LowRankConfig(rank=1.0, skip_if_no_savings=False, keep_last_dense=False)
    )
    assert len(report.converted) == 3
    torch.testing.assert_close(model(x), before, atol=1e-12, rtol=0)
    lorank.merge(model)
    assert not lorank.low_rank_layers(model)
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))
    torch.testing.assert_close(model(x), before, atol=1e-12, rtol=0)


def test_targets_exclude_keep_last_and_skip():
    model = mlp()
    report = lorank.convert(model, LowRankConfig(rank=4, keep_last_dense=True))
    status = {e.name: e.status for e in report.layers}
    assert status == {"0": "converted", "2": "converted", "4": "kept"}
    model = mlp()
    report = lorank.convert(model, LowRankConfig(rank=4, target_modules=["2"]))
    assert [e.name for e in report.converted] == ["2"]
    model = mlp()
    report = lorank.convert(
        model, LowRankConfig(rank=4, target_modules=r"[02]", exclude_modules=["0"])
    )
    assert [e.name for e in report.converted] == ["2"]
    # rank 20 of a 30x30 layer costs 1200 > 900: skipped, reported, left dense
    model = mlp()
    report = lorank.convert(model, LowRankConfig(rank=20, target_modules=["2"]))
    assert report.layers[0].status == "skipped" and "saves no parameters" in report.layers[0].reason
    assert isinstance(model[2], nn.Linear)


def test_rank_pattern_and_method_core():
    model = mlp()
    lorank.convert(model, LowRankConfig(method="dlrt", rank=3, rank_pattern={"2": 5}))
    assert model[0].core == "full" and model[0].rank == 3 and model[2].rank == 5
    model = mlp()
    lorank.convert(model, LowRankConfig(method="factorized", rank=3))
    assert model[0].core == "none"


def test_unmatched_target_is_an_error():
    with pytest.raises(LorankError, match="matched no"):
        lorank.convert(mlp(), LowRankConfig(target_modules=["nope"]))


def test_grouped_conv_skipped_by_default_refused_when_targeted():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 3))
    report = lorank.convert(model, LowRankConfig(rank=2))
    assert report.layers[0].status == "skipped"
    with pytest.raises(LorankError, match="groups=2"):
        lorank.convert(
            nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)), LowRankConfig(rank=2, target_modules=["0"])
        )


def test_report_lists_every_layer_of_resnet20_and_forward_shapes_hold():
    info = DatasetInfo("cifar10", "classification", (3, 32, 32), 10, None, 10, 10)
    model = build_model(ResNet20Config(), info)
    n_layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    report = lorank.convert(model, LowRankConfig(rank=0.5, skip_if_no_savings=False))
    assert len(report.layers) == n_layers == 20  # 19 convs + fc (option-A shortcuts)
    assert "converted" in str(report)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_save_load_round_trip_with_changed_ranks(tmp_path):
    info = DatasetInfo("mnist", "classification", (1, 28, 28), 10, None, 10, 10)
    model = build_model(LeNet5Config(), info)
    lorank.convert(model, LowRankConfig(method="svd", rank=0.5, skip_if_no_savings=False))
    layers = lorank.low_rank_layers(model)
    first = next(iter(layers.values()))
    first.truncate(2)
    first.freeze_bases()
    meta = {"model": LeNet5Config().model_dump(), "data_info": info.__dict__}
    lorank.save(model, tmp_path / "ckpt", meta)
    x = torch.randn(3, 1, 28, 28)
    loaded = lorank.load(tmp_path / "ckpt")
    torch.testing.assert_close(loaded(x), model(x))
    assert lorank.low_rank_layers(loaded)[next(iter(layers))].rank == 2
    assert not next(iter(lorank.low_rank_layers(loaded).values())).U.requires_grad
    # also into a freshly built dense model of the same architecture
    again = lorank.load(tmp_path / "ckpt.safetensors", build_model(LeNet5Config(), info))
    torch.testing.assert_close(again(x), model(x))


def test_load_errors_are_clear(tmp_path):
    info = DatasetInfo("synthetic", "classification", (20,), 5, None, 10, 10)
    model = build_model(MLPConfig(hidden=[8]), info)
    lorank.save(
        model,
        tmp_path / "m",
        {"model": MLPConfig(hidden=[8]).model_dump(), "data_info": info.__dict__},
    )
    other = build_model(MLPConfig(hidden=[9]), info)
    with pytest.raises(LorankError, match="does not fit this model"):
        lorank.load(tmp_path / "m", other)
    (tmp_path / "m.safetensors").write_bytes(b"garbage")
    with pytest.raises(LorankError, match="corrupt"):
        lorank.load(tmp_path / "m")
    with pytest.raises(LorankError, match="not found"):
        lorank.load(tmp_path / "nothing")


def test_gpt2_conv1d_converts_when_transformers_is_installed():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (2, 8))
    before = model(ids).logits
    report = lorank.convert(
        model, LowRankConfig(rank=1.0, skip_if_no_savings=False, exclude_modules=["lm_head"])
    )
    assert any(e.kind == "Conv1D" for e in report.converted)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)
    lorank.convert(model, LowRankConfig(rank=4, exclude_modules=["lm_head"]))
    assert model(ids).logits.shape == before.shape


def test_hf_style_conv1d_stores_transposed_weight():
    class Conv1D(nn.Module):  # the shape contract of transformers.pytorch_utils.Conv1D
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.randn(nf))

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)

    model = nn.Sequential(Conv1D(6, 10))
    x = torch.randn(4, 10)
    before = model(x)
    lorank.convert(model, LowRankConfig(rank=1.0, skip_if_no_savings=False, target_modules=["0"]))
    assert isinstance(model[0], LowRankLinear)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
