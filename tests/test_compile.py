"""torch.compile of GBLR models (slow: compilation takes a minute on 2 cores)."""

import pytest
import torch
from torch import nn

import gblr

pytestmark = pytest.mark.slow


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(gblr.GBLRLinear(32, 64, sigma=10.0), nn.GELU(), gblr.GBLRLinear(64, 16, sigma=10.0))


def test_compiled_training_step_matches_eager():
    model = small_model()
    x = torch.randn(8, 32)
    reference = model(x)
    reference.square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)  # one graph: no data-dependent step in a layer
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, reference)
    for parameter, grad in zip(model.parameters(), expected):
        torch.testing.assert_close(parameter.grad, grad, rtol=1e-5, atol=1e-5)


def test_compiled_frozen_model_matches_eager():
    model = gblr.freeze_(small_model())
    x = torch.randn(8, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x))
