"""Calibration statistics collected by convert_: hooks, batch forms, padding, output errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gblr
from conversion import SVD, quiet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


def test_calibration_collects_inputs_removes_hooks_and_reports_output_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).train()
    # Anisotropic inputs, so that output and weight errors differ.
    batches = [torch.randn(5, 16) * torch.linspace(0.05, 3, 16) for _ in range(3)]
    seen = {}
    for index in (0, 2):
        model[index].register_forward_hook(lambda m, args, out, i=index: seen.setdefault(i, []).append(args[0]))
    originals = {index: model[index] for index in (0, 2)}
    with torch.no_grad():
        for batch in batches:
            model(batch)
    expected = {index: torch.cat(seen[index]) for index in seen}

    # One-shot: every layer's statistics are its inputs in the original model.
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, calibration="one-shot", **SVD), calibration=batches)
    assert report.calibrated and all(row.calibrated for row in report.layers) and report.calibration == "one-shot"
    assert model.training and all(module.training for module in model)
    for index, original in originals.items():
        assert len(original._forward_pre_hooks) == 0
        new = model[index]
        x = expected[index][: 3 * 5]  # inputs seen during calibration
        W = original.weight.detach().double()
        output_error = ((x.double() @ (W - new.weight.detach().double()).T).norm() / (x.double() @ W.T).norm()).item()
        assert report[str(index)].relative_error == pytest.approx(output_error, rel=1e-6)
        weight_error = gblr.relative_error(W, new.weight.detach())
        assert abs(output_error - weight_error) > 1e-3
    assert "output error" in str(report)


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_calibration_hooks_are_removed_when_the_model_fails(mode):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).train()
    with pytest.raises(TypeError, match="bogus"):
        quiet(model, gblr.GBLRConfig(calibration=mode, **SVD),
              calibration=[torch.randn(2, 8), {"bogus": torch.randn(2, 8)}])
    assert all(len(module._forward_pre_hooks) == 0 for module in model.modules())
    assert model.training and all(type(module) is nn.Linear for module in model)


def test_calibration_batch_forms():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, y=None):
            return self.a(x) + (0 if y is None else self.b(y))

    batches = [(torch.randn(2, 8), torch.randn(2, 8)), {"x": torch.randn(3, 8), "y": torch.randn(3, 8)}, torch.randn(4, 8)]
    model = TwoInputs()
    report = quiet(model, gblr.GBLRConfig(calibration="one-shot", **SVD), calibration=batches)
    assert report.converted == ["a", "b"] and all(row.calibrated for row in report.layers)
    with pytest.warns(UserWarning, match="saw no input"):
        report = quiet(TwoInputs(), gblr.GBLRConfig(calibration="one-shot", **SVD), calibration=[torch.randn(4, 8)])
    assert report["a"].calibrated and not report["b"].calibrated
    with pytest.raises(ValueError, match="no batches"):
        quiet(TwoInputs(), gblr.GBLRConfig(**SVD), calibration=[])


def test_calibration_counts_only_real_tokens_of_masked_batches():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)

        def forward(self, hidden, attention_mask):
            return self.proj(hidden) * attention_mask[..., None]

    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 6) * torch.linspace(0.1, 2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    padded = hidden.clone()
    padded[mask == 0] = 100.0  # padding activations must not reach the statistics
    model = Tokens()
    original = model.proj.weight.detach().clone()
    report = quiet(model, gblr.GBLRConfig(allocation="uniform", calibration="one-shot", **SVD),
                   calibration=[{"hidden": padded, "attention_mask": mask}])
    real = gblr.InputStats(6)
    real.update(hidden[mask.bool()])
    expected = gblr.relative_error(original, model.proj.weight.detach(), real)
    assert report["proj"].relative_error == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_nan_in_a_calibration_batch_names_the_layer_and_the_batch(mode):
    # It used to fail in an SVD, naming neither.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [torch.randn(3, 8) for _ in range(3)]
    batches[2][1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"calibration batch 2 \(counting from 0\): the inputs of layer '0': "
                                         r"activations contain NaN or infinite values"):
        quiet(model, gblr.GBLRConfig(calibration=mode, **SVD), calibration=batches)
    assert all(type(module) is not gblr.GBLRLinear for module in model)
    assert all(len(module._forward_pre_hooks) == 0 for module in model.modules())
    stats = gblr.InputStats(8)
    with pytest.raises(ValueError, match="activations contain NaN"):
        stats.update(batches[2])
    assert stats.tokens == 0


def test_sequential_errors_are_against_the_original_outputs_and_beat_one_shot_on_held_out_inputs():
    # Sequential calibration fits the second layer to reproduce the original model's outputs from
    # the first layer's compressed outputs; its report error is measured exactly that way.
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    scale = torch.linspace(0.05, 3, 16)
    batches = [torch.randn(40, 16) * scale for _ in range(8)]
    x, held_out = torch.cat(batches).double(), (torch.randn(2000, 16) * scale).double()
    config = {"flops_ratio": 0.5, "allocation": "uniform", "method": "svd"}  # the same ranks in both modes
    models, reports = {}, {}
    for mode in ("one-shot", "sequential"):
        models[mode] = copy.deepcopy(dense)
        reports[mode] = quiet(models[mode], gblr.GBLRConfig(calibration=mode, **config), calibration=batches)
        models[mode].double()
    dense.double()
    report = reports["sequential"]
    assert report.calibration == "sequential" and report.stages == "the model (3 blocks)"
    assert all(row.ridge in (1e-3, 1e-2, 1e-1, 1.0) for row in report.layers)  # chosen on held-out tokens
    assert all(row.ridge is None for row in reports["one-shot"].layers)
    with torch.no_grad():
        x0, xc = torch.relu(dense[0](x)), torch.relu(models["sequential"][0](x))
        W, W_hat = dense[2].weight, models["sequential"][2].weight
        expected = ((x0 @ W.T - xc @ W_hat.T).norm() / (x0 @ W.T).norm()).item()
        assert report["2"].relative_error == pytest.approx(expected, rel=1e-6)
        errors = {mode: (model(held_out) - dense(held_out)).norm().item() for mode, model in models.items()}
    assert errors["sequential"] < 0.99 * errors["one-shot"]
