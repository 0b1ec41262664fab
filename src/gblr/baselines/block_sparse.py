"""The block-sparse baseline: a fixed pattern of dense blocks on a square block grid."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_flops_ratio, check_input, check_positive_int
from .common import StructuredLinear, add_bias, check_divides, closest_within, common_divisors, init_bias_, macs_budget

__all__ = ["BlockSparseLinear", "diagonal_blocks", "diagonal_grid", "check_blocks", "SMALL_BLOCK"]

SMALL_BLOCK = 32 * 32  # blocks with fewer entries run as a masked dense product (BlockSparseLinear.forward)


def diagonal_blocks(grid: int, k: int) -> list[tuple[int, int]]:
    """``k`` block diagonals of a ``grid x grid`` block grid, at evenly spread offsets.

    Diagonal ``i`` (``0 <= i < k``) has offset ``round(i * grid / k)`` and holds the blocks
    ``(r, (r + offset) % grid)`` for every row block ``r``. The offsets are distinct, so the
    pattern has ``k * grid`` blocks and covers every row block and every column block exactly
    ``k`` times: no input is ignored and no output is left to the bias alone.
    """
    check_positive_int("grid", grid)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= grid:
        raise ValueError(f"k must be an int in [1, grid={grid}], got {k!r}")
    offsets = [round(i * grid / k) for i in range(k)]
    return [(r, (r + offset) % grid) for offset in offsets for r in range(grid)]


def diagonal_grid(rows: int, cols: int, dense_macs: int, flops_ratio: float, grid: int | None,
                  names: tuple[str, str]) -> tuple[int, int]:
    """``(grid, k)`` for ``k`` block diagonals on a ``grid x grid`` grid of a ``rows x cols``
    block structure (features or channels, named ``names`` in errors) whose cost ``k / grid *
    dense_macs`` is the largest not above ``flops_ratio * dense_macs``. ``grid`` ranges over the
    common divisors up to 16 (or is the given one), excluding 1 unless it is the only one (a 1x1
    grid is dense); ``k = max(1, floor(flops_ratio * grid))``; larger grids win ties."""
    budget = macs_budget(dense_macs, 1, check_flops_ratio(flops_ratio))
    if grid is None:
        choices = [g for g in common_divisors(rows, cols, limit=16) if g >= 2] or [1]
    else:
        check_positive_int("grid", grid)
        check_divides("grid", grid, **{names[0]: rows, names[1]: cols})
        choices = [grid]
    candidates = []
    for g in choices:
        per_diagonal = dense_macs // g
        k = min(g, max(1, budget // per_diagonal))
        candidates.append((k * per_diagonal, -g, (g, k)))
    return closest_within(candidates, budget)


def check_blocks(blocks, grid: int) -> tuple[tuple[int, int], ...]:
    """``blocks`` as a tuple of distinct ``(row_block, col_block)`` int pairs on the grid, or a
    ValueError naming the offending entry."""
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Iterable):
        raise ValueError(f"blocks must be a sequence of (row_block, col_block) pairs, got {blocks!r}")
    checked: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for index, pair in enumerate(blocks):
        try:
            row, col = (operator.index(item) for item in pair)
            valid = not any(isinstance(item, bool) for item in pair)
        except (TypeError, ValueError):
            valid = False
        if not valid or not (0 <= row < grid and 0 <= col < grid):
            raise ValueError(
                f"blocks[{index}] must be a (row_block, col_block) pair of ints in [0, grid={grid}), got {pair!r}"
            )
        if (row, col) in seen:
            raise ValueError(f"blocks must not repeat a block, got {(row, col)} twice")
        seen.add((row, col))
        checked.append((row, col))
    if not checked:
        raise ValueError("blocks must hold at least one (row_block, col_block) pair, got none")
    return tuple(checked)


class BlockSparseLinear(StructuredLinear):
    """A ``grid x grid`` grid of ``(out/grid, in/grid)`` blocks of which a fixed set is nonzero.

    ``blocks`` lists the active blocks as ``(row_block, col_block)`` pairs (see
    :func:`diagonal_blocks` for the default pattern); their values are one parameter
    ``block_weight (len(blocks), out/grid, in/grid)``. The forward pass gathers the input slices
    of the active column blocks, applies all blocks in one batched matmul and scatter-adds the
    results into their row blocks: ``len(blocks) * (out/grid) * (in/grid)`` MACs, no dense
    masked matrix. Blocks of fewer than ``SMALL_BLOCK`` entries run as one dense product with
    the masked weight instead (faster in wall time; :meth:`flops` still counts the blocks).

    Active blocks are initialised like the same entries of a dense ``nn.Linear`` (uniform in
    ``+-1/sqrt(in_features)``): the layer starts as a dense init with the inactive blocks
    pruned, the usual starting point of a block-sparse baseline. (Rescaling to the reduced
    fan-in would instead keep output variance; we keep the entry scale, which the comparison
    with the other layers is about.)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid: int,
        blocks: Sequence[tuple[int, int]],
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_shape_and_bias(in_features, out_features, bias, factory)
        self.grid = check_positive_int("grid", grid)
        check_divides("grid", grid, in_features=in_features, out_features=out_features)
        self.blocks = check_blocks(blocks, grid)
        rows, cols = zip(*self.blocks)
        # The pattern is a constructor argument, not state: kept out of the state dict, but moved
        # with the module by .to().
        self.register_buffer("block_rows", torch.tensor(rows, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("block_cols", torch.tensor(cols, dtype=torch.long, device=device), persistent=False)
        self.block_weight = nn.Parameter(
            torch.empty(len(self.blocks), out_features // grid, in_features // grid, **factory)
        )
        self.reset_parameters()

    @classmethod
    def at_flops_ratio(
        cls,
        in_features: int,
        out_features: int,
        flops_ratio: float,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        grid: int | None = None,
        **kwargs,
    ) -> "BlockSparseLinear":
        """``k`` evenly spread block diagonals (:func:`diagonal_blocks`) on the grid whose cost
        ``(k / grid) * in * out`` is the largest not above ``flops_ratio * in * out``.

        ``grid`` ranges over the common divisors of ``in_features`` and ``out_features`` up to
        16 (or is the given one), excluding 1 unless it is the only one (a 1x1 grid is the dense
        layer); ``k = max(1, floor(flops_ratio * grid))``. Larger grids give finer ratios and win
        ties. ``kwargs`` go to the constructor.
        """
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        g, k = diagonal_grid(in_features, out_features, in_features * out_features, flops_ratio, grid,
                             ("in_features", "out_features"))
        return cls(
            in_features, out_features, g, diagonal_blocks(g, k), bias=bias, device=device, dtype=dtype, **kwargs
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.block_weight, -bound, bound)
        init_bias_(self.bias, self.in_features)

    @property
    def block_shape(self) -> tuple[int, int]:
        """``(out_features / grid, in_features / grid)``."""
        return self.out_features // self.grid, self.in_features // self.grid

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix, zero outside the active blocks
        (differentiable)."""
        g = self.grid
        grid_of_blocks = self.block_weight.new_zeros(g, g, *self.block_shape)
        grid_of_blocks = grid_of_blocks.index_put((self.block_rows, self.block_cols), self.block_weight)
        return grid_of_blocks.transpose(1, 2).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        b_out, b_in = self.block_shape
        if b_out * b_in < SMALL_BLOCK:
            # Tiny blocks make many tiny products, far slower on a CPU than one dense product
            # with the zeros in place; the layer's cost is still that of its blocks (flops()).
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        gathered = x.reshape(-1, self.grid, b_in).index_select(1, self.block_cols)  # (N, blocks, b_in)
        parts = torch.einsum("nki,koi->nko", gathered, self.block_weight)  # (N, blocks, b_out)
        y = parts.new_zeros(parts.shape[0], self.grid, b_out).index_add_(1, self.block_rows, parts)
        return add_bias(y.reshape(*lead, self.out_features), self.bias)

    def flops(self) -> int:
        b_out, b_in = self.block_shape
        return len(self.blocks) * b_out * b_in

    def _structure_repr(self) -> str:
        return f"grid={self.grid}, blocks={len(self.blocks)}"
