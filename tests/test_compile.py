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


def test_compiled_compact_model_matches_eager(monkeypatch):
    # the compact product even here
    monkeypatch.setattr(gblr.linear, "masked_cost", lambda *args, **kwargs: float("inf"))
    model = small_model()
    for layer in model[0], model[2]:
        layer.sigma = None
        layer.compact = True
    x = torch.randn(8, 32, requires_grad=True)
    reference = model(x)  # plans the groups
    assert all(layer.compact_plan(8) is not None for layer in (model[0], model[2]))
    reference.square().sum().backward()
    expected = [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    x.grad = None
    y = torch.compile(model)(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, reference)
    got = [x.grad] + [p.grad for p in model.parameters() if p.grad is not None]
    assert len(got) == len(expected)
    for grad, want in zip(got, expected):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)
