"""Exact GBLR forms of classic structured matrices (the paper's expressiveness theorem).

Each function returns a :class:`~gblr.GBLRLinear` (rank-1 components, ``sigma=None``) whose
``.weight`` equals the structured input and whose ``.flops()`` equals the native structure's
cost (docs/method.md section 2):

* :func:`low_rank` ``P @ Q`` of rank ``R``: ``R`` full-width components, ``R * (m + n)`` MACs;
* :func:`block_sparse`: each nonzero ``b_o x b_i`` block becomes ``rank(block)`` components
  supported exactly on it, ``b_o * b_i`` MACs per full-rank block;
* :func:`block_low_rank`: ``rank`` components per block of a grid, ``rank * (b_o + b_i)`` MACs
  per block (a Monarch-like matrix).

Block grids may be shifted cyclically by ``offset``, so a block can wrap around the last row or
column: the GBLR format has no preferred origin.
"""

from __future__ import annotations

import torch

from ._validation import check_matrix
from .flops import cyclic_indices
from .linear import GBLRLinear

__all__ = ["low_rank", "block_sparse", "block_low_rank", "from_components"]


def _check_pair(name: str, value, bounds: tuple[int, int]) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(item, int) and not isinstance(item, bool) and item > 0 for item in value)
    ):
        raise ValueError(f"{name} must be a pair of positive ints, got {value!r}")
    for item, bound, axis in zip(value, bounds, ("rows", "columns")):
        if bound % item:
            raise ValueError(f"{name}={tuple(value)} must divide the weight's shape {bounds} ({axis})")
    return int(value[0]), int(value[1])


def _check_offset(offset) -> tuple[int, int]:
    if (
        not isinstance(offset, (tuple, list))
        or len(offset) != 2
        or not all(isinstance(item, int) and not isinstance(item, bool) for item in offset)
    ):
        raise ValueError(f"offset must be a pair of ints (row, column), got {offset!r}")
    return int(offset[0]), int(offset[1])


def from_components(
    shape: tuple[int, int],
    components: list[tuple[torch.Tensor, torch.Tensor, int, int, int, int]],
    like: torch.Tensor,
    bias: torch.Tensor | None,
) -> GBLRLinear:
    """A GBLRLinear from rank-1 components ``(u_block, v_block, out_start, out_width, in_start,
    in_width)`` given on their supports (``u_block`` of length out_width, ``v_block`` in_width)."""
    m, n = shape
    count = max(1, len(components))  # an all-zero matrix is one empty component
    # Built on the meta device (no init work), then every parameter is written below.
    layer = GBLRLinear(n, m, bias=bias is not None, components=count, rank=1, device="meta", dtype=like.dtype)
    layer = layer.to_empty(device=like.device)
    with torch.no_grad():
        layer.u.zero_()
        layer.v.zero_()
        for parameter in layer.structural_parameters():
            parameter.zero_()
        for k, (u_block, v_block, out_start, out_width, in_start, in_width) in enumerate(components):
            rows = cyclic_indices(out_start, out_width, m, like.device)
            cols = cyclic_indices(in_start, in_width, n, like.device)
            layer.u[k, rows, 0] = u_block
            layer.v[k, 0, cols] = v_block
            layer.out_width[k] = out_width / m
            layer.out_location[k] = out_start / m
            layer.in_width[k] = in_width / n
            layer.in_location[k] = in_start / n
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _split_rank_one(block: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``keep`` singular triplets of ``block`` as ``(b_o, keep)`` and ``(keep, b_i)``
    factors, the singular value split evenly between them."""
    U, S, Vh = torch.linalg.svd(block.to(torch.float64), full_matrices=False)
    root = S[:keep].sqrt()
    return (U[:, :keep] * root).to(block.dtype), (root[:, None] * Vh[:keep]).to(block.dtype)


def _grid_blocks(weight: torch.Tensor, block_shape: tuple[int, int], offset: tuple[int, int]):
    """``(out_start, in_start, block)`` for every block of the cyclically shifted grid."""
    m, n = weight.shape
    b_out, b_in = block_shape
    row_offset, col_offset = offset[0] % m, offset[1] % n
    shifted = torch.roll(weight, shifts=(-row_offset, -col_offset), dims=(0, 1))
    for i in range(0, m, b_out):
        for j in range(0, n, b_in):
            yield (row_offset + i) % m, (col_offset + j) % n, shifted[i : i + b_out, j : j + b_in]


def low_rank(p: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None = None) -> GBLRLinear:
    """``P @ Q`` (``P`` of shape ``(m, R)``, ``Q`` of shape ``(R, n)``) as ``R`` full-width
    components. Its cost is ``min(R * (m + n), m * n)`` MACs."""
    p = check_matrix("p", p)
    q = check_matrix("q", q)
    if p.shape[1] != q.shape[0]:
        raise ValueError(f"p has {p.shape[1]} columns but q has {q.shape[0]} rows; they must match (the rank R)")
    m, n = p.shape[0], q.shape[1]
    components = [(p[:, k], q[k], 0, m, 0, n) for k in range(p.shape[1])]
    return from_components((m, n), components, p, bias)


def block_sparse(
    weight: torch.Tensor,
    block_shape: tuple[int, int],
    *,
    offset: tuple[int, int] = (0, 0),
    bias: torch.Tensor | None = None,
) -> GBLRLinear:
    """A block-sparse ``weight`` on a grid of ``block_shape = (b_o, b_i)`` blocks.

    Every block with a nonzero entry becomes ``rank(block)`` rank-1 components supported exactly
    on it (split by SVD, numerical rank at the usual ``max(b_o, b_i) * eps`` tolerance). The grid
    starts at row ``offset[0]`` and column ``offset[1]`` and wraps around.
    """
    weight = check_matrix("weight", weight)
    block_shape = _check_pair("block_shape", block_shape, tuple(weight.shape))
    offset = _check_offset(offset)
    b_out, b_in = block_shape
    tolerance = max(block_shape) * torch.finfo(weight.dtype).eps
    components = []
    for out_start, in_start, block in _grid_blocks(weight, block_shape, offset):
        if not block.any():
            continue
        singular = torch.linalg.svdvals(block.to(torch.float64))
        keep = int((singular > tolerance * singular[0]).sum())
        left, right = _split_rank_one(block, keep)
        components += [(left[:, k], right[k], out_start, b_out, in_start, b_in) for k in range(keep)]
    return from_components(tuple(weight.shape), components, weight, bias)


def block_low_rank(
    weight: torch.Tensor,
    grid: tuple[int, int],
    rank: int,
    *,
    offset: tuple[int, int] = (0, 0),
    bias: torch.Tensor | None = None,
) -> GBLRLinear:
    """``weight`` cut into a ``grid = (rows, columns)`` of equal blocks, each of rank ``rank``.

    Each block becomes ``rank`` rank-1 components on its support (its top singular triplets).
    Exact when every block has rank at most ``rank``; otherwise the blockwise best rank-``rank``
    approximation (a projection: applying it twice changes nothing).
    """
    weight = check_matrix("weight", weight)
    m, n = weight.shape
    grid = _check_pair("grid", grid, (m, n))
    block_shape = (m // grid[0], n // grid[1])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min(block_shape):
        raise ValueError(f"rank must be an int in [1, {min(block_shape)}] for blocks of shape {block_shape}, got {rank!r}")
    offset = _check_offset(offset)
    components = []
    for out_start, in_start, block in _grid_blocks(weight, block_shape, offset):
        left, right = _split_rank_one(block, rank)
        components += [(left[:, k], right[k], out_start, block_shape[0], in_start, block_shape[1]) for k in range(rank)]
    return from_components((m, n), components, weight, bias)
