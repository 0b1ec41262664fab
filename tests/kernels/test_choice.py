"""The path timer of kernel="auto" (gblr.kernels.choice): fastest path wins, buckets of tokens."""

import time

import torch

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
