"""The low-rank baseline: ``W = U @ V``, the structure GBLR contains as its one-block case."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._validation import check_flops_ratio, check_input, check_positive_int
from ..flops import low_rank_macs, max_low_rank
from .common import FACTOR_GAIN, StructuredLinear, add_bias, init_bias_, macs_budget

__all__ = ["LowRankLinear"]


class LowRankLinear(StructuredLinear):
    """``y = (x @ v.T) @ u.T + b`` with ``v (rank, in_features)`` and ``u (out_features, rank)``.

    Costs ``rank * (in_features + out_features)`` MACs per input vector. Both factors are
    initialised uniform in ``+-3**(1/4) / sqrt(fan_in)`` (``in_features`` for ``v``, ``rank``
    for ``u``), so that every entry of ``u @ v`` has nn.Linear's variance ``1 / (3 in_features)``
    and the two factors share the scale instead of one of them carrying it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_shape_and_bias(in_features, out_features, bias, factory)
        self.rank = check_positive_int("rank", rank)
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.reset_parameters()

    @classmethod
    def at_flops_ratio(
        cls,
        in_features: int,
        out_features: int,
        flops_ratio: float,
        bias: bool = True,
        device=None,
        dtype=None,
        **kwargs,
    ) -> "LowRankLinear":
        """The largest rank whose cost does not exceed ``flops_ratio * in * out`` (at least 1).

        ``kwargs`` go to the constructor.
        """
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        budget = macs_budget(in_features, out_features, check_flops_ratio(flops_ratio))
        rank = max(1, max_low_rank(budget, out_features, in_features))
        return cls(in_features, out_features, rank, bias=bias, device=device, dtype=dtype, **kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound_v, bound_u = FACTOR_GAIN / math.sqrt(self.in_features), FACTOR_GAIN / math.sqrt(self.rank)
        nn.init.uniform_(self.v, -bound_v, bound_v)
        nn.init.uniform_(self.u, -bound_u, bound_u)
        init_bias_(self.bias, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix ``u @ v`` (differentiable)."""
        return self.u @ self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        return add_bias((x @ self.v.T) @ self.u.T, self.bias)

    def flops(self) -> int:
        return low_rank_macs(self.rank, self.out_features, self.in_features)

    def _structure_repr(self) -> str:
        return f"rank={self.rank}"
