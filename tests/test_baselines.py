import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gblr.baselines import BlockSparseLinear, LowRankLinear, MonarchLinear, diagonal_blocks

DTYPE = torch.float64

# (name, factory(bias) -> layer in float64); the Monarch cases cover q = inner/nblocks below,
# equal to and above nblocks, and a q that nblocks does not divide.
LAYERS = {
    "low_rank": lambda bias: LowRankLinear(30, 20, 4, bias=bias, dtype=DTYPE),
    "monarch_q_lt_nb": lambda bias: MonarchLinear(12, 8, 4, 8, bias=bias, dtype=DTYPE),
    "monarch_square": lambda bias: MonarchLinear(16, 16, 4, 16, bias=bias, dtype=DTYPE),
    "monarch_q_gt_nb": lambda bias: MonarchLinear(8, 24, 2, 10, bias=bias, dtype=DTYPE),
    "block_sparse": lambda bias: BlockSparseLinear(12, 18, 3, [(0, 1), (2, 2), (1, 0), (0, 0)], bias=bias, dtype=DTYPE),
    "block_sparse_diagonals": lambda bias: BlockSparseLinear(16, 8, 4, diagonal_blocks(4, 2), bias=bias, dtype=DTYPE),
    # blocks of SMALL_BLOCK entries or more run block by block (smaller ones as a masked dense product)
    "block_sparse_large_blocks": lambda bias: BlockSparseLinear(96, 64, 2, [(0, 1), (1, 1)], bias=bias, dtype=DTYPE),
}

SHAPES = [(64, 64), (128, 512), (512, 128), (96, 384), (768, 3072)]
RATIOS = [0.1, 0.25, 0.5]
CLASSES = [LowRankLinear, MonarchLinear, BlockSparseLinear]


def make(name, bias=True, seed=0):
    torch.manual_seed(seed)
    return LAYERS[name](bias)


# -- the computation ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_weight(name, bias):
    layer = make(name, bias)
    assert (layer.bias is not None) == bias
    weight = layer.weight.detach()
    assert weight.shape == (layer.out_features, layer.in_features)
    offset = layer.bias.detach() if bias else torch.zeros(layer.out_features, dtype=DTYPE)
    x = torch.randn(2, 3, layer.in_features, dtype=DTYPE)
    y = layer(x)
    assert y.shape == (2, 3, layer.out_features) and y.dtype == DTYPE
    torch.testing.assert_close(y, x @ weight.T + offset, rtol=1e-12, atol=1e-12)
    vector = torch.randn(layer.in_features, dtype=DTYPE)
    out = layer(vector)
    assert out.shape == (layer.out_features,)
    torch.testing.assert_close(out, weight @ vector + offset, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LAYERS)
def test_gradients_reach_every_parameter(name):
    layer = make(name)
    x = torch.randn(5, layer.in_features, dtype=DTYPE)
    layer(x).pow(2).sum().backward()
    for param_name, param in layer.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        # Every parameter entry influences the output, so none of its gradient is exactly zero.
        assert (param.grad != 0).all(), param_name


@pytest.mark.parametrize("name", LAYERS)
def test_weight_is_differentiable_and_matches_forward_gradient(name):
    layer = make(name, bias=False)
    x = torch.randn(4, layer.in_features, dtype=DTYPE)
    grads_forward = torch.autograd.grad(layer(x).sum(), list(layer.parameters()))
    grads_weight = torch.autograd.grad((x @ layer.weight.T).sum(), list(layer.parameters()))
    for a, b in zip(grads_forward, grads_weight):
        torch.testing.assert_close(a, b)


def test_low_rank_weight_is_u_times_v_and_has_its_rank():
    layer = make("low_rank")
    torch.testing.assert_close(layer.weight, layer.u @ layer.v)
    assert torch.linalg.matrix_rank(layer.weight.detach()).item() == 4


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


@pytest.mark.parametrize("name", ["monarch_q_lt_nb", "monarch_square", "monarch_q_gt_nb"])
def test_monarch_matches_elementwise_definition(name):
    layer = make(name, bias=False)
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


def test_block_sparse_weight_is_zero_outside_active_blocks():
    layer = make("block_sparse")  # 18 x 12 on a 3x3 grid: blocks of 6 x 4
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


# -- cost -----------------------------------------------------------------------------------------


def test_flops_formulas():
    low_rank = LowRankLinear(30, 20, 4)
    assert low_rank.flops() == 200
    assert low_rank.flops_ratio() == pytest.approx(200 / 600)
    # R: 8 blocks of (16/8) x (64/8) -> 2 * 8 * 8 = 128 MACs; L: 8 blocks of (32/8) x 2 -> 64 MACs.
    monarch = MonarchLinear(64, 32, 8, 16)
    assert monarch.flops() == 192
    assert monarch.flops_ratio() == pytest.approx(192 / 2048)
    assert sum(p.numel() for p in (monarch.right, monarch.left)) == 192  # one MAC per weight
    # 3 blocks of (32/4) x (64/4) = 8 x 16.
    block_sparse = BlockSparseLinear(64, 32, 4, [(0, 0), (1, 2), (3, 3)])
    assert block_sparse.flops() == 384
    assert block_sparse.flops_ratio() == pytest.approx(384 / 2048)
    assert BlockSparseLinear(64, 32, 4, diagonal_blocks(4, 2)).flops_ratio() == pytest.approx(0.5)


def test_extra_repr_shows_structure_and_ratio():
    assert "rank=4" in repr(LowRankLinear(30, 20, 4)) and "flops_ratio=0.333" in repr(LowRankLinear(30, 20, 4))
    text = repr(MonarchLinear(64, 32, 8, 16, bias=False))
    assert "nblocks=8, inner=16" in text and "bias=False" in text and "flops_ratio=0.094" in text
    text = repr(BlockSparseLinear(64, 32, 4, diagonal_blocks(4, 1)))
    assert "grid=4, blocks=4" in text and "flops_ratio=0.250" in text


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_at_flops_ratio_gets_close_without_exceeding(cls, shape, ratio):
    in_features, out_features = shape
    layer = cls.at_flops_ratio(in_features, out_features, ratio)
    assert (layer.in_features, layer.out_features) == shape
    assert layer.flops_ratio() <= ratio
    # Every shape here reaches 60%: the coarsest case is BlockSparse at 0.1 on grids up to 16
    # (1/16 = 0.0625) and LowRank/Monarch on 64x64 at 0.1 (rank 3, 0.094).
    assert layer.flops_ratio() >= 0.6 * ratio
    budget = ratio * in_features * out_features
    if cls is LowRankLinear:
        assert (layer.rank + 1) * (in_features + out_features) > budget
    elif cls is MonarchLinear:
        assert (layer.inner // layer.nblocks + 1) * (in_features + out_features) > budget
    else:
        assert layer.blocks == tuple(diagonal_blocks(layer.grid, len(layer.blocks) // layer.grid))


def test_at_flops_ratio_structure_choices():
    # nblocks: the common divisor closest to sqrt(min(in, out)).
    expected_nblocks = {(64, 64): 8, (128, 512): 8, (512, 128): 8, (96, 384): 8, (768, 3072): 24}
    for shape, nblocks in expected_nblocks.items():
        layer = MonarchLinear.at_flops_ratio(*shape, 0.25)
        assert layer.nblocks == nblocks
        assert layer.inner == nblocks * (int(0.25 * shape[0] * shape[1]) // (shape[0] + shape[1]))
    # BlockSparse: ratio k / grid; a 12x12 grid beats 16x16 at 0.1 (1/12 > 1/16), ties go to 16.
    assert BlockSparseLinear.at_flops_ratio(64, 64, 0.1).grid == 16
    assert BlockSparseLinear.at_flops_ratio(96, 384, 0.1).flops_ratio() == pytest.approx(1 / 12)
    assert BlockSparseLinear.at_flops_ratio(768, 3072, 0.1).flops_ratio() == pytest.approx(1 / 12)
    layer = BlockSparseLinear.at_flops_ratio(768, 3072, 0.5)
    assert (layer.grid, len(layer.blocks)) == (16, 16 * 8)
    assert BlockSparseLinear.at_flops_ratio(60, 60, 0.3).flops_ratio() == pytest.approx(0.3)  # 3/10, float-safe
    assert LowRankLinear.at_flops_ratio(30, 20, 1 / 3).rank == 4  # exactly 200 MACs allowed
    # Overrides of the structure.
    assert MonarchLinear.at_flops_ratio(64, 64, 0.5, nblocks=4).nblocks == 4
    assert BlockSparseLinear.at_flops_ratio(64, 64, 0.5, grid=2).blocks == ((0, 0), (1, 1))


def test_at_flops_ratio_falls_back_to_smallest_structure():
    # 4x4 at 0.1 allows 1.6 MACs; the smallest structures cost more and report it.
    assert LowRankLinear.at_flops_ratio(4, 4, 0.1).flops_ratio() == pytest.approx(0.5)
    monarch = MonarchLinear.at_flops_ratio(4, 4, 0.1)
    assert monarch.inner == monarch.nblocks == 2 and monarch.flops_ratio() == pytest.approx(0.5)
    block_sparse = BlockSparseLinear.at_flops_ratio(4, 4, 0.1)
    assert (block_sparse.grid, len(block_sparse.blocks)) == (4, 4) and block_sparse.flops_ratio() == 0.25
    # Coprime shapes admit only a 1x1 grid: block-sparse degenerates to the dense layer.
    assert BlockSparseLinear.at_flops_ratio(7, 5, 0.5).flops_ratio() == 1.0


@settings(max_examples=60, deadline=None)
@given(
    in_features=st.integers(1, 96),
    out_features=st.integers(1, 96),
    ratio=st.floats(0.005, 1.0),
    index=st.integers(0, 2),
)
def test_at_flops_ratio_never_exceeds_when_it_can_help_it(in_features, out_features, ratio, index):
    cls = CLASSES[index]
    layer = cls.at_flops_ratio(in_features, out_features, ratio, dtype=DTYPE)
    budget = ratio * in_features * out_features * (1 + 1e-9)
    if cls is BlockSparseLinear:
        grids = [g for g in range(2, 17) if in_features % g == 0 and out_features % g == 0] or [1]
        smallest = in_features * out_features // max(grids)
        if smallest <= budget:
            best = max(math.floor(ratio * g + 1e-9) / g for g in grids)  # k / grid, k = 0 infeasible
            assert layer.flops_ratio() == pytest.approx(best)
    else:
        smallest = in_features + out_features
    if smallest <= budget:
        assert layer.flops() <= budget
    else:
        assert layer.flops() == smallest
    x = torch.randn(2, in_features, dtype=DTYPE)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


# -- initialisation -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
def test_init_scale_matches_nn_linear(cls):
    torch.manual_seed(0)
    layer = cls.at_flops_ratio(256, 256, 0.5)
    reference = 1 / math.sqrt(3 * 256)  # std of uniform(-1/sqrt(in), 1/sqrt(in))
    weight = layer.weight.detach()
    values = weight[weight != 0] if cls is BlockSparseLinear else weight.flatten()
    if cls is BlockSparseLinear:
        assert values.numel() == 256 * 256 // 2
    assert abs(values.std().item() / reference - 1) < 0.4
    assert abs(layer.weight.detach().mean().item()) < 0.1 * reference
    bound = 1 / math.sqrt(256)
    assert layer.bias.abs().max().item() <= bound
    assert layer.bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.4)
    # As with nn.Linear, the output of unit-variance inputs has a comparable scale.
    dense = nn.Linear(256, 256, bias=False)
    x = torch.randn(512, 256)
    ratio = (x @ weight.T).std() / (x @ dense.weight.detach().T).std()
    assert 0.5 < ratio.item() < 1.5


def test_factory_kwargs_and_dtype():
    for cls in CLASSES:
        layer = cls.at_flops_ratio(32, 16, 0.5, dtype=DTYPE, device="cpu")
        assert all(p.dtype == DTYPE for p in layer.parameters())
        assert layer.weight.dtype == DTYPE
        assert cls.at_flops_ratio(32, 16, 0.5, bias=False).bias is None
        assert cls.at_flops_ratio(32, 16, 0.5).weight.dtype == torch.float32


def test_block_pattern_moves_with_the_module_and_stays_out_of_state_dict():
    layer = BlockSparseLinear(8, 8, 2, [(0, 1)]).to(DTYPE)
    assert set(layer.state_dict()) == {"block_weight", "bias"}
    x = torch.randn(3, 8, dtype=DTYPE)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: MonarchLinear(10, 8, 4, 8), r"nblocks=4 must divide in_features=10"),
        (lambda: MonarchLinear(8, 6, 4, 8), r"nblocks=4 must divide out_features=6"),
        (lambda: MonarchLinear(8, 8, 4, 6), r"nblocks=4 must divide inner=6"),
        (lambda: MonarchLinear(8, 8, 0, 8), r"nblocks must be a positive int, got 0"),
        (lambda: MonarchLinear.at_flops_ratio(8, 8, 0.5, nblocks=3), r"nblocks=3 must divide in_features=8"),
        (lambda: BlockSparseLinear(10, 8, 4, [(0, 0)]), r"grid=4 must divide in_features=10"),
        (lambda: BlockSparseLinear(8, 6, 4, [(0, 0)]), r"grid=4 must divide out_features=6"),
        (lambda: BlockSparseLinear.at_flops_ratio(8, 8, 0.5, grid=3), r"grid=3 must divide"),
        (lambda: LowRankLinear(8, 8, 0), r"rank must be a positive int, got 0"),
        (lambda: LowRankLinear(8, 8, -2), r"rank must be a positive int, got -2"),
        (lambda: LowRankLinear(8, 8, 2.0), r"rank must be a positive int, got 2.0"),
        (lambda: LowRankLinear(0, 8, 2), r"in_features must be a positive int"),
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


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("ratio", [0, 1.5, -0.1, float("nan"), True])
def test_invalid_flops_ratio_raises(cls, ratio):
    with pytest.raises(ValueError, match="flops_ratio"):
        cls.at_flops_ratio(64, 64, ratio)


@pytest.mark.parametrize("name", LAYERS)
def test_wrong_input_width_raises(name):
    layer = make(name)
    with pytest.raises(ValueError, match=f"in_features={layer.in_features}"):
        layer(torch.randn(2, layer.in_features + 1, dtype=DTYPE))
    with pytest.raises(ValueError, match="in_features="):
        layer(torch.tensor(1.0, dtype=DTYPE))
