"""Cost of GBLR layers in multiply-accumulates (MACs) per input vector, SPEC section 2.

Components with identical (in, out) supports form a group; a group of total rank ``R`` whose
supports are ``a`` columns and ``b`` rows wide costs ``min(R * (a + b), a * b)`` (two thin
products, or one dense block if that is cheaper). Zero-width components cost nothing. A dense
``(m, n)`` layer costs ``m * n``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["Support", "support_groups", "structure_macs", "group_macs", "LayerFlops", "FlopsReport", "flops_report"]


@dataclasses.dataclass(frozen=True, order=True)
class Support:
    """A block's support in elements: columns ``in_start ..`` (``in_width`` of them, cyclic)
    and rows ``out_start ..`` (``out_width``, cyclic). A full-width side always has start 0."""

    in_start: int
    in_width: int
    out_start: int
    out_width: int


def _canonical_supports(
    in_widths: torch.Tensor,
    in_locations: torch.Tensor,
    out_widths: torch.Tensor,
    out_locations: torch.Tensor,
    in_features: int,
    out_features: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(supports (K, 4), alive (K,))``: rows of (in_start, in_width, out_start, out_width) with
    full-width starts set to 0 (where a full side starts does not matter), and which components
    have both widths nonzero."""
    in_starts = torch.where(in_widths == in_features, 0, in_locations)
    out_starts = torch.where(out_widths == out_features, 0, out_locations)
    supports = torch.stack([in_starts, in_widths, out_starts, out_widths], 1)
    return supports, (in_widths > 0) & (out_widths > 0)


def support_groups(
    in_widths: torch.Tensor,
    in_locations: torch.Tensor,
    out_widths: torch.Tensor,
    out_locations: torch.Tensor,
    in_features: int,
    out_features: int,
) -> dict[Support, list[int]]:
    """Group component indices by identical support, dropping components with a zero width.

    All arguments are integer element counts (as from :func:`gblr.masks.element_supports`).
    """
    supports, alive = _canonical_supports(in_widths, in_locations, out_widths, out_locations, in_features, out_features)
    groups: dict[Support, list[int]] = {}
    for index in alive.nonzero().flatten().tolist():
        groups.setdefault(Support(*supports[index].tolist()), []).append(index)
    return groups


def structure_macs(
    in_widths: torch.Tensor,
    in_locations: torch.Tensor,
    out_widths: torch.Tensor,
    out_locations: torch.Tensor,
    in_features: int,
    out_features: int,
    rank: int,
) -> int:
    """MACs per input vector of a GBLR structure (the sum of :func:`group_macs` over the
    groups of :func:`support_groups`), computed without a Python loop over components."""
    supports, alive = _canonical_supports(in_widths, in_locations, out_widths, out_locations, in_features, out_features)
    if not bool(alive.any()):
        return 0
    unique, counts = torch.unique(supports[alive], dim=0, return_counts=True)
    in_width, out_width = unique[:, 1], unique[:, 3]
    costs = torch.minimum(counts * rank * (in_width + out_width), in_width * out_width)
    return int(costs.sum())


def group_macs(rank: int, in_width: int, out_width: int) -> int:
    """MACs per input vector of one group: the cheaper of two thin products and a dense block."""
    return min(rank * (in_width + out_width), in_width * out_width)


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
        """Global FLOPs ratio of the GBLR layers, each weighted by its dense size."""
        return self.gblr_macs / self.dense_macs if self.layers else float("nan")

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


def _structured_macs(module: nn.Module, include_dense: bool) -> int | None:
    """MACs of a layer that reports its own cost (GBLR, frozen GBLR, the baselines), or of a
    dense nn.Linear when asked; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features if include_dense else None
    flops = getattr(module, "flops", None)
    if callable(flops) and isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    ):
        return int(flops())
    return None


def flops_report(model: nn.Module, include_dense: bool = False) -> FlopsReport:
    """MACs per input vector of every structured layer in ``model``: GBLR layers (trainable or
    frozen) and any layer with a ``flops()`` method (the :mod:`gblr.baselines`); with
    ``include_dense``, plain ``nn.Linear`` layers too (ratio 1).

    Returns a :class:`FlopsReport`: iterate it for per-layer rows (name, shape, dense and
    structured MACs, ratio), read ``.ratio`` for the global FLOPs ratio, ``.to_dict()`` for
    data, or ``print()`` it for a table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = []
    for name, module in model.named_modules():
        macs = _structured_macs(module, include_dense)
        if macs is not None:
            dense = module.in_features * module.out_features
            layers.append(LayerFlops(name, (module.out_features, module.in_features), dense, macs))
    return FlopsReport(tuple(layers))
