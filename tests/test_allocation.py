"""The budget allocation: greedy error-per-MAC ranks, uniform ratios, overrides, layers kept dense."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gblr
from conversion import SVD, quiet
from gblr.allocation import allocate_ranks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


def test_greedy_allocation_is_optimal_on_convex_curves():
    torch.manual_seed(0)
    shapes = [(6, 6), (8, 4), (10, 5)]
    curves = []
    for m, n in shapes:
        energy = torch.rand(min(m, n), dtype=torch.float64).sort(descending=True).values ** 2
        tail = energy.flip(0).cumsum(0).flip(0)
        curves.append(torch.cat([tail, tail.new_zeros(1)]) / tail[0])
    # Per layer: ranks 1 .. the largest rank cheaper than dense, or dense (None: cost m*n, error 0).
    options = [[*range(1, (m * n - 1) // (m + n) + 1), None] for m, n in shapes]

    def cost(choice):
        return sum(m * n if r is None else r * (m + n) for r, (m, n) in zip(choice, shapes))

    def error(choice):
        return sum(0.0 if r is None else float(curve[r]) for r, curve in zip(choice, curves))

    for budget in (40, 60, 75, 100):
        ranks = allocate_ranks(shapes, curves, budget, floor_ratio=0.0)
        best = min(error(choice) for choice in itertools.product(*options) if cost(choice) <= budget)
        assert cost(ranks) <= budget
        # Greedy is optimal up to the step left over at the budget edge (no step gains more than 0.5).
        assert best <= error(ranks) <= best + 0.5
    assert allocate_ranks(shapes, curves, 1000, floor_ratio=0.0) == [None, None, None]
    assert allocate_ranks(shapes, curves, 0, floor_ratio=0.0) == [1, 1, 1]  # never below rank 1


def test_error_allocation_favours_the_layer_whose_error_falls_fastest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(32, 2) @ torch.randn(2, 32))  # rank 2
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, **SVD))
    low, full = report["0"], report["1"]
    assert low.ratio < full.ratio
    assert low.ratio == pytest.approx(2 * 64 / 1024)  # the floor (0.125) is rank 2: exact already
    assert low.relative_error < 1e-5
    assert report.flops_ratio <= 0.5
    assert isinstance(model[0], gblr.GBLRLinear) and isinstance(model[1], gblr.GBLRLinear)
    assert model[0].flops() == 128 and model[1].flops() == full.flops


def test_uniform_allocation_gives_every_layer_the_target():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16))
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, allocation="uniform", **SVD))
    assert [row.ratio for row in report.layers] == [0.5, 0.5]
    assert all(row.flops_ratio <= 0.5 for row in report.layers)


def test_overrides_fix_a_layer_ratio_outside_the_global_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, overrides={"0": 0.25, "2": 1.0}, **SVD))
    assert report["0"].ratio == 0.25 and report["0"].flops == 4 * 64  # rank 4
    assert report["2"].skipped == "override ratio 1" and isinstance(model[2], nn.Linear)
    assert report["1"].flops <= 0.5 * 1024
    with pytest.warns(UserWarning, match="matches no target"):
        quiet(nn.Sequential(nn.Linear(8, 8)), gblr.GBLRConfig(overrides={"nothing": 0.5}, **SVD))


def test_too_small_layer_is_kept_dense_with_a_reason():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 16), nn.Linear(16, 16))
    for allocation in ("error", "uniform"):
        report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, allocation=allocation, **SVD))
        assert report["0"].skipped.startswith("too small") and report["0"].flops == 4
        assert report["1"].skipped is None or not report["1"].skipped.startswith("too small")
        assert type(model[0]) is nn.Linear
        model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 16), nn.Linear(16, 16))
    text = str(report)
    assert "too small" in text and "total: 3 layers, 2 converted, 1 kept dense" in text  # uniform: 2 converted


def test_tied_weight_is_kept_dense():
    model = nn.Module()
    model.embed = nn.Embedding(10, 8)
    model.out = nn.Linear(8, 10, bias=False)
    model.out.weight = model.embed.weight
    model.mid = nn.Linear(8, 8)
    with pytest.warns(UserWarning, match=r"flops_ratio=0.5 is below the smallest ratio .* 0.6667"):  # out: 80 of 144
        report = quiet(model, gblr.GBLRConfig(**SVD))
    assert report.skipped == {"out": "weight tied to another module"}
    assert report.converted == ["mid"] and model.out.weight is model.embed.weight


class TwoBranches(nn.Module):
    """Logits ``loud(x) + 0.01 * quiet(x)``: two layers with the same weight, one of which barely
    reaches the predictions."""

    def __init__(self, features: int = 24, classes: int = 24) -> None:
        super().__init__()
        self.loud = nn.Linear(features, classes, bias=False)
        self.quiet = nn.Linear(features, classes, bias=False)
        with torch.no_grad():
            self.quiet.weight.copy_(self.loud.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loud(x) + 0.01 * self.quiet(x)


def test_fisher_sensitivity_is_output_energy_times_the_expected_gradient_energy():
    from gblr.calibration import fisher_sensitivities
    from gblr.targets import find_targets

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).train()
    batches = [torch.randn(2048, 6) * 2 for _ in range(2)]
    flags = [p.requires_grad for p in model.parameters()]
    (target,) = find_targets(model, gblr.GBLRConfig(target_modules=["0"]))
    sensitivity = fisher_sensitivities(model, [target], batches, progress=False)["0"]
    with torch.no_grad():
        logits = torch.cat([model(x) for x in batches])
        p = logits.softmax(-1)
    # The gradient of a sampled label's cross-entropy is p - onehot; its expected energy is 1 - sum p^2.
    expected = logits.square().sum(-1).mean() * (1 - p.square().sum(-1)).mean() / 5
    assert sensitivity == pytest.approx(float(expected), rel=0.05)
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert all(p.grad is None for p in model.parameters())


class TokenModel(nn.Module):
    """Logits at every position of a batch of token ids, from one linear layer."""

    def __init__(self, vocabulary: int = 7, features: int = 5) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, features)
        self.head = nn.Linear(features, vocabulary)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embedding(input_ids))


def test_fisher_sensitivity_with_next_token_labels_is_the_empirical_fisher():
    from gblr.calibration import fisher_sensitivities
    from gblr.targets import find_targets

    torch.manual_seed(0)
    model = TokenModel()
    ids = torch.randint(0, 7, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padding: positions whose next token is not real carry no label
    (target,) = find_targets(model, gblr.GBLRConfig(target_modules=["head"]))
    for batch in (ids, {"input_ids": ids, "attention_mask": mask}):
        sensitivity = fisher_sensitivities(model, [target], [batch], progress=False, labels="next-token")["head"]
        real = torch.ones(3, 9, dtype=torch.bool) if isinstance(batch, torch.Tensor) else mask.bool()
        with torch.no_grad():
            logits = model(ids)
        keep = real[:, 1:] & real[:, :-1]
        # the gradient of the cross-entropy of the next token is p - onehot(next token), zero where there is none
        gradients = torch.zeros_like(logits)
        gradients[:, :-1][keep] = logits[:, :-1][keep].softmax(-1) - F.one_hot(ids[:, 1:][keep], 7).float()
        expected = logits[real].square().sum(-1).mean() * gradients[real].square().sum(-1).mean() / 7
        assert sensitivity == pytest.approx(float(expected), rel=1e-5)
    features = TwoBranches()
    (loud,) = find_targets(features, gblr.GBLRConfig(target_modules=["loud"]))
    with pytest.raises(ValueError, match="needs batches of token ids"):  # a batch of features, not of tokens
        fisher_sensitivities(features, [loud], [torch.randn(4, 24)], progress=False, labels="next-token")
    with pytest.raises(ValueError, match="labels must be one of"):
        fisher_sensitivities(model, [target], [ids], progress=False, labels="true")


def test_fisher_allocation_gives_the_budget_to_the_layer_the_predictions_depend_on():
    torch.manual_seed(0)
    batches = [torch.randn(256, 24) for _ in range(2)]
    ranks = {}
    for allocation in ("error", "fisher"):
        model = TwoBranches()
        config = gblr.GBLRConfig(flops_ratio=0.5, allocation=allocation, method="svd", calibration="one-shot")
        quiet(model, config, batches)
        ranks[allocation] = {name: getattr(model, name).flops() for name in ("loud", "quiet")}
    assert ranks["error"]["loud"] == pytest.approx(ranks["error"]["quiet"], abs=48)  # alike: the same weight
    assert ranks["fisher"]["loud"] > 2 * ranks["fisher"]["quiet"]


def test_fisher_allocation_needs_calibration_and_logits():
    config = gblr.GBLRConfig(flops_ratio=0.5, allocation="fisher")
    with pytest.raises(ValueError, match="allocation='fisher'.*calibration batches"):
        gblr.convert_(TwoBranches(), config, progress=False, verbose=False)

    class Features(TwoBranches):
        def forward(self, x):
            return {"features": super().forward(x)}

    model = Features()
    with pytest.raises(ValueError, match=r"output is logits.*got dict.*allocation='error'"):
        gblr.convert_(model, config, calibration=[torch.randn(8, 24)], progress=False, verbose=False)
    assert isinstance(model.loud, nn.Linear)  # untouched
