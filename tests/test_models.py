import pytest
import torch
from torch import nn

from lorank.data import DatasetInfo
from lorank.errors import LorankError
from lorank.models import (
    CharTransformerConfig,
    LeNet5Config,
    MLPConfig,
    ResNet20Config,
    VGGConfig,
    build_model,
    model_config_from_dict,
)

MNIST = DatasetInfo("mnist", "classification", (1, 28, 28), 10, None, 60000, 10000)
CIFAR = DatasetInfo("cifar10", "classification", (3, 32, 32), 10, None, 50000, 10000)
TEXT = DatasetInfo("tinyshakespeare", "language_model", (16,), 65, "x" * 65, 100, 10)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("cfg", "info"),
    [
        (MLPConfig(), MNIST),
        (MLPConfig(hidden=[32], activation="gelu", dropout=0.1), CIFAR),
        (LeNet5Config(), MNIST),
        (LeNet5Config(), CIFAR),
        (ResNet20Config(), CIFAR),
        (ResNet20Config(width=4), MNIST),
        (VGGConfig(), CIFAR),
        (VGGConfig(channels=[8, "M", 16, "M"], hidden=32), MNIST),
    ],
)
def test_classifier_output_shape(cfg, info):
    model = build_model(cfg, info)
    assert model(torch.randn(2, *info.input_shape)).shape == (2, 10)


def test_transformer_output_shape_and_causality():
    model = build_model(CharTransformerConfig(n_layer=2, d_model=32), TEXT).eval()
    idx = torch.randint(0, 65, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 65)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 65
    with torch.no_grad():
        after = model(changed)
    assert torch.allclose(logits[:, :10], after[:, :10], atol=1e-6)  # no peeking ahead
    assert not torch.allclose(logits[:, 10:], after[:, 10:])


def test_parameter_counts():
    mlp = build_model(MLPConfig(), MNIST)
    assert n_params(mlp) == 784 * 500 + 500 + 3 * (500 * 500 + 500) + 500 * 10 + 10
    assert n_params(build_model(ResNet20Config(), CIFAR)) == 269_722  # the paper's 0.27M
    assert n_params(build_model(LeNet5Config(), MNIST)) == 61_706


def test_layer_names_run_input_to_output():
    mlp = build_model(MLPConfig(), MNIST)
    linears = [(n, m) for n, m in mlp.named_modules() if isinstance(m, nn.Linear)]
    assert [n for n, _ in linears] == ["layers.0", "layers.2", "layers.4", "layers.6", "layers.8"]
    assert [m.in_features for _, m in linears] == [784, 500, 500, 500, 500]
    gpt = build_model(CharTransformerConfig(n_layer=1), TEXT)
    names = [n for n, m in gpt.named_modules() if isinstance(m, nn.Linear)]
    expected = ["attn.q", "attn.k", "attn.v", "attn.proj", "fc1", "fc2"]
    assert names == [f"blocks.0.{n}" for n in expected] + ["head"]


@pytest.mark.parametrize(
    ("cfg", "info"),
    [
        (MLPConfig(), MNIST),
        (LeNet5Config(), CIFAR),
        (ResNet20Config(), CIFAR),
        (VGGConfig(), CIFAR),
        (CharTransformerConfig(), TEXT),
    ],
)
def test_weights_live_in_convertible_layers(cfg, info):
    allowed = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.BatchNorm2d)
    for module in build_model(cfg, info).modules():
        if list(module.parameters(recurse=False)):
            assert isinstance(module, allowed), type(module)


def test_task_and_shape_mismatches_are_user_errors():
    with pytest.raises(LorankError, match="char_transformer"):
        build_model(MLPConfig(), TEXT)
    with pytest.raises(LorankError, match="tinyshakespeare"):
        build_model(CharTransformerConfig(), MNIST)
    flat = DatasetInfo("synthetic", "classification", (20,), 4, None, 10, 10)
    with pytest.raises(LorankError, match="image"):
        build_model(ResNet20Config(), flat)
    with pytest.raises(LorankError, match="below 1x1"):
        build_model(VGGConfig(channels=[8, "M", "M", "M", "M", "M", "M"]), CIFAR)


def test_model_config_round_trip():
    for cfg in (MLPConfig(hidden=[8]), VGGConfig(), CharTransformerConfig(n_head=2)):
        assert model_config_from_dict(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(LorankError, match="divisible"):
        model_config_from_dict({"name": "char_transformer", "d_model": 10, "n_head": 3})
    with pytest.raises(LorankError, match="invalid model config"):
        model_config_from_dict({"name": "mlp", "widths": [3]})
    with pytest.raises(LorankError, match="invalid model config"):
        model_config_from_dict({"name": "resnet56"})


def test_phil_kim_cnn_matches_the_book():
    """Phil Kim, MATLAB Deep Learning (Apress, 2017), MnistConv: W1 9x9x20, W5 100x2000,
    Wo 10x100 and no biases: 1,620 + 200,000 + 1,000 = 202,620 weights."""
    from lorank.models import PhilKimCNNConfig

    book = build_model(PhilKimCNNConfig(bias=False), MNIST)
    assert n_params(book) == 9 * 9 * 20 + 2000 * 100 + 100 * 10 == 202_620
    conv, relu, pool = book.features
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (1, 20, (9, 9))
    assert isinstance(relu, nn.ReLU) and isinstance(pool, nn.AvgPool2d)
    x = torch.randn(3, 1, 28, 28)
    assert conv(x).shape == (3, 20, 20, 20)
    assert book.features(x).shape == (3, 20, 10, 10)
    shapes = [tuple(m.weight.shape) for m in book.layers if isinstance(m, nn.Linear)]
    assert shapes == [(100, 2000), (10, 100)]
    assert book(x).shape == (3, 10)
    # The pooling is a mean, not a max: a constant image pools to the conv response itself.
    with torch.no_grad():
        pooled = book.features(torch.ones(1, 1, 28, 28))
        assert torch.allclose(pooled, torch.relu(conv(torch.ones(1, 1, 28, 28)))[..., :10, :10])
    # lorank's default adds one bias per filter and per unit.
    assert n_params(build_model(PhilKimCNNConfig(), MNIST)) == 202_620 + 20 + 100 + 10
    assert build_model(PhilKimCNNConfig(), CIFAR)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_phil_kim_cnn_rejects_a_kernel_larger_than_the_image():
    from lorank.models import PhilKimCNNConfig

    with pytest.raises(LorankError, match="kernel 28"):
        build_model(PhilKimCNNConfig(kernel=28), MNIST)


@pytest.mark.parametrize(
    ("config", "method"),
    [
        ("phil-kim-cnn-mnist-dense.toml", None),
        ("phil-kim-cnn-fashion-mnist-svd.toml", None),
        ("phil-kim-cnn-mnist-svd.toml", "{name='factorized', rank=0.5}"),
        ("phil-kim-cnn-mnist-svd.toml", "{name='dlrt', tolerance=0.2}"),
        ("phil-kim-cnn-mnist-svd.toml", "{name='oialr', delay=1, frequency=1}"),
    ],
)
def test_phil_kim_cnn_trains_with_the_gradient_methods(config, method, tmp_path, data_root):
    """One short epoch of each method on the CNN through its config (a smoke test)."""
    import json

    from lorank.training.config import load_config
    from lorank.training.trainer import train

    sets = ["data.train_subset=300", "data.test_subset=200", "train.epochs=1", "train.threads=1"]
    if method:
        sets.append(f"method={method}")
    else:
        sets.append("method.finetune_epochs=0" if "svd" in config else "train.seed=1")
    cfg = load_config(config, sets)  # a packaged config by name
    run = train(cfg, tmp_path / "run", quiet=True, data_dir=data_root)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["test_acc"] > 0.2  # above chance after 3 steps of 100
    if cfg.method.name != "dense":
        assert set(summary["ranks"]) >= {"layers.0"}  # the 2000 -> 100 layer is low-rank


def test_lenet5_widths_give_the_dlrt_papers_variant():
    paper = LeNet5Config(channels=(20, 50), hidden=[500], pad=False)
    model = build_model(paper, MNIST)
    assert n_params(model) == 431_080  # conv 1→20, 20→50 (5×5), fc 800→500, 500→10
    assert model.classifier[0].in_features == 800
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert n_params(build_model(LeNet5Config(), MNIST)) == 61_706  # classic default unchanged
    with pytest.raises(LorankError, match="larger inputs"):
        build_model(paper, DatasetInfo("tiny", "classification", (1, 12, 12), 10, None, 1, 1))
