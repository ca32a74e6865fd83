"""The model zoo: small reference networks for the low-rank benchmarks.

Every weight matrix lives in an ``nn.Linear`` or ``nn.Conv2d`` (plus embeddings and norms), so
the low-rank conversion can find and replace layers by type and by name; the ViT's attention is
PyTorch's ``nn.MultiheadAttention``, whose packed projection the conversion re-expresses as a
layer first (:mod:`lorank.core.attention`). Each model has its own
pydantic config with a ``name`` discriminator, so a saved JSON config rebuilds the same network.

The whole zoo in one file: each model is a config class and a module of 50-100 lines that
share the config union and :func:`build_model`, and are easiest to compare side by side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from torch import Tensor, nn

from lorank.core.io import register_model_builder
from lorank.data import DatasetInfo
from lorank.errors import LorankError

__all__ = [
    "CharTransformer",
    "CharTransformerConfig",
    "ForecastTransformer",
    "ForecastTransformerConfig",
    "LinearForecaster",
    "LinearForecasterConfig",
    "LeNet5",
    "LeNet5Config",
    "MLP",
    "MLPConfig",
    "ModelConfig",
    "PhilKimCNN",
    "PhilKimCNNConfig",
    "ResNet20",
    "ResNet20Config",
    "VGG",
    "VGGConfig",
    "ViT",
    "ViTConfig",
    "build_model",
    "model_config_from_dict",
]


class MLPConfig(BaseModel):
    """Fully connected network on the flattened input."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [500, 500, 500, 500],
        description="Hidden layer widths; the default is the DLRT 784-500-500-500-500-10 net.",
    )
    activation: Literal["relu", "tanh", "gelu"] = Field("relu", description="Hidden activation.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout after each activation.")


class LeNet5Config(BaseModel):
    """LeNet-5 (ReLU, max pooling) for 28x28 or 32x32 images: classic 6-16-120-84 by default;
    ``channels = [20, 50]``, ``hidden = [500]``, ``pad = false`` is the DLRT paper's variant
    (conv 1→20 5×5, pool, conv 20→50 5×5, pool, fc 800→500, fc 500→10; 431k weights)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["lenet5"] = "lenet5"
    channels: tuple[PositiveInt, PositiveInt] = Field(
        (6, 16), description="Output channels of the two 5×5 convolutions."
    )
    hidden: list[PositiveInt] = Field(
        default_factory=lambda: [120, 84], description="Widths of the hidden dense layers."
    )
    pad: bool = Field(
        True,
        description="Zero-pad the first convolution of 28×28 inputs to the classic 32×32 "
        "geometry (false: no padding, as in the DLRT paper's 800-input fc layer).",
    )


class ResNet20Config(BaseModel):
    """CIFAR ResNet-20 of He et al. (2016) with parameter-free (option A) shortcuts."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["resnet20"] = "resnet20"
    width: int = Field(16, ge=1, description="Channels of the first stage (then 2x, 4x).")


class VGGConfig(BaseModel):
    """Small VGG-style CNN: conv3x3+BN+ReLU blocks, max pooling, two-layer classifier.

    The default (32-64-128-128-256 channels, 0.8M parameters) is sized so a CIFAR-10 epoch
    takes a few minutes on a 2-core CPU.
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["vgg"] = "vgg"
    channels: list[Annotated[int, Field(ge=1)] | Literal["M"]] = Field(
        default_factory=lambda: [32, "M", 64, "M", 128, 128, "M", 256, "M"],
        min_length=1,
        description='Feature layers: an int is a conv3x3+BN+ReLU with that many channels, "M" a '
        "2x2 max pool.",
    )
    hidden: int = Field(256, ge=1, description="Width of the classifier's hidden layer.")


class CharTransformerConfig(BaseModel):
    """Small decoder-only (GPT-like, pre-LayerNorm) character language model."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["char_transformer"] = "char_transformer"
    n_layer: int = Field(4, ge=1, description="Number of transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads; must divide d_model.")
    d_model: int = Field(128, ge=1, description="Embedding / residual stream width.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention and residuals.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> CharTransformerConfig:
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        return self


class ViTConfig(BaseModel):
    """Small Vision Transformer (Dosovitskiy et al. 2021): patch embedding, pre-LayerNorm blocks
    of ``nn.MultiheadAttention`` and a GELU MLP, class token or mean pooling, linear head.

    The default (patch 7 on 28x28 MNIST: 16 tokens + class token; width 64, 4 blocks, 4
    heads; 0.14M parameters) trains an MNIST epoch in about 1-2 min on one CPU thread. Use
    patch 4 on CIFAR-10 (64 tokens).
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["vit"] = "vit"
    patch_size: int = Field(7, ge=1, description="Side of the square patches; must divide H, W.")
    dim: int = Field(64, ge=1, description="Token width (embedding / residual stream).")
    depth: int = Field(4, ge=1, description="Number of transformer blocks.")
    heads: int = Field(4, ge=1, description="Attention heads; must divide dim.")
    mlp_ratio: float = Field(2.0, gt=0, description="MLP hidden width as a multiple of dim.")
    pool: Literal["cls", "mean"] = Field(
        "cls", description="Classify from a class token, or from the mean of the patch tokens."
    )
    patch_embed: Literal["conv", "linear"] = Field(
        "conv", description="Patch embedding as a strided Conv2d or a Linear on flat patches."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention and residuals.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ViTConfig:
        if self.dim % self.heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class PhilKimCNNConfig(BaseModel):
    """The MNIST CNN of Phil Kim, *MATLAB Deep Learning* (Apress, 2017), chapter 6: one
    convolution layer (20 filters of 9x9, ReLU, 2x2 mean pooling) and a fully connected part
    (one 100-unit ReLU layer, then the output layer)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["phil_kim_cnn"] = "phil_kim_cnn"
    filters: int = Field(20, ge=1, description="Convolution filters (the book: 20).")
    kernel: int = Field(9, ge=1, description="Side of the square filters (the book: 9).")
    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [100],
        description="Widths of the fully connected ReLU layers after pooling (the book: [100]).",
    )
    bias: bool = Field(
        True,
        description="Biases in every layer. The book's network has none (202,620 weights on "
        "MNIST); lorank adds them by default (202,750) as every other zoo model has them.",
    )


class ForecastTransformerConfig(BaseModel):
    """Patch transformer forecaster in the spirit of PatchTST (Nie et al. 2023): each channel
    on its own (channel independence), its context cut into patches, a Linear patch
    embedding, pre-LayerNorm encoder blocks of ``nn.MultiheadAttention`` and a GELU MLP, and
    a linear head from all patch tokens to the horizon.

    The default (patches of 24 steps, not overlapping, over a 168-step context: 7 tokens;
    width 64, 2 blocks) has 80k parameters and trains an epoch of the hourly temperatures
    (5,940 windows of both cities) in about 6 s on one CPU thread.
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["forecast_transformer"] = "forecast_transformer"
    patch_len: int = Field(24, ge=1, description="Steps per patch (token).")
    stride: int = Field(24, ge=1, description="Steps between the starts of two patches.")
    dim: int = Field(64, ge=1, description="Token width (embedding / residual stream).")
    depth: int = Field(2, ge=1, description="Number of encoder blocks.")
    heads: int = Field(4, ge=1, description="Attention heads; must divide dim.")
    mlp_ratio: float = Field(2.0, gt=0, description="MLP hidden width as a multiple of dim.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on attention and residuals.")
    instance_norm: bool = Field(
        True,
        description="Subtract each window's own mean and divide by its std before the model, "
        "and undo it on the forecast (RevIN without affine weights).",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ForecastTransformerConfig:
        if self.dim % self.heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class LinearForecasterConfig(BaseModel):
    """The linear baseline of Zeng et al. (2023, "Are transformers effective for time series
    forecasting?"): one Linear from the context to the horizon, shared by all channels."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["forecast_linear"] = "forecast_linear"
    instance_norm: bool = Field(
        False, description="Normalise each window by its own mean and std (as the transformer)."
    )


ModelConfig = Annotated[
    MLPConfig
    | LeNet5Config
    | ResNet20Config
    | VGGConfig
    | CharTransformerConfig
    | ViTConfig
    | PhilKimCNNConfig
    | ForecastTransformerConfig
    | LinearForecasterConfig,
    Field(discriminator="name"),
]

_MODEL_CONFIG_ADAPTER: TypeAdapter[Any] = TypeAdapter(ModelConfig)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Validate a model config read back from JSON (the ``name`` key picks the model)."""
    try:
        return _MODEL_CONFIG_ADAPTER.validate_python(d)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'model'}: {err['msg']}" for err in e.errors()
        )
        raise LorankError(f"invalid model config: {problems}") from None


# --------------------------------------------------------------------------------------------
# Classification models

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """Flatten, then Linear/activation layers in ``layers`` (named input to output)."""

    def __init__(self, cfg: MLPConfig, in_features: int, num_classes: int) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        width = in_features
        for h in cfg.hidden:
            modules += [nn.Linear(width, h), _ACTIVATIONS[cfg.activation]()]
            if cfg.dropout > 0:
                modules.append(nn.Dropout(cfg.dropout))
            width = h
        modules.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.flatten(1))


def _image_shape(info: DatasetInfo, model: str) -> tuple[int, int, int]:
    if info.task != "classification" or len(info.input_shape) != 3:
        raise LorankError(
            f"model {model} needs image data (C, H, W), but {info.name} has inputs of shape "
            f"{info.input_shape}; pick an image dataset or the mlp model"
        )
    c, h, w = info.input_shape
    return c, h, w


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling; inputs smaller than 32x32 are zero-padded up to it.

    The classic 28x28 MNIST variant pads the first convolution by 2 so that both 28x28 and
    32x32 inputs reach the same 16x5x5 feature map.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        channels: tuple[int, int] = (6, 16),
        hidden: Sequence[int] = (120, 84),
        pad: bool = True,
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        c1, c2 = channels
        padding = max(0, (32 - min(h, w) + 1) // 2) if pad else 0
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        fh = ((h + 2 * padding - 4) // 2 - 4) // 2
        fw = ((w + 2 * padding - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise LorankError(f"LeNet-5 needs larger inputs than {h}x{w} (set model.pad = true)")
        layers: list[nn.Module] = []
        width = c2 * fh * fw
        for out in hidden:
            layers += [nn.Linear(width, out), nn.ReLU()]
            width = out
        self.classifier = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and zero-pad the new channels (no weights)."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra = extra_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity (or option-A) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _PadShortcut(out_channels - in_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: conv, 3 stages x 3 basic blocks (w, 2w, 4w), global pool, fc.

    Option-A shortcuts keep every weight in a Conv2d/Linear of the main path, matching the
    paper's 0.27M parameters at width 16.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_shape[0], width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages: list[nn.Module] = []
        channels = width
        for i, out_channels in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(3):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


class VGG(nn.Module):
    """VGG-style features (conv3x3+BN+ReLU, max pools) and a Linear-ReLU-Linear classifier."""

    def __init__(self, cfg: VGGConfig, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for item in cfg.channels:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            else:
                layers += [
                    nn.Conv2d(c, item, 3, padding=1, bias=False),
                    nn.BatchNorm2d(item),
                    nn.ReLU(),
                ]
                c = item
        if h < 1 or w < 1:
            raise LorankError(
                f"vgg channels {cfg.channels} pool a {in_shape[1]}x{in_shape[2]} image below 1x1; "
                'use fewer "M" entries'
            )
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c * h * w, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


# --------------------------------------------------------------------------------------------
# Character transformer


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with separate ``q``, ``k``, ``v`` and ``proj`` layers.

    Separate projections (rather than one fused qkv matrix) let low-rank conversion choose a
    rank for each of them independently.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q(x)),
            heads(self.k(x)),
            heads(self.v(x)),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x)) with a 4x GELU MLP."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class CharTransformer(nn.Module):
    """GPT-like decoder over characters: int64 (B, T) -> logits (B, T, vocab)."""

    def __init__(self, cfg: CharTransformerConfig, vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.d_model, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size)
        self._init_weights(cfg.n_layer)

    def _init_weights(self, n_layer: int) -> None:
        # GPT-2 style: N(0, 0.02), with residual output layers scaled down by depth so the
        # residual stream's variance does not grow with the number of blocks.
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                std = 0.02
                if name.endswith(("attn.proj", "fc2")):
                    std = 0.02 / math.sqrt(2 * n_layer)
                nn.init.normal_(m.weight, 0.0, std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds the block size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# --------------------------------------------------------------------------------------------
# Vision transformer


class ViTBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x)) (GELU MLP)."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        # PyTorch's own attention (packed in_proj_weight), so the ViT exercises its conversion.
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, h, need_weights=False)[0])
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class ViT(nn.Module):
    """Vision Transformer for small images: (B, C, H, W) -> logits (B, classes).

    The patch embedding stays dense under every low-rank method unless targeted explicitly
    (``lorank_dense_modules``); the head is the last layer, which the methods keep dense by
    default (``keep_last_dense``).
    """

    lorank_dense_modules = ("patch_embed",)

    def __init__(self, cfg: ViTConfig, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        p = cfg.patch_size
        if h % p or w % p:
            raise LorankError(
                f"vit patch_size {p} does not divide the {h}x{w} images; pick a divisor "
                "(7 for 28x28 MNIST, 4 or 8 for 32x32 CIFAR)"
            )
        self.patch, self.pool = p, cfg.pool
        n_tokens = (h // p) * (w // p) + (1 if cfg.pool == "cls" else 0)
        if cfg.patch_embed == "conv":
            self.patch_embed: nn.Module = nn.Conv2d(c, cfg.dim, p, stride=p)
        else:
            self.patch_embed = nn.Linear(c * p * p, cfg.dim)
        if cfg.pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, cfg.dim) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        hidden = max(1, round(cfg.mlp_ratio * cfg.dim))
        self.blocks = nn.ModuleList(
            ViTBlock(cfg.dim, cfg.heads, hidden, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_classes)

    def tokens(self, x: Tensor) -> Tensor:
        """Patch tokens (B, N, dim) of images x (B, C, H, W)."""
        if isinstance(self.patch_embed, nn.Linear):
            b, c, h, w = x.shape
            p = self.patch
            x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
            return self.patch_embed(x.reshape(b, (h // p) * (w // p), c * p * p))
        return self.patch_embed(x).flatten(2).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.tokens(x)
        if self.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))


# --------------------------------------------------------------------------------------------
# Phil Kim's CNN


class PhilKimCNN(nn.Module):
    """Phil Kim's MNIST CNN (*MATLAB Deep Learning*, Apress, 2017, ``MnistConv``):
    conv ``kernel``x``kernel`` (valid, ``filters`` maps), ReLU, 2x2 mean pooling, flatten, then
    ``layers``: Linear/ReLU for each width of ``hidden`` and a Linear output layer.

    On 28x28 MNIST: 1x28x28 -> 20x20x20 -> 20x10x10 = 2000 -> 100 -> 10. The fully connected
    part is a ``Sequential`` named ``layers`` laid out exactly as :class:`MLP`'s, so the
    closed-form methods (``pil``, ``bipil``) fit and replace it as they do an MLP's. The book
    initialises with its own scaled uniform/normal draws and trains with SGD + momentum;
    lorank keeps PyTorch's default initialisation and takes the optimizer from the config.
    """

    def __init__(
        self, cfg: PhilKimCNNConfig, in_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        k = cfg.kernel
        if h < k + 1 or w < k + 1:
            raise LorankError(
                f"phil_kim_cnn kernel {k} leaves no 2x2 pooling window on {h}x{w} images; "
                "use a smaller model.kernel"
            )
        self.features = nn.Sequential(
            nn.Conv2d(c, cfg.filters, k, bias=cfg.bias), nn.ReLU(), nn.AvgPool2d(2)
        )
        width = cfg.filters * ((h - k + 1) // 2) * ((w - k + 1) // 2)
        modules: list[nn.Module] = []
        for hidden in cfg.hidden:
            modules += [nn.Linear(width, hidden, bias=cfg.bias), nn.ReLU()]
            width = hidden
        modules.append(nn.Linear(width, num_classes, bias=cfg.bias))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.features(x).flatten(1))


# --------------------------------------------------------------------------------------------
# Forecasters: (B, context, C) -> (B, horizon, C), every channel forecast on its own


def _instance_normalised(x: Tensor, on: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Channels as rows (B*C, L), normalised per row when ``on``; with the mean and std."""
    b, length, c = x.shape
    rows = x.transpose(1, 2).reshape(b * c, length)
    if not on:
        zero = rows.new_zeros(b * c, 1)
        return rows, zero, zero + 1
    mean = rows.mean(dim=1, keepdim=True)
    std = (rows.var(dim=1, keepdim=True, unbiased=False) + 1e-5).sqrt()
    return (rows - mean) / std, mean, std


def _as_forecast(rows: Tensor, mean: Tensor, std: Tensor, b: int) -> Tensor:
    """(B*C, H) rows back to (B, H, C), the instance normalisation undone."""
    rows = rows * std + mean
    return rows.reshape(b, -1, rows.shape[1]).transpose(1, 2)


class LinearForecaster(nn.Module):
    """One Linear from the ``context`` past values to the ``horizon`` future ones."""

    def __init__(self, cfg: LinearForecasterConfig, context: int, horizon: int) -> None:
        super().__init__()
        self.instance_norm = cfg.instance_norm
        self.linear = nn.Linear(context, horizon)

    def forward(self, x: Tensor) -> Tensor:
        rows, mean, std = _instance_normalised(x, self.instance_norm)
        return _as_forecast(self.linear(rows), mean, std, x.shape[0])


class ForecastTransformer(nn.Module):
    """PatchTST-like forecaster: (B, context, C) -> (B, horizon, C).

    The context's last ``(n - 1) * stride + patch_len`` steps are cut into ``n`` patches (the
    oldest few steps that do not fill a patch are dropped, the newest never are). The patch
    embedding stays dense under every low-rank method unless targeted explicitly; the head is
    the last layer, which the methods keep dense by default (``keep_last_dense``).
    """

    lorank_dense_modules = ("patch_embed",)

    def __init__(self, cfg: ForecastTransformerConfig, context: int, horizon: int) -> None:
        super().__init__()
        if cfg.patch_len > context:
            raise LorankError(
                f"forecast_transformer patch_len {cfg.patch_len} is longer than the context "
                f"{context}; lower model.patch_len"
            )
        self.patch_len, self.stride = cfg.patch_len, cfg.stride
        self.n_patches = (context - cfg.patch_len) // cfg.stride + 1
        self.offset = context - ((self.n_patches - 1) * cfg.stride + cfg.patch_len)
        self.instance_norm = cfg.instance_norm
        self.patch_embed = nn.Linear(cfg.patch_len, cfg.dim)
        self.pos_embed = nn.Parameter(torch.randn(1, self.n_patches, cfg.dim) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        hidden = max(1, round(cfg.mlp_ratio * cfg.dim))
        self.blocks = nn.ModuleList(
            ViTBlock(cfg.dim, cfg.heads, hidden, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(self.n_patches * cfg.dim, horizon)

    def forward(self, x: Tensor) -> Tensor:
        rows, mean, std = _instance_normalised(x, self.instance_norm)
        patches = rows[:, self.offset :].unfold(1, self.patch_len, self.stride)
        h = self.drop(self.patch_embed(patches) + self.pos_embed)
        for block in self.blocks:
            h = block(h)
        out = self.head(self.norm(h).flatten(1))
        return _as_forecast(out, mean, std, x.shape[0])


# --------------------------------------------------------------------------------------------


# What a model config may ask for: checked on the "meta" device (shapes, no memory) before
# the real model is allocated, so a typo such as hidden = [5000000] is an error, not an OOM.
MAX_MODEL_PARAMS = 10**9
MAX_MODEL_LAYERS = 1024


def build_model(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    """Instantiate the model described by ``cfg`` for data described by ``info``; a model
    beyond :data:`MAX_MODEL_PARAMS` parameters is refused before anything is allocated."""
    for key, value in cfg.model_dump().items():
        if isinstance(value, list) and len(value) > MAX_MODEL_LAYERS:
            raise LorankError(
                f"config error: model.{key} has {len(value)} entries; at most "
                f"{MAX_MODEL_LAYERS} layers are supported"
            )
    with torch.device("meta"):
        probe = _build_model(cfg, info)
    count = sum(p.numel() for p in probe.parameters())
    del probe
    if count > MAX_MODEL_PARAMS:
        raise LorankError(
            f"config error: model {cfg.name} with these sizes has {count:,} parameters, more "
            f"than lorank's limit of {MAX_MODEL_PARAMS:,}; use smaller widths or fewer layers"
        )
    return _build_model(cfg, info)


def _build_model(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    forecasters = (ForecastTransformerConfig, LinearForecasterConfig)
    if isinstance(cfg, forecasters) != (info.task == "forecast"):
        if info.task == "forecast":
            raise LorankError(
                f"model {cfg.name} cannot forecast a series; for data.name = 'forecast' use "
                "model.name: forecast_transformer or forecast_linear"
            )
        raise LorankError(
            f"model {cfg.name} is a forecaster but {info.name} is not a forecast dataset; "
            "use data.name: forecast"
        )
    if isinstance(cfg, forecasters):
        context, horizon = info.input_shape[0], int(info.horizon or 0)
        if isinstance(cfg, LinearForecasterConfig):
            return LinearForecaster(cfg, context, horizon)
        return ForecastTransformer(cfg, context, horizon)
    if isinstance(cfg, CharTransformerConfig):
        if info.task != "language_model":
            raise LorankError(
                f"model char_transformer needs a language-model dataset, not {info.name}; "
                "use data.name: tinyshakespeare"
            )
        return CharTransformer(cfg, info.num_classes, info.input_shape[0])
    if info.task != "classification":
        raise LorankError(
            f"model {cfg.name} is a classifier but {info.name} is a language-model dataset; "
            "use model.name: char_transformer"
        )
    if isinstance(cfg, MLPConfig):
        return MLP(cfg, math.prod(info.input_shape), info.num_classes)
    shape = _image_shape(info, cfg.name)
    if isinstance(cfg, LeNet5Config):
        return LeNet5(shape, info.num_classes, cfg.channels, cfg.hidden, cfg.pad)
    if isinstance(cfg, ResNet20Config):
        return ResNet20(shape, info.num_classes, cfg.width)
    if isinstance(cfg, VGGConfig):
        return VGG(cfg, shape, info.num_classes)
    if isinstance(cfg, ViTConfig):
        return ViT(cfg, shape, info.num_classes)
    if isinstance(cfg, PhilKimCNNConfig):
        return PhilKimCNN(cfg, shape, info.num_classes)
    raise LorankError(f"unknown model config {cfg!r}")


def build_from_metadata(meta: dict[str, Any]) -> nn.Module | None:
    """Rebuild a zoo model from the metadata that :func:`lorank.save` wrote beside it."""
    if "model" not in meta or "data_info" not in meta:
        return None
    info = DatasetInfo.from_dict(meta["data_info"])
    return build_model(model_config_from_dict(meta["model"]), info)


register_model_builder(build_from_metadata)
