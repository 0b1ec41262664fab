"""The deployed layer (gblr.frozen): freezing keeps outputs and cost, merges supports, and
its inference paths agree, cache correctly and train through the reference path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gblr
from fixtures import block_specs, frozen_layer, random_structure, set_structure
from gblr import FrozenGBLRLinear, GBLRLinear
from gblr.kernels.choice import MEASURED_PATHS


def outputs_by_path(layer, x):
    outputs = {}
    with torch.no_grad():
        for kernel in ("reference", *MEASURED_PATHS):
            layer.kernel = kernel
            outputs[kernel] = layer(x)
    layer.kernel = "auto"
    return outputs


@settings(max_examples=40, deadline=None)
@given(
    in_features=st.integers(1, 24),
    out_features=st.integers(1, 24),
    components=st.integers(1, 8),
    rank=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_freeze_is_equivalent(in_features, out_features, components, rank, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    layer = GBLRLinear(in_features, out_features, bias=bias, components=components, rank=rank, dtype=torch.float64)
    random_structure(layer, generator)
    if components > 1:  # force one duplicated support so that merging is exercised
        with torch.no_grad():
            for parameter in layer.structural_parameters():
                parameter[1] = parameter[0]
    frozen = layer.freeze()
    assert isinstance(frozen, FrozenGBLRLinear)
    x = torch.randn(5, in_features, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), layer(x))
        torch.testing.assert_close(frozen.weight, layer.weight)
    assert frozen.flops() == layer.flops()
    stored = sum(p.numel() for p in frozen.parameters()) - (out_features if bias else 0)
    assert stored <= max(layer.flops(), 0)  # memory follows the cost


def test_freeze_uses_sharp_masks_and_merges_supports():
    torch.manual_seed(0)
    layer = GBLRLinear(30, 20, components=4, sigma=4.0, dtype=torch.float64)
    set_structure(layer, [6, 6, 30, 2], [27, 27, 0, 3], [5, 5, 20, 2], [18, 18, 0, 1])
    frozen = layer.freeze()
    layer.sigma = None
    x = torch.randn(3, 30, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), layer(x))
    assert len(frozen.supports) == 3  # components 0 and 1 merged; the 2x2 block stored dense
    assert any(right is None for _, _, right in frozen.blocks())
    assert "blocks=3" in repr(frozen)


def test_freeze_in_place_on_a_model():
    model = nn.Sequential(GBLRLinear(8, 8), nn.ReLU(), nn.Sequential(GBLRLinear(8, 4, bias=False)))
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
    returned = gblr.freeze_(model)
    assert returned is model
    assert isinstance(model[0], FrozenGBLRLinear) and isinstance(model[2][0], FrozenGBLRLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    assert isinstance(gblr.freeze_(GBLRLinear(4, 4)), FrozenGBLRLinear)


@settings(max_examples=60, deadline=None)
@given(st.tuples(block_specs(40, 8), st.integers(1, 16)))
def test_tiled_and_dense_agree_with_reference_on_random_structures(case):
    # wrap-around, overlapping, one-element and full blocks, rank 1-3, dense blocks (rank >= widths)
    (m, n, spec), tile = case
    layer = frozen_layer(m, n, [(o % m, a, i % n, b, r) for o, a, i, b, r in spec], tile=tile)
    x = torch.randn(3, 7, n, dtype=torch.float64)
    outputs = outputs_by_path(layer, x)
    torch.testing.assert_close(outputs["tiled"], outputs["reference"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs["dense"], outputs["reference"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs["tiled-coarse"], outputs["reference"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs["tiled-batched"], outputs["reference"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_paths_agree_in_lower_precision(dtype, tolerance):
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(96, 160, init_flops_ratio=0.3).to(dtype).freeze()
    x = torch.randn(33, 96).to(dtype)
    outputs = outputs_by_path(layer, x)
    scale = outputs["reference"].float().abs().max()
    for kernel in MEASURED_PATHS:
        assert outputs[kernel].dtype == dtype
        assert (outputs[kernel].float() - outputs["reference"].float()).abs().max() <= tolerance * scale


def test_cached_tiles_follow_edits_training_steps_loads_and_dtype_changes():
    layer = frozen_layer(24, 20, [(0, 10, 5, 12, 2), (20, 8, 0, 20, 1)], tile=4, kernel="tiled")
    x = torch.randn(6, 20, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        layer.left0.mul_(2.0)
        assert torch.equal(layer(x), before)  # in-place edits outside autograd need refresh()
        layer.refresh()
        after = layer(x)
        layer.kernel = "reference"
        expected = layer(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)
    # a training step (reference path with autograd) drops the caches
    layer.kernel = "tiled"
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        trained = layer(x)
        layer.kernel = "reference"
        torch.testing.assert_close(trained, layer(x))
    # so does loading a state dict
    layer.kernel = "tiled"
    state = {key: value * 0.5 for key, value in layer.state_dict().items()}
    layer.load_state_dict(state)
    with torch.no_grad():
        loaded = layer(x)
        layer.kernel = "reference"
        torch.testing.assert_close(loaded, layer(x))
        expected = layer(x)
    layer.kernel = "tiled"
    layer32 = layer.float()
    with torch.no_grad():
        y32 = layer32(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, expected.float(), rtol=1e-5, atol=1e-5)


def test_gradients_use_the_reference_path():
    layer = frozen_layer(16, 12, [(2, 6, 3, 5, 1), (0, 16, 0, 12, 2)], kernel="auto")
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.left0.grad is not None and x.grad is not None
    assert layer.choices == {}  # nothing measured: training never takes the inference paths


def test_bad_kernel_name_is_rejected():
    with pytest.raises(ValueError, match="kernel must be one of"):
        frozen_layer(8, 8, [(0, 4, 0, 4, 1)], kernel="fast")


def test_dtype_and_device_follow_module_casts_even_without_blocks():
    empty = GBLRLinear(6, 4, bias=False)
    with torch.no_grad():
        empty.in_width.zero_()
    frozen = empty.freeze()
    assert len(frozen.supports) == 0 and frozen.dtype == torch.float32 and frozen.device == torch.device("cpu")
    frozen = frozen.to(torch.float64)
    assert frozen.dtype == torch.float64
    assert frozen.weight.dtype == torch.float64 and torch.equal(frozen.weight, torch.zeros(4, 6, dtype=torch.float64))
