import json

import pytest
import torch
from torch import nn

import gblr
from gblr import structures
from gblr.flops import (
    group_macs, group_macs_slopes, largest_cheaper_rank, low_rank_macs, max_low_rank, rank_for_ratio, square_block_fraction,
)


def test_report_rows_totals_and_weighted_ratio():
    torch.manual_seed(0)
    model = nn.Sequential(
        structures.low_rank(torch.randn(40, 2), torch.randn(2, 30)),  # 2 * 70 = 140 of 1200
        nn.ReLU(),
        nn.Linear(40, 40),  # not a GBLR layer: not reported
        nn.Sequential(gblr.GBLRLinear(40, 10, init_flops_ratio=0.5)),
    )
    report = gblr.flops_report(model)
    assert [layer.name for layer in report] == ["0", "3.0"]
    first, second = report.layers
    assert first.shape == (40, 30) and first.dense_macs == 1200 and first.gblr_macs == 140
    assert second.shape == (10, 40) and second.gblr_macs == model[3][0].flops()
    assert report.dense_macs == 1600
    assert report.gblr_macs == 140 + second.gblr_macs
    assert report.ratio == pytest.approx((140 + second.gblr_macs) / 1600)
    assert first.ratio == pytest.approx(140 / 1200)


def test_report_is_data_and_a_table():
    model = nn.Sequential(structures.low_rank(torch.randn(8, 1), torch.randn(1, 8)))
    gblr.freeze_(model)
    report = gblr.flops_report(model)
    data = json.loads(report.to_json())
    assert data["layers"] == [
        {"name": "0", "shape": [8, 8], "dense_macs": 64, "gblr_macs": 16, "flops_ratio": 0.25}
    ]
    assert data["flops_ratio"] == 0.25
    lines = str(report).splitlines()
    assert lines[0].split() == ["layer", "shape", "dense", "MACs", "GBLR", "MACs", "ratio"]
    assert lines[2].split() == ["0", "8x8", "64", "16", "0.250"]
    assert lines[-1].split() == ["total", "64", "16", "0.250"]


def test_a_model_without_gblr_layers_reports_nothing():
    report = gblr.flops_report(nn.Linear(3, 3))
    assert len(report) == 0 and report.gblr_macs == 0


def test_the_ratio_of_a_model_without_structured_layers_is_an_error_not_nan():
    # It used to be nan.
    report = gblr.flops_report(nn.Sequential(nn.Linear(3, 3)))
    message = r"the model has no structured layers .* gblr.convert_ .* include_dense=True"
    for read in (lambda: report.ratio, lambda: str(report), report.to_dict):
        with pytest.raises(ValueError, match=message):
            read()
    assert gblr.flops_report(nn.Sequential(nn.Linear(3, 3)), include_dense=True).ratio == 1.0


def test_report_needs_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        gblr.flops_report("model")


def test_report_includes_baselines_and_optionally_dense_layers():
    from gblr.baselines import LowRankLinear

    model = nn.Sequential(LowRankLinear(30, 20, rank=2), nn.Linear(20, 10))
    structured = gblr.flops_report(model)
    assert [(layer.name, layer.gblr_macs) for layer in structured] == [("0", 100)]
    everything = gblr.flops_report(model, include_dense=True)
    assert [(layer.name, layer.gblr_macs, layer.dense_macs) for layer in everything] == [("0", 100, 600), ("1", 200, 200)]
    assert everything.ratio == pytest.approx(300 / 800)


def test_group_macs_is_one_rule_for_ints_and_tensors():
    ranks, a, b = torch.tensor([1, 2, 3, 8]), torch.tensor([4, 4, 2, 3]), torch.tensor([5, 1, 9, 3])
    expected = [min(int(r) * (int(x) + int(y)), int(x) * int(y)) for r, x, y in zip(ranks, a, b)]
    assert group_macs(ranks, a, b).tolist() == expected
    assert [group_macs(int(r), int(x), int(y)) for r, x, y in zip(ranks, a, b)] == expected
    assert expected == [9, 4, 18, 9]


def test_group_macs_slopes_are_the_derivatives_of_the_cost():
    rank = torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)
    a = torch.tensor([30.0, 3.0, 10.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([20.0, 5.0, 1.5], dtype=torch.float64, requires_grad=True)
    group_macs(rank, a, b).sum().backward()
    slope_a, slope_b = group_macs_slopes(rank, a.detach(), b.detach())
    torch.testing.assert_close(slope_a, a.grad)
    torch.testing.assert_close(slope_b, b.grad)


def test_rank_arithmetic():
    m, n = 30, 20
    assert low_rank_macs(3, m, n) == 150
    assert max_low_rank(149, m, n) == 2 and max_low_rank(150, m, n) == 3
    assert rank_for_ratio(0.25, m, n) == 3  # 150 MACs of 600
    assert rank_for_ratio(1.0, m, n) == 12 and rank_for_ratio(1.0, 3, 1000) == 2
    assert largest_cheaper_rank(m, n) == 11  # 12 * 50 = 600 is not cheaper than dense
    assert largest_cheaper_rank(1, 5) == 0  # rank 1 costs 6 > 5


@pytest.mark.parametrize("macs, rank, m, n", [(50.0, 1, 64, 32), (100.0, 2, 48, 48), (10.0, 4, 16, 16)])
def test_square_block_fraction_inverts_the_block_cost(macs, rank, m, n):
    x = square_block_fraction(macs, rank, m, n)
    cost = min(rank * (m + n) * x, m * n * x * x)
    assert cost == pytest.approx(macs)
    assert square_block_fraction(10 * m * n, rank, m, n) == 1.0


def test_include_dense_counts_hugging_face_conv1d_layers():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential(pytorch_utils.Conv1D(12, 5), nn.Linear(12, 3))  # Conv1D(nf=out, nx=in): weight (5, 12)
    report = gblr.flops_report(model, include_dense=True)
    assert [(layer.name, layer.shape, layer.dense_macs, layer.gblr_macs) for layer in report] == [
        ("0", (12, 5), 60, 60), ("1", (3, 12), 36, 36)]
    assert len(gblr.flops_report(model)) == 0  # without include_dense: no structured layers
