"""GBLRConv2d and FrozenGBLRConv2d: the kernel's matrix view is a GBLR matrix; every path
computes the same convolution; convolutions convert, count, learn, save and load like linears."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gblr
from gblr.conv import CONV_KERNELS, FrozenGBLRConv2d, GBLRConv2d, im2col_rows

GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=(2, 3), padding="same"),  # even kernel: "same" pads asymmetrically
    dict(kernel_size=1, stride=(2, 1)),
    dict(kernel_size=3, padding="valid"),
]


def random_conv(seed: int, dtype=torch.float32, in_channels=5, out_channels=7, **geometry) -> GBLRConv2d:
    """A convolution with random locations (blocks wrap around the matrix edges) and widths."""
    torch.manual_seed(seed)
    layer = GBLRConv2d(in_channels, out_channels, bias=True, init_flops_ratio=0.4, dtype=dtype, **geometry)
    with torch.no_grad():
        layer.in_location.uniform_(0, 1)
        layer.out_location.uniform_(0, 1)
        layer.in_width.uniform_(0.05, 0.9)
        layer.out_width.uniform_(0.05, 0.9)
    return layer


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_gblr_conv_is_a_convolution_with_the_masked_matrix(geometry):
    layer = random_conv(0, torch.float64, **geometry)
    # the same GBLR matrix from a plain GBLRLinear with the same parameters
    linear = gblr.GBLRLinear(layer.in_features, layer.out_features, components=layer.components, dtype=torch.float64)
    linear.load_state_dict(layer.state_dict())
    kernel = linear.matrix.reshape(7, 5, *layer.kernel_size)
    x = torch.randn(3, 5, 9, 8, dtype=torch.float64)
    expected = F.conv2d(x, kernel, layer.bias, layer.stride, layer.padding, layer.dilation)
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    assert layer.weight.shape == (7, 5, *layer.kernel_size)
    assert layer.output_pixels == y.shape[-2] * y.shape[-1]
    torch.testing.assert_close(layer(x[0]), y[0], rtol=0, atol=1e-12)  # unbatched input as nn.Conv2d


@pytest.mark.parametrize("sigma", [None, 3.0])
def test_gblr_conv_gradients_equal_autograd_through_the_masks(sigma):
    layer = random_conv(1, torch.float64, kernel_size=3, padding=1, stride=2)
    layer.sigma = sigma
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 7, 4, 3, dtype=torch.float64)
    (layer(x) * weights).sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    reference = layer.convolve(x, layer.weight, layer.bias)  # autograd through masked_factor
    (reference * weights).sum().backward()
    theirs = [x.grad] + [p.grad for p in layer.parameters()]
    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine, other, rtol=1e-9, atol=1e-9)


def test_a_pruned_block_of_a_conv_can_grow_back():
    layer = random_conv(2, kernel_size=3, padding=1)
    with torch.no_grad():
        layer.in_width[0] = 0.0
        layer.out_width[0] = 0.0
    layer(torch.randn(2, 5, 6, 6)).square().sum().backward()
    assert layer.in_width.grad[0] != 0 and layer.out_width.grad[0] != 0


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_frozen_path_equals_the_trainable_conv(geometry, seed):
    layer = random_conv(seed, **geometry)
    x = torch.randn(4, 5, 9, 10)
    with torch.no_grad():
        expected = layer(x)
        frozen = layer.freeze()
        assert isinstance(frozen, FrozenGBLRConv2d) and frozen.flops() == layer.flops()
        for path in CONV_KERNELS[1:]:
            torch.testing.assert_close(frozen.run(path, x, frozen.bias), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-5)  # kernel="auto" measures
    (key, kept), = frozen.choices.items()
    assert set(kept.predicted) == {"dense", "blocks"} and "dense" in kept.seconds  # dense is always timed
    assert kept.path in kept.seconds and set(kept.seconds) <= {"dense", "blocks"} and kept.tokens == 4
    assert frozen.output_pixels == expected.shape[-2] * expected.shape[-1]
    torch.testing.assert_close(frozen.weight, layer.weight.detach(), rtol=1e-6, atol=1e-6)


def test_frozen_conv_with_a_fixed_kernel_trains_through_the_reference_path():
    frozen = random_conv(3, kernel_size=3, padding=1).freeze()
    frozen.kernel = "blocks"
    x = torch.randn(2, 5, 6, 6)
    with torch.no_grad():
        before = frozen(x)
    y = frozen(x)  # parameters require gradients: the differentiable reference path
    y.sum().backward()
    torch.testing.assert_close(y, before, rtol=1e-5, atol=1e-5)
    assert frozen.bias.grad is not None and frozen.left0.grad is not None
    assert frozen(torch.zeros(0, 5, 6, 6)).shape == (0, 7, 6, 6)
    with pytest.raises(ValueError, match="kernel must be one of"):
        frozen.kernel = "tiled"
    with pytest.raises(TypeError, match="path_for_batch"):
        frozen.path_for(16)


def test_conv_flops_count_per_pixel_and_reports_weigh_them_by_output_pixels():
    layer = random_conv(4, kernel_size=3, padding=1, stride=2)
    linear = gblr.GBLRLinear(45, 7, components=layer.components)
    linear.load_state_dict(layer.state_dict())
    assert layer.flops() == linear.flops()
    report = gblr.flops_report(nn.Sequential(layer))
    assert report.dense_macs == 45 * 7  # before any forward pass: per pixel
    layer(torch.randn(1, 5, 8, 8))  # 4x4 output pixels
    (row,) = gblr.flops_report(nn.Sequential(layer))
    assert (row.dense_macs, row.gblr_macs) == (45 * 7 * 16, layer.flops() * 16)
    dense = nn.Conv2d(5, 7, 3)
    (dense_row,) = gblr.flops_report(nn.Sequential(dense), include_dense=True)
    assert dense_row.shape == (7, 45) and dense_row.ratio == 1.0


def test_the_learner_weighs_convolutions_by_their_output_pixels():
    model = nn.Sequential(GBLRConv2d(4, 4, 3, padding=1, init_flops_ratio=0.5),
                          GBLRConv2d(4, 4, 3, padding=1, stride=2, init_flops_ratio=0.5))
    model(torch.randn(1, 4, 8, 8))  # 64 and 16 output pixels
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-3, struct_lr=1e-3))
    learner = gblr.StructureLearner(model, optimizer, flops_target=0.3, total_steps=10)
    torch.testing.assert_close(learner.layer_weights(), torch.tensor([1.0, 0.25], dtype=torch.float64))
    first, second = (layer.flops() for layer in model)
    assert learner.flops_ratio() == pytest.approx((64 * first + 16 * second) / (80 * 36 * 4))
    assert learner.flops_ratio() == pytest.approx(gblr.flops_report(model).ratio)


def test_the_learner_brings_a_cnn_to_its_budget():
    torch.manual_seed(0)
    model = nn.Sequential(GBLRConv2d(3, 8, 3, padding=1), nn.ReLU(), GBLRConv2d(8, 8, 3, padding=1, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 2, (32,))
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-2, struct_lr=1e-2))
    learner = gblr.StructureLearner(model, optimizer, flops_target=0.3, total_steps=60)
    for _ in range(60):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        learner.step()
    assert learner.flops_ratio() <= 0.3 + 0.02
    frozen = gblr.freeze_(model)
    with torch.no_grad():
        assert isinstance(frozen[2], FrozenGBLRConv2d)
        assert gblr.flops_report(frozen).ratio == pytest.approx(learner.flops_ratio(), abs=1e-9)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(24 * 4 * 4, 10))


def test_convert_replaces_convolutions_with_calibrated_gblr_convolutions(tmp_path):
    model = tiny_cnn()
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        dense = model(x)
    batches = [(x[i : i + 16],) for i in range(0, 64, 16)]
    report = gblr.convert_(model, gblr.GBLRConfig(flops_ratio=0.5), calibration=batches, progress=False, verbose=False)
    assert isinstance(model[2], GBLRConv2d) and isinstance(model[5], gblr.GBLRLinear)
    assert report["2"].in_features == 144 and report["2"].flops_ratio < 1.0
    assert report.flops_ratio <= 0.5 + 1e-9
    with torch.no_grad():
        converted = model(x)
        error = float((converted - dense).norm() / dense.norm())
    assert error < 0.6
    uncalibrated = tiny_cnn()
    gblr.convert_(uncalibrated, gblr.GBLRConfig(flops_ratio=0.5), progress=False, verbose=False)
    with torch.no_grad():
        assert error < float((uncalibrated(x) - dense).norm() / dense.norm())

    gblr.freeze_(model)
    gblr.save_pretrained(model, tmp_path)
    loaded = gblr.load_pretrained(tiny_cnn(0), tmp_path)  # a fresh copy of the base model
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert isinstance(loaded[2], FrozenGBLRConv2d) and loaded[2].stride == (2, 2)

    other = tiny_cnn(1)
    other[2] = nn.Conv2d(16, 24, 3, stride=1, padding=1)  # same matrix shape, another geometry
    with pytest.raises(ValueError, match="saved as a convolution with"):
        gblr.load_pretrained(other, tmp_path)


def test_trainable_conv_saves_and_loads_exactly(tmp_path):
    model = nn.Sequential(random_conv(5, kernel_size=(3, 2), stride=2, padding="valid"))
    gblr.save_pretrained(model, tmp_path)
    loaded = gblr.load_pretrained(nn.Sequential(nn.Conv2d(5, 7, (3, 2), stride=2)), tmp_path)
    x = torch.randn(2, 5, 9, 9)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded[0].padding == "valid"


def test_im2col_rows_are_what_the_kernel_matrix_multiplies():
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False)
    x = torch.randn(2, 3, 7, 8)
    rows = im2col_rows(conv, x)
    y = conv(x)
    flat = rows @ conv.weight.reshape(4, -1).T
    torch.testing.assert_close(flat.reshape(2, -1, 4).transpose(1, 2).reshape(y.shape), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: GBLRConv2d(4, 4, 3, groups=2), "groups must be 1"),
        (lambda: GBLRConv2d(4, 4, 3, padding_mode="reflect"), "padding_mode must be 'zeros'"),
        (lambda: GBLRConv2d(4, 4, 3, padding="same", stride=2), "padding='same' needs stride 1"),
        (lambda: GBLRConv2d(4, 4, 0), "kernel_size must be an int >= 1"),
        (lambda: GBLRConv2d(4, 4, 3, padding=-1), "padding must be an int >= 0"),
        (lambda: GBLRConv2d(4, 4, 3, padding="full"), "padding must be 'valid', 'same'"),
        (lambda: GBLRConv2d(4, 4, 3)(torch.randn(1, 3, 5, 5)), r"C = in_channels = 4, got shape \(1, 3, 5, 5\)"),
        (lambda: GBLRConv2d(4, 4, 3)(torch.randn(1, 4, 2, 2)), "smaller than the \\(dilated\\) kernel"),
        (lambda: GBLRConv2d(4, 4, 3)(torch.randn(4, 5)), "must be \\(N, C, H, W\\) or \\(C, H, W\\)"),
        (lambda: GBLRConv2d.from_matrix_layer(gblr.GBLRLinear(8, 4), nn.Conv2d(4, 4, 3)), "is not the matrix view"),
    ],
)
def test_bad_convolutions_are_refused_saying_why(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_integer_images_are_refused_like_nn_conv2d():
    with pytest.raises(ValueError, match="floating point"):
        GBLRConv2d(2, 2, 1)(torch.ones(1, 2, 3, 3, dtype=torch.long))
