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
3. **Watch.** Each call on the CPU is timed (two clock reads) and compared with what the choice's
   measurement predicts for its token count (scaled by the cost model). A choice whose calls run
   :data:`DRIFT` times slower or faster than that, :data:`STRIKES` calls in a row, is dropped and
   measured again on the next call (the load changed since it was made); each further
   re-measurement of the same key needs twice as many such calls in a row, so a machine whose
   load keeps changing does not pay for timing on every call. A choice is also confirmed by a
   new measurement after :data:`CONFIRM` calls, then after 4x as many each time: a choice made
   during a burst of load that has since passed cannot stand for long, and the timing costs a
   vanishing share of the calls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import segmented

__all__ = ["KERNELS", "MEASURED_PATHS", "CALL_MACS", "PLAUSIBLE", "DRIFT", "STRIKES", "CONFIRM", "Cost", "Choice",
           "Watch", "measured_paths", "choice_key", "measure", "predicted_cost", "plausible_paths", "choose"]

CALL_MACS = 2**18  # what one kernel call costs on the CPU, in MACs of arithmetic (about 5-10 us)
PLAUSIBLE = 3.0  # paths predicted to cost more than this times the cheapest are not timed
DRIFT = 2.0  # a call this much slower or faster than its measurement predicts counts as a strike
STRIKES = 3  # strikes in a row before a choice is measured again (doubling with each re-measurement)
CONFIRM = 50  # calls after which a choice is measured again, then 4x as many each time


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
    equivalents, :func:`predicted_cost`) and each candidate's :class:`Cost` model."""

    path: str
    seconds: dict[str, float]
    tokens: int
    predicted: dict[str, float]
    costs: dict[str, Cost]

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

KERNELS = ("auto", "reference", "tiled", "tiled-coarse", "tiled-batched", "stacked", "triton", "dense")
MEASURED_PATHS = ("tiled", "tiled-coarse", "tiled-batched", "stacked", "dense")  # what kernel="auto" chooses from


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
    path, seconds = measure(run, plausible_paths(predicted), x)
    return Choice(path, seconds, tokens, predicted, dict(costs))


class Watch:
    """Counts, per choice key, the calls and the calls in a row that ran :data:`DRIFT` times
    slower or faster than their choice predicts, and says when to measure again (see the module
    docstring). ``remeasured`` counts the re-measurements per key, ``confirmed`` those after
    :data:`CONFIRM` calls (times a power of 4)."""

    def __init__(self) -> None:
        self.strikes: dict[tuple, int] = {}
        self.calls: dict[tuple, int] = {}
        self.confirmed: dict[tuple, int] = {}
        self.remeasured: dict[tuple, int] = {}

    def observe(self, key: tuple, choice: Choice, tokens: int, seconds: float) -> bool:
        """Record one call of ``choice`` over ``tokens`` rows that took ``seconds``; True when the
        choice should be dropped and measured again."""
        calls = self.calls[key] = self.calls.get(key, 0) + 1
        if calls >= CONFIRM * 4 ** self.confirmed.get(key, 0):
            self.confirmed[key] = self.confirmed.get(key, 0) + 1
            self.remeasured[key] = self.remeasured.get(key, 0) + 1
            self.strikes[key] = 0
            return True
        expected = choice.expected_seconds(tokens) if tokens > 0 else 0.0
        if expected <= 0.0:
            return False
        ratio = seconds / expected
        if 1.0 / DRIFT <= ratio <= DRIFT:
            self.strikes[key] = 0
            return False
        self.strikes[key] = self.strikes.get(key, 0) + 1
        if self.strikes[key] < STRIKES * 2 ** self.remeasured.get(key, 0):
            return False
        self.strikes[key] = 0
        self.remeasured[key] = self.remeasured.get(key, 0) + 1
        return True
