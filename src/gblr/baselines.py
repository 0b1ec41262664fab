"""Fixed-structure linear layers used as baselines against GBLR at matched FLOPs.

Each layer behaves like :class:`torch.nn.Linear` (any leading dimensions, optional bias,
``device``/``dtype`` factory arguments) and reports its cost the way :mod:`gblr.flops` does:
multiply-accumulates (MACs) per input vector, bias not counted.

* :class:`LowRankLinear`: ``W = U @ V`` of rank ``r``, ``r * (in + out)`` MACs;
* :class:`MonarchLinear`: two block-diagonal factors with the Monarch permutation between them,
  ``inner * (in + out) / nblocks`` MACs;
* :class:`BlockSparseLinear`: a fixed pattern of dense blocks on a ``grid x grid`` block grid,
  ``len(blocks) * (out / grid) * (in / grid)`` MACs; :func:`diagonal_blocks` makes the default
  pattern (evenly spaced block diagonals).

``Layer.at_flops_ratio(in_features, out_features, flops_ratio)`` picks the structure whose cost
is the largest one not above ``flops_ratio * in * out``, so that a baseline never gets more
compute than the GBLR layer it is compared to. When even the smallest structure costs more, it
takes the smallest and ``.flops_ratio()`` reports what was achieved.

Every layer initialises its dense equivalent ``.weight`` to about the entry variance of
``nn.Linear``'s default init (uniform in ``+-1/sqrt(in)``, variance ``1/(3 in)``), so that
swapping a baseline in does not change activation scales.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_flops_ratio, check_input, check_positive_int
from .flops import max_low_rank

__all__ = ["LowRankLinear", "MonarchLinear", "BlockSparseLinear", "diagonal_blocks"]

# Each factor of a two-factor product is drawn uniform in +-_FACTOR_GAIN / sqrt(its fan-in), i.e.
# with variance 1 / (sqrt(3) * fan_in). An entry of the product sums `paths` such terms, so its
# variance is paths / (3 * fan_in_left * fan_in_right); both product layers below have, on average,
# paths = fan_in_left * fan_in_right / in_features, which gives nn.Linear's 1 / (3 * in_features).
_FACTOR_GAIN = 3.0**0.25


def _check_divides(name: str, value: int, **dims: int) -> None:
    for dim_name, dim in dims.items():
        if dim % value:
            raise ValueError(f"{name}={value} must divide {dim_name}={dim}")


def _macs_budget(in_features: int, out_features: int, flops_ratio: float) -> int:
    """Largest MAC count allowed at ``flops_ratio``.

    The relative slack absorbs float rounding of the product, so that e.g. ratio 0.3 admits
    exactly ``3/10`` of the dense cost (``0.3`` is stored slightly below 3/10) but never a whole
    extra MAC.
    """
    return math.floor(flops_ratio * in_features * out_features * (1 + 1e-9))


def _common_divisors(a: int, b: int, limit: int | None = None) -> list[int]:
    g = math.gcd(a, b)
    top = g if limit is None else min(g, limit)
    return [d for d in range(1, top + 1) if g % d == 0]


def _closest_within(candidates: Iterable[tuple[int, object, object]], budget: int):
    """The choice of the ``(macs, preference, choice)`` candidate with the most MACs not above
    ``budget`` (ties: smallest ``preference``); if every candidate is above, the cheapest one."""
    candidates = list(candidates)
    within = [c for c in candidates if c[0] <= budget]
    if within:
        return min(within, key=lambda c: (-c[0], c[1]))[2]
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def _bias_init_(bias: torch.Tensor | None, in_features: int) -> None:
    if bias is not None:
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(bias, -bound, bound)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


class _StructuredLinear(nn.Module):
    """Shared plumbing: shape attributes, bias, the cost ratio and the repr."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def _init_shape_and_bias(self, in_features: int, out_features: int, bias: bool, factory: dict) -> None:
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)

    def flops(self) -> int:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def flops_ratio(self) -> float:
        """MACs per input vector relative to a dense ``nn.Linear`` of the same shape."""
        return self.flops() / (self.in_features * self.out_features)

    def _structure_repr(self) -> str:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self._structure_repr()}, flops_ratio={self.flops_ratio():.3f}"
        )


class LowRankLinear(_StructuredLinear):
    """``y = (x @ v.T) @ u.T + b`` with ``v (rank, in_features)`` and ``u (out_features, rank)``.

    Costs ``rank * (in_features + out_features)`` MACs per input vector. Both factors are
    initialised uniform in ``+-3**(1/4) / sqrt(fan_in)`` (``in_features`` for ``v``, ``rank``
    for ``u``), so that every entry of ``u @ v`` has nn.Linear's variance ``1 / (3 in_features)``
    and the two factors share the scale instead of one of them carrying it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_shape_and_bias(in_features, out_features, bias, factory)
        self.rank = check_positive_int("rank", rank)
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(rank, in_features, **factory))
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
        **kwargs,
    ) -> "LowRankLinear":
        """The largest rank whose cost does not exceed ``flops_ratio * in * out`` (at least 1).

        ``kwargs`` go to the constructor.
        """
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        budget = _macs_budget(in_features, out_features, check_flops_ratio(flops_ratio))
        rank = max(1, max_low_rank(budget, out_features, in_features))
        return cls(in_features, out_features, rank, bias=bias, device=device, dtype=dtype, **kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound_v, bound_u = _FACTOR_GAIN / math.sqrt(self.in_features), _FACTOR_GAIN / math.sqrt(self.rank)
        nn.init.uniform_(self.v, -bound_v, bound_v)
        nn.init.uniform_(self.u, -bound_u, bound_u)
        _bias_init_(self.bias, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix ``u @ v`` (differentiable)."""
        return self.u @ self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        return _add_bias((x @ self.v.T) @ self.u.T, self.bias)

    def flops(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def _structure_repr(self) -> str:
        return f"rank={self.rank}"


class MonarchLinear(_StructuredLinear):
    """A Monarch matrix ``W = L @ P @ R``: block-diagonal ``R``, a fixed permutation ``P``,
    block-diagonal ``L``.

    With ``q = inner / nblocks``:

    * ``R`` has ``nblocks`` blocks ``right[i] (q, in_features / nblocks)``: block ``i`` maps the
      ``i``-th slice of the input to the ``i``-th slice of the ``inner``-wide intermediate;
    * ``P`` views the intermediate as ``(nblocks, q)``, transposes it to ``(q, nblocks)`` and
      flattens it, so that every slice of the permuted intermediate draws on every block of ``R``
      in turn (position ``t * nblocks + i`` holds feature ``t`` of block ``i``);
    * ``L`` has ``nblocks`` blocks ``left[j] (out_features / nblocks, q)``: block ``j`` maps the
      ``j``-th ``q``-wide slice of the permuted intermediate to the ``j``-th output slice.

    Cost: ``inner * (in + out) / nblocks = q * (in + out)`` MACs per input vector, the cost of a
    rank-``q`` product; ``nblocks`` decides how those MACs are spread. The ``(j, i)`` block of the
    dense weight (``out/nblocks x in/nblocks``) is a sum of as many rank-1 terms as there are
    positions ``t * nblocks + i`` (``0 <= t < q``) in slice ``j``: ``q / nblocks`` of them when
    ``nblocks`` divides ``q``, and zero or one when ``q < nblocks`` (a block-sparse weight).

    Both factors are initialised uniform in ``+-3**(1/4) / sqrt(fan_in)``; as a block of the
    dense weight has ``q / nblocks`` terms on average, its entries have nn.Linear's variance
    ``1 / (3 in_features)`` on average.

    Computed with two batched matmuls over the blocks, never with a dense masked matrix.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int,
        inner: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_shape_and_bias(in_features, out_features, bias, factory)
        self.nblocks = check_positive_int("nblocks", nblocks)
        self.inner = check_positive_int("inner", inner)
        _check_divides("nblocks", nblocks, in_features=in_features, out_features=out_features, inner=inner)
        q = inner // nblocks
        self.right = nn.Parameter(torch.empty(nblocks, q, in_features // nblocks, **factory))
        self.left = nn.Parameter(torch.empty(nblocks, out_features // nblocks, q, **factory))
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
        nblocks: int | None = None,
        **kwargs,
    ) -> "MonarchLinear":
        """``nblocks`` and ``inner`` whose cost is the largest not above ``flops_ratio * in * out``.

        ``nblocks`` ranges over the common divisors of ``in_features`` and ``out_features`` (or
        is the given one), ``inner`` over its multiples. The cost ``(inner / nblocks) * (in +
        out)`` does not depend on ``nblocks``, so among equally cheap candidates the one with
        ``nblocks`` closest to ``sqrt(min(in, out))`` wins (the square Monarch shape: blocks
        about as wide as they are many; ties go to more blocks). ``kwargs`` go to the constructor.
        """
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        budget = _macs_budget(in_features, out_features, check_flops_ratio(flops_ratio))
        if nblocks is None:
            choices = _common_divisors(in_features, out_features)
        else:
            check_positive_int("nblocks", nblocks)
            _check_divides("nblocks", nblocks, in_features=in_features, out_features=out_features)
            choices = [nblocks]
        target = math.sqrt(min(in_features, out_features))
        per_inner_unit = in_features + out_features  # MACs per unit of q = inner / nblocks
        candidates = []
        for nb in choices:
            q = max(1, budget // per_inner_unit)
            candidates.append((q * per_inner_unit, (abs(nb - target), -nb), (nb, q * nb)))
        nb, inner = _closest_within(candidates, budget)
        return cls(in_features, out_features, nb, inner, bias=bias, device=device, dtype=dtype, **kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        fan_right, fan_left = self.right.shape[-1], self.left.shape[-1]
        nn.init.uniform_(self.right, -_FACTOR_GAIN / math.sqrt(fan_right), _FACTOR_GAIN / math.sqrt(fan_right))
        nn.init.uniform_(self.left, -_FACTOR_GAIN / math.sqrt(fan_left), _FACTOR_GAIN / math.sqrt(fan_left))
        _bias_init_(self.bias, self.in_features)

    def permutation(self) -> torch.Tensor:
        """``perm`` with ``permuted_intermediate = intermediate[..., perm]``."""
        q = self.inner // self.nblocks
        return torch.arange(self.inner, device=self.right.device).view(self.nblocks, q).T.reshape(-1)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix ``L @ P @ R`` (differentiable).

        Built from the definition (block-diagonal matrices and a permutation index), a separate
        path from :meth:`forward`'s reshapes.
        """
        right = torch.block_diag(*self.right.unbind(0))  # (inner, in)
        left = torch.block_diag(*self.left.unbind(0))  # (out, inner)
        return left @ right[self.permutation()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        nb, q = self.nblocks, self.inner // self.nblocks
        lead = x.shape[:-1]
        h = torch.einsum("nbi,bqi->nbq", x.reshape(-1, nb, self.in_features // nb), self.right)
        # The Monarch permutation: (nb, q) -> (q, nb), flattened, then cut into nb slices of q.
        h = h.transpose(1, 2).reshape(-1, nb, q)
        y = torch.einsum("nbq,boq->nbo", h, self.left)
        return _add_bias(y.reshape(*lead, self.out_features), self.bias)

    def flops(self) -> int:
        return self.inner * (self.in_features + self.out_features) // self.nblocks

    def _structure_repr(self) -> str:
        return f"nblocks={self.nblocks}, inner={self.inner}"


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


def _check_blocks(blocks, grid: int) -> tuple[tuple[int, int], ...]:
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


SMALL_BLOCK = 32 * 32  # blocks with fewer entries run as a masked dense product (BlockSparseLinear.forward)


class BlockSparseLinear(_StructuredLinear):
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
        _check_divides("grid", grid, in_features=in_features, out_features=out_features)
        self.blocks = _check_blocks(blocks, grid)
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
        budget = _macs_budget(in_features, out_features, check_flops_ratio(flops_ratio))
        if grid is None:
            choices = [g for g in _common_divisors(in_features, out_features, limit=16) if g >= 2] or [1]
        else:
            check_positive_int("grid", grid)
            _check_divides("grid", grid, in_features=in_features, out_features=out_features)
            choices = [grid]
        candidates = []
        for g in choices:
            per_diagonal = in_features * out_features // g
            k = min(g, max(1, budget // per_diagonal))
            candidates.append((k * per_diagonal, -g, (g, k)))
        g, k = _closest_within(candidates, budget)
        return cls(
            in_features, out_features, g, diagonal_blocks(g, k), bias=bias, device=device, dtype=dtype, **kwargs
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.block_weight, -bound, bound)
        _bias_init_(self.bias, self.in_features)

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
        return _add_bias(y.reshape(*lead, self.out_features), self.bias)

    def flops(self) -> int:
        b_out, b_in = self.block_shape
        return len(self.blocks) * b_out * b_in

    def _structure_repr(self) -> str:
        return f"grid={self.grid}, blocks={len(self.blocks)}"
