"""What every baseline layer (gblr.baselines) does alike: an nn.Linear-like computation that
matches its dense ``.weight``, a cost never above the asked FLOPs ratio when it can help it,
nn.Linear's init scale, the factory arguments and the argument errors; and the shared helpers
of gblr.baselines.common."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gblr.baselines import BlockSparseLinear, LowRankLinear, MonarchLinear, diagonal_blocks
from gblr.baselines.common import check_divides, closest_within, common_divisors, macs_budget

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


# -- cost -----------------------------------------------------------------------------------------


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


# -- errors ---------------------------------------------------------------------------------------


def test_invalid_shape_raises():
    with pytest.raises(ValueError, match=r"in_features must be a positive int"):
        LowRankLinear(0, 8, 2)


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


# -- the shared helpers ---------------------------------------------------------------------------


def test_macs_budget_rounds_down_but_absorbs_float_error():
    assert 0.3 * 3 * 30 < 27 and macs_budget(3, 30, 0.3) == 27  # float rounding: still 3/10
    assert macs_budget(4, 4, 0.1) == 1  # 1.6 MACs: never a whole extra one
    assert macs_budget(30, 20, 1 / 3) == 200


def test_common_divisors_and_closest_within():
    assert common_divisors(64, 96) == [1, 2, 4, 8, 16, 32]
    assert common_divisors(64, 96, limit=16) == [1, 2, 4, 8, 16]
    assert common_divisors(7, 5) == [1]
    # the most MACs within budget, ties to the smallest preference; all above: the cheapest
    candidates = [(100, 1, "a"), (90, 0, "b"), (100, 0, "c"), (120, 0, "d")]
    assert closest_within(candidates, 100) == "c"
    assert closest_within(candidates, 95) == "b"
    assert closest_within(candidates, 50) == "b"


def test_check_divides_names_the_dimension():
    check_divides("grid", 4, in_features=8, out_features=12)
    with pytest.raises(ValueError, match="grid=4 must divide out_features=10"):
        check_divides("grid", 4, in_features=8, out_features=10)
