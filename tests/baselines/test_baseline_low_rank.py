"""LowRankLinear: ``W = u @ v`` of a given rank, ``rank * (in + out)`` MACs (gblr.baselines.low_rank)."""

import pytest
import torch

from gblr.baselines import LowRankLinear

DTYPE = torch.float64


def test_low_rank_weight_is_u_times_v_and_has_its_rank():
    torch.manual_seed(0)
    layer = LowRankLinear(30, 20, 4, dtype=DTYPE)
    torch.testing.assert_close(layer.weight, layer.u @ layer.v)
    assert torch.linalg.matrix_rank(layer.weight.detach()).item() == 4


def test_flops_formula():
    low_rank = LowRankLinear(30, 20, 4)
    assert low_rank.flops() == 200
    assert low_rank.flops_ratio() == pytest.approx(200 / 600)


def test_at_flops_ratio_rank():
    assert LowRankLinear.at_flops_ratio(30, 20, 1 / 3).rank == 4  # exactly 200 MACs allowed
    # 4x4 at 0.1 allows 1.6 MACs; rank 1 costs more and reports it.
    assert LowRankLinear.at_flops_ratio(4, 4, 0.1).flops_ratio() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LowRankLinear(8, 8, 0), r"rank must be a positive int, got 0"),
        (lambda: LowRankLinear(8, 8, -2), r"rank must be a positive int, got -2"),
        (lambda: LowRankLinear(8, 8, 2.0), r"rank must be a positive int, got 2.0"),
    ],
)
def test_invalid_rank_raises(build, match):
    with pytest.raises(ValueError, match=match):
        build()
