"""The compact product of the content phase (gblr.compact) against the masked product at sigma=None."""

import pytest
import torch
import torch.nn.functional as F

import gblr
from gblr.compact import MAX_GROUP, CompactProduct, plan_compact
from gblr.flops import low_rank_macs
from gblr.learning import gblr_layers


def content_layer(n, m, components, rank=1, bias=True, seed=0, dtype=torch.float64):
    """A layer with a fixed structure of every kind: empty, full-width, wrapping and partial supports."""
    torch.manual_seed(seed)
    layer = gblr.GBLRLinear(n, m, components=components, rank=rank, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.in_width.uniform_(0.0, 0.7)
        layer.out_width.uniform_(0.0, 0.7)
        layer.in_location.uniform_(0.0, 1.0)
        layer.out_location.uniform_(0.0, 1.0)
        layer.in_width[0] = 0.0  # no input columns: the component is dead
        layer.out_width[1] = 0.0
        layer.in_width[2:4] = 1.0  # full width on the input side
        layer.out_width[3:5] = 1.0
        layer.in_location[5], layer.in_width[5] = 0.9, 0.5  # wraps past the last column
        layer.out_location[6], layer.out_width[6] = 0.95, 0.3
    return layer


def step(layer, x, grad_y, compact):
    """Output and gradients of the masked product, or of the compact one (called directly: a layer
    this small runs the masked product even with ``compact`` on, being cheaper)."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    if compact:
        plan = plan_compact(layer.supports(), layer.rank, layer.in_features, layer.out_features)
        y = CompactProduct.apply(x.reshape(-1, layer.in_features), layer.u, layer.v, layer.bias, plan)
        y = y.reshape(*x.shape[:-1], layer.out_features)
    else:
        y = layer(x)
    y.backward(grad_y)
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("n, m, components, rank, bias", [
    (64, 48, 48, 1, True), (40, 70, 20, 3, False), (96, 96, 96, 1, True), (33, 130, 25, 2, True),
])
def test_output_and_gradients_equal_the_masked_product(n, m, components, rank, bias):
    layer = content_layer(n, m, components, rank, bias)
    x = torch.randn(3, 11, n, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(3, 11, m, dtype=torch.float64)
    y, grad_x, grads = step(layer, x, grad_y, compact=False)
    y_c, grad_x_c, grads_c = step(layer, x, grad_y, compact=True)
    torch.testing.assert_close(y_c, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x_c, grad_x, rtol=1e-12, atol=1e-12)
    for name in ("u", "v") + (("bias",) if bias else ()):
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-12, atol=1e-12)


def test_a_compact_layer_takes_the_cheaper_product():
    # many local blocks in a large layer: the compact product
    large = content_layer(512, 512, 512, dtype=torch.float32)
    with torch.no_grad():
        large.in_width.uniform_(0.05, 0.1)
        large.out_width.uniform_(0.05, 0.1)
    # a tiny layer: the masked product is predicted cheaper, and runs (with the same output)
    small = content_layer(16, 16, 16, dtype=torch.float32)
    for layer, compact in ((large, True), (small, False)):
        x = torch.randn(2048, layer.in_features)
        layer.compact = False
        expected = layer(x).detach()
        layer.compact = True
        y = layer(x)
        assert (layer.compact_plan(2048) is not None) == compact
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
        y.sum().backward()
        # compact: the structure takes part with zero gradients (DistributedDataParallel needs every parameter)
        assert (layer.in_width.grad.abs().max() == 0) == compact


@pytest.mark.parametrize("group", [1, 16, 64, 256, None])
def test_every_grouping_gives_the_same_product(group):
    layer = content_layer(80, 300, 80)
    x = torch.randn(50, 80, dtype=torch.float64, requires_grad=True)
    reference = F.linear(x, layer.weight.detach(), layer.bias.detach())
    plan = plan_compact(layer.supports(), 1, 80, 300, group=group)
    y = CompactProduct.apply(x, layer.u, layer.v, layer.bias, plan)
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)
    for side in plan.inputs, plan.outputs:
        sizes = [g.last - g.first for g in side.groups]
        assert sum(sizes) == plan.hidden
        assert max(sizes) <= (group or MAX_GROUP) and all(size == group for size in sizes[:-1] if group)


def test_segments_cover_each_span_once_and_multiply_the_rows_that_reach_them():
    layer = content_layer(300, 500, 200, seed=2)
    with torch.no_grad():
        layer.in_width[7:].uniform_(0.05, 0.4)
        layer.out_width[7:].uniform_(0.05, 0.4)
    supports = layer.supports()
    plan = plan_compact(supports, 1, 300, 500, tokens=4096)
    w_in, l_in, w_out, l_out = supports
    shorter = 0
    for side, widths, locations in ((plan.inputs, w_in, l_in), (plan.outputs, w_out, l_out)):
        for g in side.groups:
            covered = [column for begin, end, _, _ in g.segments for column in range(begin, end)]
            assert sorted(covered) == sorted(c % side.size for c in range(g.start, g.stop))  # each column once
            counts = [count for *_, count in g.segments]
            assert counts[0] == g.last - g.first and counts == sorted(counts, reverse=True)
            for begin, end, offset, count in g.segments:
                assert (g.start + offset) % side.size == begin
                # a row after the prefix has no column in the segment
                for source in g.sources[count:].tolist():
                    reach = (torch.arange(begin, end) - locations[source]) % side.size < widths[source]
                    assert not reach.any()
                shorter += count < g.last - g.first
    assert shorter > 0  # the plan does use shorter prefixes
    x = torch.randn(40, 300, dtype=torch.float64, requires_grad=True)
    y = CompactProduct.apply(x, layer.u, layer.v, layer.bias, plan)
    torch.testing.assert_close(y, F.linear(x, layer.weight.detach(), layer.bias.detach()), rtol=1e-12, atol=1e-12)


def test_factor_gradients_vanish_outside_the_supports():
    layer = content_layer(50, 60, 30)
    x = torch.randn(20, 50, dtype=torch.float64, requires_grad=True)
    _, _, grads = step(layer, x, torch.randn(20, 60, dtype=torch.float64), compact=True)
    mask_in, mask_out = layer.masks()
    assert grads["v"][:, 0][mask_in == 0].abs().max() == 0
    assert grads["u"][:, :, 0][mask_out == 0].abs().max() == 0
    assert grads["v"][:, 0][mask_in == 1].abs().max() > 0


def test_plan_costs_between_the_layer_flops_and_the_full_length_factors():
    layer = content_layer(256, 512, 200, seed=1)
    plan = plan_compact(layer.supports(), 1, 256, 512, tokens=4096)
    live = ((layer.supports()[0] > 0) & (layer.supports()[2] > 0)).sum().item()
    assert plan.hidden == live
    assert layer.flops() <= plan.macs <= low_rank_macs(live, 512, 256)
    # one token: few GEMMs win; many tokens: less padding wins
    assert plan_compact(layer.supports(), 1, 256, 512, tokens=1).gemms <= plan.gemms


def test_no_tokens_and_no_live_components():
    layer = content_layer(16, 24, 8)
    plan = plan_compact(layer.supports(), 1, 16, 24)
    empty = torch.zeros(0, 16, dtype=torch.float64)
    assert CompactProduct.apply(empty, layer.u, layer.v, layer.bias, plan).shape == (0, 24)
    with torch.no_grad():
        layer.in_width.zero_()
    plan = plan_compact(layer.supports(), 1, 16, 24)
    assert plan.hidden == 0 and plan.macs == 0
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    y = CompactProduct.apply(x, layer.u, layer.v, layer.bias, plan)
    torch.testing.assert_close(y, layer.bias.detach().expand(5, 24))
    y.sum().backward()
    assert x.grad.abs().max() == 0


def test_compact_needs_exact_boxcars_and_a_bool():
    layer = gblr.GBLRLinear(8, 8, sigma=10.0)
    layer.compact = True
    with pytest.raises(ValueError, match="compact=True needs sigma=None"):
        layer(torch.randn(2, 8))
    with pytest.raises(ValueError, match="compact must be True or False"):
        layer.compact = 1


def test_autocast_runs_in_the_autocast_dtype():
    layer = content_layer(32, 48, 20, dtype=torch.float32)
    plan = plan_compact(layer.supports(), 1, 32, 48)
    x = torch.randn(10, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_c = CompactProduct.apply(x, layer.u, layer.v, layer.bias, plan)
    assert y_c.dtype == y.dtype == torch.bfloat16
    torch.testing.assert_close(y_c.float(), y.float(), rtol=0.05, atol=0.05)
    y_c.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.u.grad.dtype == torch.float32


def test_learner_runs_the_content_phase_compact_and_settles_early():
    torch.manual_seed(0)
    model = torch.nn.Sequential(gblr.GBLRLinear(32, 32, init_flops_ratio=0.5), torch.nn.Tanh(),
                                gblr.GBLRLinear(32, 32, init_flops_ratio=0.5))
    layers = gblr_layers(model)
    # no structural learning rate: the supports never move, so the phase settles after the warm-up
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-3, struct_lr=1e-12))
    learner = gblr.StructureLearner(model, optimizer, flops_target=0.5, total_steps=40, settle_steps=3)
    assert learner.structure_steps == 32 and not any(layer.compact for layer in layers)
    phases = []
    for _ in range(40):
        loss = model(torch.randn(16, 32)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.step()
        phases.append((learner.structure_phase, all(layer.compact for layer in layers),
                       all(layer.sigma is None for layer in layers)))
    warmup = learner.budget_warmup * learner.planned_structure_steps
    assert warmup <= learner.structure_steps < learner.planned_structure_steps
    assert phases[learner.structure_steps - 1] == (False, True, True)  # the step that ended it
    assert phases[learner.structure_steps - 2] == (True, False, False)
    # the phase's end is part of the learner's state
    other = gblr.StructureLearner(model, torch.optim.AdamW(gblr.param_groups(model, lr=1e-3)), flops_target=0.5,
                                  total_steps=40, settle_steps=3)
    other.load_state_dict(learner.state_dict())
    assert other.structure_steps == learner.structure_steps and all(layer.compact for layer in layers)


def test_settle_steps_is_checked():
    model = gblr.GBLRLinear(8, 8)
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-3))
    with pytest.raises(ValueError, match="settle_steps"):
        gblr.StructureLearner(model, optimizer, flops_target=0.5, total_steps=10, settle_steps=0)


def test_plans_are_made_per_bucket_of_token_counts():
    layer = content_layer(512, 512, 512, dtype=torch.float32)
    with torch.no_grad():
        layer.in_width.uniform_(0.05, 0.1)
        layer.out_width.uniform_(0.05, 0.1)
    layer.sigma = None
    layer.compact = True
    few, many = layer.compact_plan(16), layer.compact_plan(4096)
    assert few is not None and many is not None and few is not many
    assert layer.compact_plan(9) is few and layer.compact_plan(3000) is many  # same power-of-two bucket
    assert few.gemms <= many.gemms  # a GEMM's fixed price weighs more with few tokens: fewer, larger groups
    layer.compact = True  # setting it again plans afresh
    assert layer.compact_plan(16) is not few
    layer.sigma = 2.0
    with pytest.raises(ValueError, match="compact=True needs sigma=None"):
        layer.compact_plan(16)
