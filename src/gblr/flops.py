"""Cost of GBLR layers in multiply-accumulates (MACs) per input vector, docs/method.md section 2.

Components with identical (in, out) supports form a group; a group of total rank ``R`` whose
supports are ``a`` columns and ``b`` rows wide costs ``min(R * (a + b), a * b)`` (two thin
products, or one dense block if that is cheaper). Zero-width components cost nothing. A dense
``(m, n)`` layer costs ``m * n``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "Support", "Structure", "cyclic_indices", "cyclic_ranges", "group_macs", "group_macs_slopes", "low_rank_macs",
    "max_low_rank", "rank_for_ratio", "largest_cheaper_rank", "square_block_fraction", "LayerFlops", "FlopsReport",
    "flops_report",
]


@dataclasses.dataclass(frozen=True, order=True)
class Support:
    """A block's support in elements: columns ``in_start ..`` (``in_width`` of them, cyclic)
    and rows ``out_start ..`` (``out_width``, cyclic). A full-width side always has start 0."""

    in_start: int
    in_width: int
    out_start: int
    out_width: int


@dataclasses.dataclass(frozen=True)
class Structure:
    """Rounded supports of the components of one or more GBLR layers, flattened: one entry per
    component, all int64 tensors of length N (element counts, from
    :func:`gblr.masks.element_supports`), with each component's layer sizes, rank and layer index."""

    in_widths: torch.Tensor
    in_locations: torch.Tensor
    out_widths: torch.Tensor
    out_locations: torch.Tensor
    in_sizes: torch.Tensor
    out_sizes: torch.Tensor
    ranks: torch.Tensor
    layers: torch.Tensor
    num_layers: int

    def groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(members, group, first)``: the indices of components with both widths nonzero, the
        group (identical layer and support) of each, and one member index per group. Where a
        full-width side starts does not matter, so such starts count as 0."""
        in_starts = torch.where(self.in_widths == self.in_sizes, 0, self.in_locations)
        out_starts = torch.where(self.out_widths == self.out_sizes, 0, self.out_locations)
        members = ((self.in_widths > 0) & (self.out_widths > 0)).nonzero().flatten()
        if members.numel() == 0:
            return members, members, members
        # Row-wise grouping as three 1-D uniques (torch.unique(dim=0) is ~50x slower); each key
        # stays far below 2**63: (layer * (n + 1) + start) * (n + 1) + width.
        base_in, base_out = int(self.in_sizes.max()) + 1, int(self.out_sizes.max()) + 1
        key_in = ((self.layers * base_in + in_starts) * base_in + self.in_widths)[members]
        key_out = (out_starts * base_out + self.out_widths)[members]
        rank_in = torch.unique(key_in, return_inverse=True)[1]
        rank_out = torch.unique(key_out, return_inverse=True)[1]
        group = torch.unique(rank_in * members.numel() + rank_out, return_inverse=True)[1]
        count = int(group.max()) + 1
        first = torch.full((count,), members.numel(), dtype=torch.long, device=members.device)
        first = members[first.scatter_reduce(0, group, torch.arange(members.numel(), device=members.device), "amin")]
        return members, group, first

    def layer_macs(self) -> torch.Tensor:
        """MACs per input vector of each layer, ``(num_layers,)`` int64 (docs/method.md section 2)."""
        macs = torch.zeros(self.num_layers, dtype=torch.long, device=self.in_widths.device)
        members, group, first = self.groups()
        if members.numel() == 0:
            return macs
        ranks = torch.zeros(first.numel(), dtype=torch.long, device=first.device)
        ranks.index_add_(0, group, self.ranks[members])  # a group's total rank (a dense block's is min(m, n))
        a, b = self.in_widths[first], self.out_widths[first]
        costs = group_macs(ranks, a, b)
        return macs.index_add_(0, self.layers[first], costs)

    def support_groups(self) -> dict[Support, list[int]]:
        """For a single layer: component indices grouped by support (zero widths dropped)."""
        if self.num_layers != 1:
            raise ValueError(f"support_groups needs the structure of one layer, got {self.num_layers}")
        members, group, first = self.groups()
        in_starts = torch.where(self.in_widths == self.in_sizes, 0, self.in_locations)
        out_starts = torch.where(self.out_widths == self.out_sizes, 0, self.out_locations)
        supports = [
            Support(*values)
            for values in torch.stack([in_starts, self.in_widths, out_starts, self.out_widths], 1)[first].tolist()
        ]
        groups: dict[Support, list[int]] = {support: [] for support in supports}
        for index, group_id in zip(members.tolist(), group.tolist()):
            groups[supports[group_id]].append(index)
        return groups


def cyclic_indices(start: int, width: int, size: int, device=None) -> torch.Tensor:
    """The indices ``start, start + 1, ...`` (``width`` of them) modulo ``size``: one side of a
    block's cyclic support."""
    return torch.remainder(torch.arange(start, start + width, device=device), size)


def cyclic_ranges(start: int, width: int, size: int) -> list[tuple[int, int, int]]:
    """The cyclic range ``start .. start + width`` of ``0 .. size`` as contiguous pieces
    ``(position, offset_from, offset_to)``: elements ``offset_from:offset_to`` of the range sit
    at ``position ..`` (one piece, or two when it wraps)."""
    start %= size
    first = min(width, size - start)
    pieces = [(start, 0, first)]
    if width > first:
        pieces.append((0, first, width))
    return pieces


def group_macs(rank, in_width, out_width):
    """MACs per input vector of one group of components sharing a support ``in_width`` columns
    and ``out_width`` rows wide, of total rank ``rank``: the cheaper of two thin products,
    ``rank * (in_width + out_width)``, and one dense block, ``in_width * out_width``. Ints give an
    int; any tensor argument gives a tensor (elementwise). This is the one cost rule of the package."""
    thin, dense = rank * (in_width + out_width), in_width * out_width
    if isinstance(thin, torch.Tensor) or isinstance(dense, torch.Tensor):
        return torch.minimum(torch.as_tensor(thin), torch.as_tensor(dense))
    return min(thin, dense)


def group_macs_slopes(rank: torch.Tensor, in_width: torch.Tensor, out_width: torch.Tensor):
    """The slopes of :func:`group_macs` in ``in_width`` and in ``out_width`` (tensors): ``rank``
    each where the thin products are cheaper, ``out_width`` and ``in_width`` where the dense block is."""
    dense = in_width * out_width < rank * (in_width + out_width)
    return torch.where(dense, out_width, rank), torch.where(dense, in_width, rank)


def low_rank_macs(rank: int, m: int, n: int) -> int:
    """MACs per input vector of a rank-``rank`` factorisation of an ``(m, n)`` weight."""
    return rank * (m + n)


def max_low_rank(macs: float, m: int, n: int) -> int:
    """The largest rank whose factorisation of an ``(m, n)`` weight costs at most ``macs``."""
    return int(macs // (m + n))


def rank_for_ratio(flops_ratio: float, m: int, n: int) -> int:
    """The largest rank (at most ``min(m, n)``) whose factorisation costs at most ``flops_ratio`` of
    the dense ``m * n`` MACs."""
    return min(min(m, n), max_low_rank(flops_ratio * m * n, m, n))


def largest_cheaper_rank(m: int, n: int) -> int:
    """The largest rank whose factorisation is strictly cheaper than the dense weight (0 where
    even rank 1 is not)."""
    return max_low_rank(m * n - 1, m, n)


def square_block_fraction(macs: float, rank: int, m: int, n: int) -> float:
    """The fraction ``x`` (at most 1) such that a rank-``rank`` block over ``x n`` columns and ``x m``
    rows costs ``macs`` (:func:`group_macs`). The cost ``min(r (m + n) x, m n x^2)`` is the smaller
    of two increasing functions of ``x``, so ``x`` is the larger of their roots."""
    return min(1.0, max(macs / (rank * (m + n)), math.sqrt(macs / (m * n))))


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    name: str
    shape: tuple[int, int]  # (out_features, in_features), as nn.Linear's weight
    dense_macs: int
    gblr_macs: int

    @property
    def ratio(self) -> float:
        return self.gblr_macs / self.dense_macs


@dataclasses.dataclass(frozen=True)
class FlopsReport:
    """Per-layer and total MACs of the GBLR layers in a model. ``str()`` gives a table."""

    layers: tuple[LayerFlops, ...]

    @property
    def dense_macs(self) -> int:
        return sum(layer.dense_macs for layer in self.layers)

    @property
    def gblr_macs(self) -> int:
        return sum(layer.gblr_macs for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Global FLOPs ratio of the GBLR layers, each weighted by its dense size. A report
        without layers has none: a ValueError (so do ``str()`` and :meth:`to_dict`) instead of
        NaN; its rows (none) and MAC sums (0) stay readable."""
        if not self.layers:
            raise ValueError(
                "the model has no structured layers (GBLRLinear, FrozenGBLRLinear or a gblr.baselines layer), so "
                "it has no FLOPs ratio: convert its linear layers with gblr.convert_ or build them as "
                "gblr.GBLRLinear, or pass include_dense=True to count nn.Linear layers at ratio 1"
            )
        return self.gblr_macs / self.dense_macs

    def __iter__(self) -> Iterator[LayerFlops]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict:
        return {
            "layers": [
                {
                    "name": layer.name,
                    "shape": list(layer.shape),
                    "dense_macs": layer.dense_macs,
                    "gblr_macs": layer.gblr_macs,
                    "flops_ratio": layer.ratio,
                }
                for layer in self.layers
            ],
            "dense_macs": self.dense_macs,
            "gblr_macs": self.gblr_macs,
            "flops_ratio": self.ratio,
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        header = ("layer", "shape", "dense MACs", "GBLR MACs", "ratio")
        rows = [
            (layer.name or "(model)", f"{layer.shape[0]}x{layer.shape[1]}", f"{layer.dense_macs:,}",
             f"{layer.gblr_macs:,}", f"{layer.ratio:.3f}")
            for layer in self.layers
        ]
        rows.append(("total", "", f"{self.dense_macs:,}", f"{self.gblr_macs:,}", f"{self.ratio:.3f}"))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row):
            cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
            return "  ".join(cells)

        rule = "  ".join("-" * width for width in widths)
        return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])


def hf_conv1d_type() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's linear layers, weight ``(in, out)``) if transformers is
    loaded (a model holding one has loaded it); never imports transformers itself."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _structured_cost(module: nn.Module, include_dense: bool) -> tuple[int, int, int] | None:
    """``(out_features, in_features, MACs)`` of a layer that reports its own cost (GBLR, frozen
    GBLR, the baselines), or of a dense nn.Linear, nn.Conv2d (its ``(out, in * kh * kw /
    groups)`` matrix) or Hugging Face Conv1D when asked; None for anything else."""
    if isinstance(module, nn.Linear):
        dense = module.in_features * module.out_features
        return (module.out_features, module.in_features, dense) if include_dense else None
    if isinstance(module, nn.Conv2d):
        if not include_dense:
            return None
        out_channels, fan_in = module.weight.shape[0], int(module.weight[0].numel())
        return out_channels, fan_in, out_channels * fan_in
    conv1d = hf_conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        in_features, out_features = module.weight.shape
        return (out_features, in_features, in_features * out_features) if include_dense else None
    flops = getattr(module, "flops", None)
    if callable(flops) and isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    ):
        return module.out_features, module.in_features, int(flops())
    return None


def flops_report(model: nn.Module, include_dense: bool = False) -> FlopsReport:
    """MACs per input vector of every structured layer in ``model``: GBLR layers (trainable or
    frozen) and any layer with a ``flops()`` method (the :mod:`gblr.baselines`); with
    ``include_dense``, plain ``nn.Linear``, ``nn.Conv2d`` and Hugging Face ``Conv1D`` layers too
    (ratio 1). A convolution counts its matrix view's MACs per output pixel times its
    ``output_pixels`` (the output height times width of its last forward pass, kept by the GBLR
    convolutions and the convolution baselines; set it on a plain ``nn.Conv2d`` to weigh it the
    same way), so that layers at different resolutions count by their real cost.

    Returns a :class:`FlopsReport`: iterate it for per-layer rows (name, shape, dense and
    structured MACs, ratio), read ``.ratio`` for the global FLOPs ratio, ``.to_dict()`` for
    data, or ``print()`` it for a table. A model without structured layers gives an empty report
    (no rows, 0 MACs) whose ``.ratio``, ``str()`` and ``.to_dict()`` raise a ValueError saying so:
    a ratio of nothing is not a number to carry on with.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(include_dense, bool):
        raise TypeError(f"include_dense must be a bool, got {include_dense!r}")
    layers = []
    for name, module in model.named_modules():
        cost = _structured_cost(module, include_dense)
        if cost is not None:
            out_features, in_features, macs = cost
            times = getattr(module, "output_pixels", None) or 1  # a convolution that has run
            layers.append(LayerFlops(name, (out_features, in_features), in_features * out_features * times,
                                     macs * times))
    return FlopsReport(tuple(layers))
