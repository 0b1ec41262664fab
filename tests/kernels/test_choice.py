"""kernel="auto" (gblr.kernels.choice): the cost model prunes, timing decides, the watch re-measures."""

import time

import torch

import gblr
from gblr.kernels.choice import MEASURED_PATHS, choice_key, measure, measured_paths


def test_measure_picks_the_fastest_path_and_times_each():
    calls = []
    delays = {"slow": 2e-3, "fast": 0.0, "medium": 1e-3}

    def run(path, x):
        calls.append(path)
        time.sleep(delays[path])

    best, seconds = measure(run, tuple(delays), torch.zeros(1), repeats=3, budget=0.0)
    assert best == "fast"
    assert set(seconds) == set(delays) and seconds["slow"] >= 2e-3 and seconds["medium"] >= 1e-3
    # one warm-up each, then interleaved rounds: every path is timed equally often
    assert calls[:3] == list(delays) and all(calls.count(path) == 4 for path in delays)


def test_choice_key_buckets_token_counts_by_powers_of_two():
    keys = [choice_key(t, torch.device("cpu"), torch.float32)[2] for t in (1, 2, 3, 4, 5, 16, 17)]
    assert keys == [1, 2, 4, 4, 8, 16, 32]
    assert choice_key(0, torch.device("cpu"), torch.float16) == ("cpu", torch.float16, 1)


def test_cpu_inputs_measure_the_cpu_paths():
    assert measured_paths(torch.zeros(1)) == MEASURED_PATHS and "dense" in MEASURED_PATHS


def test_the_cost_model_prices_macs_and_calls():
    from gblr.kernels.choice import CALL_MACS, predicted_cost

    assert predicted_cost(1000, 3, 16) == 16_000 + 3 * CALL_MACS
    assert predicted_cost(1000, 3, 16, "cuda") == 16_000  # queued calls cost no host time


def test_only_plausible_paths_and_dense_are_timed():
    from gblr.kernels.choice import PLAUSIBLE, Cost, choose, plausible_paths

    predicted = {"tiled": 100.0, "tiled-coarse": 100.0 * PLAUSIBLE, "tiled-batched": 100.0 * PLAUSIBLE + 1,
                 "dense": 1000.0}
    assert plausible_paths(predicted) == ("tiled", "tiled-coarse", "dense")  # dense always
    timed = []

    def run(path, x):
        timed.append(path)

    costs = {path: Cost(value, 0, "cuda") for path, value in predicted.items()}  # no call price: cost = MACs
    kept = choose(run, costs, torch.zeros(1), tokens=1)
    assert set(timed) == {"tiled", "tiled-coarse", "dense"}
    assert kept.tokens == 1 and kept.predicted == predicted and set(kept.seconds) == set(timed)


def test_the_watch_remeasures_after_strikes_in_a_row_and_backs_off():
    from gblr.kernels.choice import CALL_MACS, DRIFT, STRIKES, Choice, Cost, Watch

    watch, key = Watch(), ("cpu", torch.float32, 16)
    cost = Cost(CALL_MACS / 16, 1)  # 16 tokens cost as much as the call: 8 tokens three quarters of it
    kept = Choice("tiled", {"tiled": 1e-3, "dense": 2e-3}, 16, {}, {"tiled": cost})
    assert kept.expected_seconds(8) == 0.75e-3
    assert not watch.observe(key, kept, 16, 1e-3 * DRIFT * 0.9)  # within DRIFT: fine
    for _ in range(STRIKES - 1):
        assert not watch.observe(key, kept, 16, 1e-3 * DRIFT * 1.5)
    assert not watch.observe(key, kept, 16, 1e-3)  # a normal call resets the count
    for _ in range(STRIKES - 1):
        assert not watch.observe(key, kept, 8, 0.75e-3 * DRIFT * 1.1)
    assert watch.observe(key, kept, 16, 1e-3 / DRIFT / 1.5)  # much faster counts too: remeasure
    assert watch.remeasured[key] == 1
    results = [watch.observe(key, kept, 16, 1e-2) for _ in range(2 * STRIKES)]
    assert results == [False] * (2 * STRIKES - 1) + [True]  # the second time it takes twice as many


def test_the_watch_confirms_a_choice_after_50_then_4x_more_calls():
    from gblr.kernels.choice import CONFIRM, Choice, Cost, Watch

    watch, key = Watch(), ("cpu", torch.float32, 4)
    kept = Choice("dense", {"dense": 1e-3}, 4, {}, {"dense": Cost(10, 1)})
    flags = [watch.observe(key, kept, 4, 1e-3) for _ in range(5 * CONFIRM)]
    assert [i + 1 for i, flag in enumerate(flags) if flag] == [CONFIRM, 4 * CONFIRM]
    assert watch.confirmed[key] == 2 and watch.remeasured[key] == 2


def test_a_frozen_layer_measures_again_when_its_choice_drifts():
    from gblr.kernels.choice import STRIKES

    torch.manual_seed(0)
    frozen = gblr.GBLRLinear(64, 96, init_flops_ratio=0.25).freeze()
    x = torch.randn(20, 64)
    with torch.no_grad():
        frozen(x)
    key = frozen.choice_key(20, x)
    first = frozen.choices[key]
    for _ in range(STRIKES):  # calls far slower than measured, as when other processes take the cores
        frozen.observe(20, x, 1.0)
    assert key not in frozen.choices  # dropped: the next call measures again
    with torch.no_grad():
        y = frozen(x)
    assert key in frozen.choices and frozen.choices[key] is not first and frozen.watch.remeasured[key] == 1
    torch.testing.assert_close(y, frozen.run("reference", x) + frozen.bias)


def test_a_frozen_convolution_measures_again_when_its_choice_drifts():
    from gblr.kernels.choice import STRIKES

    torch.manual_seed(0)
    frozen = gblr.GBLRConv2d(8, 8, 3, padding=1, init_flops_ratio=0.3).freeze()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        frozen(x)
    key = frozen.choice_key(x)
    for _ in range(STRIKES):
        frozen.observe_batch(x, 1.0)
    assert key not in frozen.choices
    with torch.no_grad():
        frozen(x)
    assert key in frozen.choices and frozen.watch.remeasured[key] == 1


def test_a_layer_without_blocks_expects_its_measured_time():
    from gblr.kernels.choice import Choice, Cost

    kept = Choice("tiled", {"tiled": 2e-6}, 8, {}, {"tiled": Cost(0, 0)})  # nothing to compute, no calls
    assert kept.expected_seconds(16) == 2e-6
