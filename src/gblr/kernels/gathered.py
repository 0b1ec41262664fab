"""Triton path of a frozen GBLR layer (CUDA; fp32, fp16, bf16): two gathered grouped GEMMs.

A frozen layer is ``y = sum_k left_k (right_k x[cols_k])`` scattered to ``rows_k``. Stack every
block's rank rows (as :mod:`gblr.kernels.tiled` does) and compute, for ``x`` of ``T`` tokens,

    h[:, r] = x[:, cols(r)] . V[r]             stage 1, one column of h per rank row
    y[:, o] = sum over rows r covering o of h[:, r] * U[r, o]      stage 2

Both stages are one kernel, a *gathered grouped GEMM*: output columns come in groups of
``block`` (``N``); group ``g`` reads the input columns ``index[offsets[g]:offsets[g+1]]`` (a
gather folded into the loads, so nothing is copied) and multiplies them by its own dense
``(K_g, N)`` slab of values. Every output column belongs to one group, so each program owns its
outputs: no atomics, no zero-fill.

- Stage 1 groups rank rows: rows sorted by where their input support starts, ``N`` at a time;
  a group reads the union of its rows' supports (padding: the union minus each row's support).
- Stage 2 groups output columns in tiles of ``N``; a tile reads the ``h`` columns of the rank
  rows whose output support meets it (padding: the part of a row's tile outside its support).

Weights are read once per ``BLOCK_T`` tokens and ``h`` stays small (rank columns), so at a few
tokens the work is the weights' bytes and at many tokens the padded MACs (:attr:`macs`).
The block sizes are first guesses, not tuned on a GPU. Triton's interpreter
(``TRITON_INTERPRET=1``) runs the kernel on CPU tensors for tests; it cannot do bf16 products.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from .tiled import _stacked

__all__ = ["available", "GatheredGEMM", "TritonProduct", "pack_triton", "triton_forward"]


@functools.cache
def available() -> bool:
    """Whether Triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass
class GatheredGEMM:
    """``out[:, g*N:(g+1)*N] = a[:, index[s:e]] @ values[s:e]`` with ``s, e = offsets[g],
    offsets[g+1]``; ``columns`` of the output are kept (the last group may be partial)."""

    index: torch.Tensor  # (total,) int32: input columns read, group after group
    offsets: torch.Tensor  # (groups + 1,) int32
    values: torch.Tensor  # (total, N)
    columns: int

    @property
    def groups(self) -> int:
        return self.offsets.numel() - 1

    @property
    def macs(self) -> int:
        """MACs per token, padding included."""
        return int(self.values.numel())


@dataclasses.dataclass
class TritonProduct:
    first: GatheredGEMM  # x -> h
    second: GatheredGEMM  # h -> y
    block: int

    @property
    def macs(self) -> int:
        return self.first.macs + self.second.macs


def _gemm(indices: list[torch.Tensor], slabs: list[torch.Tensor], columns: int, block: int, like) -> GatheredGEMM:
    counts = torch.tensor([0] + [index.numel() for index in indices], dtype=torch.int64)
    offsets = counts.cumsum(0).to(torch.int32)
    index = torch.cat(indices).to(torch.int32) if indices else torch.zeros(0, dtype=torch.int32)
    values = torch.cat(slabs) if slabs else like.new_zeros(0, block)
    return GatheredGEMM(index.to(like.device), offsets.to(like.device), values.contiguous(), columns)


@torch.no_grad()
def pack_triton(in_features: int, out_features: int, blocks, block: int = 64, device=None, dtype=None) -> TritonProduct:
    """The two stages for a frozen layer's ``blocks`` (``(Support, left, right)``, ``right=None``
    for a dense block), ``block`` output columns per group."""
    blocks = [(support, left.detach(), None if right is None else right.detach()) for support, left, right in blocks]
    if blocks:
        device = device if device is not None else blocks[0][1].device
        dtype = dtype if dtype is not None else blocks[0][1].dtype
    like = torch.empty(0, device=device, dtype=dtype)
    right_rows, right_active = _stacked(blocks, in_features, "in", device, dtype)
    left_rows, left_active = _stacked(blocks, out_features, "out", device, dtype)
    rank = right_rows.shape[0]

    # Stage 1: rank rows sorted by (cyclic) support start, then width; groups of `block` rows.
    starts = (right_active & ~right_active.roll(1, dims=1)).float().argmax(1)  # 0 for full rows
    widths = right_active.sum(1)
    order = torch.argsort(starts * (in_features + 1) + widths, stable=True)
    indices, slabs = [], []
    for first in range(0, rank, block):
        rows = order[first : first + block]
        columns = right_active[rows].any(0).nonzero().flatten()
        slab = like.new_zeros(columns.numel(), block)
        slab[:, : rows.numel()] = right_rows[rows][:, columns].T
        indices.append(columns)
        slabs.append(slab)
    groups = len(indices)
    stage1 = _gemm(indices, slabs, groups * block, block, like)
    position = torch.empty(rank, dtype=torch.long, device=device)  # h column of each rank row
    position[order] = torch.arange(rank, device=device)

    # Stage 2: output tiles of `block` columns, reading the h columns of the rows that reach them.
    indices, slabs = [], []
    for start in range(0, out_features, block):
        stop = min(out_features, start + block)
        rows = left_active[:, start:stop].any(1).nonzero().flatten()
        slab = like.new_zeros(rows.numel(), block)
        slab[:, : stop - start] = left_rows[rows, start:stop]
        indices.append(position[rows])
        slabs.append(slab)
    stage2 = _gemm(indices, slabs, out_features, block, like)
    return TritonProduct(stage1, stage2, block)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gathered_gemm(
        a_ptr, a_stride, index_ptr, offsets_ptr, values_ptr, out_ptr, out_stride, tokens, columns,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    ):
        token_block, group = tl.program_id(0), tl.program_id(1)
        start = tl.load(offsets_ptr + group)
        stop = tl.load(offsets_ptr + group + 1)
        t = token_block * BLOCK_T + tl.arange(0, BLOCK_T)
        n = tl.arange(0, BLOCK_N)
        t_ok = t < tokens
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(start, stop, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < stop
            index = tl.load(index_ptr + k, mask=k_ok, other=0)
            a = tl.load(a_ptr + t[:, None].to(tl.int64) * a_stride + index[None, :],
                        mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(values_ptr + k[:, None].to(tl.int64) * BLOCK_N + n[None, :], mask=k_ok[:, None], other=0.0)
            acc += tl.dot(a, b, input_precision=PRECISION)
        column = group * BLOCK_N + n
        tl.store(out_ptr + t[:, None].to(tl.int64) * out_stride + column[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & (column[None, :] < columns))

    return gathered_gemm


def _run(a: torch.Tensor, gemm: GatheredGEMM, block: int) -> torch.Tensor:
    tokens = a.shape[0]
    out = a.new_empty(tokens, gemm.columns)
    if gemm.groups == 0 or tokens == 0:
        return out.zero_()
    block_t = 16 if tokens <= 16 else 32 if tokens <= 32 else 64 if tokens <= 1024 else 128
    block_k = 32 if a.dtype == torch.float32 else 64
    tf32 = a.dtype == torch.float32 and a.is_cuda and torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if tf32 or a.dtype != torch.float32 else "ieee"
    grid = (-(-tokens // block_t), gemm.groups)
    _kernel()[grid](
        a, a.stride(0), gemm.index, gemm.offsets, gemm.values, out, out.stride(0), tokens, gemm.columns,
        BLOCK_T=block_t, BLOCK_N=block, BLOCK_K=block_k, PRECISION=precision,
    )
    return out


def triton_forward(x: torch.Tensor, product: TritonProduct) -> torch.Tensor:
    """``y (T, out_features)`` for ``x (T, in_features)``, without bias; inference only."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton path runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, for tests); "
                         "use kernel='auto' or move the model to a GPU")
    x = x.contiguous()
    h = _run(x, product.first, product.block)
    return _run(h, product.second, product.block)
