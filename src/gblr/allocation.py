"""The budget allocation of :func:`gblr.convert_`: which FLOPs ratio each target layer gets.

``allocation="error"`` (the default). The layers share one MACs budget,
``flops_ratio * sum(m * n)`` over the targets that have no override. The best rank-``r``
approximation of layer ``l`` leaves a relative squared error ``e_l(r)``
(:func:`gblr.svd_error_curve`, activation-aware when calibrated); one more rank costs
``m + n`` MACs (:func:`gblr.flops.low_rank_macs`) and gains ``e_l(r) - e_l(r + 1)``. Every
layer starts at its floor rank (the largest rank within ``min_layer_ratio``, at least 1); then
rank steps are taken greedily in decreasing gain per MAC over all layers until the budget is
spent. Since each ``e_l`` is convex (its steps are the squared singular values, in decreasing
order), this minimises the sum over layers of the relative squared output errors (up to the one
step that does not fit at the end of the budget): layers whose error falls slowly with rank give
up budget to those where it falls fast. The last step of a layer goes from the largest rank
still cheaper than dense (:func:`gblr.flops.largest_cheaper_rank`) to the dense layer itself
(error 0); a layer that earns it is kept dense. The ranks set each layer's FLOPs ratio, the
cost of its rank over ``m * n``; the layer is then decomposed at that ratio by
:func:`gblr.decompose` (``method="gblr"``, which may spend it on a better GBLR structure than
low rank) or :func:`gblr.svd_decompose` (``method="svd"``, the baseline).
``allocation="uniform"``: every layer gets ``flops_ratio``.

Layers kept dense, with the reason in the report: a layer where even rank 1 costs as much as
dense (``m + n >= m * n``), a ratio of 1 (allocated or overridden), a weight tied to another
module (an output embedding shared with the input embedding, say). Kept-dense layers count at
their dense cost in the global ratio.
"""

from __future__ import annotations

import dataclasses
import heapq
import warnings
from collections.abc import Mapping

import torch

from .config import GBLRConfig
from .decompose import svd_error_curve
from .flops import largest_cheaper_rank, low_rank_macs, max_low_rank
from .stats import InputStats
from .targets import Target, name_matches

__all__ = ["GLOBAL_ALLOCATIONS", "FISHER_ALLOCATIONS", "Plan", "allocate_ranks", "plan_targets", "shares_budget"]

# The allocations that split one budget among the layers by their error curves.
GLOBAL_ALLOCATIONS = ("error", "fisher", "fisher-next-token")
# the allocations weighed by sensitivities -> the labels gblr.calibration.fisher_sensitivities judges them with
# (one of gblr.calibration.FISHER_LABELS)
FISHER_ALLOCATIONS = {"fisher": "sampled", "fisher-next-token": "next-token"}


def allocate_ranks(
    shapes: list[tuple[int, int]], curves: list[torch.Tensor], budget: float, floor_ratio: float
) -> list[int | None]:
    """Per layer of shape ``(m, n)``, the rank from greedy error-per-MAC allocation (module
    docstring) of ``budget`` MACs, or None where the layer should stay dense. ``curves[l][r]`` is
    layer ``l``'s relative squared error at rank ``r``. Every layer must have
    ``largest_cheaper_rank(m, n) >= 1``."""
    limits = [largest_cheaper_rank(m, n) for m, n in shapes]
    ranks = [max(1, min(limit, max_low_rank(floor_ratio * m * n, m, n))) for (m, n), limit in zip(shapes, limits)]
    dense = [False] * len(shapes)
    remaining = budget - sum(low_rank_macs(rank, m, n) for rank, (m, n) in zip(ranks, shapes))
    # Gains below this are rounding noise of the curve (relative squared error, float64).
    noise = 1e-12
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        (m, n), rank, curve = shapes[i], ranks[i], curves[i]
        if rank < limits[i]:
            gain, cost = float(curve[rank] - curve[rank + 1]), low_rank_macs(1, m, n)
        elif not dense[i]:
            gain, cost = float(curve[rank]), m * n - low_rank_macs(rank, m, n)
        else:
            return
        if gain > noise:
            heapq.heappush(heap, (-gain / cost, i, cost))

    for i in range(len(shapes)):
        push(i)
    while heap:
        _, i, cost = heapq.heappop(heap)
        if cost > remaining:
            continue  # this layer's next step never fits again: the remaining budget only shrinks
        remaining -= cost
        if ranks[i] < limits[i]:
            ranks[i] += 1
        else:
            dense[i] = True
        push(i)
    return [None if is_dense else rank for rank, is_dense in zip(ranks, dense)]


def _override(target: Target, config: GBLRConfig) -> float | None:
    """The ratio of the first ``config.overrides`` pattern matching ``target``, or None."""
    return next((ratio for pattern, ratio in config.overrides.items() if name_matches(target.names, pattern)), None)


def _kept_dense_reason(target: Target, tied: set[int]) -> str | None:
    """Why ``target`` stays dense whatever the budget (its weight is in ``tied``, or it is too
    small to gain), or None."""
    m, n = target.out_features, target.in_features
    if id(target.module.weight) in tied:
        return "weight tied to another module"
    if largest_cheaper_rank(m, n) < 1:
        return f"too small: rank 1 costs m+n={low_rank_macs(1, m, n)} >= m*n={m * n} MACs"
    return None


def shares_budget(target: Target, config: GBLRConfig, tied: set[int]) -> bool:
    """Whether ``target`` takes part in the error allocation (so :func:`plan_targets` needs its
    error curve): ``allocation="error"`` or ``"fisher"``, no override, not kept dense for a reason
    of its own."""
    return (config.allocation in GLOBAL_ALLOCATIONS and _override(target, config) is None
            and _kept_dense_reason(target, tied) is None)


@dataclasses.dataclass
class Plan:
    """What one target gets: its FLOPs ratio, or why it stays dense."""

    ratio: float  # allocated FLOPs ratio (1.0 when kept dense by the allocation)
    skipped: str | None = None
    decompose_ratio: float | None = None  # what decompose is asked for (a hair above ratio, see plan_targets)

    @property
    def requested_ratio(self) -> float:
        """The ratio to ask the decomposition for."""
        return self.ratio if self.decompose_ratio is None else self.decompose_ratio


def plan_targets(
    targets: list[Target],
    config: GBLRConfig,
    stats: Mapping[str, InputStats],
    tied: set[int],
    curves: Mapping[str, torch.Tensor] | None = None,
    sensitivities: Mapping[str, float] | None = None,
) -> dict[str, Plan]:
    """A :class:`Plan` per target name: overrides, layers kept dense (too small, weight in
    ``tied``), then the allocation ``config`` asks for over the rest, with the calibration
    ``stats`` (by target name) where there are some. ``curves`` (by target name) are error
    curves computed beforehand (:func:`gblr.svd_error_curve`; sequential calibration computes
    them block by block, so that no more than one block's statistics are held at a time); a
    target without one gets its curve from ``stats``. ``sensitivities`` (by target name, for
    ``allocation="fisher"``: :func:`gblr.calibration.fisher_sensitivities`) weigh each curve, so
    that the allocation minimises the sum of the predicted losses instead of the relative errors."""
    plans: dict[str, Plan] = {}
    pool: list[Target] = []  # the layers that share the global budget
    dense_macs = 0  # of the layers without override
    kept_dense_macs = 0  # of those, kept dense before allocation
    rank_one_macs = 0  # of those, what rank 1 costs in each of the others
    for target in targets:
        m, n = target.out_features, target.in_features
        override = _override(target, config)
        if override is None:
            dense_macs += m * n
        reason = _kept_dense_reason(target, tied)
        if reason is not None:
            plans[target.name] = Plan(1.0, reason)
            kept_dense_macs += m * n if override is None else 0
        elif override is not None:
            plans[target.name] = Plan(override, "override ratio 1" if override >= 1 else None)
        else:
            rank_one_macs += low_rank_macs(1, m, n)
            if config.allocation not in GLOBAL_ALLOCATIONS:
                plans[target.name] = Plan(config.flops_ratio, "flops_ratio 1" if config.flops_ratio >= 1 else None)
            else:
                pool.append(target)
    for pattern in config.overrides:
        if not any(name_matches(target.names, pattern) for target in targets):
            warnings.warn(f"overrides pattern {pattern!r} matches no target layer", stacklevel=3)
    # Where every layer gets at least rank 1 (the error allocation, or the SVD method), a smaller
    # ratio cannot be met: say so instead of returning more than was asked for. (Uniform GBLR
    # spends small ratios on partial blocks; convert_ warns about layers left empty.)
    reachable = (rank_one_macs + kept_dense_macs) / dense_macs if dense_macs else 0.0
    if config.flops_ratio < reachable and (config.allocation in GLOBAL_ALLOCATIONS or config.method == "svd"):
        warnings.warn(
            f"flops_ratio={config.flops_ratio:g} is below the smallest ratio the targeted layers can reach, "
            f"{reachable:.4g} of their dense MACs (one rank-1 component each; layers kept dense at their dense cost), "
            "which is about what they get",
            stacklevel=3,
        )
    if not pool:
        return plans
    shapes = [(target.out_features, target.in_features) for target in pool]
    given = {} if curves is None else curves
    curves = []
    for target in pool:
        if target.name in given:
            curves.append(given[target.name])
            continue
        try:
            curves.append(svd_error_curve(target.float_weight(), stats.get(target.name)))
        except ValueError as error:
            raise ValueError(f"layer {target.name!r}: {error}") from error
    if sensitivities is not None:  # relative to the most sensitive layer (allocate_ranks' noise floor is absolute)
        top = max((sensitivities.get(target.name, 0.0) for target in pool), default=0.0)
        if top > 0:
            curves = [curve * (sensitivities.get(target.name, 0.0) / top) for curve, target in zip(curves, pool)]
    budget = config.flops_ratio * dense_macs - kept_dense_macs
    ranks = allocate_ranks(shapes, curves, budget, config.floor_ratio)
    for target, (m, n), rank in zip(pool, shapes, ranks):
        if rank is None:
            plans[target.name] = Plan(1.0, "allocation: dense is cheaper than the rank it earned")
        else:
            # Half a MAC above the rank's cost, so that decompose's rank rounding cannot lose the last rank.
            macs = low_rank_macs(rank, m, n)
            plans[target.name] = Plan(macs / (m * n), None, (macs + 0.5) / (m * n))
    return plans
