"""LowRankConv2d and BlockSparseConv2d: fixed-structure convolutions whose effective kernel
(``.weight``) is what they convolve with, costed in MACs per output pixel of the kernel's
``(out, in * kh * kw)`` matrix view (gblr.baselines.conv)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gblr import flops_report
from gblr.baselines import BlockSparseConv2d, LowRankConv2d, diagonal_blocks
from gblr.baselines.common import macs_budget

DTYPE = torch.float64

GEOMETRIES = [  # constructor keywords, and the same as F.conv2d arguments
    ({}, {}),
    ({"stride": 2, "padding": 1}, {"stride": 2, "padding": 1}),
    ({"padding": (2, 1), "dilation": (2, 1)}, {"padding": (2, 1), "dilation": (2, 1)}),
    ({"padding": "same"}, {"padding": "same"}),
    ({"stride": (1, 2), "padding": "valid"}, {"stride": (1, 2), "padding": "valid"}),
]

LAYERS = {
    "low_rank": lambda **kw: LowRankConv2d(6, 8, 3, 4, dtype=DTYPE, **kw),
    "low_rank_rectangular": lambda **kw: LowRankConv2d(4, 6, (3, 2), 2, dtype=DTYPE, **kw),
    "block_sparse": lambda **kw: BlockSparseConv2d(6, 9, 3, 3, [(0, 1), (2, 2), (1, 0)], dtype=DTYPE, **kw),
    "block_sparse_diagonals": lambda **kw: BlockSparseConv2d(8, 4, (1, 3), 4, diagonal_blocks(4, 2), dtype=DTYPE, **kw),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's, for (3, 2)
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("geometry, conv_args", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_convolution_with_the_effective_kernel(name, geometry, conv_args, bias):
    torch.manual_seed(0)
    layer = LAYERS[name](bias=bias, **geometry)
    kernel = layer.weight.detach()
    assert kernel.shape == (layer.out_channels, layer.in_channels, *layer.kernel_size)
    assert (layer.in_features, layer.out_features) == (layer.in_channels * math.prod(layer.kernel_size),
                                                       layer.out_channels)
    torch.testing.assert_close(layer.matrix, kernel.reshape(layer.out_channels, -1))
    x = torch.randn(2, layer.in_channels, 9, 10, dtype=DTYPE)
    expected = F.conv2d(x, kernel, layer.bias, **conv_args)
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert layer.output_pixels == expected.shape[-2] * expected.shape[-1]
    # an unbatched image gives the unbatched output
    single = layer(x[1])
    assert single.shape == expected.shape[1:]
    torch.testing.assert_close(single, expected[1], rtol=1e-12, atol=1e-12)


def test_low_rank_kernel_is_v_then_u_and_has_the_rank():
    torch.manual_seed(0)
    layer = LowRankConv2d(6, 8, 3, 4, dtype=DTYPE)
    assert layer.v.shape == (4, 6, 3, 3) and layer.u.shape == (8, 4)
    torch.testing.assert_close(layer.matrix, layer.u @ layer.v.reshape(4, -1))
    assert torch.linalg.matrix_rank(layer.matrix.detach()).item() == 4


def test_block_sparse_kernel_is_zero_outside_the_channel_group_blocks():
    torch.manual_seed(0)
    active = [(0, 1), (2, 2), (1, 0)]
    layer = BlockSparseConv2d(6, 9, 3, 3, active, dtype=DTYPE)  # blocks of 3 output x 2 input channels
    assert layer.block_shape == (3, 2) and layer.block_weight.shape == (3, 3, 2, 3, 3)
    kernel = layer.weight.detach()
    for i in range(3):
        for j in range(3):
            block = kernel[i * 3 : (i + 1) * 3, j * 2 : (j + 1) * 2]  # all taps of the channel groups
            if (i, j) in active:
                torch.testing.assert_close(block, layer.block_weight[active.index((i, j))].detach())
                assert (block != 0).all()
            else:
                assert (block == 0).all()
    # in the matrix view, a block is (out/grid) rows by (in/grid) * kh * kw consecutive columns
    assert (layer.matrix[0:3, 2 * 9 : 4 * 9] != 0).all() and (layer.matrix[0:3, 0:18] == 0).all()
    assert set(layer.state_dict()) == {"block_weight", "bias"}


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for layer in (LowRankConv2d(4, 6, 3, 2, padding=1), BlockSparseConv2d(4, 6, 3, 2, [(0, 1), (1, 1)], padding=1)):
        layer(torch.randn(2, 4, 5, 5)).square().sum().backward()
        for name, parameter in layer.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_flops_formulas():
    low_rank = LowRankConv2d(16, 32, 3, 5)
    assert low_rank.flops() == 5 * (16 * 9 + 32) == 880
    assert low_rank.flops_ratio() == pytest.approx(880 / (16 * 9 * 32))
    assert LowRankConv2d(16, 32, (3, 1), 2).flops() == 2 * (16 * 3 + 32)
    block_sparse = BlockSparseConv2d(16, 32, 3, 4, [(0, 0), (1, 2), (3, 3)])
    assert block_sparse.flops() == 3 * (32 // 4) * (16 // 4) * 9 == 864
    assert block_sparse.flops_ratio() == pytest.approx(3 / 16)
    assert BlockSparseConv2d(16, 32, 5, 4, diagonal_blocks(4, 2)).flops_ratio() == 0.5


def test_flops_report_counts_macs_per_pixel_times_output_pixels():
    model = nn.Sequential(LowRankConv2d(8, 16, 3, 3, padding=1), BlockSparseConv2d(16, 16, 3, 4, diagonal_blocks(4, 1),
                                                                                   stride=2, padding=1))
    before = flops_report(model)  # no forward yet: per output pixel
    assert [row.gblr_macs for row in before] == [model[0].flops(), model[1].flops()]
    model(torch.randn(2, 8, 8, 8))
    assert (model[0].output_pixels, model[1].output_pixels) == (64, 16)
    rows = list(flops_report(model))
    assert [row.shape for row in rows] == [(16, 72), (16, 144)]
    assert [row.gblr_macs for row in rows] == [model[0].flops() * 64, model[1].flops() * 16]
    assert [row.dense_macs for row in rows] == [16 * 72 * 64, 16 * 144 * 16]


@pytest.mark.parametrize("cls", [LowRankConv2d, BlockSparseConv2d])
@pytest.mark.parametrize("channels", [(16, 16), (16, 32), (3, 64), (64, 10), (24, 36)])
@pytest.mark.parametrize("kernel_size", [1, 3, (3, 5)])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 0.5, 1.0])
def test_at_flops_ratio_never_exceeds_the_budget_when_it_can_help_it(cls, channels, kernel_size, ratio):
    in_channels, out_channels = channels
    layer = cls.at_flops_ratio(in_channels, out_channels, kernel_size, ratio)
    taps = 9 if kernel_size == 3 else 1 if kernel_size == 1 else 15
    dense = in_channels * taps * out_channels
    assert (layer.in_features, layer.out_features) == (in_channels * taps, out_channels)
    budget = macs_budget(in_channels * taps, out_channels, ratio)
    smallest = (in_channels * taps + out_channels) if cls is LowRankConv2d else dense // max(
        g for g in range(1, 17) if in_channels % g == 0 == out_channels % g)
    if smallest <= budget:
        assert layer.flops() <= budget
    else:  # even the smallest structure is above the budget: it is taken, and reports its ratio
        assert layer.flops() == smallest
    assert layer.flops_ratio() == layer.flops() / dense


def test_at_flops_ratio_choices():
    # 16 * 9 + 32 = 176 MACs per rank; 0.3 * 4608 = 1382.4 allows rank 7 (1232), not 8 (1408)
    assert LowRankConv2d.at_flops_ratio(16, 32, 3, 0.3).rank == 7
    assert LowRankConv2d.at_flops_ratio(16, 32, 3, 1232 / 4608).rank == 7  # exactly 7 ranks allowed
    layer = BlockSparseConv2d.at_flops_ratio(16, 32, 3, 0.3)  # grids 2, 4, 8, 16: 4/16 = 0.25 is the largest
    assert (layer.grid, len(layer.blocks), layer.flops_ratio()) == (16, 64, 0.25)
    assert BlockSparseConv2d.at_flops_ratio(20, 20, 3, 0.3).flops_ratio() == pytest.approx(0.3)  # grid 10, k 3
    assert BlockSparseConv2d.at_flops_ratio(16, 16, 3, 0.5, grid=2).blocks == ((0, 0), (1, 1))
    # coprime channel counts admit only a 1x1 grid: the dense convolution
    assert BlockSparseConv2d.at_flops_ratio(7, 5, 3, 0.5).flops_ratio() == 1.0
    # the constructor's other arguments pass through
    strided = LowRankConv2d.at_flops_ratio(8, 8, 3, 0.5, stride=2, padding=1, bias=False, dtype=DTYPE)
    assert (strided.stride, strided.padding, strided.bias, strided.v.dtype) == ((2, 2), (1, 1), None, DTYPE)
    assert BlockSparseConv2d.at_flops_ratio(8, 8, 3, 0.5, dilation=2).dilation == (2, 2)


@pytest.mark.parametrize("build", [lambda: LowRankConv2d(32, 64, 3, 16),
                                   lambda: BlockSparseConv2d(32, 64, 3, 4, diagonal_blocks(4, 2))])
def test_init_scale_is_that_of_nn_conv2d(build):
    torch.manual_seed(0)
    layer = build()
    kernel = layer.weight.detach()
    active = kernel[kernel != 0]
    reference = 1 / (3 * 32 * 9)  # nn.Conv2d's default: uniform in +-1/sqrt(fan_in)
    assert active.var().item() == pytest.approx(reference, rel=0.1)
    assert layer.bias.abs().max().item() <= 1 / math.sqrt(32 * 9)


def test_repr_names_the_geometry_and_the_structure():
    text = repr(LowRankConv2d(8, 16, 3, 2, stride=2, padding=1))
    assert text == ("LowRankConv2d(in_channels=8, out_channels=16, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), "
                    "dilation=(1, 1), bias=True, rank=2, flops_ratio=0.153)")  # 2 * (72 + 16) / (72 * 16)
    text = repr(BlockSparseConv2d(8, 16, 3, 4, diagonal_blocks(4, 1), padding="same", bias=False))
    assert "padding=same" in text and "bias=False, grid=4, blocks=4, flops_ratio=0.250" in text


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LowRankConv2d(8, 8, 3, 0), r"rank must be a positive int, got 0"),
        (lambda: LowRankConv2d(0, 8, 3, 2), r"in_channels must be a positive int, got 0"),
        (lambda: LowRankConv2d(8, 8, 0, 2), r"kernel_size must be an int >= 1 or a pair of them, got 0"),
        (lambda: LowRankConv2d(8, 8, 3, 2, stride=0), r"stride must be an int >= 1"),
        (lambda: LowRankConv2d(8, 8, 3, 2, padding="full"), r"padding must be 'valid', 'same'"),
        (lambda: LowRankConv2d(8, 8, 3, 2, stride=2, padding="same"), r"padding='same' needs stride 1"),
        (lambda: LowRankConv2d.at_flops_ratio(8, 8, 3, 0.0), r"flops_ratio must be a number in \(0, 1\]"),
        (lambda: LowRankConv2d.at_flops_ratio(8, 8, (3, 3, 3), 0.5), r"kernel_size must be"),
        (lambda: BlockSparseConv2d(10, 8, 3, 4, [(0, 0)]), r"grid=4 must divide in_channels=10"),
        (lambda: BlockSparseConv2d(8, 6, 3, 4, [(0, 0)]), r"grid=4 must divide out_channels=6"),
        (lambda: BlockSparseConv2d(8, 8, 3, 4, [(0, 4)]), r"blocks\[0\] .* in \[0, grid=4\), got \(0, 4\)"),
        (lambda: BlockSparseConv2d(8, 8, 3, 4, [(0, 1), (0, 1)]), r"blocks must not repeat"),
        (lambda: BlockSparseConv2d(8, 8, 3, 4, []), r"blocks must hold at least one"),
        (lambda: BlockSparseConv2d.at_flops_ratio(8, 8, 3, 0.5, grid=3), r"grid=3 must divide in_channels=8"),
        (lambda: BlockSparseConv2d.at_flops_ratio(8, 8, 3, 1.5), r"flops_ratio must be a number in \(0, 1\]"),
    ],
)
def test_bad_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("layer", [LowRankConv2d(4, 8, 3, 2), BlockSparseConv2d(4, 8, 3, 2, [(0, 0)])])
def test_bad_inputs_raise(layer):
    with pytest.raises(ValueError, match=r"input must be \(N, C, H, W\) or \(C, H, W\) with C = in_channels = 4"):
        layer(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"input must be \(N, C, H, W\)"):
        layer(torch.randn(8, 4))
    with pytest.raises(ValueError, match="smaller than the"):
        layer(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="has dtype torch.float64"):
        layer(torch.randn(1, 4, 5, 5, dtype=DTYPE))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        layer([[1.0]])
