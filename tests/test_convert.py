"""convert_: model surgery on nested, shared, half-precision and Hugging Face models, and its report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gblr
from conversion import SVD, UNIFORM_SVD, Net, names, quiet, tiny_bert_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


def test_convert_rejects_wrong_arguments():
    with pytest.raises(TypeError, match="config"):
        quiet(nn.Sequential(nn.Linear(4, 4)), {"flops_ratio": 0.5})
    with pytest.raises(TypeError, match="calibration"):
        quiet(nn.Sequential(nn.Linear(4, 4)), gblr.GBLRConfig(), calibration=torch.randn(3, 4))
    with pytest.raises(ValueError, match="itself is a linear layer"):
        quiet(nn.Linear(8, 8), gblr.GBLRConfig())


def test_convert_replaces_exactly_the_targets_in_a_nested_model():
    torch.manual_seed(0)
    model = Net()
    originals = dict(model.named_modules())
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, exclude_modules=["xquery"], **UNIFORM_SVD))
    converted = [f"layers.{i}.{name}" for i in range(2) for name in ("query", "ffn.0", "ffn.2")]
    assert report.converted == converted and report.skipped == {}
    for name, module in model.named_modules():
        if name in converted:
            assert isinstance(module, gblr.GBLRLinear)
            assert report[name].flops == module.flops()
        elif isinstance(module, nn.Linear):
            assert module is originals[name]  # xquery and the head untouched
    assert {name for name, m in model.named_modules() if isinstance(m, gblr.GBLRLinear)} == set(converted)
    dense = sum(originals[name].weight.numel() for name in converted)
    assert report.dense_flops == dense
    assert report.flops == sum(model.get_submodule(name).flops() for name in converted)
    assert report.flops_ratio <= 0.5 + 1e-9
    assert model(torch.randn(3, 16)).shape == (3, 10)


def test_error_allocation_meets_the_global_target():
    torch.manual_seed(0)
    model = Net()
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.4, **SVD))
    assert [row.name for row in report.layers] == names(Net())
    assert report.flops_ratio <= 0.4 + 1e-9
    for row in report.layers:  # a layer is replaced exactly when it was not kept dense
        replaced = isinstance(model.get_submodule(row.name), gblr.GBLRLinear)
        assert replaced == (row.skipped is None)
        assert row.flops_ratio == (1.0 if row.skipped else row.ratio)
        assert row.ratio >= 0.1 or row.flops == (row.in_features + row.out_features)  # floor: 0.25 * 0.4 or rank 1


def test_convert_with_gblr_method_keeps_dtype_training_mode_and_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8, bias=False)).double().eval()
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5))
    assert report.converted == ["0", "2"]
    for index in (0, 2):
        assert model[index].u.dtype == torch.float64 and not model[index].training
    assert model[2].bias is None
    assert report.flops_ratio <= 0.5
    assert model(torch.randn(2, 12, dtype=torch.float64)).dtype == torch.float64


def test_shared_module_is_replaced_everywhere():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = quiet(model, gblr.GBLRConfig(**SVD))
    assert report.converted == ["0"]
    assert isinstance(model[0], gblr.GBLRLinear) and model[2] is model[0]


def test_a_failing_layer_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '1'.*NaN"):
        quiet(model, gblr.GBLRConfig(**SVD))
    assert all(type(module) is nn.Linear for module in model)


def test_verbose_prints_the_table(capsys):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    report = gblr.convert_(model, gblr.GBLRConfig(**UNIFORM_SVD), progress=False, verbose=True)
    printed = capsys.readouterr().out
    assert printed.strip() == str(report)
    assert "weight error" in printed and "16x16" in printed and "8x16" in printed
    data = report.to_dict()
    assert [row["name"] for row in data["layers"]] == ["0", "1"]
    assert data["flops_ratio"] == report.flops_ratio and data["converted"] == 2
    json.dumps(data)


def test_conv1d_is_converted_from_its_transposed_weight():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=12, nx=20)
    with torch.no_grad():
        conv.bias.normal_()
    model = nn.Sequential(conv)
    x = torch.randn(2, 3, 20)
    reference = gblr.svd_decompose(conv.weight.detach().T, 0.5, bias=conv.bias.detach())
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, allocation="uniform", **SVD))
    assert report.converted == ["0"] and (report["0"].in_features, report["0"].out_features) == (20, 12)
    assert isinstance(model[0], gblr.GBLRLinear)
    assert (model[0].in_features, model[0].out_features) == (20, 12)
    torch.testing.assert_close(model(x), reference(x))
    torch.testing.assert_close(model[0].weight, reference.weight)


def test_tiny_bert_converts_with_dict_calibration():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(tiny_bert_config()).eval()
    batches = [{"input_ids": torch.randint(0, 100, (2, 8))} for _ in range(2)]
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, **SVD), calibration=batches)
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]
    expected = [f"encoder.layer.{i}.{name}" for i in range(2) for name in per_layer] + ["pooler.dense"]
    assert [row.name for row in report.layers] == expected
    assert report.converted == expected and report.calibrated
    assert all(isinstance(model.get_submodule(name), gblr.GBLRLinear) for name in expected)
    assert report.flops_ratio <= 0.5
    assert all(0 <= row.relative_error < 1 for row in report.layers)
    output = model(**batches[0]).last_hidden_state
    assert output.shape == (2, 8, 32) and torch.isfinite(output).all()


@pytest.mark.parametrize("config", [{"method": "gblr"}, {"method": "svd"}, UNIFORM_SVD])
def test_a_ratio_below_what_rank_one_reaches_warns(config):
    # convert_ used to give 0.047 for a requested 1e-6 without a word.
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    with pytest.warns(UserWarning, match=r"flops_ratio=1e-06 is below the smallest ratio the targeted layers can "
                                         r"reach, 0.04688 of their dense MACs"):
        report = quiet(model, gblr.GBLRConfig(flops_ratio=1e-6, **config))
    assert report.flops_ratio == pytest.approx(0.046875)


def test_layers_left_without_any_block_are_named_in_a_warning():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    with pytest.warns(UserWarning, match=r"2 layer\(s\) got no block at their ratio and now output only their bias: "
                                         r"0, 2"):
        report = quiet(model, gblr.GBLRConfig(flops_ratio=1e-6, allocation="uniform"))
    assert report.flops_ratio == 0.0
