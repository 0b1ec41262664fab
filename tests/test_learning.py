import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gblr
from gblr.learning import STRUCTURE_GROUP, _first_true


class ResidualPair(nn.Module):
    """y = second(x + tanh(first(x))): the second layer sees full-rank inputs."""

    def __init__(self, width: int, init: float = 0.8) -> None:
        super().__init__()
        self.first = gblr.GBLRLinear(width, width, init_flops_ratio=init)
        self.second = gblr.GBLRLinear(width, width, init_flops_ratio=init)

    def forward(self, x):
        return self.second(x + torch.tanh(self.first(x)))


def train(model, teacher, steps, target, width, lr=3e-3, seed=0, **learner_kwargs):
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=lr, struct_lr=lr))
    learner = gblr.StructureLearner(model, optimizer, flops_target=target, total_steps=steps, **learner_kwargs)
    history = []
    for _ in range(steps):
        x = torch.randn(256, width)
        loss = F.mse_loss(model(x), teacher(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(learner.step())
    return learner, history


def make_teacher(width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    low_rank = 2 * torch.randn(width, 2, generator=generator) @ torch.randn(2, width, generator=generator) / width**0.5
    dense = torch.randn(width, width, generator=generator) / width**0.5
    return lambda x: (x + torch.tanh(x @ low_rank.T)) @ dense.T


@pytest.mark.parametrize("seed", [0, 1])
def test_budget_goes_to_the_layer_that_needs_it(seed):
    width, target = 32, 0.4
    torch.manual_seed(seed)
    model = ResidualPair(width)
    learner, _ = train(model, make_teacher(width, seed), steps=600, target=target, width=width, seed=seed)
    first, second = learner.layer_ratios()
    assert learner.flops_ratio() == pytest.approx(target, abs=0.01)
    # The first layer's teacher has rank 2; the second's is dense: the split must show it.
    assert first < 0.6 * second, (first, second)


def test_global_budget_is_tracked_and_held():
    width = 32
    torch.manual_seed(0)
    model = ResidualPair(width, init=0.9)
    learner, history = train(model, make_teacher(width), steps=300, target=0.3, width=width)
    # trajectory: from the initial ratio down to the target by half of the structure phase
    midway = history[60]
    assert midway["target"] > 0.3 and midway["flops_ratio"] == pytest.approx(midway["target"], abs=0.02)
    # held from both sides: the optimizer's step moves the ratio a little, the learner's undoes it
    held = torch.tensor([record["flops_ratio"] for record in history[130:]])
    assert (held - 0.3).abs().max() < 0.03 and (held - 0.3).abs().mean() < 0.005
    assert learner.flops_ratio() == pytest.approx(0.3, abs=0.01)


def test_sigma_schedule_then_sharp_fixed_structure():
    width = 16
    torch.manual_seed(0)
    model = ResidualPair(width)
    steps = 100
    learner, history = train(
        model, make_teacher(width), steps=steps, target=0.5, width=width,
        sigma_schedule=gblr.SigmaSchedule(start=1.0, end=100.0, ramp=1.0), structure_fraction=0.6,
    )
    sigmas = [record["sigma"] for record in history]
    assert sigmas[0] == pytest.approx(1.0 + 99.0 / 60, rel=1e-6)  # after the first step
    assert all(a <= b for a, b in zip(sigmas[:59], sigmas[1:59]))
    assert sigmas[58] == pytest.approx(1.0 + 99.0 * 59 / 60)
    assert all(sigma == float("inf") for sigma in sigmas[59:])  # sharp masks in the content phase
    assert model.first.sigma is None and model.second.sigma is None
    # The structure does not move after the structure phase, whatever the optimizer does.
    structure = [p.detach().clone() for p in model.first.structural_parameters()]
    optimizer = learner.optimizer
    model(torch.randn(8, width)).sum().backward()
    optimizer.step()
    learner.step()
    for before, after in zip(structure, model.first.structural_parameters()):
        assert torch.equal(before, after)


def test_proximal_step_clips_widths_and_wraps_locations():
    layer = gblr.GBLRLinear(8, 8)
    optimizer = torch.optim.SGD(gblr.param_groups(layer, lr=0.1), lr=0.1)
    learner = gblr.StructureLearner(layer, optimizer, flops_target=1.0, total_steps=10)
    with torch.no_grad():
        layer.in_width.fill_(1.3)
        layer.out_width.fill_(-0.2)
        layer.in_location.fill_(1.25)
        layer.out_location.fill_(-0.25)
    learner.step()
    assert torch.all(layer.in_width == 1.0) and torch.all(layer.out_width == 0.0)
    torch.testing.assert_close(layer.in_location, torch.full((8,), 0.25))
    torch.testing.assert_close(layer.out_location, torch.full((8,), 0.75))


def test_resume_from_state_dict_is_exact():
    width, steps = 16, 60
    teacher = make_teacher(width)
    torch.manual_seed(0)
    reference = ResidualPair(width)
    resumed = copy.deepcopy(reference)

    def run(model, start, stop, state=None):
        optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=3e-3))
        learner = gblr.StructureLearner(model, optimizer, flops_target=0.4, total_steps=steps)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            learner.load_state_dict(state["learner"])
        for step in range(start, stop):
            x = torch.randn(64, width, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            F.mse_loss(model(x), teacher(x)).backward()
            optimizer.step()
            learner.step()
        return {"optimizer": copy.deepcopy(optimizer.state_dict()), "learner": copy.deepcopy(learner.state_dict())}

    run(reference, 0, steps)
    state = run(resumed, 0, 30)
    state["model"] = copy.deepcopy(resumed.state_dict())
    fresh = ResidualPair(width)
    fresh.load_state_dict(state["model"])
    run(fresh, 30, steps, state)
    for a, b in zip(reference.state_dict().values(), fresh.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_param_groups_split_structure_from_content():
    model = nn.Sequential(gblr.GBLRLinear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    groups = gblr.param_groups(model, lr=1e-3, struct_lr=5e-2, weight_decay=0.1)
    assert len(groups) == 3
    decay, no_decay, structure = groups
    layer = model[0]
    assert {id(p) for p in decay["params"]} == {id(layer.u), id(layer.v), id(model[2].weight)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in structure["params"]} == {id(p) for p in layer.structural_parameters()}
    assert structure["lr"] == 5e-2 and structure["weight_decay"] == 0.0 and structure["betas"] == (0.0, 0.999)
    assert structure[STRUCTURE_GROUP] is True
    optimizer = torch.optim.AdamW(groups)
    assert optimizer.param_groups[2]["betas"] == (0.0, 0.999)
    total = sum(p.numel() for group in groups for p in group["params"])
    assert total == sum(p.numel() for p in model.parameters())


def test_learner_errors_are_actionable():
    layer = gblr.GBLRLinear(4, 4)
    with pytest.raises(ValueError, match="no GBLRLinear"):
        gblr.StructureLearner(nn.Linear(4, 4), torch.optim.SGD(nn.Linear(4, 4).parameters(), lr=0.1), 0.5, 10)
    with pytest.raises(ValueError, match="flops_target"):
        gblr.StructureLearner(layer, torch.optim.SGD(layer.parameters(), lr=0.1), 1.5, 10)
    with pytest.raises(ValueError, match="total_steps"):
        gblr.StructureLearner(layer, torch.optim.SGD(layer.parameters(), lr=0.1), 0.5, 0)
    with pytest.raises(ValueError, match="gblr.param_groups"):
        gblr.StructureLearner(layer, torch.optim.SGD([layer.u, layer.v], lr=0.1), 0.5, 10)
    with pytest.raises(ValueError, match="lr"):
        gblr.param_groups(layer, lr=0.0)


def test_below_the_budget_the_optimizer_may_widen_blocks_but_not_narrow_them():
    # The task gradient alone narrows blocks steadily; below the budget the learner undoes that.
    width = 32
    torch.manual_seed(0)
    model = ResidualPair(width, init=0.5)
    optimizer = torch.optim.SGD(gblr.param_groups(model, lr=1e-2), lr=1e-2)
    learner = gblr.StructureLearner(model, optimizer, flops_target=0.5, total_steps=100)
    with torch.no_grad():  # start well below the budget
        for layer in (model.first, model.second):
            layer.in_width.mul_(0.6)
            layer.out_width.mul_(0.6)
    learner.step()
    held = learner.flops_ratio()
    assert held < 0.4
    before = [w.detach().clone() for w in (model.first.in_width, model.second.out_width)]
    with torch.no_grad():  # what an optimizer step might do: narrow many widths, widen one
        for layer in (model.first, model.second):
            for w in (layer.in_width, layer.out_width):
                w.mul_(torch.empty_like(w).uniform_(0.3, 1.0))
        model.first.in_width[0] = min(1.0, float(before[0][0]) + 0.25)
    assert learner.flops_ratio() < held - 0.05
    record = learner.step()
    assert record["lambda"] == 0.0
    assert torch.equal(model.second.out_width, before[1])
    assert float(model.first.in_width.detach()[0]) == pytest.approx(min(1.0, float(before[0][0]) + 0.25))
    assert torch.equal(model.first.in_width[1:], before[0][1:])
    assert learner.flops_ratio() >= held


def test_small_blocks_of_high_rank_shrink_at_the_cost_of_their_area():
    # Component cost min(r(a + b), ab): a block cheaper as a dense one pays for its area.
    layer = gblr.GBLRLinear(32, 32, components=2, rank=8, init_flops_ratio=0.5)
    optimizer = torch.optim.SGD(gblr.param_groups(layer, lr=1e-2), lr=1e-2)
    learner = gblr.StructureLearner(layer, optimizer, flops_target=0.25, total_steps=100)
    in_w = torch.tensor([8 / 32, 1.0], dtype=torch.float64)  # 8x8 (dense, 64 < 128) and 32x32 (rank 8)
    out_w = torch.tensor([8 / 32, 1.0], dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)  # one layer, weight 1
    in_weight, out_weight = learner._shrink_weights(in_w, out_w, ones)
    unit = 32.0  # a rank-1 component's mean side
    torch.testing.assert_close(in_weight, torch.tensor([32 * 8 / unit, 32 * 8 / unit], dtype=torch.float64))
    with torch.no_grad():
        layer.in_width.copy_(torch.tensor([1 / 32, 1.0]))
        layer.out_width.copy_(torch.tensor([16 / 32, 1.0]))
    in_weight, out_weight = learner._shrink_weights(layer.in_width.detach().double(), layer.out_width.detach().double(),
                                                 ones)
    # 1x16 costs 16 MACs as a dense block: one more input column costs 16, one more output row 1
    assert in_weight[0] == pytest.approx(32 * 16 / unit) and out_weight[0] == pytest.approx(32 * 1 / unit)
    assert in_weight[1] == pytest.approx(32 * 8 / unit) and out_weight[1] == pytest.approx(32 * 8 / unit)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_initial_ratio_counts_dense_blocks(rank):
    layer = gblr.GBLRLinear(64, 64, components=64 // rank, rank=rank, init_flops_ratio=0.5)
    assert layer.flops_ratio() == pytest.approx(0.5, abs=0.06)


@pytest.mark.parametrize("answer", [3e-3, 0.7, 2e5])
def test_lambda_search_is_precise_when_the_reach_is_a_millionfold_larger(answer):
    # the reach is set by the slowest-shrinking width and can exceed the needed lambda by far;
    # a search on a linear grid over [0, reach] stopped a whole grid step (reach / 32**5) late
    calls = []

    def predicate(lams):
        calls.append(lams.numel())
        return lams >= answer

    reach = torch.tensor([1e6], dtype=torch.float64)
    found = float(_first_true(predicate, reach)[0])
    assert answer <= found <= answer * (1 + 1e-5)
    assert calls == [33] * 5
    assert float(_first_true(lambda lams: lams >= 2e6, reach)[0]) == 1e6  # never true: the upper end


# -- bad inputs (the reliability issue) ------------------------------------------------------------


@pytest.mark.parametrize("argument", ["lr", "struct_lr", "weight_decay"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, True, "0.1"])
def test_param_groups_refuse_non_finite_or_negative_rates(argument, value):
    # lr=inf used to be accepted.
    kwargs = {"lr": 1e-3, argument: value}
    with pytest.raises(ValueError, match=rf"^{argument} must be a finite number"):
        gblr.param_groups(gblr.GBLRLinear(4, 4), **kwargs)


def test_a_nan_width_after_the_optimizer_step_is_named_by_the_learner():
    model = nn.Sequential(gblr.GBLRLinear(8, 8), nn.ReLU(), gblr.GBLRLinear(8, 4))
    optimizer = torch.optim.SGD(gblr.param_groups(model, lr=0.1), lr=0.1)
    learner = gblr.StructureLearner(model, optimizer, flops_target=0.5, total_steps=10)
    x = torch.randn(4, 8)
    x[0, 0] = float("nan")  # one NaN input: NaN gradients, NaN widths after the step
    model(x).sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match=r"layer '0' \(GBLRLinear\(in_features=8, out_features=8\)\): in_width, "
                                         r"in_location, out_width, out_location contain NaN or infinite values after "
                                         r"the optimizer step \(1 more layer\(s\) affected\); probably from a "
                                         r"non-finite loss or gradient; lower the learning rate"):
        learner.step()


def test_the_learner_says_when_the_structure_does_not_require_gradients():
    # It used to blame param_groups.
    model = nn.Sequential(gblr.GBLRLinear(8, 8))
    model.requires_grad_(False)
    model[0].u.requires_grad_(True)
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-3))
    with pytest.raises(ValueError, match=r"widths and locations of 1 GBLR layer\(s\) \('0'\) have requires_grad=False"):
        gblr.StructureLearner(model, optimizer, flops_target=0.5, total_steps=10)


def test_a_per_layer_budget_brings_every_layer_to_the_target():
    torch.manual_seed(0)
    model = nn.Sequential(gblr.GBLRLinear(32, 32, init_flops_ratio=0.8), nn.GELU(),
                          gblr.GBLRLinear(32, 32, init_flops_ratio=0.4), nn.GELU(), gblr.GBLRLinear(32, 8))
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-2))
    learner = gblr.StructureLearner(model, optimizer, flops_target=0.3, total_steps=40, budget="per-layer")
    x, target = torch.randn(128, 32), torch.randn(128, 8)
    for _ in range(40):
        (model(x) - target).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        learner.step()
    assert learner.layer_ratios() == pytest.approx([0.3, 0.3, 0.3], abs=0.03)
    state = learner.state_dict()
    assert state["initial_layer_ratios"] == pytest.approx([0.8, 0.4, 0.5], abs=0.06)


def test_a_global_budget_may_split_unevenly_and_an_unknown_budget_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(gblr.GBLRLinear(32, 32), nn.GELU(), gblr.GBLRLinear(32, 8))
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-2))
    with pytest.raises(ValueError, match="budget must be one of 'global', 'per-layer'"):
        gblr.StructureLearner(model, optimizer, flops_target=0.3, total_steps=10, budget="uniform")


def test_lambda_search_runs_one_search_per_row():
    answers = torch.tensor([3e-3, 0.7, 2e5], dtype=torch.float64)
    found = _first_true(lambda lams: lams >= answers[:, None], torch.full((3,), 1e6, dtype=torch.float64))
    assert torch.allclose(found, answers, rtol=1e-5)


def test_a_per_layer_step_reports_the_global_ratio_it_started_from():
    torch.manual_seed(0)
    model = nn.Sequential(gblr.GBLRLinear(32, 32, init_flops_ratio=0.8), nn.GELU(), gblr.GBLRLinear(32, 8))
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-2))
    learner = gblr.StructureLearner(model, optimizer, flops_target=0.3, total_steps=20, budget="per-layer")
    x = torch.randn(16, 32)
    for _ in range(8):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        before = learner.flops_ratio()  # after the optimizer's step, before the learner's shrink
        stats = learner.step()
        if stats["lambda"] > 0:  # the shrink moved it: the report is the ratio the step started from
            assert learner.flops_ratio() < before
        assert stats["flops_ratio"] == pytest.approx(before, abs=1e-12)  # as the global budget reports it
