"""Triton path of a frozen GBLR layer (CUDA; fp32, fp16, bf16): two segmented grouped GEMMs.

A frozen layer is ``y = sum_k left_k (right_k x[cols_k])`` scattered to ``rows_k``. Stack every
block's rank rows (as :mod:`gblr.kernels.tiled` does) and compute, for ``x`` of ``T`` tokens,

    h[:, r] = x[:, cols(r)] . V[r]             stage 1, one column of h per rank row
    y[:, o] = sum over rows r covering o of h[:, r] * U[r, o]      stage 2

Both stages are one kernel, a *segmented grouped GEMM*: output columns come in groups of
``block`` (``N``), and group ``g`` multiplies a few **segments** of the input, contiguous runs of
its columns, by its own dense slab of values. Segments start at a multiple of 8 columns and are
whole multiples of ``block_k`` long, so the kernel's loads are 16-byte vectors with no mask along
``K`` and pipeline like a plain GEMM's (a per-column gather, the first version of this kernel,
ran at 3-6 % of cuBLAS on an H200; unaligned contiguous runs at 15-30 %). Every output column
belongs to one group: no atomics, no zero fill.

- Stage 1 groups rank rows (sorted by where their input support starts, ``N`` at a time); the
  union of a group's supports becomes its segments (gaps shorter than ``block_k`` are read and
  multiplied by zeros). It writes each row's ``h`` column where stage 2 wants it (``h`` is kept
  transposed, so that is one contiguous run of tokens per row).
- ``h``'s columns are the rank rows sorted by where their *output* support starts, so the rows
  that reach an output tile are few contiguous runs: stage 2's segments, one tile of ``N``
  output columns per group.

Padding (zeros multiplied) is counted in :attr:`SegmentedProduct.macs`. Triton's interpreter
(``TRITON_INTERPRET=1``) runs the kernel on CPU tensors for tests; it cannot do bf16 products.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.nn.functional as F

from .tiled import stack_factors

__all__ = ["available", "SegmentedGEMM", "SegmentedProduct", "pack_triton", "triton_forward"]

ALIGN = 8  # segment starts: a multiple of 8 elements is 16 bytes in fp16/bf16, 32 in fp32
# Packing defaults, measured best on an H200 (docs/benchmarks/triton_tuning.md): output columns
# per stage-2 group, rank rows per stage-1 group, and the K step segments are rounded to.
OUT_BLOCK, ROW_BLOCK, BLOCK_K = 128, 128, 64


@functools.cache
def available() -> bool:
    """Whether Triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass
class SegmentedGEMM:
    """``out[:, columns of group g] = sum over its segments s of a[:, start_s : start_s + len_s]
    @ values[offset_s : offset_s + len_s]``. Group ``g``'s segments are ``groups[g]:groups[g+1]``;
    segment ``s`` reads ``starts[s]`` on and its values rows ``offsets[s]:offsets[s+1]``. Output
    columns of group ``g`` are ``g*N + arange(N)``, or ``targets[g*N + arange(N)]`` if given."""

    starts: torch.Tensor  # (segments,) int32, multiples of ALIGN
    offsets: torch.Tensor  # (segments + 1,) int32, multiples of block_k
    groups: torch.Tensor  # (groups + 1,) int32
    values: torch.Tensor  # (offsets[-1], N)
    columns: int  # width of the output
    reads: int  # width of the input the segments address (a multiple of block_k)
    block_k: int  # segment lengths are multiples of it: the kernel's K step
    targets: torch.Tensor | None = None  # (groups * N,) int32: output column of each group column

    @property
    def block(self) -> int:
        """Output columns per group (the kernel's N)."""
        return int(self.values.shape[1])

    @property
    def group_count(self) -> int:
        return self.groups.numel() - 1

    @property
    def macs(self) -> int:
        """MACs per token, padding included."""
        return int(self.values.numel())


@dataclasses.dataclass
class SegmentedProduct:
    first: SegmentedGEMM  # x -> h
    second: SegmentedGEMM  # h -> y

    @property
    def macs(self) -> int:
        return self.first.macs + self.second.macs


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _segments(needed: torch.Tensor, reads: int, block_k: int) -> list[tuple[int, int]]:
    """``(start, length)`` runs covering the sorted column indices ``needed``: runs closer than
    ``block_k`` merged, each start rounded down to :data:`ALIGN`, each length up to ``block_k``,
    and moved left where that would pass ``reads`` (itself a multiple of ``block_k``)."""
    if needed.numel() == 0:
        return []
    breaks = (needed[1:] - needed[:-1] > block_k).nonzero().flatten() + 1
    firsts = torch.cat([needed[:1], needed[breaks]]).tolist()
    lasts = torch.cat([needed[breaks - 1], needed[-1:]]).tolist()
    runs = []
    for first, last in zip(firsts, lasts):
        start = first - first % ALIGN
        length = round_up(last + 1 - start, block_k)
        runs.append((min(start, reads - length), length))
    return runs


def _gemm(slabs: list[torch.Tensor], columns: int, reads: int, block_k: int, like, targets=None) -> SegmentedGEMM:
    """One segmented GEMM from each group's dense slab ``(reads, N)`` over all input columns."""
    if reads % block_k or any(slab.shape[0] != reads for slab in slabs):
        raise ValueError(f"slabs must have reads={reads} rows, a multiple of block_k={block_k}")
    starts, lengths, groups, values = [], [], [0], []
    for slab in slabs:
        needed = slab.ne(0).any(1).nonzero().flatten()
        # Runs are more than block_k apart, so a segment's rounding ends before the next run
        # starts; the last segment, moved left to fit, overlaps its neighbour only where the
        # slab is zero. No column is counted twice.
        for start, length in _segments(needed, reads, block_k):
            starts.append(start)
            lengths.append(length)
            values.append(slab[start : start + length])
        groups.append(len(starts))
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    device = like.device
    return SegmentedGEMM(
        starts=torch.tensor(starts, dtype=torch.int32, device=device),
        offsets=offsets.to(torch.int32).to(device),
        groups=torch.tensor(groups, dtype=torch.int32, device=device),
        values=(torch.cat(values) if values else like.new_zeros(0, slabs[0].shape[1] if slabs else 16)).contiguous(),
        columns=columns,
        reads=reads,
        block_k=block_k,
        targets=targets,
    )


def _cyclic_starts(active: torch.Tensor) -> torch.Tensor:
    """Where each row's cyclic support starts (0 for full or empty rows)."""
    return (active & ~active.roll(1, dims=1)).float().argmax(1)


@torch.no_grad()
def pack_triton(in_features: int, out_features: int, blocks, out_block: int = OUT_BLOCK, row_block: int = ROW_BLOCK,
                block_k: int = BLOCK_K, device=None, dtype=None) -> SegmentedProduct:
    """The two stages for a frozen layer's ``blocks`` (``(Support, left, right)``, ``right=None``
    for a dense block): stage 1 groups ``row_block`` rank rows, stage 2 tiles of ``out_block``
    output columns; segments are multiples of ``block_k``. Fewer rows per group pad less (the
    union of fewer supports) but reuse each loaded input tile for fewer rows."""
    if min(out_block, row_block, block_k) < 16 or block_k % ALIGN:
        raise ValueError(f"out_block, row_block and block_k must be at least 16 (tl.dot), block_k a multiple of "
                         f"{ALIGN}; got {out_block}, {row_block}, {block_k}")
    blocks = [(support, left.detach(), None if right is None else right.detach()) for support, left, right in blocks]
    if blocks:
        device = device if device is not None else blocks[0][1].device
        dtype = dtype if dtype is not None else blocks[0][1].dtype
    like = torch.empty(0, device=device, dtype=dtype)
    right_rows, right_active = stack_factors(blocks, in_features, "in", device, dtype)
    left_rows, left_active = stack_factors(blocks, out_features, "out", device, dtype)
    rank = right_rows.shape[0]

    # h's columns: rank rows in the order of their output supports (stage 2 reads runs of them).
    out_order = torch.argsort(_cyclic_starts(left_active) * (out_features + 1) + left_active.sum(1), stable=True)
    position = torch.empty(rank, dtype=torch.long, device=device)
    position[out_order] = torch.arange(rank, device=device)

    # Stage 1: rank rows sorted by input-support start, `row_block` per group.
    in_order = torch.argsort(_cyclic_starts(right_active) * (in_features + 1) + right_active.sum(1), stable=True)
    groups = -(-rank // row_block)
    hidden = round_up(max(groups * row_block, 1), block_k)  # h's width; columns past `rank` stay zero
    targets = torch.arange(rank, groups * row_block, device=device)  # padding rows write unused columns
    targets = torch.cat([position[in_order], targets]).to(torch.int32)
    reads = round_up(in_features, block_k)
    slabs = []
    for first in range(0, rank, row_block):
        rows = in_order[first : first + row_block]
        slab = like.new_zeros(reads, row_block)
        slab[:in_features, : rows.numel()] = right_rows[rows].T
        slabs.append(slab)
    stage1 = _gemm(slabs, hidden, reads, block_k, like, targets)

    # Stage 2: output tiles of `out_block` columns.
    slabs = []
    for start in range(0, out_features, out_block):
        stop = min(out_features, start + out_block)
        slab = like.new_zeros(hidden, out_block)
        slab[position, : stop - start] = left_rows[:, start:stop]
        slabs.append(slab)
    stage2 = _gemm(slabs, out_features, hidden, block_k, like)
    return SegmentedProduct(stage1, stage2)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def segmented_gemm(
        a_ptr, a_stride_t, a_stride_k, a_rows, starts_ptr, offsets_ptr, groups_ptr, values_ptr, targets_ptr,
        out_ptr, out_stride_t, out_stride_n, out_rows, columns,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
        SCATTER: tl.constexpr,
    ):
        # token blocks vary fastest: programs that run together share a group's values (measured
        # 2-23 % faster per stage on an H200 than the transposed order, which shares input rows)
        token_block, group = tl.program_id(0), tl.program_id(1)
        t = token_block * BLOCK_T + tl.arange(0, BLOCK_T)
        n = tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        rows = a_ptr + t[:, None].to(tl.int64) * a_stride_t
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for segment in range(tl.load(groups_ptr + group), tl.load(groups_ptr + group + 1)):
            start = tl.multiple_of(tl.load(starts_ptr + segment), 8)
            first = tl.load(offsets_ptr + segment)
            length = tl.load(offsets_ptr + segment + 1) - first
            values = values_ptr + first.to(tl.int64) * BLOCK_N
            for k in range(0, length, BLOCK_K):
                a = tl.load(rows + (start + k + kk)[None, :].to(tl.int64) * a_stride_k,
                            mask=(t < a_rows)[:, None], other=0.0)
                b = tl.load(values + (k + kk)[:, None] * BLOCK_N + n[None, :])
                acc += tl.dot(a, b, input_precision=PRECISION)
        column = group * BLOCK_N + n
        if SCATTER:
            column = tl.load(targets_ptr + column)
        tl.store(out_ptr + t[:, None].to(tl.int64) * out_stride_t + column[None, :].to(tl.int64) * out_stride_n,
                 acc.to(out_ptr.dtype.element_ty), mask=(t < out_rows)[:, None] & (column[None, :] < columns))

    return segmented_gemm


def _launch_defaults(tokens: int) -> dict:
    """Launch settings by token count (block_t 128 with 4 warps and 3 stages measured best on an
    H200 at 8192 tokens, against 8 warps, 4 stages and block_t 256; below that, first guesses)."""
    block_t = 16 if tokens <= 16 else 32 if tokens <= 32 else 64 if tokens <= 1024 else 128
    return {"block_t": block_t, "num_warps": 4, "num_stages": 3}


def launch(a: torch.Tensor, a_rows: int, gemm: SegmentedGEMM, out: torch.Tensor, out_rows: int, block_t: int,
         num_warps: int, num_stages: int) -> torch.Tensor:
    """``out[t, :] = gemm(a[t, :])``: ``a`` and ``out`` are (tokens, columns) views of any strides;
    rows of ``a`` from ``a_rows`` on read as zeros, rows of ``out`` from ``out_rows`` on are kept."""
    tf32 = a.dtype == torch.float32 and a.is_cuda and torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if tf32 or a.dtype != torch.float32 else "ieee"
    scatter = gemm.targets is not None
    _kernel()[(-(-out.shape[0] // block_t), gemm.group_count)](
        a, a.stride(0), a.stride(1), a_rows, gemm.starts, gemm.offsets, gemm.groups, gemm.values,
        gemm.targets if scatter else gemm.starts, out, out.stride(0), out.stride(1), out_rows, gemm.columns,
        BLOCK_T=block_t, BLOCK_N=gemm.block, BLOCK_K=gemm.block_k, PRECISION=precision, SCATTER=scatter,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def triton_forward(x: torch.Tensor, product: SegmentedProduct, **config) -> torch.Tensor:
    """``y (T, out_features)`` for ``x (T, in_features)``, without bias; inference only.
    ``config`` (block_t, num_warps, num_stages) overrides the launch settings.

    ``h`` is kept transposed, ``(rank rows, T)``: stage 1 writes each rank row's tokens as one
    contiguous run (a scatter of whole rows, not of single elements), and stage 2 reads it as a
    column-major operand. Its token count is padded to whole ``block_t`` tiles, which stage 1
    fills with zeros, so stage 2 reads it unmasked."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton path runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, for tests); "
                         "use kernel='auto' or move the model to a GPU")
    tokens = x.shape[0]
    first, second = product.first, product.second
    if tokens == 0 or first.group_count == 0 or second.starts.numel() == 0:
        return x.new_zeros(tokens, second.columns)
    config = {**_launch_defaults(tokens), **config}
    x = x.contiguous()
    if x.shape[1] != first.reads:  # segments may read up to a whole block_k past the last column
        x = F.pad(x, (0, first.reads - x.shape[1]))
    padded = round_up(tokens, config["block_t"])
    h = x.new_empty(first.columns, padded)  # transposed
    written = first.group_count * first.block
    if written < first.columns:
        h[written:].zero_()
    launch(x, tokens, first, h.T, padded, **config)
    y = x.new_empty(tokens, second.columns)
    return launch(h.T, padded, second, y, tokens, **config)
