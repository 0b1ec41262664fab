import io
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fixtures import set_structure
from gblr import GBLRLinear
from gblr.masks import boxcar


def dense_from_definition(layer):
    """docs/method.md section 1 written out as a loop over components, with exact boxcars."""
    mask_in = boxcar(layer.in_width, layer.in_location, layer.in_features)
    mask_out = boxcar(layer.out_width, layer.out_location, layer.out_features)
    weight = torch.zeros(layer.out_features, layer.in_features, dtype=layer.u.dtype)
    for k in range(layer.components):
        weight += (mask_out[k, :, None] * layer.u[k]) @ (layer.v[k] * mask_in[k, None, :])
    return weight


def test_defaults_and_repr():
    layer = GBLRLinear(96, 64)
    assert layer.components == 64 and layer.rank == 1 and layer.sigma is None
    assert layer.u.shape == (64, 64, 1) and layer.v.shape == (64, 1, 96)
    for parameter in layer.structural_parameters():
        assert parameter.shape == (64,)
    text = repr(layer)
    assert "components=64" in text and "rank=1" in text and "sigma=None" in text
    assert f"flops_ratio={layer.flops_ratio():.3f}" in text


@pytest.mark.parametrize("sigma", [None, 3.0])
def test_weight_is_the_spec_sum(sigma):
    torch.manual_seed(0)
    layer = GBLRLinear(20, 12, components=7, rank=2, dtype=torch.float64)
    set_structure(layer, [20, 5, 0, 7, 3, 20, 1], [0, 17, 4, 2, 19, 0, 6], [12, 4, 3, 0, 12, 2, 5], [0, 10, 1, 5, 0, 11, 3])
    if sigma is None:
        torch.testing.assert_close(layer.weight, dense_from_definition(layer))
    else:
        layer.sigma = sigma
        mask_in, mask_out = layer.masks()
        expected = sum((mask_out[k, :, None] * layer.u[k]) @ (layer.v[k] * mask_in[k, None, :]) for k in range(7))
        torch.testing.assert_close(layer.weight, expected)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_linear_with_weight(shape, bias):
    layer = GBLRLinear(5, 7, bias=bias, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*shape[:-1], 7)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))






def test_gradients_reach_every_parameter():
    layer = GBLRLinear(16, 16, sigma=5.0)
    layer(torch.randn(4, 16)).square().sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    layer = GBLRLinear(24, 16, dtype=dtype)
    assert layer.u.dtype == dtype and layer.bias.dtype == dtype
    assert layer.in_width.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(3, 24, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    reference = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    tolerance = 1e-10 if dtype == torch.float64 else 5e-2
    torch.testing.assert_close(y.double(), reference, rtol=tolerance, atol=tolerance)




@settings(max_examples=25, deadline=None)
@given(
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 40),
    components=st.integers(1, 6),
    rank=st.integers(1, 3),
    bias=st.booleans(),
    sigma=st.one_of(st.none(), st.floats(0.5, 200.0)),
)
def test_state_dict_round_trip(in_features, out_features, components, rank, bias, sigma):
    rank = min(rank, in_features, out_features)  # a larger rank is refused (tests/test_bad_inputs.py)
    source = GBLRLinear(in_features, out_features, bias=bias, components=components, rank=rank, sigma=sigma)
    with torch.no_grad():
        for parameter in source.structural_parameters():
            parameter.uniform_(0, 1)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = GBLRLinear(in_features, out_features, bias=bias, components=components, rank=rank)
    target.load_state_dict(torch.load(buffer))
    assert target.sigma == source.sigma
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    x = torch.randn(3, in_features)
    assert torch.equal(source(x), target(x))


def test_loading_a_checkpoint_of_another_shape_fails_clearly():
    with pytest.raises(RuntimeError, match="size mismatch"):
        GBLRLinear(8, 8).load_state_dict(GBLRLinear(8, 16).state_dict())


@pytest.mark.parametrize("ratio", [0.05, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(256, 256), (96, 384), (384, 96)])
@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_initial_structure_meets_the_ratio(ratio, shape, share):
    torch.manual_seed(0)
    layer = GBLRLinear(*shape, init_flops_ratio=ratio, init_full_width_share=share)
    assert layer.flops_ratio() == pytest.approx(ratio, rel=0.05, abs=0.005)
    full = (layer.in_width == 1) & (layer.out_width == 1)
    full_macs = int(full.sum()) * sum(shape)
    assert full_macs == pytest.approx(share * ratio * shape[0] * shape[1], abs=sum(shape))
    if share == 0.0:
        assert not full.any()
    # The full-width components are the top singular directions of a dense init.
    strengths = layer.u.norm(dim=(1, 2)) * layer.v.norm(dim=(1, 2))
    if full.any() and not full.all():
        assert strengths[full].min() >= strengths[~full].max()


def test_initial_weight_has_dense_init_scale():
    torch.manual_seed(0)
    layer = GBLRLinear(512, 512, init_flops_ratio=1.0)
    dense = nn.Linear(512, 512)
    assert layer.weight.std().item() == pytest.approx(dense.weight.std().item(), rel=0.35)


def test_reset_parameters_reinitialises():
    layer = GBLRLinear(32, 32)
    with torch.no_grad():
        layer.u.zero_()
        layer.in_width.zero_()
    layer.reset_parameters()
    assert layer.u.abs().sum() > 0 and layer.flops_ratio() == pytest.approx(0.5, rel=0.1)


def test_flops_counts_groups_and_skips_empty_components():
    layer = GBLRLinear(100, 60, components=6, rank=2)
    #               in: width, location     out: width, location
    set_structure(
        layer,
        [10, 10, 100, 100, 0, 50],
        [5, 5, 0, 37, 3, 0],
        [20, 20, 60, 60, 40, 1],
        [3, 3, 0, 11, 0, 0],
    )
    # components 0 and 1 share a support: rank 4 on 10x20 -> min(4*30, 200) = 120
    # components 2 and 3 are full width (locations are irrelevant): rank 4 -> min(4*160, 6000) = 640
    # component 4 has a zero width; component 5: min(2*51, 50) = 50
    assert layer.flops() == 120 + 640 + 50
    assert layer.flops_ratio() == pytest.approx(810 / 6000)


def test_widths_above_one_do_not_double_the_mask():
    layer = GBLRLinear(16, 16, components=1)
    with torch.no_grad():
        layer.in_width.fill_(1.8)
        layer.out_width.fill_(1.0)
    mask_in, _ = layer.masks()
    assert torch.equal(mask_in, torch.ones(1, 16))
    assert layer.flops() == 32















@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_features": 0, "out_features": 4}, "in_features"),
        ({"in_features": 4, "out_features": -1}, "out_features"),
        ({"in_features": 4, "out_features": 4, "components": 0}, "components"),
        ({"in_features": 4, "out_features": 4, "rank": 0}, "rank"),
        ({"in_features": 4, "out_features": 4, "init_flops_ratio": 0.0}, "init_flops_ratio"),
        ({"in_features": 4, "out_features": 4, "init_flops_ratio": 1.5}, "init_flops_ratio"),
        ({"in_features": 4, "out_features": 4, "init_full_width_share": -0.1}, "init_full_width_share"),
        ({"in_features": 4, "out_features": 4, "sigma": -1.0}, "sigma"),
        ({"in_features": 4.0, "out_features": 4}, "in_features"),
        ({"in_features": 4, "out_features": 4, "product": "dense"}, "product"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GBLRLinear(**kwargs)


@pytest.mark.parametrize("shape", [(3, 7), (7,), (2, 3, 9)])
def test_wrong_input_size_is_an_error_not_padding(shape):
    layer = GBLRLinear(8, 4)
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.randn(*shape))
    with pytest.raises(ValueError, match="in_features=8"):
        layer.freeze()(torch.randn(*shape))


def test_sigma_setter_validates():
    layer = GBLRLinear(4, 4)
    layer.sigma = 7
    assert layer.sigma == 7.0
    with pytest.raises(ValueError, match="sigma"):
        layer.sigma = float("inf")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_backward_and_freeze():
    layer = GBLRLinear(64, 48, sigma=10.0, device="cuda")
    x = torch.randn(5, 64, device="cuda")
    layer(x).sum().backward()
    assert layer.in_width.grad.device.type == "cuda"
    layer.sigma = None
    with torch.no_grad():
        torch.testing.assert_close(layer.freeze()(x), layer(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_matches_float32(dtype):
    torch.manual_seed(0)
    layer = GBLRLinear(256, 192, sigma=10.0, device="cuda")
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    low = [p.grad.clone() for p in (x, *layer.parameters())]
    assert all(g.dtype == torch.float32 for g in low)
    x.grad = None
    layer.zero_grad()
    layer(x).square().sum().backward()
    for got, expected in zip(low, (x.grad, *(p.grad for p in layer.parameters()))):
        torch.testing.assert_close(got, expected, rtol=0, atol=3e-2 * expected.abs().max().item())


# -- bad inputs and casts (the reliability issue) -------------------------------------------------


def test_integer_inputs_are_refused_naming_the_expected_dtype():
    # They used to give int64 zeros (nn.Linear raises).
    layer = GBLRLinear(16, 8)
    with pytest.raises(ValueError, match=r"floating point tensor of dtype torch.float32.*got torch.int64"):
        layer(torch.randint(-3, 4, (2, 16)))


def test_an_input_of_another_dtype_is_refused_unless_autocast_is_on():
    # A float64 input into a float32 layer used to compute silently in float64.
    layer = GBLRLinear(16, 8)
    x = torch.randn(2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"input has dtype torch.float64 but GBLRLinear\(in_features=16, "
                                         r"out_features=8\) has dtype torch.float32"):
        layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast chooses the compute dtype, as before
        assert layer(x).dtype == torch.bfloat16
    assert layer(x.float()).dtype == torch.float32


@pytest.mark.parametrize("shape", [(0, 16), (3, 0, 16)])
@pytest.mark.parametrize("grad", [True, False])
def test_an_empty_batch_gives_an_empty_output(shape, grad):
    layer = GBLRLinear(16, 8, sigma=5.0)
    with torch.set_grad_enabled(grad):
        y = layer(torch.randn(shape))
    assert y.shape == (*shape[:-1], 8)
    if grad:
        y.sum().backward()
        assert torch.equal(layer.u.grad, torch.zeros_like(layer.u))


def test_rank_above_the_smaller_side_is_refused():
    with pytest.raises(ValueError, match=r"rank must be at most min\(in_features, out_features\) = 8, got 1000000"):
        GBLRLinear(16, 8, rank=10**6)
    assert GBLRLinear(16, 8, rank=8).rank == 8


CASTS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
    "to float16": lambda m: m.to(torch.float16),
    "to bfloat16": lambda m: m.to(torch.bfloat16),
    "to cpu, float16": lambda m: m.to("cpu", torch.float16),
    "to dtype=": lambda m: m.to(dtype=torch.bfloat16),
    "double then float": lambda m: m.double().float(),
    "double then half": lambda m: m.double().half(),
    "type": lambda m: m.type(torch.float16),
}


@pytest.mark.parametrize("conversion", ["set data", "overwrite", "swap"])
@pytest.mark.parametrize("cast", CASTS.values(), ids=CASTS.keys())
def test_casts_keep_the_structure(cast, conversion, monkeypatch):
    # At 3072 outputs float16 cannot hold a location (1/3072): a cast used to move 182 of 768
    # locations of a 3072x768 layer (544 in bfloat16). The structure keeps float32 instead, with
    # each of torch.__future__'s ways of converting module parameters.
    overwrite = conversion == "overwrite"
    monkeypatch.setattr(torch.__future__, "get_overwrite_module_params_on_conversion", lambda: overwrite)
    monkeypatch.setattr(torch.__future__, "get_swap_module_params_on_conversion", lambda: conversion == "swap")
    torch.manual_seed(0)
    layer = GBLRLinear(16, 3072, components=64, init_flops_ratio=0.1)
    layer(torch.randn(2, 16)).sum().backward()
    before = [p.detach().clone() for p in layer.structural_parameters()]
    supports = layer.supports()
    frozen = layer.freeze().supports
    objects = [id(p) for p in layer.structural_parameters()]
    model = nn.Sequential(layer)
    cast(model)
    content = layer.u.dtype
    assert layer.in_width.dtype == (torch.float64 if content == torch.float64 else torch.float32)
    for parameter, value in zip(layer.structural_parameters(), before):
        assert torch.equal(parameter.detach().to(value.dtype), value)  # not rounded through half precision
        assert parameter.grad is not None and parameter.grad.dtype == parameter.dtype
    for got, expected in zip(layer.supports(), supports):
        assert torch.equal(got, expected)
    assert layer.freeze().supports == frozen
    if not overwrite:  # optimizers hold the Parameter objects
        assert [id(p) for p in layer.structural_parameters()] == objects
    assert list(dict(layer.named_parameters())) == ["in_width", "in_location", "out_width", "out_location", "u", "v",
                                                     "bias"]
    assert layer.bias.dtype == content


def test_a_cast_to_float64_and_back_and_to_empty_follow_the_content():
    layer = GBLRLinear(12, 10).double()
    assert layer.u.dtype == layer.in_width.dtype == torch.float64
    layer.float()
    assert layer.u.dtype == layer.in_width.dtype == torch.float32
    meta = GBLRLinear(12, 10, device="meta", dtype=torch.float16).to_empty(device="cpu")
    assert meta.in_width.dtype == torch.float32 and meta.in_width.device.type == "cpu"


def nan_layer():
    layer = GBLRLinear(16, 8)
    with torch.no_grad():
        layer.in_width[3] = float("nan")
    return layer


@pytest.mark.parametrize("use", ["forward", "flops()", "freeze()", "supports()", "weight"])
def test_a_nan_width_is_refused_where_it_is_used(use):
    # It used to give IndexError in the forward pass, flops() == 0 and flops_ratio=0.000.
    layer = nan_layer()
    call = {
        "forward": lambda: layer(torch.randn(2, 16)),
        "flops()": layer.flops,
        "freeze()": layer.freeze,
        "supports()": layer.supports,
        "weight": lambda: layer.weight,
    }[use]
    with pytest.raises(ValueError, match=rf"GBLRLinear\(in_features=16, out_features=8\): in_width contain NaN or "
                                         rf"infinite values in {re.escape(use)}"):
        call()
    assert "flops_ratio=invalid (non-finite widths or locations)" in repr(layer)


def test_a_nan_width_in_a_state_dict_is_refused_on_loading():
    state = nan_layer().state_dict()
    layer = GBLRLinear(16, 8)
    before = layer.in_width.detach().clone()
    with pytest.raises(RuntimeError, match=r"GBLRLinear\(in_features=16, out_features=8\).*in_width in the state "
                                           r"dict contain NaN"):
        layer.load_state_dict(state)
    assert torch.equal(layer.in_width.detach(), before)  # left as it was
