"""What the baseline layers share: the base class (shape, bias, cost ratio, repr), their
initialisation scale, and the arithmetic of ``at_flops_ratio`` (the MAC budget, the candidate
structures and the choice among them)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .._validation import check_positive_int

__all__ = [
    "FACTOR_GAIN", "StructuredLinear", "add_bias", "check_divides", "closest_within", "common_divisors",
    "init_bias_", "macs_budget",
]

# Each factor of a two-factor product is drawn uniform in +-FACTOR_GAIN / sqrt(its fan-in), i.e.
# with variance 1 / (sqrt(3) * fan_in). An entry of the product sums `paths` such terms, so its
# variance is paths / (3 * fan_in_left * fan_in_right); both product layers (low-rank, Monarch)
# have, on average, paths = fan_in_left * fan_in_right / in_features, which gives nn.Linear's
# 1 / (3 * in_features).
FACTOR_GAIN = 3.0**0.25


def check_divides(name: str, value: int, **dims: int) -> None:
    """Raise a ValueError naming ``name`` and the dimension unless ``value`` divides every one of
    ``dims`` (e.g. ``check_divides("grid", 4, in_features=10)``)."""
    for dim_name, dim in dims.items():
        if dim % value:
            raise ValueError(f"{name}={value} must divide {dim_name}={dim}")


def macs_budget(in_features: int, out_features: int, flops_ratio: float) -> int:
    """Largest MAC count allowed at ``flops_ratio``.

    The relative slack absorbs float rounding of the product, so that e.g. ratio 0.3 admits
    exactly ``3/10`` of the dense cost (``0.3`` is stored slightly below 3/10) but never a whole
    extra MAC.
    """
    return math.floor(flops_ratio * in_features * out_features * (1 + 1e-9))


def common_divisors(a: int, b: int, limit: int | None = None) -> list[int]:
    """The common divisors of ``a`` and ``b`` (up to ``limit``), ascending: the block counts that
    split both sides of a weight into equal blocks."""
    g = math.gcd(a, b)
    top = g if limit is None else min(g, limit)
    return [d for d in range(1, top + 1) if g % d == 0]


def closest_within(candidates: Iterable[tuple[int, object, object]], budget: int):
    """The choice of the ``(macs, preference, choice)`` candidate with the most MACs not above
    ``budget`` (ties: smallest ``preference``); if every candidate is above, the cheapest one."""
    candidates = list(candidates)
    within = [c for c in candidates if c[0] <= budget]
    if within:
        return min(within, key=lambda c: (-c[0], c[1]))[2]
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def init_bias_(bias: torch.Tensor | None, in_features: int) -> None:
    """nn.Linear's bias init (uniform in ``+-1/sqrt(in_features)``), in place; no-op for None."""
    if bias is not None:
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(bias, -bound, bound)


def add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


class StructuredLinear(nn.Module):
    """Shared plumbing: shape attributes, bias, the cost ratio and the repr.

    Subclasses call :meth:`_init_shape_and_bias` first in ``__init__`` and implement ``flops()``
    (MACs per input vector) and ``_structure_repr()`` (their structure, for the repr).
    """

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def _init_shape_and_bias(self, in_features: int, out_features: int, bias: bool, factory: dict) -> None:
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)

    def flops(self) -> int:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def flops_ratio(self) -> float:
        """MACs per input vector relative to a dense ``nn.Linear`` of the same shape."""
        return self.flops() / (self.in_features * self.out_features)

    def _structure_repr(self) -> str:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self._structure_repr()}, flops_ratio={self.flops_ratio():.3f}"
        )
