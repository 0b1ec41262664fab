"""Shared helpers for the benchmark scripts: interleaved timing, machine description, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gblr._files import write_text_atomic

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} threads used), {device}, torch {torch.__version__}"


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    before: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Run each candidate ``repeats`` times, alternating between them so that drift in machine
    load hits all of them alike; returns the seconds of every run. ``before`` runs untimed before
    every timed call (e.g. :func:`evict_caches`)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if before is not None:
                before()
                sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return samples


_EVICTION_BUFFER: list[torch.Tensor] = []


def evict_caches() -> None:
    """Write 64 MB, more than this machine's caches hold, so that the next call reads its weights
    from memory, as a layer inside a model does (the other layers evicted them since its last
    call). Without it, two candidates timed in turn both run from cache."""
    if not _EVICTION_BUFFER:
        _EVICTION_BUFFER.append(torch.empty(16 * 2**20))
    _EVICTION_BUFFER[0].fill_(1.0)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def write_outputs(name: str, rows: list[dict], markdown: str) -> tuple[Path, Path]:
    """Write ``docs/benchmarks/<name>.json`` and ``.md`` atomically."""
    DOCS.mkdir(parents=True, exist_ok=True)
    paths = (DOCS / f"{name}.json", DOCS / f"{name}.md")
    contents = (json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n", markdown)
    for path, text in zip(paths, contents):
        write_text_atomic(path, text)
    return paths
