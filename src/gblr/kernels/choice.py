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
3. **Watch.** Each call on the CPU is timed (two clock reads). A choice whose calls run
   :data:`DRIFT` times slower or faster per token than it was measured, :data:`STRIKES` calls in a
   row, is dropped and measured again on the next call (the load changed since it was made); each
   further re-measurement of the same key needs twice as many such calls in a row, so a machine
   whose load keeps changing does not pay for timing on every call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import segmented

__all__ = ["KERNELS", "MEASURED_PATHS", "CALL_MACS", "PLAUSIBLE", "DRIFT", "STRIKES", "Choice", "Watch",
           "measured_paths", "choice_key", "measure", "predicted_cost", "plausible_paths", "choose"]

CALL_MACS = 2**18  # what one kernel call costs on the CPU, in MACs of arithmetic (about 5-10 us)
PLAUSIBLE = 3.0  # paths predicted to cost more than this times the cheapest are not timed
DRIFT = 4.0  # a call this much slower or faster per token than measured counts as a strike
STRIKES = 3  # strikes in a row before a choice is measured again (doubling with each re-measurement)


class Choice(NamedTuple):
    """A kept choice: the ``path``, the ``seconds`` of each timed path (best round), the
    ``tokens`` of the input it was timed on and the ``predicted`` cost of every candidate (MAC
    equivalents, :func:`predicted_cost`)."""

    path: str
    seconds: dict[str, float]
    tokens: int
    predicted: dict[str, float]


def predicted_cost(macs_per_token: float, calls: int, tokens: int, device_type: str = "cpu") -> float:
    """A path's predicted cost in MAC equivalents: its (padded) MACs over ``tokens`` tokens plus
    :data:`CALL_MACS` per kernel call (on CUDA, where the calls are queued, only the MACs)."""
    return macs_per_token * tokens + (calls * CALL_MACS if device_type == "cpu" else 0)


def plausible_paths(predicted: dict[str, float], always: tuple[str, ...] = ("dense",)) -> tuple[str, ...]:
    """The paths predicted within :data:`PLAUSIBLE` of the cheapest, and those in ``always``, in
    the order of ``predicted``."""
    best = min(predicted.values())
    return tuple(path for path, cost in predicted.items() if cost <= PLAUSIBLE * best or path in always)

KERNELS = ("auto", "reference", "tiled", "tiled-coarse", "tiled-batched", "triton", "dense")
MEASURED_PATHS = ("tiled", "tiled-coarse", "tiled-batched", "dense")  # what kernel="auto" chooses from


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


def choose(run: Callable[[str, torch.Tensor], object], predicted: dict[str, float], x: torch.Tensor,
           tokens: int) -> Choice:
    """Time the plausible paths of ``predicted`` (:func:`plausible_paths`) on ``x`` and return the
    :class:`Choice` of the fastest."""
    path, seconds = measure(run, plausible_paths(predicted), x)
    return Choice(path, seconds, tokens, dict(predicted))


class Watch:
    """Counts, per choice key, the calls in a row that ran :data:`DRIFT` times slower or faster
    per token than their choice was measured, and says when to measure again (see the module
    docstring). ``remeasured`` counts the re-measurements per key."""

    def __init__(self) -> None:
        self.strikes: dict[tuple, int] = {}
        self.remeasured: dict[tuple, int] = {}

    def observe(self, key: tuple, choice: Choice, tokens: int, seconds: float) -> bool:
        """Record one call of ``choice`` over ``tokens`` rows that took ``seconds``; True when the
        choice should be dropped and measured again."""
        expected = choice.seconds.get(choice.path, 0.0) / max(1, choice.tokens)
        if expected <= 0.0 or tokens <= 0:
            return False
        ratio = seconds / tokens / expected
        if 1.0 / DRIFT <= ratio <= DRIFT:
            self.strikes[key] = 0
            return False
        self.strikes[key] = self.strikes.get(key, 0) + 1
        if self.strikes[key] < STRIKES * 2 ** self.remeasured.get(key, 0):
            return False
        self.strikes[key] = 0
        self.remeasured[key] = self.remeasured.get(key, 0) + 1
        return True
