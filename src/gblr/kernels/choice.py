"""Choosing a frozen layer's inference path (``kernel="auto"``): a cost model, timing, a watch.

Every path computes the same product; which one is fastest depends on the structure, the
machine, its load and the number of tokens. Three steps, so that a choice also behaves when other
processes share the cores:

1. **Cost model.** Each path's cost is predicted in MAC equivalents: its padded MACs per token
   times the tokens, plus a fixed price per kernel call (:data:`CALL_MACS`). Only the paths
   predicted within :data:`PLAUSIBLE` of the cheapest are timed, and the dense path always is:
   under load, multi-GEMM paths slow down far more than one large GEMM, and a path the model
   rules out can no longer win by a lucky measurement.
2. **Timing.** :func:`measure` times the plausible paths on a real input, in interleaved rounds
   so that drifting machine load hits all of them alike, and keeps the fastest as a
   :class:`Choice`, per device, dtype and power-of-two bucket of token counts (:func:`choice_key`).
3. **Watch.** Each call on the CPU is timed (two clock reads) and compared with what its choice's
   first calls took (:data:`SETTLE` of them, scaled to its token count by the cost model). The
   first calls, not the measurement itself, are the yardstick: a layer timed alone keeps its
   weights in cache, and inside a model (a decoder reading 500 MB of weights per token) the same
   call can run 3-5x slower for as long as the model runs; that is no change of load. A choice
   whose calls run :data:`DRIFT` times slower or faster than the yardstick, :data:`STRIKES` calls
   in a row, is dropped and measured again on the next call (the load changed since it was
   made); each further re-measurement of the same key needs twice as many such calls in a row. A
   choice is also confirmed by a new measurement after :data:`CONFIRM` calls, then after 4x as
   many each time. Neither happens before the calls since the choice have taken :data:`PAYBACK`
   times as long as its measurement did, so timing stays a small share of the run (a
   measurement takes at least 20 ms; a decoder's layer call can take 30 us). One exception: first
   calls that run :data:`DRIFT` times *faster* than the measurement say that it was taken under a
   burst of load that has passed (out of cache, calls only get slower): the choice is measured
   again at once, at most :data:`RETAKES` times per key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import segmented

__all__ = ["KERNELS", "MEASURED_PATHS", "CALL_MACS", "PLAUSIBLE", "DRIFT", "STRIKES", "CONFIRM", "SETTLE", "PAYBACK",
           "RETAKES", "Cost", "Choice", "Watch", "measured_paths", "choice_key", "measure", "predicted_cost",
           "plausible_paths", "choose"]

CALL_MACS = 2**18  # what one kernel call costs on the CPU, in MACs of arithmetic (about 5-10 us)
PLAUSIBLE = 3.0  # paths predicted to cost more than this times the cheapest are not timed
DRIFT = 2.0  # a call this much slower or faster than its yardstick (first calls) counts as a strike
STRIKES = 3  # strikes in a row before a choice is measured again (doubling with each re-measurement)
CONFIRM = 50  # calls after which a choice is measured again, then 4x as many each time
SETTLE = 3  # a choice's first calls, whose median time is the yardstick of the later ones
PAYBACK = 20  # a choice is measured again only once its calls have taken this many times its measurement
RETAKES = 3  # re-measurements at once per key, when the first calls run far faster than the measurement


class Cost(NamedTuple):
    """A path's cost model: padded MACs per token and kernel calls per forward pass."""

    macs_per_token: float
    calls: int
    device_type: str = "cpu"

    def at(self, tokens: int) -> float:
        """The predicted cost over ``tokens`` tokens, in MAC equivalents (:func:`predicted_cost`)."""
        return predicted_cost(self.macs_per_token, self.calls, tokens, self.device_type)


class Choice(NamedTuple):
    """A kept choice: the ``path``, the ``seconds`` of each timed path (best round), the
    ``tokens`` of the input it was timed on, the ``predicted`` cost of every candidate there (MAC
    equivalents, :func:`predicted_cost`), each candidate's :class:`Cost` model and the seconds
    the measurement took (``measured_in``)."""

    path: str
    seconds: dict[str, float]
    tokens: int
    predicted: dict[str, float]
    costs: dict[str, Cost]
    measured_in: float = 0.0

    def expected_seconds(self, tokens: int) -> float:
        """What a call of the chosen path over ``tokens`` tokens should take, from its measured
        time scaled by its cost model."""
        cost = self.costs[self.path]
        base = cost.at(self.tokens)
        if base <= 0:  # nothing to compute (a layer without blocks): the measured time stands
            return self.seconds[self.path]
        return self.seconds[self.path] * cost.at(tokens) / base


def predicted_cost(macs_per_token: float, calls: int, tokens: int, device_type: str = "cpu") -> float:
    """A path's predicted cost in MAC equivalents: its (padded) MACs over ``tokens`` tokens plus
    :data:`CALL_MACS` per kernel call (on CUDA, where the calls are queued, only the MACs)."""
    return macs_per_token * tokens + (calls * CALL_MACS if device_type == "cpu" else 0)


def plausible_paths(predicted: dict[str, float], always: tuple[str, ...] = ("dense",)) -> tuple[str, ...]:
    """The paths predicted within :data:`PLAUSIBLE` of the cheapest, and those in ``always``, in
    the order of ``predicted``."""
    best = min(predicted.values())
    return tuple(path for path, cost in predicted.items() if cost <= PLAUSIBLE * best or path in always)

KERNELS = ("auto", "reference", "tiled", "tiled-coarse", "tiled-batched", "stacked", "stacked-t", "triton", "dense",
           "dense-t")
# what kernel="auto" chooses from ("-t": the same products on long-row storage, kernels.tiled.LongRows)
MEASURED_PATHS = ("tiled", "tiled-coarse", "tiled-batched", "stacked", "stacked-t", "dense", "dense-t")


def measured_paths(x: torch.Tensor) -> tuple[str, ...]:
    """The paths ``kernel="auto"`` times for inputs like ``x``: :data:`MEASURED_PATHS`, and on
    CUDA with Triton installed the Triton kernel too."""
    return MEASURED_PATHS + (("triton",) if x.is_cuda and segmented.available() else ())


def choice_key(tokens: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """The key under which a choice for ``tokens`` rows on ``device`` in ``dtype`` is kept:
    device type, dtype and the power-of-two bucket of the token count."""
    return device.type, dtype, 1 << max(0, int(tokens) - 1).bit_length()


def measure(run: Callable[[str, torch.Tensor], object], paths: tuple[str, ...], x: torch.Tensor,
            repeats: int = 5, budget: float = 0.02) -> tuple[str, dict[str, float]]:
    """Time ``run(path, x)`` for each of ``paths``: one warm-up each, then rounds in turn, at
    least ``repeats`` and until ``budget`` seconds have passed (at most 50 rounds: fast calls are
    noisy), the best time of each. Returns the fastest path and the seconds per path."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for path in paths:
        run(path, x)  # warm up (and pack)
    seconds = dict.fromkeys(paths, math.inf)
    began = time.perf_counter()
    for round_ in range(50):
        if round_ >= repeats and time.perf_counter() - began >= budget:
            break
        for path in paths:
            sync()
            start = time.perf_counter()
            run(path, x)
            sync()
            seconds[path] = min(seconds[path], time.perf_counter() - start)
    return min(seconds, key=seconds.get), seconds


def choose(run: Callable[[str, torch.Tensor], object], costs: dict[str, Cost], x: torch.Tensor,
           tokens: int) -> Choice:
    """Time the plausible paths among ``costs`` (:func:`plausible_paths` of their predictions over
    ``tokens`` tokens) on ``x`` and return the :class:`Choice` of the fastest."""
    predicted = {path: cost.at(tokens) for path, cost in costs.items()}
    began = time.perf_counter()
    path, seconds = measure(run, plausible_paths(predicted), x)
    return Choice(path, seconds, tokens, predicted, dict(costs), time.perf_counter() - began)


class Watch:
    """Counts, per choice key, the calls of its current choice, the seconds they took, their
    yardstick (the median ratio of the first :data:`SETTLE` calls' time to what the measurement
    predicts) and the calls in a row that ran :data:`DRIFT` times slower or faster than the
    yardstick, and says when to measure again (see the module docstring). ``remeasured`` counts
    the re-measurements per key, ``confirmed`` those after :data:`CONFIRM` calls (times a power
    of 4)."""

    def __init__(self) -> None:
        self.strikes: dict[tuple, int] = {}
        self.calls: dict[tuple, int] = {}
        self.confirmed: dict[tuple, int] = {}
        self.remeasured: dict[tuple, int] = {}
        self.watched: dict[tuple, Choice] = {}  # the choice the counts below belong to
        self.spent: dict[tuple, float] = {}  # seconds of its calls
        self.first: dict[tuple, list[float]] = {}  # its first calls' time over the predicted time
        self.yardstick: dict[tuple, float] = {}

    def observe(self, key: tuple, choice: Choice, tokens: int, seconds: float) -> bool:
        """Record one call of ``choice`` over ``tokens`` rows that took ``seconds``; True when the
        choice should be dropped and measured again."""
        if self.watched.get(key) is not choice:  # a new choice: a new yardstick, nothing spent yet
            self.watched[key], self.spent[key], self.first[key], self.strikes[key] = choice, 0.0, [], 0
            self.yardstick.pop(key, None)
        calls = self.calls[key] = self.calls.get(key, 0) + 1
        spent = self.spent[key] = self.spent[key] + seconds
        paid = spent >= PAYBACK * choice.measured_in
        if calls >= CONFIRM * 4 ** self.confirmed.get(key, 0) and paid:
            self.confirmed[key] = self.confirmed.get(key, 0) + 1
            return self._again(key)
        expected = choice.expected_seconds(tokens) if tokens > 0 else 0.0
        if expected <= 0.0:
            return False
        if key not in self.yardstick:
            self.first[key].append(seconds / expected)
            if len(self.first[key]) == SETTLE:
                self.yardstick[key] = max(sorted(self.first[key])[SETTLE // 2], 1e-9)
                if self.yardstick[key] < 1.0 / DRIFT and self.remeasured.get(key, 0) < RETAKES:
                    return self._again(key)  # measured under a burst of load that has passed
            return False
        ratio = seconds / (expected * self.yardstick[key])
        if 1.0 / DRIFT <= ratio <= DRIFT:
            self.strikes[key] = 0
            return False
        self.strikes[key] += 1
        if self.strikes[key] < STRIKES * 2 ** self.remeasured.get(key, 0) or not paid:
            return False
        return self._again(key)

    def _again(self, key: tuple) -> bool:
        """Count a re-measurement of ``key``'s choice: True, for :meth:`observe` to return."""
        self.remeasured[key] = self.remeasured.get(key, 0) + 1
        self.strikes[key] = 0
        return True
