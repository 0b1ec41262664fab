"""gblr.explain and kernel="auto": the path choice is measured once per token bucket and reported."""

import copy

import pytest
import torch

import gblr
from gblr.kernels.choice import MEASURED_PATHS


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
    ((device, dtype, bucket), (path, seconds, tokens, predicted, costs, measured_in)), = layer.choices.items()
    assert (device, dtype, bucket) == ("cpu", torch.float32, 8) and path in MEASURED_PATHS and tokens == 5
    assert measured_in >= max(seconds.values())  # the measurement took at least its slowest call
    assert set(predicted) == set(costs) == set(MEASURED_PATHS) and "dense" in seconds  # the plausible are timed
    assert set(seconds) <= set(MEASURED_PATHS) and path == min(seconds, key=seconds.get)
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
