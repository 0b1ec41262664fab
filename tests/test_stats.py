"""The statistics behind every output error: paired (sequential calibration) and held-out parts.

InputStats' scaling and the whitener's robustness are tested with the decompositions that use
them, in tests/test_decompose.py."""

from __future__ import annotations

import pytest
import torch

import gblr
from gblr.stats import PairedStats, SplitPairedStats


def test_paired_stats_correct_the_drift_and_reduce_to_input_stats_without_it():
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    x0 = torch.randn(200, 10, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 2, 10, dtype=torch.float64)
    same = PairedStats(W)
    same.update(x0, x0)
    corrected, _ = same.corrected()
    torch.testing.assert_close(corrected, W)  # nothing to correct: the weight itself
    W_hat = gblr.svd_decompose(W, 0.5, calibration=x0).weight.double()
    assert same.relative_error(W_hat) == pytest.approx(gblr.relative_error(W, W_hat, x0), rel=1e-9)

    x = x0 @ (torch.eye(10, dtype=torch.float64) + 0.1 * torch.randn(10, 10, generator=generator, dtype=torch.float64))
    drift = PairedStats(W)
    for rows in (slice(0, 120), slice(120, 200)):
        drift.update(x[rows], x0[rows])
    corrected, _ = drift.corrected()
    # x0 is a linear function of x, so some weight reproduces W x0 from x exactly; the corrected
    # weight comes close (up to its small ridge toward W), where W itself is far off.
    least_squares = torch.linalg.lstsq(x, x0 @ W.T).solution.T
    assert drift.relative_error(least_squares) < 1e-6
    assert drift.relative_error(corrected) < 0.01
    assert drift.relative_error(W) > 0.1
    with pytest.raises(ValueError, match="same shape"):
        drift.update(x[:3], x0[:4])


def test_split_paired_stats_hold_out_whole_sequences_and_merge_back():
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    x0 = torch.randn(3, 4, 6, 8, generator=generator, dtype=torch.float64)  # batches of 4 sequences of 6 tokens
    x = x0 + 0.1 * torch.randn(3, 4, 6, 8, generator=generator, dtype=torch.float64)
    split, whole, first = (SplitPairedStats(W), PairedStats(W),
                           PairedStats(W))
    for batch in range(3):
        split.update(x[batch], x0[batch])
        whole.update(x[batch], x0[batch])
        first.update(x[batch, :2], x0[batch, :2])
    assert (split.fit.tokens, split.held.tokens, split.tokens) == (36, 36, 72)
    torch.testing.assert_close(split.fit.corrected()[0], first.corrected()[0])  # sequences 0-1 of each batch
    merged = split.merged()
    for ridge in (1e-3, 1.0):
        torch.testing.assert_close(merged.corrected(ridge)[0], whole.corrected(ridge)[0])
    assert merged.relative_error(W * 0.9) == pytest.approx(whole.relative_error(W * 0.9), rel=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        split.update(x[0], x0[0, :2])


def test_choose_ridge_prefers_a_strong_pull_toward_the_weight_when_tokens_are_few():
    # With fewer tokens than inputs the drift correction over-fits its half; with many it does not.
    generator = torch.Generator().manual_seed(2)
    W = torch.randn(24, 32, generator=generator, dtype=torch.float64)
    mixing = torch.eye(32, dtype=torch.float64) + 0.3 * torch.randn(32, 32, generator=generator, dtype=torch.float64)
    choices = {}
    for tokens in (24, 4000):
        stats = SplitPairedStats(W)
        x0 = torch.randn(tokens, 32, generator=generator, dtype=torch.float64) @ mixing
        stats.update(x0 + 0.2 * torch.randn(tokens, 32, generator=generator, dtype=torch.float64), x0)
        choices[tokens] = stats.choose_ridge(rank=6)
    assert choices[24] > choices[4000]
    assert SplitPairedStats(W).choose_ridge(rank=6) is None  # no tokens: nothing to judge by
    bad = SplitPairedStats(W * float("nan"))
    bad.update(x0[:10], x0[:10])
    with pytest.raises(ValueError, match="weight contains NaN"):
        bad.choose_ridge(rank=6)
