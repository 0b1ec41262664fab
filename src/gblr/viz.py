"""Pictures of what was learned: mask patterns per layer and per-layer budgets.

Matplotlib is optional (``pip install gblr[train]``); :func:`coverage` needs only torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ._files import write_atomic
from .conv import ConvGeometry
from .flops import FlopsReport, cyclic_indices
from .frozen import FrozenGBLRLinear
from .linear import GBLRLinear
from .masks import boxcar

__all__ = ["coverage", "plot_masks", "plot_budgets"]


def coverage(layer: GBLRLinear | FrozenGBLRLinear) -> torch.Tensor:
    """``(out, in)`` count of the blocks covering each weight entry (the paper's mask picture:
    brighter = more overlapping low-rank blocks, i.e. more rank there)."""
    if isinstance(layer, GBLRLinear):
        with torch.no_grad():
            mask_in = boxcar(layer.in_width, layer.in_location, layer.in_features)
            mask_out = boxcar(layer.out_width, layer.out_location, layer.out_features)
            ranks = layer.entry_ranks()
            w_in, _, w_out, _ = layer.supports()
            dense = slice(layer.components, None)  # a dense block's rank: the smaller side of its support
            ranks[dense] = torch.minimum(w_in[dense], w_out[dense])
            ranks = ranks.to(mask_in.dtype)
            return (mask_out.T * ranks) @ mask_in
    if isinstance(layer, FrozenGBLRLinear):
        counts = torch.zeros(layer.out_features, layer.in_features)
        for support, left, right in layer.blocks():
            rank = min(support.in_width, support.out_width) if right is None else left.shape[1]
            rows = cyclic_indices(support.out_start, support.out_width, layer.out_features)
            cols = cyclic_indices(support.in_start, support.in_width, layer.in_features)
            counts[rows[:, None], cols[None, :]] += rank
        return counts
    raise TypeError(f"coverage needs a GBLRLinear or FrozenGBLRLinear, got {type(layer).__name__}")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("pictures need matplotlib: pip install 'gblr[train]'") from error
    return plt


def _save(figure, path: str | os.PathLike) -> Path:
    image_format = Path(path).suffix.lstrip(".") or "png"
    return write_atomic(path, lambda handle: figure.savefig(handle, format=image_format, dpi=110, bbox_inches="tight"))


def panel_image(layer) -> tuple[torch.Tensor, str]:
    """What a layer's panel shows and how its title says so: the :func:`coverage` of a linear
    layer; for a convolution, output x input channels averaged over the kernel's taps."""
    image = coverage(layer).cpu()
    if isinstance(layer, ConvGeometry):
        return image.reshape(layer.out_channels, layer.in_channels, layer.taps).mean(-1), " (channels)"
    return image, ""


def plot_masks(model: nn.Module, path: str | os.PathLike, columns: int | None = None) -> Path:
    """One panel per GBLR layer with its :func:`coverage` image (for a convolution, output x input
    channels, averaged over the kernel's taps); saved atomically as ``path``."""
    plt = _pyplot()
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (GBLRLinear, FrozenGBLRLinear))]
    if not layers:
        raise ValueError("model has no GBLR layers to draw")
    columns = columns or min(len(layers), 6)
    rows = math.ceil(len(layers) / columns)
    height = 2.4 * rows + 0.9  # 0.9 inch for the two-line heading above the panel titles
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, height), squeeze=False)
    figure.subplots_adjust(top=1 - 1.05 / height, bottom=0.2 / height, hspace=0.45)
    for axis in axes.flat:
        axis.axis("off")
    prefix = _common_prefix([name for name, _ in layers])
    for axis, (name, layer) in zip(axes.flat, layers):
        name = name[len(prefix):]
        image, kind = panel_image(layer)
        axis.imshow(image.numpy(), cmap="magma", interpolation="nearest", aspect="auto", vmin=0)
        axis.set_title(f"{name}{kind}\n{layer.flops_ratio():.2f}", fontsize=7)
    figure.suptitle("learned GBLR structure (brighter = more overlapping blocks; title: FLOPs ratio)"
                    + (f"\nlayers under {prefix.rstrip('.')}" if prefix else ""), fontsize=9)
    try:
        return _save(figure, path)
    finally:
        plt.close(figure)


def plot_budgets(report: FlopsReport, path: str | os.PathLike, target: float | None = None) -> Path:
    """Bar chart of each layer's FLOPs ratio (the learned split of the budget)."""
    plt = _pyplot()
    if len(report) == 0:
        raise ValueError("the report has no layers to draw")
    names = [layer.name for layer in report]
    ratios = [layer.ratio for layer in report]
    figure, axis = plt.subplots(figsize=(max(4.0, 0.32 * len(names) + 1.5), 3.2))
    axis.bar(range(len(names)), ratios, color="#4c72b0")
    axis.axhline(report.ratio, color="#dd8452", linestyle="--", label=f"global {report.ratio:.3f}")
    if target is not None:
        axis.axhline(target, color="#55a868", linestyle=":", label=f"target {target:.3f}")
    axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axis.set_ylabel("FLOPs ratio")
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=7)
    axis.set_title("per-layer budget", fontsize=9)
    try:
        return _save(figure, path)
    finally:
        plt.close(figure)


def _common_prefix(names: list[str]) -> str:
    """The dotted prefix shared by all ``names`` (``"encoder.layer."``), so titles stay short;
    empty for fewer than two names."""
    if len(names) < 2:
        return ""
    parts = [name.split(".") for name in names]
    shared = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        shared.append(pieces[0])
    shared = shared[: min(len(p) for p in parts) - 1]  # never the whole name
    return ".".join(shared) + "." if shared else ""
