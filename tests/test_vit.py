"""The model-zoo ViT: shapes, and every low-rank method on its attention and MLP projections."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorank
from lorank.core.attention import LowRankMultiheadAttention
from lorank.core.layers import LowRankLinear
from lorank.core.optim import optimizer_holds_only
from lorank.data import DatasetInfo
from lorank.errors import LorankError
from lorank.methods import build
from lorank.models import ViT, ViTConfig, build_model, model_config_from_dict

torch.set_num_threads(1)

MNIST = DatasetInfo("mnist", "classification", (1, 28, 28), 10, None, 60000, 10000)
CIFAR = DatasetInfo("cifar10", "classification", (3, 32, 32), 10, None, 50000, 10000)
TINY = ViTConfig(patch_size=7, dim=16, depth=2, heads=2)


@pytest.mark.parametrize(
    ("cfg", "info"),
    [
        (ViTConfig(), MNIST),
        (ViTConfig(patch_size=4, pool="mean", patch_embed="linear"), CIFAR),
        (ViTConfig(patch_size=4, dim=24, depth=1, heads=3, mlp_ratio=4), MNIST),
        (ViTConfig(patch_size=8, pool="cls", patch_embed="linear"), CIFAR),
    ],
)
def test_vit_output_shape(cfg, info):
    model = build_model(cfg, info)
    x = torch.randn(3, *info.input_shape)
    assert model(x).shape == (3, 10)
    attn = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attn) == cfg.depth and all(a.batch_first for a in attn)
    tokens = (info.input_shape[1] // cfg.patch_size) ** 2 + (cfg.pool == "cls")
    assert model.pos_embed.shape == (1, tokens, cfg.dim)


def test_vit_linear_and_conv_patch_embeddings_agree():
    """The Linear embedding of flattened (C, p, p) patches is the strided conv."""
    conv = build_model(ViTConfig(patch_size=4), CIFAR)
    lin = build_model(ViTConfig(patch_size=4, patch_embed="linear"), CIFAR)
    with torch.no_grad():
        lin.patch_embed.weight.copy_(conv.patch_embed.weight.flatten(1))
        lin.patch_embed.bias.copy_(conv.patch_embed.bias)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(lin.tokens(x), conv.tokens(x), atol=1e-5, rtol=1e-5)


def test_vit_config_errors():
    with pytest.raises(LorankError, match="patch_size 5"):
        build_model(ViTConfig(patch_size=5), MNIST)
    with pytest.raises(LorankError, match="divisible"):
        model_config_from_dict({"name": "vit", "dim": 10, "heads": 4})
    assert model_config_from_dict({"name": "vit"}) == ViTConfig()


def test_default_vit_size():
    n = sum(p.numel() for p in build_model(ViTConfig(), MNIST).parameters())
    assert 100_000 < n < 200_000  # the docstring's 0.14M


def test_convert_targets_attention_and_mlp_keeps_patch_embedding_dense():
    model = build_model(TINY, MNIST)
    x = torch.randn(4, 1, 28, 28)
    report = lorank.convert(
        model, lorank.LowRankConfig(rank=1.0, skip_if_no_savings=False, keep_last_dense=True)
    )
    names = {e.name for e in report.converted}
    expected = {
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn.in_proj", "attn.out_proj", "fc1", "fc2")
    }
    assert names == expected  # not patch_embed (dense by default), not head (keep_last_dense)
    assert isinstance(model.blocks[0].attn, LowRankMultiheadAttention)
    out = model(x)
    lorank.merge(model)
    assert type(model.blocks[0].attn) is nn.MultiheadAttention
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-4)
    explicit = lorank.convert(
        build_model(TINY, MNIST), lorank.LowRankConfig(rank=2, target_modules=["patch_embed"])
    )
    assert [e.name for e in explicit.converted] == ["patch_embed"]


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


# method config -> what must be low-rank after the steps
METHODS = {
    "factorized": {"rank": 0.5},
    "svd": {"rank": 0.5},
    "nnsvd": {"rank": 0.5},
    "dlrt-bug": {"name": "dlrt", "integrator": "bug", "tolerance": 0.2, "r_min": 1},
    "dlrt-kls": {"name": "dlrt", "integrator": "kls", "tolerance": 0.2, "r_min": 1},
    "oialr": {"delay": 1, "frequency": 1, "cutoff": 0.3},
    "hybrid": {"direction": "dense_to_lowrank", "switch_epoch": 1, "rank_rule": "rank=3"},
    "hybrid-lr2dense": {"name": "hybrid", "direction": "lowrank_to_dense", "switch_epoch": 2},
}


@pytest.mark.parametrize("case", list(METHODS))
def test_every_method_trains_the_vit(case, tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY, MNIST)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    config = {"name": case, **METHODS[case]}
    method = build(config)
    method.attach(loss_fn=loss_fn, calibration=lambda n: [(x, y)], epochs=2)
    method.prepare(model)
    optimizer = torch.optim.Adam(method.parameters(model), lr=1e-3)
    low_rank_at_start = lorank.low_rank_layers(model)
    losses = []
    for epoch in (1, 2):
        for _ in range(2):
            stats = method.train_step(model, optimizer, (x, y), loss_fn)
            losses.append(float(stats["loss"]))
        method.on_epoch_end(model, optimizer, epoch, {"loss_task": losses[-1]})
    assert all(torch.isfinite(torch.tensor(losses)))
    assert optimizer_holds_only(optimizer, model)
    low_rank = low_rank_at_start if case == "hybrid-lr2dense" else lorank.low_rank_layers(model)
    attn_layers = [n for n in low_rank if ".attn." in n]
    assert attn_layers, f"{case} left the attention dense: {list(low_rank)}"
    assert all(isinstance(low_rank[n], LowRankLinear) for n in attn_layers)
    assert "patch_embed" not in low_rank and "head" not in low_rank
    if case == "oialr":  # switched: frozen bases, trainable cores, ranks cut by the updates
        assert method.switched and method.updates
        assert all(
            not low_rank[n].U.requires_grad and low_rank[n].S.requires_grad for n in attn_layers
        )
    # The trained attention survives a save/load round trip through the zoo metadata.
    meta = {"model": TINY.model_dump(mode="json"), "data_info": MNIST.__dict__}
    lorank.save(model, tmp_path / "m", meta)
    model.eval()
    loaded = lorank.load(tmp_path / "m").eval()
    assert isinstance(loaded, ViT)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
