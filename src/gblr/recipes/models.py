"""Small vision models and a small decoder-only language model whose linear layers (or
convolutions) come from a factory, so one architecture can be trained dense, as GBLR, or with a
baseline structure at the same FLOPs.

Only the layers inside the blocks are replaced (attention q, k, v and output projections, MLP
layers, Mixer token and channel MLPs, the ResNet's 3x3 convolutions), as in the paper; the patch
embedding, the GPT's token and position embeddings, the ResNet's stem and projection shortcuts,
and the classifier (the GPT's tied language-model head) stay dense.

The ViT, the MLP-Mixer and the GPT take a linear-layer factory (:func:`make_linear`,
``linear=``), the ResNet a convolution factory (:func:`make_conv`, ``conv=``); :func:`build_model`
gives each model the one it takes. Each model class says what it reads in ``inputs``:
``"images"`` (``(N, C, H, W)`` floats) or ``"tokens"`` (``(N, T)`` token ids, the GPT).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..baselines import BlockSparseConv2d, BlockSparseLinear, LowRankConv2d, LowRankLinear, MonarchLinear
from ..baselines.conv import kernel_taps
from ..conv import GBLRConv2d
from ..flops import FlopsReport, flops_report
from ..linear import GBLRLinear

__all__ = ["LAYER_KINDS", "CONV_KINDS", "make_linear", "linear_factory", "make_conv", "conv_factory", "ViT",
           "MLPMixer", "ResNet", "GPT", "MODELS", "build_model", "replaced_flops"]

LAYER_KINDS = ("dense", "gblr", "lowrank", "monarch", "blocksparse")
CONV_KINDS = ("dense", "gblr", "lowrank", "blocksparse")  # the layer kinds that have a convolution

LinearFactory = Callable[[int, int], nn.Module]
ConvFactory = Callable[..., nn.Module]  # (in_channels, out_channels, kernel_size, *, stride, padding, bias)


def make_linear(
    kind: str,
    in_features: int,
    out_features: int,
    flops_ratio: float = 1.0,
    *,
    init_flops_ratio: float | None = None,
    init_full_width_share: float = 0.5,
    rank: int = 1,
    dense_blocks: int = 0,
    init_dense_share: float = 0.8,
) -> nn.Module:
    """One linear layer of the given kind. Baselines are built at ``flops_ratio``; a GBLR layer
    starts at ``init_flops_ratio`` (default: the smaller of 1 and twice ``flops_ratio``) and
    is brought to the budget by :class:`gblr.StructureLearner`, with ``init_dense_share`` of the
    initial budget in ``dense_blocks`` dense blocks (if any) and ``init_full_width_share`` of
    the rest in full-width components. GBLR layers have components of rank ``rank``, as many as
    make up the rank of a dense layer (``min(in, out) / rank``, rounded up)."""
    if kind == "gblr":
        start = min(1.0, 2 * flops_ratio) if init_flops_ratio is None else init_flops_ratio
        components = -(-min(in_features, out_features) // rank)
        return GBLRLinear(in_features, out_features, components=components, rank=rank, init_flops_ratio=start,
                          init_full_width_share=init_full_width_share, dense_blocks=dense_blocks,
                          init_dense_share=init_dense_share)
    if kind == "dense":
        return nn.Linear(in_features, out_features)
    if kind == "lowrank":
        return LowRankLinear.at_flops_ratio(in_features, out_features, flops_ratio)
    if kind == "monarch":
        return MonarchLinear.at_flops_ratio(in_features, out_features, flops_ratio)
    if kind == "blocksparse":
        return BlockSparseLinear.at_flops_ratio(in_features, out_features, flops_ratio)
    raise ValueError(f"layer kind must be one of {', '.join(LAYER_KINDS)}; got {kind!r}")


def linear_factory(kind: str, flops_ratio: float = 1.0, **kwargs) -> LinearFactory:
    if kind not in LAYER_KINDS:
        raise ValueError(f"layer kind must be one of {', '.join(LAYER_KINDS)}; got {kind!r}")
    return functools.partial(make_linear, kind, flops_ratio=flops_ratio, **kwargs)


def _record_output_pixels(module: nn.Module, inputs, output: torch.Tensor) -> None:
    """Forward hook of the factory's dense convolutions: keep ``output_pixels`` (the output
    height times width of the last forward pass) as the structured convolutions do, so that
    :func:`gblr.flops_report` weighs dense and structured convolutions alike."""
    module.output_pixels = int(output.shape[-2] * output.shape[-1])


def make_conv(
    kind: str,
    in_channels: int,
    out_channels: int,
    kernel_size,
    flops_ratio: float = 1.0,
    *,
    stride=1,
    padding=0,
    bias: bool = True,
    init_flops_ratio: float | None = None,
    init_full_width_share: float = 0.5,
    rank: int = 1,
) -> nn.Module:
    """One convolution of the given kind (:data:`CONV_KINDS`), the counterpart of
    :func:`make_linear`: ``"dense"`` is an ``nn.Conv2d`` (that keeps ``output_pixels`` of its
    last forward pass, through a forward hook), ``"gblr"`` a :class:`gblr.conv.GBLRConv2d`
    starting at ``init_flops_ratio`` (default: the smaller of 1 and twice ``flops_ratio``) with
    ``ceil(min(in_channels * kh * kw, out_channels) / rank)`` components of rank ``rank``,
    ``"lowrank"`` and ``"blocksparse"`` the baselines of :mod:`gblr.baselines.conv` built at
    ``flops_ratio``. There is no Monarch convolution: ``"monarch"`` raises a ValueError."""
    _check_conv_kind(kind)
    geometry = {"stride": stride, "padding": padding, "bias": bias}
    if kind == "gblr":
        start = min(1.0, 2 * flops_ratio) if init_flops_ratio is None else init_flops_ratio
        components = -(-min(in_channels * kernel_taps(kernel_size, in_channels, out_channels), out_channels) // rank)
        return GBLRConv2d(in_channels, out_channels, kernel_size, **geometry, components=components, rank=rank,
                          init_flops_ratio=start, init_full_width_share=init_full_width_share)
    if kind == "dense":
        layer = nn.Conv2d(in_channels, out_channels, kernel_size, **geometry)
        layer.output_pixels = None
        layer.register_forward_hook(_record_output_pixels)
        return layer
    if kind == "lowrank":
        return LowRankConv2d.at_flops_ratio(in_channels, out_channels, kernel_size, flops_ratio, **geometry)
    if kind == "blocksparse":
        return BlockSparseConv2d.at_flops_ratio(in_channels, out_channels, kernel_size, flops_ratio, **geometry)
    raise AssertionError(kind)  # pragma: no cover - _check_conv_kind refused it


def _check_conv_kind(kind: str) -> None:
    if kind == "monarch":
        raise ValueError(f"there is no Monarch convolution: the layer kind of a convolutional model must be one of "
                         f"{', '.join(CONV_KINDS)}; got 'monarch'")
    if kind not in CONV_KINDS:
        raise ValueError(f"layer kind must be one of {', '.join(CONV_KINDS)}; got {kind!r}")


def conv_factory(kind: str, flops_ratio: float = 1.0, **kwargs) -> ConvFactory:
    _check_conv_kind(kind)
    return functools.partial(make_conv, kind, flops_ratio=flops_ratio, **kwargs)


class PatchEmbedding(nn.Module):
    """Non-overlapping ``patch x patch`` patches, flattened and projected (dense)."""

    def __init__(self, image_shape: tuple[int, int, int], patch_size: int, dim: int) -> None:
        super().__init__()
        channels, height, width = image_shape
        if height % patch_size or width % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide the image size {height}x{width}")
        self.patch_size = patch_size
        self.tokens = (height // patch_size) * (width // patch_size)
        self.projection = nn.Linear(channels * patch_size * patch_size, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(images, kernel_size=self.patch_size, stride=self.patch_size)  # (B, C*p*p, tokens)
        return self.projection(patches.transpose(1, 2))


class Attention(nn.Module):
    """Multi-head self-attention with separate query, key, value and output projections from the
    factory; ``causal``: each position attends only to itself and the positions before it."""

    def __init__(self, dim: int, heads: int, linear: LinearFactory, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads, self.causal = heads, causal
        self.query, self.key, self.value = linear(dim, dim), linear(dim, dim), linear(dim, dim)
        self.output = linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def split(t):
            return t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                                  is_causal=self.causal)
        return self.output(attended.transpose(1, 2).reshape(batch, tokens, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, linear: LinearFactory) -> None:
        super().__init__()
        self.fc1, self.fc2 = linear(dim, hidden), linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, linear: LinearFactory, causal: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, linear, causal)
        self.mlp = MLP(dim, int(dim * mlp_ratio), linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer: patch embedding, class token, pre-norm blocks."""

    layer_argument = "linear"  # build_model passes a linear-layer factory
    inputs = "images"

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        *,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        linear: LinearFactory = nn.Linear,
    ) -> None:
        super().__init__()
        self.embed = PatchEmbedding(image_shape, patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, self.embed.tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio, linear) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.position
        return self.head(self.norm(self.blocks(x))[:, 0])


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_ratio: float, channel_ratio: float, linear: LinearFactory) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mlp = MLP(tokens, int(tokens * token_ratio), linear)
        self.channel_mlp = MLP(dim, int(dim * channel_ratio), linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer: patch embedding, token-mixing and channel-mixing MLPs, mean pooling."""

    layer_argument = "linear"  # build_model passes a linear-layer factory
    inputs = "images"

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        *,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        token_ratio: float = 2.0,
        channel_ratio: float = 2.0,
        linear: LinearFactory = nn.Linear,
    ) -> None:
        super().__init__()
        self.embed = PatchEmbedding(image_shape, patch_size, dim)
        tokens = self.embed.tokens
        self.blocks = nn.Sequential(
            *[MixerBlock(tokens, dim, token_ratio, channel_ratio, linear) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(images))).mean(1))


class Shortcut(nn.Sequential):
    """A residual block's 1x1 projection (strided convolution and BatchNorm), dense: like the
    stem, it is not one of the layers the factory replaces, nor counted by :func:`replaced_flops`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions from the factory, each followed by BatchNorm, and a residual: the
    identity, or a :class:`Shortcut` where the block changes the width or the resolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, conv: ConvFactory) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        changes = stride != 1 or in_channels != out_channels
        self.shortcut = Shortcut(in_channels, out_channels, stride) if changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


def _check_depth(depth) -> tuple[int, ...]:
    if isinstance(depth, int) and not isinstance(depth, bool):
        depth = (depth,)
    if not isinstance(depth, (tuple, list)) or not depth or any(
        isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in depth
    ):
        raise ValueError(f"depth must be a positive int or a non-empty sequence of them (blocks per stage), "
                         f"got {depth!r}")
    return tuple(depth)


class ResNet(nn.Module):
    """A small ResNet for 28x28 or 32x32 images (CIFAR-style): a dense 3x3 stem convolution
    (image channels to ``width``) with BatchNorm and ReLU, then ``len(depth)`` stages of
    :class:`BasicBlock` (``depth[s]`` blocks in stage ``s``, ``width * 2**s`` channels; the
    first block of every stage after the first halves the resolution, with stride 2 and a dense
    1x1 projection shortcut), global average pooling and a dense linear classifier.

    Only the 3x3 convolutions inside ``self.blocks`` come from ``conv`` (a factory called as
    ``conv(in_channels, out_channels, 3, stride=..., padding=1, bias=False)``, see
    :func:`make_conv`; default: its dense ``nn.Conv2d``). Each of them starts with
    ``output_pixels`` set to the output pixels of an ``image_shape`` input, so that FLOPs
    reports weigh the stages by their cost from the start.
    The defaults (width 16, one block per stage) train a Fashion-MNIST epoch in well under a
    minute on two CPU cores.
    """

    layer_argument = "conv"  # build_model passes a convolution factory
    inputs = "images"

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        *,
        width: int = 16,
        depth=(1, 1, 1),
        conv: ConvFactory | None = None,
    ) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
            raise ValueError(f"width must be a positive int, got {width!r}")
        depth = _check_depth(depth)
        conv = functools.partial(make_conv, "dense") if conv is None else conv
        channels, height, breadth = image_shape
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        blocks, in_channels = [], width
        for stage, count in enumerate(depth):
            out_channels = width * 2**stage
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                if stride == 2:  # a 3x3 convolution with padding 1 and stride 2: ceil(size / 2)
                    height, breadth = (height + 1) // 2, (breadth + 1) // 2
                block = BasicBlock(in_channels, out_channels, stride, conv)
                for layer in (block.conv1, block.conv2):
                    if hasattr(layer, "output_pixels"):  # make_conv's layers (a plain nn.Conv2d has none)
                        layer.output_pixels = height * breadth
                blocks.append(block)
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(images))
        return self.head(features.mean((2, 3)))


class GPT(nn.Module):
    """A small decoder-only language model (GPT-2's layout): token embedding plus a learned
    position embedding, pre-norm :class:`TransformerBlock` s with causal self-attention, a final
    LayerNorm and a language-model head that shares its weight with the token embedding.

    Takes ``(N, T)`` token ids, ``T <= seq_len``, and returns ``(N, T, vocab_size)`` logits, those
    at position ``t`` predicting token ``t + 1`` from tokens ``0..t``. Only the linear layers
    inside ``self.blocks`` (query, key, value, output, the MLP's fc1 and fc2) come from
    ``linear``; the embeddings and the head are dense. ``input_shape`` is ``(seq_len,)`` and
    ``num_classes`` the vocabulary size, the arguments :func:`build_model` passes every model.
    """

    layer_argument = "linear"  # build_model passes a linear-layer factory
    inputs = "tokens"

    def __init__(
        self,
        input_shape: tuple[int],
        num_classes: int,
        *,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        linear: LinearFactory = nn.Linear,
    ) -> None:
        super().__init__()
        (self.seq_len,) = input_shape
        self.embed = nn.Embedding(num_classes, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # small, as the head shares it: logits start near 0
        self.position = nn.Parameter(torch.randn(1, self.seq_len, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio, linear, causal=True)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] > self.seq_len:
            raise ValueError(f"the GPT takes at most seq_len={self.seq_len} tokens, got {tokens.shape[-1]}")
        x = self.embed(tokens) + self.position[:, : tokens.shape[-1]]
        return self.head(self.norm(self.blocks(x)))


MODELS = {"vit": ViT, "mixer": MLPMixer, "resnet": ResNet, "gpt": GPT}


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    layer: str = "dense",
    flops_ratio: float = 1.0,
    layer_options: dict | None = None,
    **kwargs,
) -> nn.Module:
    """``build_model("vit", (1, 28, 28), 10, layer="gblr", flops_ratio=0.3, dim=64)``, or
    ``build_model("gpt", (seq_len,), vocab_size, ...)``: ``input_shape`` is an image's ``(C, H,
    W)`` or a token window's ``(seq_len,)``, ``num_classes`` the classes or the vocabulary size.
    The ViT, MLP-Mixer and GPT get their linear layers from :func:`make_linear`, the ResNet its
    convolutions from :func:`make_conv` (no ``"monarch"`` kind: a ValueError).
    ``layer_options`` go to that factory (GBLR's ``init_flops_ratio``, ``init_full_width_share``
    and ``rank``); other keyword arguments to the model."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got {name!r}")
    model = MODELS[name]
    if model.layer_argument == "conv":
        factories = {"conv": conv_factory(layer, flops_ratio, **(layer_options or {}))}
    else:
        factories = {"linear": linear_factory(layer, flops_ratio, **(layer_options or {}))}
    return model(input_shape, num_classes, **factories, **kwargs)


def replaced_flops(model: nn.Module) -> FlopsReport:
    """FLOPs of the layers the factory made (those inside ``model.blocks``), whatever their kind;
    names are relative to the model.

    This is :func:`gblr.flops_report` of ``model.blocks`` with ``include_dense=True`` (so a dense
    model's layers are rows of ratio 1), less the ResNet's :class:`Shortcut` projections, which
    stay dense whatever the kind and are not the factory's. Convolutions count MACs per example:
    MACs per output pixel times their ``output_pixels`` (the ResNet sets it from its input size
    at construction, and every layer of :func:`make_conv`, the dense ones included, updates it in
    each forward pass), so a stage at a higher resolution weighs more."""
    kept_dense = [f"{name}." for name, module in model.blocks.named_modules() if isinstance(module, Shortcut)]
    report = flops_report(model.blocks, include_dense=True)
    return FlopsReport(tuple(dataclasses.replace(layer, name=f"blocks.{layer.name}") for layer in report
                             if not f"{layer.name}.".startswith(tuple(kept_dense))))
