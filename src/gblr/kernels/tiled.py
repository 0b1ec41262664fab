"""Tiled GBLR product: a frozen layer as a few dense GEMMs over column and row tiles.

A frozen layer applies ``y = sum_k left_k (right_k x[cols_k])`` scattered to ``rows_k``, with
contiguous (cyclic) supports. One GEMM per block is memory bound for thin blocks, and torch's
sparse formats are slower than dense at these densities. Here the layer's ``R`` rank rows are
stacked instead (every block's ``right`` rows, every block's ``left`` columns), and both sides
are cut into tiles of ``tile`` columns / rows:

    h[k]     = sum over column tiles j  of  V_j[k] . x[tile j]      (V_j: rows active in tile j)
    y[tile i] = U_i^T h[rows active in tile i]

so a forward pass is ``n / tile + m / tile`` GEMMs whose inner sizes are the tile and the number
of rows active in it. Each row costs its support rounded out to whole tiles, so the padded MACs
(:attr:`TiledProduct.macs`) exceed the layer's FLOPs by about ``tile`` per row and side.
Everything is precomputed once (:func:`pack`); ``h`` is kept transposed (rank rows by tokens)
so that the scatter and gather between the stages move whole contiguous rows.

At a few tokens the cost is the number of calls rather than the MACs; :func:`batch` then pads
every tile on a side to the same number of rows (zero rows, scattered to a scratch row of ``h``)
so that each side is one batched GEMM (:func:`batched_forward`): four calls in all, paying the
padding in MACs.

At one token or a few, even four calls cost more than the arithmetic of a layer of a few hundred
features: :func:`stack` keeps the stacked rank rows whole instead (zero off each block's support),
so that a forward pass is two matrix products, ``y = U (V x)`` (:func:`stacked_forward`), at
``R * (in + out)`` MACs per token: the cost of low rank for full-width blocks, padding for
local ones.
"""

from __future__ import annotations

import dataclasses

import torch

from ..flops import cyclic_indices

__all__ = ["TiledProduct", "BatchedTiles", "StackedFactors", "pack", "batch", "stack", "tiled_forward",
           "batched_forward", "stacked_forward", "LongRows", "long_rows_stacked", "long_rows_stacked_forward"]


@dataclasses.dataclass
class TiledProduct:
    in_features: int
    out_features: int
    rank: int  # stacked rank rows
    tile: int
    in_tiles: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # (start, stop, rows (K_j,), V_j (K_j, width))
    out_tiles: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # (start, stop, rows (K_i,), U_i (K_i, width))
    uncovered: list[tuple[int, int]]  # output column ranges no block reaches (zero)

    @property
    def macs(self) -> int:
        """MACs per token including the zero padding inside partially covered tiles."""
        return sum(int(V.numel()) for *_, V in self.in_tiles) + sum(int(U.numel()) for *_, U in self.out_tiles)

    @property
    def gemms(self) -> int:
        return len(self.in_tiles) + len(self.out_tiles)


def stack_factors(blocks, size: int, side: str, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values (R, size), active (R, size) bool)``: every rank row of every block on one side
    (``"in"``: the rows of ``right``; ``"out"``: the columns of ``left``), zero off its support."""
    values, active = [], []
    for support, left, right in blocks:
        if side == "in":  # a dense block's rows are rank rows of their own (its left is the identity)
            start, width = support.in_start, support.in_width
            factor = left if right is None else right
        else:
            start, width = support.out_start, support.out_width
            factor = torch.eye(left.shape[0], dtype=left.dtype, device=left.device) if right is None else left.T
        index = cyclic_indices(start, width, size, device)
        row_values = factor.new_zeros(factor.shape[0], size)
        row_values[:, index] = factor
        row_active = torch.zeros(factor.shape[0], size, dtype=torch.bool, device=device)
        row_active[:, index] = True
        values.append(row_values.to(dtype))
        active.append(row_active)
    if not values:
        return torch.zeros(0, size, dtype=dtype, device=device), torch.zeros(0, size, dtype=torch.bool, device=device)
    return torch.cat(values), torch.cat(active)


def _tiles(values: torch.Tensor, active: torch.Tensor, tile: int):
    size = values.shape[1]
    tiles = []
    for start in range(0, size, tile):
        stop = min(size, start + tile)
        rows = active[:, start:stop].any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        tiles.append((start, stop, rows, values[rows, start:stop].contiguous()))
    return tiles


@torch.no_grad()
def pack(in_features: int, out_features: int, blocks, tile: int, device=None, dtype=None) -> TiledProduct:
    """Precompute the tiles of a frozen layer's ``blocks`` (``(Support, left, right)`` triples,
    ``right=None`` for a dense block) for ``tile``-wide column and row tiles."""
    blocks = [(support, left.detach(), None if right is None else right.detach()) for support, left, right in blocks]
    if blocks:
        device = device if device is not None else blocks[0][1].device
        dtype = dtype if dtype is not None else blocks[0][1].dtype
    right_rows, right_active = stack_factors(blocks, in_features, "in", device, dtype)
    left_rows, left_active = stack_factors(blocks, out_features, "out", device, dtype)
    out_tiles = _tiles(left_rows, left_active, tile)
    covered = {start for start, *_ in out_tiles}
    uncovered = [(start, min(out_features, start + tile)) for start in range(0, out_features, tile) if start not in covered]
    return TiledProduct(
        in_features, out_features, right_rows.shape[0], tile,
        _tiles(right_rows, right_active, tile), out_tiles, uncovered,
    )


def tiled_forward(x: torch.Tensor, product: TiledProduct) -> torch.Tensor:
    """``y (T, out_features)`` for ``x (T, in_features)``, without bias. Inference only (the
    products write into the output in place; no autograd)."""
    tokens = x.shape[0]
    h = x.new_zeros(product.rank, tokens)  # rank rows x tokens: contiguous rows to scatter / gather
    x_t = x.T
    for start, stop, rows, V in product.in_tiles:
        h.index_add_(0, rows, V @ x_t[start:stop])
    y = x.new_empty(tokens, product.out_features)  # every column is written once below (zeroing 50 MB costs ~10 ms)
    for start, stop, rows, U in product.out_tiles:
        torch.mm(h.index_select(0, rows).T, U, out=y[:, start:stop])
    for start, stop in product.uncovered:
        y[:, start:stop].zero_()
    return y


@dataclasses.dataclass
class BatchedTiles:
    """A :class:`TiledProduct` with each side's tiles padded to one row count: ``V (J_in, K_in,
    tile)`` and ``U (J_out, K_out, tile)``, every tile of both sides present (an uncovered tile is
    all padding). Padding rows read and write row ``rank`` of ``h``, a scratch row."""

    in_features: int
    out_features: int
    rank: int
    tile: int
    in_rows: torch.Tensor  # (J_in * K_in,) rows of h each padded tile row adds to
    V: torch.Tensor
    out_rows: torch.Tensor  # (J_out * K_out,) rows of h each padded tile row reads
    U: torch.Tensor

    @property
    def macs(self) -> int:
        """MACs per token, padding included."""
        return int(self.V.numel() + self.U.numel())


def _padded(tiles, size: int, tile: int, scratch: int, like: torch.Tensor):
    count = -(-size // tile)
    rows = max([r.numel() for _, _, r, _ in tiles], default=0) or 1
    values = like.new_zeros(count, rows, tile)
    index = torch.full((count, rows), scratch, dtype=torch.long, device=like.device)
    for start, stop, r, block in tiles:
        values[start // tile, : r.numel(), : stop - start] = block
        index[start // tile, : r.numel()] = r
    return index.flatten(), values


@torch.no_grad()
def batch(product: TiledProduct, like: torch.Tensor) -> BatchedTiles:
    """The padded, batched form of ``product`` (``like``: device and dtype of the values)."""
    tile, scratch = product.tile, product.rank
    in_rows, V = _padded(product.in_tiles, product.in_features, tile, scratch, like)
    out_rows, U = _padded(product.out_tiles, product.out_features, tile, scratch, like)
    return BatchedTiles(product.in_features, product.out_features, product.rank, tile, in_rows, V, out_rows, U)


def batched_forward(x: torch.Tensor, batched: BatchedTiles) -> torch.Tensor:
    """:func:`tiled_forward` as two batched GEMMs (see :func:`batch`)."""
    # every shape is spelled out (no -1): with zero tokens a -1 could be any size, and view refuses it
    tokens, tile = x.shape[0], batched.tile
    (j_in, k_in, _), (j_out, k_out, _) = batched.V.shape, batched.U.shape
    x_t = x.new_zeros(j_in * tile, tokens)  # x transposed, padded to whole tiles
    x_t[: batched.in_features] = x.T
    parts = torch.bmm(batched.V, x_t.view(j_in, tile, tokens))  # (J_in, K_in, tokens)
    h = x.new_zeros(batched.rank + 1, tokens)
    h.index_add_(0, batched.in_rows, parts.view(j_in * k_in, tokens))
    gathered = h.index_select(0, batched.out_rows).view(j_out, k_out, tokens)
    y = torch.bmm(gathered.transpose(1, 2), batched.U)  # (J_out, tokens, tile)
    return y.transpose(0, 1).reshape(tokens, j_out * tile)[:, : batched.out_features]


@dataclasses.dataclass
class StackedFactors:
    """Every rank row of a frozen layer, whole: ``right (R, in)`` and ``left (out, R)``, zero
    off each block's support (see :func:`stack`)."""

    right: torch.Tensor
    left: torch.Tensor

    @property
    def macs(self) -> int:
        """MACs per token, zeros included."""
        return int(self.right.numel() + self.left.numel())


@torch.no_grad()
def stack(in_features: int, out_features: int, blocks, device=None, dtype=None) -> StackedFactors:
    """The :class:`StackedFactors` of a frozen layer's ``blocks`` (as for :func:`pack`)."""
    blocks = [(support, left.detach(), None if right is None else right.detach()) for support, left, right in blocks]
    right, _ = stack_factors(blocks, in_features, "in", device, dtype)
    left, _ = stack_factors(blocks, out_features, "out", device, dtype)
    return StackedFactors(right.contiguous(), left.T.contiguous())


def stacked_forward(x: torch.Tensor, factors: StackedFactors) -> torch.Tensor:
    """``y (T, out_features)`` for ``x (T, in_features)``, without bias: two matrix products."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, factors.right), factors.left)


@dataclasses.dataclass
class LongRows:
    """A matrix ``W (out, in)`` applied as ``x @ W.T``, stored so that its rows run along its
    longer side: as it is where ``in >= out`` (one ``F.linear``), transposed to ``(in, out)`` where
    ``out > in`` (one ``x @ stored``). At one token the product streams the stored rows, and long
    rows stream faster: 1.6x on this project's CPU for a 1536x576 matrix read from memory
    (docs/benchmarks/decode.md); at 8 tokens the plain layout wins again, which is why
    the ``-t`` paths are timed, not assumed."""

    stored: torch.Tensor
    transposed: bool

    @staticmethod
    def turns(out_features: int, in_features: int) -> bool:
        """Whether a matrix of that shape is stored transposed (more outputs than inputs)."""
        return out_features > in_features

    @classmethod
    def of(cls, weight: torch.Tensor) -> "LongRows":
        """The long-row storage of ``weight (out, in)``."""
        if cls.turns(*weight.shape):
            return cls(weight.detach().T.contiguous(), True)
        return cls(weight.detach().contiguous(), False)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` for 2-D ``x``, in one call."""
        if not self.transposed:
            return torch.nn.functional.linear(x, self.stored, bias)
        return torch.mm(x, self.stored) if bias is None else torch.addmm(bias, x, self.stored)


def long_rows_stacked(factors: StackedFactors) -> tuple[LongRows, LongRows]:
    """The two factors of ``factors`` (right, then left) in long-row storage (:class:`LongRows`)."""
    return LongRows.of(factors.right), LongRows.of(factors.left)


def long_rows_stacked_forward(x: torch.Tensor, factors: tuple[LongRows, LongRows]) -> torch.Tensor:
    """:func:`stacked_forward` on the long-row factors of :func:`long_rows_stacked`."""
    right, left = factors
    return left.apply(right.apply(x))
