"""Choosing a frozen layer's inference path by timing it (``FrozenGBLRLinear(kernel="auto")``).

Every path computes the same product; which one is fastest depends on the structure, the
machine and the number of tokens. :func:`measure` times the candidates on a real input, in
interleaved rounds so that drifting machine load hits all of them alike; the choice is kept per
device, dtype and power-of-two bucket of token counts (:func:`choice_key`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from . import segmented

__all__ = ["KERNELS", "MEASURED_PATHS", "measured_paths", "choice_key", "measure"]

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
