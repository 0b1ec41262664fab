"""Packing of the Triton path (gblr.kernels.segmented) without Triton: the segments' layout, and
the packed product, evaluated by a plain torch emulation of the kernel, against the reference
path on random structures. The kernel itself is tested in test_triton.py."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import gblr
from fixtures import block_specs, frozen_layer
from gblr.kernels import segmented


def _emulate(a: torch.Tensor, gemm: segmented.SegmentedGEMM, out: torch.Tensor) -> None:
    """What one launch of the kernel computes, group by group, in plain torch."""
    starts, offsets, groups = gemm.starts.tolist(), gemm.offsets.tolist(), gemm.groups.tolist()
    for group in range(gemm.group_count):
        acc = a.new_zeros(a.shape[0], gemm.block)
        for s in range(groups[group], groups[group + 1]):
            length = offsets[s + 1] - offsets[s]
            acc += a[:, starts[s] : starts[s] + length] @ gemm.values[offsets[s] : offsets[s + 1]]
        columns = torch.arange(group * gemm.block, (group + 1) * gemm.block)
        if gemm.targets is not None:
            columns = gemm.targets[columns].long()
        keep = columns < gemm.columns
        out[:, columns[keep]] = acc[:, keep]


def _forward(x: torch.Tensor, product: segmented.SegmentedProduct) -> torch.Tensor:
    first, second = product.first, product.second
    h = x.new_zeros(x.shape[0], first.columns)
    _emulate(F.pad(x, (0, first.reads - x.shape[1])), first, h)
    y = x.new_full((x.shape[0], second.columns), float("nan"))  # every column must be written
    _emulate(h, second, y)
    return y


@settings(max_examples=60, deadline=None)
@given(st.tuples(block_specs(70, 6), st.sampled_from([16, 32]), st.sampled_from([16, 32, 64])))
def test_packed_product_equals_the_layer_on_random_structures(case):
    # wrap-around, overlapping, one-element and full blocks, rank 1-3, dense blocks; several
    # groups; widths that are not multiples of block_k (input padded, segments moved left)
    (m, n, spec), block, block_k = case
    layer = frozen_layer(m, n, spec)
    product = segmented.pack_triton(n, m, list(layer.blocks()), block, 48 - block, block_k)
    x = torch.randn(5, n, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(_forward(x, product), layer.run("reference", x), rtol=1e-10, atol=1e-10)
    for gemm in (product.first, product.second):
        assert gemm.reads % block_k == 0
        assert all(start % segmented.ALIGN == 0 for start in gemm.starts.tolist())
        assert all(offset % block_k == 0 for offset in gemm.offsets.tolist())


def test_segments_are_aligned_whole_chunks_that_cover_every_needed_column():
    needed = torch.tensor([3, 4, 5, 30, 31, 200, 201, 202, 220, 250])
    runs = segmented._segments(needed, reads=256, block_k=32)
    # gaps up to block_k are read as padding: 3..31 one run, 200..250 another, moved left to fit 256
    assert runs == [(0, 32), (192, 64)]
    for start, length in runs:
        assert start % segmented.ALIGN == 0 and length % 32 == 0 and start + length <= 256
    covered = torch.zeros(256, dtype=torch.bool)
    for start, length in runs:
        covered[start : start + length] = True
    assert covered[needed].all()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([16, 32, 64]).flatmap(lambda block_k: st.tuples(
    st.just(block_k), st.integers(1, 6).map(lambda steps: steps * block_k)).flatmap(lambda case: st.tuples(
        st.just(case[0]), st.just(case[1]),
        st.sets(st.integers(0, case[1] - 1), min_size=1, max_size=case[1])))))
def test_segments_cover_every_needed_column_exactly_once(case):
    # so each segment may take its values straight from the slab: overlaps hold only zeros
    block_k, reads, needed = case
    needed = torch.tensor(sorted(needed))
    cover = torch.zeros(reads, dtype=torch.long)
    for start, length in segmented._segments(needed, reads, block_k):
        assert start >= 0 and start + length <= reads
        assert start % segmented.ALIGN == 0 and length % block_k == 0
        cover[start : start + length] += 1
    assert torch.all(cover[needed] == 1)


def test_a_segment_moved_left_to_fit_overlaps_only_zeros():
    # the last run's segment would pass the input's end: moved left, it overlaps the one before
    torch.manual_seed(0)
    slab = torch.zeros(96, 16)
    slab[8:51] = torch.randn(43, 16)
    slab[90:96] = torch.randn(6, 16)
    gemm = segmented._gemm([slab], 16, 96, 32, slab)
    starts, offsets = gemm.starts.tolist(), gemm.offsets.tolist()
    assert starts == [8, 64]  # 8..71, and 88..119 moved left to fit 96: 64..71 read twice
    rebuilt = torch.zeros(96, 16)
    for s, (first, last) in enumerate(zip(offsets[:-1], offsets[1:])):
        rebuilt[starts[s] : starts[s] + last - first] += gemm.values[first:last]
    torch.testing.assert_close(rebuilt, slab)


def test_padded_macs_stay_near_the_layer_flops_at_a_realistic_size():
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(768, 3072, bias=False, init_flops_ratio=0.25).freeze()
    product = segmented.pack_triton(768, 3072, list(layer.blocks()), 64, 32, 32)
    padded = product.macs / (768 * 3072)
    assert layer.flops_ratio() <= padded < 0.36
