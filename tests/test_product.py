"""The fused product of the trainable layer (gblr.product): both ways of computing it, its
gradients against autograd through the weight, autocast, and the revival of pruned blocks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fixtures import set_structure
from gblr import GBLRLinear


def test_both_forward_paths_agree_in_value_and_gradient():
    torch.manual_seed(1)
    layer = GBLRLinear(48, 32, sigma=10.0, dtype=torch.float64)
    assert not layer.materialises(1)
    assert layer.materialises(10_000)
    x = torch.randn(6, 48, dtype=torch.float64)
    results = []
    for product in ("factored", "materialise"):
        layer.zero_grad()
        layer.product = product
        assert layer.materialises(6) == (product == "materialise")
        y = layer(x)
        (y.sin().sum()).backward()
        results.append((y.detach(), [p.grad.clone() for p in layer.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for thin, dense in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(thin, dense)


@pytest.mark.parametrize("materialise", [False, True])
@pytest.mark.parametrize("sigma", [None, 10.0])
@pytest.mark.parametrize("input_grad", [False, True])
def test_gradients_equal_autograd_through_the_weight(materialise, sigma, input_grad):
    # The fused product rebuilds the masked factors in backward and skips the input gradient
    # when the input needs none; plain autograd through layer.weight is the reference.
    torch.manual_seed(2)
    layer = GBLRLinear(40, 24, rank=2, sigma=sigma, dtype=torch.float64)
    layer.product = "materialise" if materialise else "factored"
    reference = copy.deepcopy(layer)
    x = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=input_grad)
    layer(x).sin().sum().backward()
    x_grad, x.grad = x.grad, None
    F.linear(x, reference.weight, reference.bias).sin().sum().backward()
    assert (x_grad is None) == (not input_grad)
    if input_grad:
        torch.testing.assert_close(x_grad, x.grad)
    for (name, got), expected in zip(layer.named_parameters(), reference.parameters()):
        assert got.grad is not None and got.grad.abs().sum() > 0, name
        torch.testing.assert_close(got.grad, expected.grad, msg=name)


def test_bfloat16_autocast_keeps_mask_math_in_float32():
    layer = GBLRLinear(32, 32, sigma=10.0)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_in, _ = layer.masks()
        y = layer(x)
    assert mask_in.dtype == torch.float32
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)
    # backward: gradients in each parameter's own dtype, close to the float32 ones
    y.float().square().sum().backward()
    low = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert low[name].dtype == p.dtype == torch.float32, name
        scale = p.grad.abs().max()
        torch.testing.assert_close(low[name], p.grad, rtol=0, atol=3e-2 * scale, msg=name)


@pytest.mark.parametrize("materialise", [False, True])
def test_revival_gives_dead_components_a_width_gradient(materialise):
    torch.manual_seed(0)
    layer = GBLRLinear(16, 12, components=3, sigma=20.0, dtype=torch.float64)
    layer.product = "materialise" if materialise else "factored"
    set_structure(layer, [0, 5, 16], [3, 1, 0], [0, 4, 12], [7, 2, 0])  # component 0 is fully pruned
    reference = copy.deepcopy(layer)
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randn(10, 12, dtype=torch.float64)
    F.mse_loss(layer(x), target).backward()
    x_grad, x.grad = x.grad, None
    assert layer.in_width.grad[0] != 0 and layer.out_width.grad[0] != 0
    # Revival changes nothing else: same output, same gradients for the input and the live parts.
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x))
    reference.requires_grad_(True)
    loss = F.mse_loss(F.linear(x, reference.weight, reference.bias), target)
    loss.backward()
    torch.testing.assert_close(x_grad, x.grad)
    for name in ("u", "v", "bias"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(reference, name).grad)
    for name in ("in_width", "in_location", "out_width", "out_location"):
        torch.testing.assert_close(getattr(layer, name).grad[1:], getattr(reference, name).grad[1:])
    # Each empty mask gets the gradient it would get beside a one-element partner.
    for out_widths, in_widths, name in (([1, 4, 12], [0, 5, 16], "in_width"), ([0, 4, 12], [1, 5, 16], "out_width")):
        with torch.no_grad():
            set_structure(reference, in_widths, [3, 1, 0], out_widths, [7, 2, 0])
        reference.zero_grad()
        F.mse_loss(reference(x), target).backward()
        torch.testing.assert_close(getattr(layer, name).grad[0], getattr(reference, name).grad[0])


def test_a_pruned_block_can_grow_back_under_gradient_descent():
    # The teacher is one rank-1 block on the top-left quarter. The student's only component has
    # the right content but is pruned to nothing inside that block: width descent must regrow it.
    torch.manual_seed(0)
    n = 64
    teacher = torch.zeros(n, n)
    teacher[:32, :32] = torch.randn(32, 1) @ torch.randn(1, 32)
    layer = GBLRLinear(n, n, bias=False, components=1, sigma=5.0)
    set_structure(layer, [0], [8], [0], [8])
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(teacher)
        layer.u[0, :, 0] = u[:, 0] * s[0].sqrt()
        layer.v[0, 0] = vh[0] * s[0].sqrt()
    x = torch.randn(512, n)
    initial = F.mse_loss(layer(x), x @ teacher.T).item()
    optimizer = torch.optim.SGD([layer.in_width, layer.out_width], lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        F.mse_loss(layer(x), x @ teacher.T).backward()
        optimizer.step()
    assert layer.flops() > 0
    assert F.mse_loss(layer(x), x @ teacher.T).item() < 0.5 * initial
