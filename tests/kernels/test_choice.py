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
    from gblr.kernels.choice import CALL_MACS, DRIFT, SETTLE, STRIKES, Choice, Cost, Watch

    watch, key = Watch(), ("cpu", torch.float32, 16)
    cost = Cost(CALL_MACS / 16, 1)  # 16 tokens cost as much as the call: 8 tokens three quarters of it
    kept = Choice("tiled", {"tiled": 1e-3, "dense": 2e-3}, 16, {}, {"tiled": cost})
    assert kept.expected_seconds(8) == 0.75e-3
    # the first calls run 3x slower than measured (weights out of cache inside a model): the yardstick
    assert not any(watch.observe(key, kept, 16, 3e-3) for _ in range(SETTLE))
    assert watch.yardstick[key] == 3.0
    assert not watch.observe(key, kept, 16, 3e-3 * DRIFT * 0.9)  # within DRIFT of the yardstick: fine
    for _ in range(STRIKES - 1):
        assert not watch.observe(key, kept, 16, 3e-3 * DRIFT * 1.5)
    assert not watch.observe(key, kept, 16, 3e-3)  # a normal call resets the count
    for _ in range(STRIKES - 1):
        assert not watch.observe(key, kept, 8, 3 * 0.75e-3 * DRIFT * 1.1)
    assert watch.observe(key, kept, 16, 3e-3 / DRIFT / 1.5)  # much faster counts too: remeasure
    assert watch.remeasured[key] == 1
    results = [watch.observe(key, kept, 16, 1e-1) for _ in range(2 * STRIKES)]
    assert results == [False] * (2 * STRIKES - 1) + [True]  # the second time it takes twice as many


def test_a_new_choice_gets_a_new_yardstick():
    from gblr.kernels.choice import SETTLE, Choice, Cost, Watch

    watch, key = Watch(), ("cpu", torch.float32, 1)
    first = Choice("dense", {"dense": 1e-3}, 1, {}, {"dense": Cost(10, 1)})
    for _ in range(SETTLE):
        watch.observe(key, first, 1, 4e-3)
    second = first._replace(path="dense")  # measured again: another Choice object
    assert not watch.observe(key, second, 1, 1e-3) and key not in watch.yardstick
    for _ in range(SETTLE - 1):
        watch.observe(key, second, 1, 1e-3)
    assert watch.yardstick[key] == 1.0


def test_first_calls_far_faster_than_the_measurement_retake_it_at_once():
    from gblr.kernels.choice import DRIFT, RETAKES, SETTLE, Choice, Cost, Watch

    # measured under a burst of load (10 ms) that has passed: the calls take 1 ms
    watch, key = Watch(), ("cpu", torch.float32, 1)
    retakes = 0
    for _ in range(RETAKES + 2):
        kept = Choice("dense", {"dense": 10e-3}, 1, {}, {"dense": Cost(10, 1)}, measured_in=1.0)
        flags = [watch.observe(key, kept, 1, 10e-3 / DRIFT / 5) for _ in range(SETTLE)]
        assert flags[:-1] == [False] * (SETTLE - 1)
        retakes += flags[-1]
    assert retakes == RETAKES == watch.remeasured[key]  # then it keeps the choice


def test_the_watch_confirms_a_choice_after_50_then_4x_more_calls():
    from gblr.kernels.choice import CONFIRM, Choice, Cost, Watch

    watch, key = Watch(), ("cpu", torch.float32, 4)
    kept = Choice("dense", {"dense": 1e-3}, 4, {}, {"dense": Cost(10, 1)})
    flags = [watch.observe(key, kept, 4, 1e-3) for _ in range(5 * CONFIRM)]
    assert [i + 1 for i, flag in enumerate(flags) if flag] == [CONFIRM, 4 * CONFIRM]
    assert watch.confirmed[key] == 2 and watch.remeasured[key] == 2


def test_the_watch_measures_again_only_once_the_calls_paid_for_the_measurement():
    from gblr.kernels.choice import CONFIRM, DRIFT, PAYBACK, SETTLE, STRIKES, Choice, Cost, Watch

    # a measurement of 20 ms for calls of 30 us (a decoder's layer): confirming after 50 calls would
    # spend more time timing than computing; it waits until the calls took PAYBACK x 20 ms
    watch, key = Watch(), ("cpu", torch.float32, 1)
    kept = Choice("dense", {"dense": 30e-6}, 1, {}, {"dense": Cost(10, 1)}, measured_in=0.02)
    calls_to_pay = round(PAYBACK * 0.02 / 30e-6)
    flags = [watch.observe(key, kept, 1, 30e-6) for _ in range(calls_to_pay + 10)]
    assert calls_to_pay > CONFIRM and flags.index(True) + 1 in (calls_to_pay, calls_to_pay + 1)
    # drifting calls count strikes but do not re-measure before the calls paid either
    watch, slow = Watch(), 30e-6 * DRIFT * 2
    for _ in range(SETTLE):
        watch.observe(key, kept, 1, 30e-6)
    assert not any(watch.observe(key, kept, 1, slow) for _ in range(STRIKES))
    assert watch.strikes[key] == STRIKES
    assert watch.observe(key, kept, 1, PAYBACK * 0.02)  # one call long enough to pay: now it does


def test_a_frozen_layer_measures_again_when_its_choice_drifts():
    from gblr.kernels.choice import PAYBACK, SETTLE, STRIKES

    torch.manual_seed(0)
    frozen = gblr.GBLRLinear(64, 96, init_flops_ratio=0.25).freeze()
    x = torch.randn(20, 64)
    with torch.no_grad():
        frozen(x)
    key = frozen.choice_key(20, x)
    first = frozen.choices[key]
    for _ in range(SETTLE - 1):  # the first calls set the yardstick
        frozen.observe(20, x, first.seconds[first.path])
    slow = max(1.0, PAYBACK * first.measured_in)  # far slower, and enough to pay for the measurement
    for _ in range(STRIKES):  # calls far slower than that, as when other processes take the cores
        frozen.observe(20, x, slow)
    assert key not in frozen.choices  # dropped: the next call measures again
    with torch.no_grad():
        y = frozen(x)
    assert key in frozen.choices and frozen.choices[key] is not first and frozen.watch.remeasured[key] == 1
    torch.testing.assert_close(y, frozen.run("reference", x) + frozen.bias)


def test_a_frozen_convolution_measures_again_when_its_choice_drifts():
    from gblr.kernels.choice import PAYBACK, SETTLE, STRIKES

    torch.manual_seed(0)
    frozen = gblr.GBLRConv2d(8, 8, 3, padding=1, init_flops_ratio=0.3).freeze()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        frozen(x)
    key = frozen.choice_key(x)
    first = frozen.choices[key]
    for _ in range(SETTLE - 1):
        frozen.observe_batch(x, first.seconds[first.path])
    for _ in range(STRIKES):
        frozen.observe_batch(x, max(1.0, PAYBACK * first.measured_in))
    assert key not in frozen.choices
    with torch.no_grad():
        frozen(x)
    assert key in frozen.choices and frozen.watch.remeasured[key] == 1


def test_a_layer_without_blocks_expects_its_measured_time():
    from gblr.kernels.choice import Choice, Cost

    kept = Choice("tiled", {"tiled": 2e-6}, 8, {}, {"tiled": Cost(0, 0)})  # nothing to compute, no calls
    assert kept.expected_seconds(16) == 2e-6
