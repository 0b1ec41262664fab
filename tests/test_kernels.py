"""Frozen-layer inference paths: tiled and dense agree with the torch reference."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gblr
from fixtures import block_specs, frozen_layer
from gblr.kernels.tiled import batch, batched_forward, pack, tiled_forward
from gblr.kernels.choice import MEASURED_PATHS


def _outputs(layer, x):
    outputs = {}
    with torch.no_grad():
        for kernel in ("reference", *MEASURED_PATHS):
            layer.kernel = kernel
            outputs[kernel] = layer(x)
    layer.kernel = "auto"
    return outputs


@settings(max_examples=60, deadline=None)
@given(st.tuples(block_specs(40, 8), st.integers(1, 16)))
def test_tiled_and_dense_agree_with_reference_on_random_structures(case):
    # wrap-around, overlapping, one-element and full blocks, rank 1-3, dense blocks (rank >= widths)
    (m, n, spec), tile = case
    layer = frozen_layer(m, n, [(o % m, a, i % n, b, r) for o, a, i, b, r in spec], tile=tile)
    x = torch.randn(3, 7, n, dtype=torch.float64)
    outputs = _outputs(layer, x)
    torch.testing.assert_close(outputs["tiled"], outputs["reference"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs["dense"], outputs["reference"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs["tiled-coarse"], outputs["reference"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs["tiled-batched"], outputs["reference"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_paths_agree_in_lower_precision(dtype, tolerance):
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(96, 160, init_flops_ratio=0.3).to(dtype).freeze()
    x = torch.randn(33, 96).to(dtype)
    outputs = _outputs(layer, x)
    scale = outputs["reference"].float().abs().max()
    for kernel in MEASURED_PATHS:
        assert outputs[kernel].dtype == dtype
        assert (outputs[kernel].float() - outputs["reference"].float()).abs().max() <= tolerance * scale


def test_tiled_product_pads_only_partial_tiles():
    # one rank-2 block on rows 8..23 (wrapping past 31 is not needed) and columns 30..33 of 40 (wraps)
    layer = frozen_layer(32, 40, [(8, 16, 30, 14, 2)], tile=8, bias=False)
    product = pack(40, 32, list(layer.blocks()), 8)
    # columns 30..39 and 0..3: tiles [24,32), [32,40), [0,8) -> 3 tiles x 8 x 2 rows; rows 8..23: 2 tiles x 8 x 2
    assert product.macs == 3 * 8 * 2 + 2 * 8 * 2
    assert product.gemms == 5 and product.rank == 2
    x = torch.randn(4, 40, dtype=torch.float64)
    torch.testing.assert_close(tiled_forward(x, product), layer._reference(x))


def test_batched_tiles_pad_every_tile_to_the_same_rows():
    # tile 8: block A (rank 2) covers columns 0..15 (tiles 0, 1), block B (rank 1) columns 8..11
    # (tile 1): the column tiles hold 2 and 3 rows, padded to 3; 24 columns = 3 tiles, the last empty
    layer = frozen_layer(16, 24, [(0, 16, 0, 16, 2), (4, 4, 8, 4, 1)], tile=8, bias=False)
    product = pack(24, 16, list(layer.blocks()), 8)
    batched = batch(product, torch.empty(0, dtype=torch.float64))
    assert batched.V.shape == (3, 3, 8) and batched.U.shape == (2, 3, 8)
    assert batched.macs == 3 * 3 * 8 + 2 * 3 * 8
    assert (batched.in_rows == product.rank).sum() == 9 - 5  # padding rows point at the scratch row
    for tokens in (1, 5):
        x = torch.randn(tokens, 24, dtype=torch.float64)
        torch.testing.assert_close(batched_forward(x, batched), layer._reference(x))


def test_auto_measures_once_per_bucket_and_explain_reports_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(gblr.GBLRLinear(64, 96, init_flops_ratio=0.25), torch.nn.ReLU(),
                                gblr.GBLRLinear(96, 32, init_flops_ratio=0.5))
    frozen = gblr.freeze_(copy.deepcopy(model))
    x = torch.randn(5, 64)
    with torch.no_grad():
        reference = model(x)
        y = frozen(x)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    layer = frozen[0]
    assert len(layer.choices) == 1
    ((device, dtype, bucket), (path, seconds)), = layer.choices.items()
    assert (device, dtype, bucket) == ("cpu", torch.float32, 8) and path in MEASURED_PATHS
    assert set(seconds) == set(MEASURED_PATHS) and path == min(seconds, key=seconds.get)
    with torch.no_grad():
        frozen(torch.randn(7, 64))  # same bucket: no new measurement
    assert len(layer.choices) == 1

    explanation = gblr.explain(frozen, tokens=(1, 16))
    assert [row.name for row in explanation.layers] == ["0", "2"]
    row = explanation.layers[0]
    assert row.flops_ratio == pytest.approx(layer.flops_ratio())
    assert row.padded_ratio >= row.flops_ratio and row.gemms == layer.tiled_product().gemms
    assert set(row.paths) == {1, 16} and all(p in MEASURED_PATHS for p, _ in row.paths.values())
    text = str(explanation)
    assert "0" in text and "16 tok" in text and "x" in text
    assert "training form" in str(gblr.explain(model, tokens=(4,)))
    with pytest.raises(ValueError, match="no GBLR layers"):
        gblr.explain(torch.nn.Linear(3, 3))


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
