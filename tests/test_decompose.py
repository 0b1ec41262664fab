"""gblr.decompose: dense -> GBLR within a FLOPs budget, never worse than (activation-aware) SVD."""

import pytest
import torch

import gblr
from gblr.decompose import InputStats


def _weight(m, n, seed=0, decay=0.97):
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    k = min(m, n)
    return (U[:, :k] * decay ** torch.arange(k, dtype=torch.float64)) @ V[:, :k].T


def _activations(n, tokens=400, seed=1):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, n, dtype=torch.float64)
    mixing = torch.randn(n, n, generator=generator, dtype=torch.float64) / n**0.5 + torch.eye(n, dtype=torch.float64)
    return (torch.randn(tokens, n, generator=generator, dtype=torch.float64) * scales) @ mixing


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_never_worse_than_svd_and_within_budget(shape, ratio):
    W = _weight(*shape)
    layer = gblr.decompose(W, ratio)
    baseline = gblr.svd_decompose(W, ratio)
    m, n = shape
    assert layer.flops() <= ratio * m * n
    assert gblr.relative_error(W, layer.weight) <= gblr.relative_error(W, baseline.weight) + 1e-12


def test_uses_the_budget_low_rank_cannot():
    # 48x80 at 0.5: rank 15 costs 1920 of 1920 MACs... use 0.52 so 76 MACs are left over
    W = _weight(48, 80)
    layer = gblr.decompose(W, 0.52)
    baseline = gblr.svd_decompose(W, 0.52)
    assert baseline.flops() < layer.flops() <= 0.52 * 48 * 80
    assert gblr.relative_error(W, layer.weight) < gblr.relative_error(W, baseline.weight) - 1e-4


def test_finds_block_low_rank_structure_svd_misses():
    generator = torch.Generator().manual_seed(3)
    blocks = [torch.randn(32, 2, generator=generator, dtype=torch.float64)
              @ torch.randn(2, 32, generator=generator, dtype=torch.float64) for _ in range(4)]
    W = torch.block_diag(*blocks)  # 128x128, four diagonal blocks of rank 2: 4*2*64 = 512 MACs
    ratio = 512 / (128 * 128)
    layer = gblr.decompose(W, ratio)
    assert layer.flops() <= 512
    assert gblr.relative_error(W, layer.weight) < 1e-10
    assert gblr.relative_error(W, gblr.svd_decompose(W, ratio).weight) > 0.5


def test_ratio_below_one_full_component_uses_partial_blocks():
    W = _weight(64, 64)
    ratio = 100 / (64 * 64)  # a full rank-1 component costs 128 MACs
    with pytest.raises(ValueError, match="partial blocks"):
        gblr.svd_decompose(W, ratio)
    layer = gblr.decompose(W, ratio)
    assert 0 < layer.flops() <= 100
    assert gblr.relative_error(W, layer.weight) < 1.0


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_calibrated_output_error_beats_activation_aware_svd(ratio):
    W = _weight(48, 96, seed=4)
    X = _activations(96)
    aware = gblr.svd_decompose(W, ratio, calibration=X)
    plain = gblr.svd_decompose(W, ratio)
    layer = gblr.decompose(W, ratio, calibration=X)
    output_error = lambda approx: float((X @ (W - approx.weight.detach().double()).T).norm() / (X @ W.T).norm())  # noqa: E731
    assert gblr.relative_error(W, aware.weight, X) == pytest.approx(output_error(aware), rel=1e-9)
    assert output_error(aware) < output_error(plain)
    assert output_error(layer) <= output_error(aware) + 1e-12
    assert layer.flops() <= ratio * 48 * 96


def test_bias_dtype_and_layer_behave_like_linear():
    W = _weight(40, 24).float()
    bias = torch.randn(40)
    layer = gblr.decompose(W, 0.6, bias=bias)
    assert layer.u.dtype == torch.float32 and torch.equal(layer.bias, bias)
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + bias)


def test_input_stats_and_error_curve():
    X = _activations(12, tokens=50)
    stats = InputStats(12)
    stats.update(X[:20])
    stats.update(X[20:].reshape(3, 10, 12))
    torch.testing.assert_close(stats.second_moment, X.T @ X / 50)
    assert stats.tokens == 50
    same = InputStats.from_second_moment(X.T @ X / 50, tokens=50)
    torch.testing.assert_close(same.second_moment, stats.second_moment)

    W = _weight(10, 12)
    curve = gblr.svd_error_curve(W)
    assert curve.shape == (11,) and curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.0, abs=1e-12)
    assert bool((curve[1:] <= curve[:-1] + 1e-15).all())
    rank3 = gblr.svd_decompose(W, 3 * 22 / 120)
    assert gblr.relative_error(W, rank3.weight) ** 2 == pytest.approx(float(curve[3]), rel=1e-9)
    aware_curve = gblr.svd_error_curve(W, stats)
    aware3 = gblr.svd_decompose(W, 3 * 22 / 120, calibration=stats)
    assert gblr.relative_error(W, aware3.weight, stats) ** 2 == pytest.approx(float(aware_curve[3]), rel=1e-4)  # C is damped by 1e-6


def test_clear_errors():
    W = _weight(16, 24)
    with pytest.raises(ValueError, match="flops_ratio"):
        gblr.decompose(W, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        gblr.decompose(W * float("nan"), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        gblr.decompose(torch.randn(3, 4, 5), 0.5)
    with pytest.raises(ValueError, match="24 features|24 inputs"):
        gblr.decompose(W, 0.5, calibration=torch.randn(10, 16))
    with pytest.raises(TypeError, match="calibration"):
        gblr.decompose(W, 0.5, calibration=[1, 2, 3])
    with pytest.raises(ValueError, match="no activations"):
        InputStats(24).second_moment
    with pytest.raises(ValueError, match="trade"):
        gblr.decompose(W, 0.5, trade=-1)
