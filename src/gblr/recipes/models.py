"""Small vision models whose linear layers come from a factory, so one architecture can be
trained dense, as GBLR, or with a baseline structure at the same FLOPs.

Only the layers inside the blocks are replaced (attention q, k, v and output projections, MLP
layers, Mixer token and channel MLPs), as in the paper; the patch embedding and the classifier
stay dense.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..baselines import BlockSparseLinear, LowRankLinear, MonarchLinear
from ..flops import FlopsReport, flops_report
from ..linear import GBLRLinear

__all__ = ["LAYER_KINDS", "make_linear", "linear_factory", "ViT", "MLPMixer", "MODELS", "build_model", "replaced_flops"]

LAYER_KINDS = ("dense", "gblr", "lowrank", "monarch", "blocksparse")

LinearFactory = Callable[[int, int], nn.Module]


def make_linear(
    kind: str,
    in_features: int,
    out_features: int,
    flops_ratio: float = 1.0,
    *,
    init_flops_ratio: float | None = None,
    init_full_width_share: float = 0.5,
    rank: int = 1,
) -> nn.Module:
    """One linear layer of the given kind. Baselines are built at ``flops_ratio``; a GBLR layer
    starts at ``init_flops_ratio`` (default: the smaller of 1 and twice ``flops_ratio``) and
    is brought to the budget by :class:`gblr.StructureLearner`, with ``init_full_width_share``
    of the initial budget in full-width components. GBLR layers have components of
    rank ``rank``, as many as make up the rank of a dense layer (``min(in, out) / rank``,
    rounded up)."""
    if kind == "gblr":
        start = min(1.0, 2 * flops_ratio) if init_flops_ratio is None else init_flops_ratio
        components = -(-min(in_features, out_features) // rank)
        return GBLRLinear(in_features, out_features, components=components, rank=rank, init_flops_ratio=start,
                          init_full_width_share=init_full_width_share)
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
    def __init__(self, dim: int, heads: int, linear: LinearFactory) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.query, self.key, self.value = linear(dim, dim), linear(dim, dim), linear(dim, dim)
        self.output = linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def split(t):
            return t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return self.output(attended.transpose(1, 2).reshape(batch, tokens, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, linear: LinearFactory) -> None:
        super().__init__()
        self.fc1, self.fc2 = linear(dim, hidden), linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, linear: LinearFactory) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, linear)
        self.mlp = MLP(dim, int(dim * mlp_ratio), linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer: patch embedding, class token, pre-norm blocks."""

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


MODELS = {"vit": ViT, "mixer": MLPMixer}


def build_model(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    layer: str = "dense",
    flops_ratio: float = 1.0,
    layer_options: dict | None = None,
    **kwargs,
) -> nn.Module:
    """``build_model("vit", (1, 28, 28), 10, layer="gblr", flops_ratio=0.3, dim=64)``.
    ``layer_options`` go to :func:`make_linear` (GBLR's ``init_flops_ratio``, ``init_full_width_share`` and ``rank``);
    other keyword arguments to the model."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got {name!r}")
    linear = linear_factory(layer, flops_ratio, **(layer_options or {}))
    return MODELS[name](image_shape, num_classes, linear=linear, **kwargs)


def replaced_flops(model: nn.Module) -> FlopsReport:
    """FLOPs of the layers the factory made (those inside ``model.blocks``), whatever their kind;
    names are relative to the model."""
    report = flops_report(model.blocks, include_dense=True)
    return FlopsReport(tuple(dataclasses.replace(layer, name=f"blocks.{layer.name}") for layer in report))
