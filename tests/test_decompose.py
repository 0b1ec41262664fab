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


# -- whitening that never fails ------------------------------------------------------------------


def _hard_activations(kind: str, n: int = 48) -> torch.Tensor:
    """Calibration activations that break a naive whitener (Cholesky of X^T X)."""
    generator = torch.Generator().manual_seed(5)
    X = torch.randn(300, n, generator=generator, dtype=torch.float64) * torch.logspace(-1, 1, n, dtype=torch.float64)
    if kind == "few tokens":  # rank 6 < n features
        return X[:6]
    if kind == "one token":
        return X[:1]
    if kind == "duplicated features":
        X[:, n // 2:] = X[:, : n // 2]
    elif kind == "zero features":
        X[:, ::3] = 0
    elif kind == "scaled 1e-8 .. 1e8":
        X = X * torch.logspace(-8, 8, n, dtype=torch.float64)
    elif kind == "one outlier feature":  # as in LLM hidden states, in float32
        X[:, 5] *= 1e4
        X = X.float()
    elif kind == "constant":
        X = torch.full((50, n), 3.0, dtype=torch.float64)
    elif kind == "all zero":
        X = torch.zeros(50, n, dtype=torch.float64)
    elif kind == "huge (1e170)":  # its second moment overflows float64
        X = X * 1e170
    elif kind == "tiny (1e-170)":  # its second moment underflows float64
        X = X * 1e-170
    return X


HARD = ["few tokens", "one token", "duplicated features", "zero features", "scaled 1e-8 .. 1e8",
        "one outlier feature", "constant", "all zero", "huge (1e170)", "tiny (1e-170)"]


@pytest.mark.parametrize("kind", HARD)
def test_whitening_never_fails_and_never_loses_to_plain_svd(kind):
    W = _weight(40, 48, seed=6, decay=0.95)
    X = _hard_activations(kind)
    ratio = 0.5

    def squared(layer):  # the output error, squared
        return gblr.relative_error(W, layer.weight, X) ** 2

    plain = gblr.svd_decompose(W, ratio)
    aware = gblr.svd_decompose(W, ratio, calibration=X)
    layer = gblr.decompose(W, ratio, calibration=X)
    for result in (aware, layer):
        assert torch.isfinite(result.weight).all()
        assert result.flops() <= ratio * 40 * 48
    # In the output metric: activation-aware SVD never loses to plain SVD, GBLR never to either
    # (up to float64 rounding of squared relative errors).
    assert squared(aware) <= squared(plain) + 1e-12
    assert squared(layer) <= squared(aware) + 1e-12
    if kind not in ("all zero",):  # there every output error is 0
        assert squared(aware) < 0.9 * squared(plain)  # and the activations make a difference
    curve = gblr.svd_error_curve(W, X)
    assert torch.isfinite(curve).all() and curve[0] == 1 and curve[-1] == 0
    assert bool((curve[1:] <= curve[:-1] + 1e-15).all()) and bool((curve >= 0).all())


def test_input_stats_keep_the_shape_of_any_finite_second_moment():
    X = _activations(12, tokens=60)
    reference = InputStats(12)
    reference.update(X)
    for scale in (1e-170, 1e170):
        stats = InputStats(12)
        stats.update(X[:30] * scale)
        stats.update(X[30:] * scale)
        torch.testing.assert_close(stats.normalized_second_moment, reference.normalized_second_moment)
    mixed = InputStats(12)  # tiny activations first, then ones 1e100 times larger: the first are negligible
    mixed.update(X[:30] * 1e-50)
    mixed.update(X[30:] * 1e50)
    only_large = InputStats(12)
    only_large.update(X[30:])
    torch.testing.assert_close(mixed.normalized_second_moment, only_large.normalized_second_moment)
    assert mixed.tokens == 60
    # A precomputed moment near the float64 limit, rank deficient and with a zero row: no error.
    C = torch.diag(torch.tensor([1e300, 1e-300, 0.0, 1.0], dtype=torch.float64))
    stats = InputStats.from_second_moment(C)
    W = _weight(5, 4)
    curve = gblr.svd_error_curve(W, stats)
    assert torch.isfinite(curve).all()
    layer = gblr.svd_decompose(W, 0.5, calibration=stats)
    assert torch.isfinite(layer.weight).all() and 0 <= gblr.relative_error(W, layer.weight, stats) < 1
    with pytest.raises(ValueError, match="NaN or infinite"):
        InputStats.from_second_moment(torch.full((3, 3), float("inf")))


def test_split_input_stats_hold_the_second_half_of_every_update():
    X = _activations(24, tokens=90, seed=5)
    split = gblr.stats.SplitInputStats(24)
    first, second = InputStats(24), InputStats(24)
    for chunk in X.split(30):  # each update: 15 tokens to fit, 15 held
        split.update(chunk)
        first.update(chunk[:15])
        second.update(chunk[15:])
    assert split.tokens == 90 and split.held.tokens == 45
    torch.testing.assert_close(split.second_moment, (first.sum + second.sum) / 90)
    torch.testing.assert_close(split.held.second_moment, second.second_moment)
    torch.testing.assert_close(split.fitted_second_moment(), first.normalized_second_moment)
    lone = gblr.stats.SplitInputStats(24)
    lone.update(X[:1])  # one token: nothing held, nothing to judge on
    assert lone.held.tokens == 0 and lone.fitted_second_moment() is None


def test_held_tokens_choose_the_structure_variant(monkeypatch):
    import importlib

    module = importlib.import_module("gblr.decompose")
    W = _weight(48, 96, seed=6)
    split = gblr.stats.SplitInputStats(96)
    for chunk in _activations(96, tokens=600, seed=7).split(50):
        split.update(chunk)
    calls = []
    original = module._variants

    def recorded(W, C, *args, **kwargs):
        result = original(W, C, *args, **kwargs)
        calls.append((C, kwargs.get("only"), result))
        return result

    monkeypatch.setattr(module, "_variants", recorded)
    layer = gblr.decompose(W, 0.3, calibration=split, trade=2)
    (fitted, only, variants), (final, chosen, [(_, atoms)]) = calls
    assert only is None and len(variants) == 4  # the truncated SVD alone, then 2, 1 and 0 components traded
    torch.testing.assert_close(fitted, split.fitted_second_moment())
    torch.testing.assert_close(final, split.normalized_second_moment)
    held = split.held.normalized_second_moment
    errors = [float(module._squared_error(W - module._matrix(a, 48, 96), held)) for _, a in variants]
    assert chosen == min(range(4), key=errors.__getitem__)
    torch.testing.assert_close(layer.weight.detach().double(), module._matrix(atoms, 48, 96))


def test_held_tokens_keep_real_block_structure():
    generator = torch.Generator().manual_seed(3)
    blocks = [torch.randn(32, 2, generator=generator, dtype=torch.float64)
              @ torch.randn(2, 32, generator=generator, dtype=torch.float64) for _ in range(4)]
    W = torch.block_diag(*blocks)  # four diagonal blocks of rank 2: what block atoms capture, not low rank
    X = _activations(128, tokens=1024, seed=8)
    plain, split = InputStats(128), gblr.stats.SplitInputStats(128)
    plain.update(X)
    for chunk in X.split(64):
        split.update(chunk)
    ratio = 512 / (128 * 128)
    errors = [gblr.relative_error(W, gblr.decompose(W, ratio, calibration=stats).weight, plain)
              for stats in (plain, split)]
    assert errors[1] <= errors[0] + 1e-9
    assert errors[1] < 0.5 * gblr.relative_error(W, gblr.svd_decompose(W, ratio, calibration=plain).weight, plain)
