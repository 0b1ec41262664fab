"""The Monarch baseline: two block-diagonal factors with a fixed permutation between them."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._validation import check_flops_ratio, check_input, check_positive_int
from ..flops import low_rank_macs, max_low_rank
from .common import (
    FACTOR_GAIN,
    StructuredLinear,
    add_bias,
    check_divides,
    closest_within,
    common_divisors,
    init_bias_,
    macs_budget,
)

__all__ = ["MonarchLinear"]


class MonarchLinear(StructuredLinear):
    """A Monarch matrix ``W = L @ P @ R``: block-diagonal ``R``, a fixed permutation ``P``,
    block-diagonal ``L``.

    With ``q = inner / nblocks``:

    * ``R`` has ``nblocks`` blocks ``right[i] (q, in_features / nblocks)``: block ``i`` maps the
      ``i``-th slice of the input to the ``i``-th slice of the ``inner``-wide intermediate;
    * ``P`` views the intermediate as ``(nblocks, q)``, transposes it to ``(q, nblocks)`` and
      flattens it, so that every slice of the permuted intermediate draws on every block of ``R``
      in turn (position ``t * nblocks + i`` holds feature ``t`` of block ``i``);
    * ``L`` has ``nblocks`` blocks ``left[j] (out_features / nblocks, q)``: block ``j`` maps the
      ``j``-th ``q``-wide slice of the permuted intermediate to the ``j``-th output slice.

    Cost: ``inner * (in + out) / nblocks = q * (in + out)`` MACs per input vector, the cost of a
    rank-``q`` product; ``nblocks`` decides how those MACs are spread. The ``(j, i)`` block of the
    dense weight (``out/nblocks x in/nblocks``) is a sum of as many rank-1 terms as there are
    positions ``t * nblocks + i`` (``0 <= t < q``) in slice ``j``: ``q / nblocks`` of them when
    ``nblocks`` divides ``q``, and zero or one when ``q < nblocks`` (a block-sparse weight).

    Both factors are initialised uniform in ``+-3**(1/4) / sqrt(fan_in)``; as a block of the
    dense weight has ``q / nblocks`` terms on average, its entries have nn.Linear's variance
    ``1 / (3 in_features)`` on average.

    Computed with two batched matmuls over the blocks, never with a dense masked matrix.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int,
        inner: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_shape_and_bias(in_features, out_features, bias, factory)
        self.nblocks = check_positive_int("nblocks", nblocks)
        self.inner = check_positive_int("inner", inner)
        check_divides("nblocks", nblocks, in_features=in_features, out_features=out_features, inner=inner)
        q = inner // nblocks
        self.right = nn.Parameter(torch.empty(nblocks, q, in_features // nblocks, **factory))
        self.left = nn.Parameter(torch.empty(nblocks, out_features // nblocks, q, **factory))
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
        *,
        nblocks: int | None = None,
        **kwargs,
    ) -> "MonarchLinear":
        """``nblocks`` and ``inner`` whose cost is the largest not above ``flops_ratio * in * out``.

        ``nblocks`` ranges over the common divisors of ``in_features`` and ``out_features`` (or
        is the given one), ``inner`` over its multiples. The cost ``(inner / nblocks) * (in +
        out)`` does not depend on ``nblocks``, so among equally cheap candidates the one with
        ``nblocks`` closest to ``sqrt(min(in, out))`` wins (the square Monarch shape: blocks
        about as wide as they are many; ties go to more blocks). ``kwargs`` go to the constructor.
        """
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        budget = macs_budget(in_features, out_features, check_flops_ratio(flops_ratio))
        if nblocks is None:
            choices = common_divisors(in_features, out_features)
        else:
            check_positive_int("nblocks", nblocks)
            check_divides("nblocks", nblocks, in_features=in_features, out_features=out_features)
            choices = [nblocks]
        target = math.sqrt(min(in_features, out_features))
        # q = inner / nblocks costs what a rank-q product does, whatever nblocks is.
        q = max(1, max_low_rank(budget, out_features, in_features))
        macs = low_rank_macs(q, out_features, in_features)
        candidates = [(macs, (abs(nb - target), -nb), (nb, q * nb)) for nb in choices]
        nb, inner = closest_within(candidates, budget)
        return cls(in_features, out_features, nb, inner, bias=bias, device=device, dtype=dtype, **kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        fan_right, fan_left = self.right.shape[-1], self.left.shape[-1]
        nn.init.uniform_(self.right, -FACTOR_GAIN / math.sqrt(fan_right), FACTOR_GAIN / math.sqrt(fan_right))
        nn.init.uniform_(self.left, -FACTOR_GAIN / math.sqrt(fan_left), FACTOR_GAIN / math.sqrt(fan_left))
        init_bias_(self.bias, self.in_features)

    def permutation(self) -> torch.Tensor:
        """``perm`` with ``permuted_intermediate = intermediate[..., perm]``."""
        q = self.inner // self.nblocks
        return torch.arange(self.inner, device=self.right.device).view(self.nblocks, q).T.reshape(-1)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix ``L @ P @ R`` (differentiable).

        Built from the definition (block-diagonal matrices and a permutation index), a separate
        path from :meth:`forward`'s reshapes.
        """
        right = torch.block_diag(*self.right.unbind(0))  # (inner, in)
        left = torch.block_diag(*self.left.unbind(0))  # (out, inner)
        return left @ right[self.permutation()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        nb, q = self.nblocks, self.inner // self.nblocks
        lead = x.shape[:-1]
        h = torch.einsum("nbi,bqi->nbq", x.reshape(-1, nb, self.in_features // nb), self.right)
        # The Monarch permutation: (nb, q) -> (q, nb), flattened, then cut into nb slices of q.
        h = h.transpose(1, 2).reshape(-1, nb, q)
        y = torch.einsum("nbq,boq->nbo", h, self.left)
        return add_bias(y.reshape(*lead, self.out_features), self.bias)

    def flops(self) -> int:
        # inner is a multiple of nblocks (checked), so this is inner * (in + out) / nblocks exactly.
        return low_rank_macs(self.inner // self.nblocks, self.out_features, self.in_features)

    def _structure_repr(self) -> str:
        return f"nblocks={self.nblocks}, inner={self.inner}"
