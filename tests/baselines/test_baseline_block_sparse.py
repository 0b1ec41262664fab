"""BlockSparseLinear and diagonal_blocks: a fixed pattern of dense blocks on a square block grid
(gblr.baselines.block_sparse)."""

import pytest
import torch

from gblr.baselines import BlockSparseLinear, diagonal_blocks

DTYPE = torch.float64


def test_block_sparse_weight_is_zero_outside_active_blocks():
    torch.manual_seed(0)
    layer = BlockSparseLinear(12, 18, 3, [(0, 1), (2, 2), (1, 0), (0, 0)], dtype=DTYPE)  # blocks of 6 x 4
    weight = layer.weight.detach()
    active = {(0, 1), (2, 2), (1, 0), (0, 0)}
    for r in range(3):
        for c in range(3):
            block = weight[r * 6 : (r + 1) * 6, c * 4 : (c + 1) * 4]
            if (r, c) in active:
                torch.testing.assert_close(block, layer.block_weight[layer.blocks.index((r, c))].detach())
                assert (block != 0).all()
            else:
                assert (block == 0).all()
    assert (weight != 0).sum().item() == 4 * 6 * 4


def test_diagonal_blocks_pattern():
    assert diagonal_blocks(4, 1) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert diagonal_blocks(4, 2) == [(0, 0), (1, 1), (2, 2), (3, 3), (0, 2), (1, 3), (2, 0), (3, 1)]
    # offsets round(i * 8 / 3) = 0, 3, 5
    assert sorted({(c - r) % 8 for r, c in diagonal_blocks(8, 3)}) == [0, 3, 5]
    for grid in range(1, 17):
        for k in range(1, grid + 1):
            pattern = diagonal_blocks(grid, k)
            assert len(pattern) == len(set(pattern)) == k * grid
            rows = torch.bincount(torch.tensor([r for r, _ in pattern]), minlength=grid)
            cols = torch.bincount(torch.tensor([c for _, c in pattern]), minlength=grid)
            assert (rows == k).all() and (cols == k).all()


def test_flops_formula():
    # 3 blocks of (32/4) x (64/4) = 8 x 16.
    block_sparse = BlockSparseLinear(64, 32, 4, [(0, 0), (1, 2), (3, 3)])
    assert block_sparse.flops() == 384
    assert block_sparse.flops_ratio() == pytest.approx(384 / 2048)
    assert BlockSparseLinear(64, 32, 4, diagonal_blocks(4, 2)).flops_ratio() == pytest.approx(0.5)


def test_at_flops_ratio_structure_choices():
    # Ratio k / grid; a 12x12 grid beats 16x16 at 0.1 (1/12 > 1/16), ties go to 16.
    assert BlockSparseLinear.at_flops_ratio(64, 64, 0.1).grid == 16
    assert BlockSparseLinear.at_flops_ratio(96, 384, 0.1).flops_ratio() == pytest.approx(1 / 12)
    assert BlockSparseLinear.at_flops_ratio(768, 3072, 0.1).flops_ratio() == pytest.approx(1 / 12)
    layer = BlockSparseLinear.at_flops_ratio(768, 3072, 0.5)
    assert (layer.grid, len(layer.blocks)) == (16, 16 * 8)
    assert BlockSparseLinear.at_flops_ratio(60, 60, 0.3).flops_ratio() == pytest.approx(0.3)  # 3/10, float-safe
    # An override of the structure.
    assert BlockSparseLinear.at_flops_ratio(64, 64, 0.5, grid=2).blocks == ((0, 0), (1, 1))


def test_at_flops_ratio_falls_back_to_smallest_structure():
    # 4x4 at 0.1 allows 1.6 MACs; the smallest structure costs more and reports it.
    block_sparse = BlockSparseLinear.at_flops_ratio(4, 4, 0.1)
    assert (block_sparse.grid, len(block_sparse.blocks)) == (4, 4) and block_sparse.flops_ratio() == 0.25
    # Coprime shapes admit only a 1x1 grid: block-sparse degenerates to the dense layer.
    assert BlockSparseLinear.at_flops_ratio(7, 5, 0.5).flops_ratio() == 1.0


def test_block_pattern_moves_with_the_module_and_stays_out_of_state_dict():
    layer = BlockSparseLinear(8, 8, 2, [(0, 1)]).to(DTYPE)
    assert set(layer.state_dict()) == {"block_weight", "bias"}
    x = torch.randn(3, 8, dtype=DTYPE)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: BlockSparseLinear(10, 8, 4, [(0, 0)]), r"grid=4 must divide in_features=10"),
        (lambda: BlockSparseLinear(8, 6, 4, [(0, 0)]), r"grid=4 must divide out_features=6"),
        (lambda: BlockSparseLinear.at_flops_ratio(8, 8, 0.5, grid=3), r"grid=3 must divide"),
        (lambda: BlockSparseLinear(8, 8, 4, [(0, 4)]), r"blocks\[0\] .* in \[0, grid=4\), got \(0, 4\)"),
        (lambda: BlockSparseLinear(8, 8, 4, [(0, 0), (-1, 2)]), r"blocks\[1\]"),
        (lambda: BlockSparseLinear(8, 8, 4, [(0,)]), r"blocks\[0\]"),
        (lambda: BlockSparseLinear(8, 8, 4, [("a", 1)]), r"blocks\[0\]"),
        (lambda: BlockSparseLinear(8, 8, 4, [(0, 1), (0, 1)]), r"blocks must not repeat"),
        (lambda: BlockSparseLinear(8, 8, 4, []), r"blocks must hold at least one"),
        (lambda: diagonal_blocks(4, 5), r"k must be an int in \[1, grid=4\]"),
    ],
)
def test_invalid_structure_raises(build, match):
    with pytest.raises(ValueError, match=match):
        build()
