"""MonarchLinear: ``W = L @ P @ R`` with block-diagonal factors and the Monarch permutation
(gblr.baselines.monarch)."""

import pytest
import torch

from gblr.baselines import MonarchLinear

DTYPE = torch.float64

# (in_features, out_features, nblocks, inner): q = inner/nblocks below, equal to and above
# nblocks, and a q that nblocks does not divide.
CASES = {
    "monarch_q_lt_nb": (12, 8, 4, 8),
    "monarch_square": (16, 16, 4, 16),
    "monarch_q_gt_nb": (8, 24, 2, 10),
}


def monarch_by_definition(layer, x):
    """The Monarch product for one input vector, written element by element from the docstring."""
    nb, inner = layer.nblocks, layer.inner
    q, b_in, b_out = inner // nb, layer.in_features // nb, layer.out_features // nb
    right, left = layer.right.detach(), layer.left.detach()
    h = torch.zeros(inner, dtype=x.dtype)
    for i in range(nb):
        for t in range(q):
            h[i * q + t] = right[i, t] @ x[i * b_in : (i + 1) * b_in]
    # view as (nb, q), transpose to (q, nb), flatten: feature t of block i lands at t * nb + i
    permuted = torch.zeros(inner, dtype=x.dtype)
    for i in range(nb):
        for t in range(q):
            permuted[t * nb + i] = h[i * q + t]
    y = torch.zeros(layer.out_features, dtype=x.dtype)
    for j in range(nb):
        for o in range(b_out):
            y[j * b_out + o] = left[j, o] @ permuted[j * q : (j + 1) * q]
    return y


@pytest.mark.parametrize("name", CASES)
def test_monarch_matches_elementwise_definition(name):
    torch.manual_seed(0)
    layer = MonarchLinear(*CASES[name], bias=False, dtype=DTYPE)
    x = torch.randn(layer.in_features, dtype=DTYPE)
    torch.testing.assert_close(layer(x).detach(), monarch_by_definition(layer, x), rtol=1e-12, atol=1e-12)


def test_square_monarch_permutation_is_a_transpose():
    layer = MonarchLinear(9, 9, 3, 9, bias=False)
    assert layer.permutation().tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]


@pytest.mark.parametrize(
    "shape", [(24, 16, 4, 8), (16, 32, 2, 8), (12, 12, 3, 12), (8, 24, 2, 10), (30, 20, 5, 10)]
)
def test_monarch_blocks_have_rank_of_their_path_count(shape):
    # Block (j, i) of the dense weight sums one rank-1 term per intermediate feature t of R's
    # block i that the permutation sends into L's slice j (position t * nb + i in [j q, (j+1) q)).
    # With random factors its rank is exactly min(paths, block rows, block columns), and a block
    # with no path is exactly zero.
    in_features, out_features, nb, inner = shape
    torch.manual_seed(1)
    layer = MonarchLinear(in_features, out_features, nb, inner, dtype=DTYPE)
    q, b_in, b_out = inner // nb, in_features // nb, out_features // nb
    weight = layer.weight.detach()
    for j in range(nb):
        for i in range(nb):
            paths = sum(1 for t in range(q) if (t * nb + i) // q == j)
            block = weight[j * b_out : (j + 1) * b_out, i * b_in : (i + 1) * b_in]
            if paths == 0:
                assert (block == 0).all()
            else:
                assert torch.linalg.matrix_rank(block).item() == min(paths, b_out, b_in)


def test_flops_formula():
    # R: 8 blocks of (16/8) x (64/8) -> 2 * 8 * 8 = 128 MACs; L: 8 blocks of (32/8) x 2 -> 64 MACs.
    monarch = MonarchLinear(64, 32, 8, 16)
    assert monarch.flops() == 192
    assert monarch.flops_ratio() == pytest.approx(192 / 2048)
    assert sum(p.numel() for p in (monarch.right, monarch.left)) == 192  # one MAC per weight


def test_at_flops_ratio_structure_choices():
    # nblocks: the common divisor closest to sqrt(min(in, out)).
    expected_nblocks = {(64, 64): 8, (128, 512): 8, (512, 128): 8, (96, 384): 8, (768, 3072): 24}
    for shape, nblocks in expected_nblocks.items():
        layer = MonarchLinear.at_flops_ratio(*shape, 0.25)
        assert layer.nblocks == nblocks
        assert layer.inner == nblocks * (int(0.25 * shape[0] * shape[1]) // (shape[0] + shape[1]))
    # An override of the structure.
    assert MonarchLinear.at_flops_ratio(64, 64, 0.5, nblocks=4).nblocks == 4


def test_at_flops_ratio_falls_back_to_smallest_structure():
    # 4x4 at 0.1 allows 1.6 MACs; the smallest structure costs more and reports it.
    monarch = MonarchLinear.at_flops_ratio(4, 4, 0.1)
    assert monarch.inner == monarch.nblocks == 2 and monarch.flops_ratio() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: MonarchLinear(10, 8, 4, 8), r"nblocks=4 must divide in_features=10"),
        (lambda: MonarchLinear(8, 6, 4, 8), r"nblocks=4 must divide out_features=6"),
        (lambda: MonarchLinear(8, 8, 4, 6), r"nblocks=4 must divide inner=6"),
        (lambda: MonarchLinear(8, 8, 0, 8), r"nblocks must be a positive int, got 0"),
        (lambda: MonarchLinear.at_flops_ratio(8, 8, 0.5, nblocks=3), r"nblocks=3 must divide in_features=8"),
    ],
)
def test_invalid_structure_raises(build, match):
    with pytest.raises(ValueError, match=match):
        build()
