"""Learning GBLR structures in a plain PyTorch loop (docs/method.md section 4).

    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-3, struct_lr=1e-3))
    learner = gblr.StructureLearner(model, optimizer, flops_target=0.3, total_steps=steps)
    for x, y in batches:
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()
        learner.step()          # proximal width step, location wrap, sigma, budget
    gblr.freeze_(model)

The objective is task loss + lambda * cost, where cost is the MAC count of all GBLR layers as
a function of the real-valued widths: component ``k`` with ``a = n * in_width_k`` and
``b = m * out_width_k`` elements costs ``min(r * (a + b), a * b)`` (docs/method.md section 2: two thin
products, or one dense block where that is cheaper). For rank 1 this is the sum of widths of
docs/method.md section 4, each weighted by the MACs it buys; for components of higher rank, small blocks
cost their area, so learning can choose full-rank blocks as well as low-rank bands. It is
solved by proximal gradient descent: after the optimizer step on the task loss, every width
shrinks by ``lr_struct * lambda * weight``, where ``weight`` is the slope of the cost in that
width at the current point (normalised so that a square rank-1 layer's widths weigh 1), and is
clipped to [0, 1].

The proximal step is taken in the optimizer's own metric: for Adam-type optimizers the shrink
is divided by the same ``sqrt(v_hat)`` that scales the width's gradient step. Without this,
Adam's per-parameter normalisation makes every width's gradient step about ``lr_struct`` long
whatever its size, so a width that barely matters resists the shrinkage as well as one that
matters a lot. In the shared metric a width settles where ``|d loss / d width| = lambda *
weight``: every width, in every layer, buys the same loss reduction per MAC, which is the
optimality condition of spending a global budget.

Users think in FLOPs, not in lambda. Each step the learner picks the smallest lambda >= 0 whose
proximal step puts the *global* FLOPs ratio of the GBLR layers (each weighted by its dense
size; a convolution also by its output pixels, :meth:`StructureLearner.layer_weights`) on a
trajectory from the initial ratio to ``flops_target`` (found by bisection on a cheap
element-count estimate of the cost, calibrated against the exact count). Below the trajectory
lambda is 0 and the optimizer may widen blocks, but not narrow them: each width is kept at
least where the last structural step left it. Without that floor the ratio drifts under the
target, because the task gradient alone narrows blocks steadily. The floor is preferred to
forcing the ratio back up with a negative lambda: in the optimizer's metric such growth goes
to the widths with the least gradient information, so blocks of untrained content would
appear. How the budget is split across layers is left to the gradients, so layers that
matter less end up cheaper.

Phases over ``total_steps``:
1. structure learning (the first ``structure_fraction`` of the steps): sigma rises linearly
   from ``sigma_start`` to ``sigma_end``; the budget target moves from the initial ratio to
   ``flops_target`` over the first ``budget_warmup`` of this phase, then holds;
2. content only: the structure is fixed (sigma=None, exact boxcars; widths and locations are
   restored after every optimizer step), so the contents adapt to the structure that will be
   deployed and ``freeze_`` changes nothing. The layers run compact (``GBLRLinear.compact``,
   :mod:`gblr.compact`) where that is predicted cheaper: forward and backward touch only the
   cropped blocks, so a step costs about the FLOPs ratio of a dense step instead of more than a
   dense step.

With ``settle_steps``, the structure phase ends early once the budget warm-up is over and the
rounded supports of every layer have not changed for that many steps in a row: the remaining
structure steps would only smooth the masks, and the content phase is the cheaper one.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ._validation import check_finite_number, check_flops_ratio, check_share
from .flops import group_macs, group_macs_slopes
from .linear import GBLRLinear, check_finite_structure, structure_of

__all__ = ["BUDGETS", "param_groups", "StructureLearner", "SigmaSchedule", "gblr_layers"]

STRUCTURE_GROUP = "gblr_structure"  # marker key in the optimizer's structural parameter group
BUDGETS = ("global", "per-layer")  # StructureLearner(budget=...): one budget for all layers, or one each


def gblr_layers(model: nn.Module) -> list[GBLRLinear]:
    return [module for module in model.modules() if isinstance(module, GBLRLinear)]


def param_groups(
    model: nn.Module,
    lr: float,
    struct_lr: float | None = None,
    weight_decay: float = 0.0,
    struct_betas: tuple[float, float] = (0.0, 0.999),
) -> list[dict]:
    """Optimizer parameter groups with the structural parameters apart (docs/method.md section 4).

    Returns up to three groups: weights (``weight_decay``), biases and other 1-D parameters (no
    decay), and the widths and locations of every :class:`GBLRLinear` (learning rate
    ``struct_lr``, default ``lr``; no weight decay; Adam betas ``struct_betas``, by default
    (0, 0.999) as in the paper). Pass them to any torch optimizer, e.g. ``AdamW(groups)``.
    """
    check_finite_number("lr", lr, 0.0, allow_minimum=False)
    if struct_lr is not None:
        check_finite_number("struct_lr", struct_lr)
    check_finite_number("weight_decay", weight_decay)
    if not (isinstance(struct_betas, (tuple, list)) and len(struct_betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in struct_betas)):
        raise ValueError(f"struct_betas must be two numbers in [0, 1), got {struct_betas!r}")
    structural_ids = {id(p) for layer in gblr_layers(model) for p in layer.structural_parameters()}
    structural, decay, no_decay = [], [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in structural_ids:
            structural.append(parameter)
        elif parameter.dim() >= 2:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {
            "params": structural,
            "lr": lr if struct_lr is None else struct_lr,
            "weight_decay": 0.0,
            "betas": tuple(struct_betas),
            STRUCTURE_GROUP: True,
        },
    ]
    return [group for group in groups if group["params"]]


@dataclasses.dataclass
class SigmaSchedule:
    """Sigma as a function of progress through the structure-learning phase: linear from
    ``start`` to ``end`` over the first ``ramp`` of it, then ``end``."""

    start: float = 1.0
    end: float = 100.0
    ramp: float = 0.8

    def __call__(self, progress: float) -> float:
        if self.ramp <= 0:
            return self.end
        fraction = min(1.0, max(0.0, progress / self.ramp))
        return self.start + (self.end - self.start) * fraction


def _reach(in_w: torch.Tensor, in_rate: torch.Tensor, out_w: torch.Tensor, out_rate: torch.Tensor,
           groups: torch.Tensor, count: int) -> torch.Tensor:
    """Per group of components, the lambda at which every width that lambda moves has shrunk to
    0; a width whose cost slope is 0 (its partner is 0 wide) is not moved. ``(count,)``."""
    reach = torch.cat([in_w / in_rate, out_w / out_rate])
    reach = torch.where(torch.isfinite(reach), reach, torch.zeros_like(reach))
    return torch.zeros(count, dtype=reach.dtype, device=reach.device).scatter_reduce(
        0, torch.cat([groups, groups]), reach, "amax")


def _first_true(predicate, high: torch.Tensor) -> torch.Tensor:
    """Per row, the first lambda in [0, high] where ``predicate`` (monotone: False, then True)
    holds, to about 1e-6 of itself (or 1e-12 of ``high``); ``high`` if none. ``predicate`` maps a
    ``(rows, points)`` grid of lambdas to booleans of that shape; ``high`` is ``(rows,)``. Each
    round evaluates a 33-point grid per row at once: the first spans 12 decades below ``high``
    (with 0), because ``high`` (the reach of the slowest-shrinking width) can exceed the answer a
    millionfold; four linear rounds refine the bracket it finds. (A linear first round, as before,
    could stop a whole grid step past the answer: 0.030 for a true 0.003, and the step took 0.016
    of the FLOPs ratio too much.)"""
    zero = torch.zeros(high.numel(), 1, dtype=torch.float64, device=high.device)
    grid = torch.cat([zero, high[:, None] * torch.logspace(-12, 0, 32, dtype=torch.float64, device=high.device)], 1)
    steps = torch.linspace(0.0, 1.0, 33, dtype=torch.float64, device=high.device)
    for _ in range(5):
        first = (~predicate(grid)).long().sum(1, keepdim=True)  # grid[:, first] is the first point where it holds
        low = grid.gather(1, (first - 1).clamp(min=0))
        high = grid.gather(1, first.clamp(max=32))
        grid = low + (high - low) * steps
    return high[:, 0]


class StructureLearner:
    """Proximal structure step, sigma schedule and global FLOPs budget; call :meth:`step`
    after every ``optimizer.step()``. See the module docstring for the method.

    Args:
        model: a model with :class:`GBLRLinear` layers (a DDP wrapper is fine).
        optimizer: holds the structural parameters, ideally built from :func:`param_groups`;
            its structural learning rate (read each step, so schedulers apply) scales lambda.
        flops_target: the global FLOPs ratio of the GBLR layers to reach, in (0, 1].
        total_steps: optimizer steps of the whole run.
        sigma_schedule: a callable from phase progress in [0, 1] to sigma.
        structure_fraction: share of the steps spent learning the structure (default 0.8).
        budget_warmup: share of the structure phase over which the target moves from the
            initial ratio to ``flops_target`` (default 0.5).
        settle_steps: end the structure phase early once the budget warm-up is over and no
            rounded support has changed for this many steps (default None: never early);
            :attr:`structure_steps` then says where it ended.
        budget: ``"global"`` (default): one budget for all layers, split among them by the
            gradients; ``"per-layer"``: every layer is brought to ``flops_target`` on its own
            (one lambda per layer), as the fixed baselines are built.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        flops_target: float,
        total_steps: int,
        *,
        sigma_schedule=None,
        structure_fraction: float = 0.8,
        budget_warmup: float = 0.5,
        settle_steps: int | None = None,
        budget: str = "global",
    ) -> None:
        self.layers = gblr_layers(model)
        names = {id(module): name for name, module in model.named_modules()}
        self.names = [names[id(layer)] or "(model)" for layer in self.layers]  # for error messages
        if not self.layers:
            raise ValueError("model has no GBLRLinear layers: nothing to learn (see gblr.convert_ or GBLRLinear)")
        self.flops_target = check_flops_ratio(flops_target, "flops_target")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        check_share(structure_fraction, "structure_fraction")
        check_share(budget_warmup, "budget_warmup")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.structure_steps = int(round(structure_fraction * total_steps))
        self.planned_structure_steps = self.structure_steps
        if settle_steps is not None and (isinstance(settle_steps, bool) or not isinstance(settle_steps, int)
                                         or settle_steps <= 0):
            raise ValueError(f"settle_steps must be a positive int or None, got {settle_steps!r}")
        self.settle_steps = settle_steps
        self._settled = 0  # structural steps in a row that left every rounded support as it was
        self._last_supports: torch.Tensor | None = None
        self.sigma_schedule = sigma_schedule if sigma_schedule is not None else SigmaSchedule()
        self.budget_warmup = budget_warmup
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(map(repr, BUDGETS))}, got {budget!r}")
        self.budget = budget
        self._check_optimizer_holds_structure()
        check_finite_structure(self.layers, "before the first step", names=self.names,
                               cause="the model was built or loaded with them; check its checkpoint")

        # Per-component constants, flattened over all layers (in the order of structure_of).
        self._group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self._structure = structure_of(self.layers)  # sizes, ranks and layer indices stay fixed
        # shrink weights are MACs per unit of width, in units of a rank-1 component's mean side
        self._cost_unit = float((self._structure.in_sizes + self._structure.out_sizes).double().mean()) / 2
        self._layer_dense = torch.tensor([layer.in_features * layer.out_features for layer in self.layers],
                                         dtype=torch.float64)

        self.step_count = 0
        self._warmup_steps = self.budget_warmup * self.structure_steps
        self.initial_ratio = self.flops_ratio()
        self.initial_layer_ratios = self.layer_ratios()
        self.last: dict[str, float] = {}
        self._frozen_structure: list[torch.Tensor] | None = None
        self._floor: list[torch.Tensor] | None = None  # widths after the last structural step
        self._apply_sigma()

    # -- measurements ----------------------------------------------------------------------------

    def _current_structure(self):
        return structure_of(self.layers)

    def layer_weights(self) -> torch.Tensor:
        """How many times each layer runs per example, relative to the most used one: 1 for
        linear layers; a convolution's output pixels in its last forward pass (1 before any),
        so that a 3x3 convolution at 28x28 counts 16 times one at 7x7, as in its real FLOPs."""
        counts = torch.tensor([float(getattr(layer, "output_pixels", None) or 1) for layer in self.layers],
                              dtype=torch.float64)
        return counts / counts.max()

    def _dense_macs(self, weights: torch.Tensor) -> float:
        return float((self._layer_dense * weights).sum())

    def flops_ratio(self) -> float:
        """Global FLOPs ratio of the GBLR layers now, each weighted by its dense MACs per
        example (:meth:`layer_weights` times its dense size)."""
        weights = self.layer_weights()
        macs = self._current_structure().layer_macs().double().cpu()
        return float((macs * weights).sum()) / self._dense_macs(weights)

    def layer_ratios(self) -> list[float]:
        """Each GBLR layer's FLOPs ratio, in ``self.layers`` order."""
        return (self._current_structure().layer_macs().double().cpu() / self._layer_dense).tolist()

    def target_now(self) -> float:
        """The budget trajectory: initial ratio -> flops_target over the warm-up, then flat."""
        return self._trajectory(self.initial_ratio)

    def _trajectory(self, initial: float) -> float:
        warmup_steps = self._warmup_steps  # of the planned structure phase (settling may end it early)
        fraction = 1.0 if warmup_steps <= 0 else min(1.0, self.step_count / warmup_steps)
        start = max(initial, self.flops_target)
        return start + (self.flops_target - start) * fraction

    def _budget_groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ratios, targets, group of each layer)``, one entry per budget: the global ratio and
        target, or each layer's (``budget="per-layer"``)."""
        if self.budget == "global":
            ratios = torch.tensor([self.flops_ratio()], dtype=torch.float64)
            targets = torch.tensor([self.target_now()], dtype=torch.float64)
            return ratios, targets, torch.zeros(len(self.layers), dtype=torch.long)
        ratios = torch.tensor(self.layer_ratios(), dtype=torch.float64)
        targets = torch.tensor([self._trajectory(initial) for initial in self.initial_layer_ratios],
                               dtype=torch.float64)
        return ratios, targets, torch.arange(len(self.layers))

    @property
    def structure_phase(self) -> bool:
        return self.step_count < self.structure_steps

    def _struct_lr(self) -> float:
        """The structural learning rate now (schedulers may change it every step)."""
        return float(self._group_of[id(self.layers[0].in_width)]["lr"])

    def _check_optimizer_holds_structure(self) -> None:
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [p for layer in self.layers for p in layer.structural_parameters() if id(p) not in held]
        frozen = [name for name, layer in zip(self.names, self.layers)
                  if not all(p.requires_grad for p in layer.structural_parameters())]
        if missing and frozen:  # param_groups leaves out parameters that do not require gradients
            raise ValueError(
                f"the widths and locations of {len(frozen)} GBLR layer(s) ({', '.join(map(repr, frozen[:3]))}"
                f"{', ...' if len(frozen) > 3 else ''}) have requires_grad=False (after model.requires_grad_(False)?), "
                "so the optimizer cannot hold them and the structure cannot be learned; make them trainable "
                "(layer.in_width.requires_grad_(True), ... or model.requires_grad_(True)) before building the "
                "optimizer with gblr.param_groups"
            )
        if missing:
            raise ValueError(
                f"optimizer does not hold {len(missing)} structural parameters (widths/locations); "
                "build it from gblr.param_groups(model, lr, struct_lr=...)"
            )

    def _preconditioners(self, widths: list[torch.Tensor]) -> torch.Tensor:
        """``sqrt(v_hat) + eps`` of an Adam-type optimizer for each width (flattened), or 1
        where the optimizer keeps no second moment (SGD, or before its first step)."""
        states = [self.optimizer.state.get(width, {}) for width in widths]
        if not all("exp_avg_sq" in state for state in states):
            return torch.ones(sum(w.numel() for w in widths), dtype=torch.float64, device=widths[0].device)
        groups = [self._group_of[id(width)] for width in widths]
        corrections = torch.tensor(
            [1.0 - group["betas"][1] ** float(state["step"]) for group, state in zip(groups, states)], dtype=torch.float64
        ).repeat_interleave(torch.tensor([w.numel() for w in widths]))
        eps = torch.tensor([group["eps"] for group in groups], dtype=torch.float64).repeat_interleave(
            torch.tensor([w.numel() for w in widths])
        )
        second_moment = torch.cat([state["exp_avg_sq"].detach() for state in states]).double()
        return (second_moment / corrections.to(second_moment.device)).sqrt_() + eps.to(second_moment.device)

    def _shrink_weights(self, in_w: torch.Tensor, out_w: torch.Tensor,
                        component_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slopes of each component's cost ``min(r(a + b), ab)`` in its in and out widths,
        at the current widths, in units of ``self._cost_unit``: ``r * n`` and ``r * m`` for a
        low-rank block, ``b * n`` and ``a * m`` for a block cheaper as a dense one; times the
        component's layer weight (:meth:`layer_weights`)."""
        in_size, out_size = self._structure.in_sizes.double(), self._structure.out_sizes.double()
        slope_a, slope_b = group_macs_slopes(self._structure.ranks.double(), in_w * in_size, out_w * out_size)
        scale = component_weights / self._cost_unit
        return in_size * slope_a * scale, out_size * slope_b * scale

    def _choose_lambda(self, targets: torch.Tensor, exact_ratios: torch.Tensor, layer_groups: torch.Tensor,
                       struct_lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per budget (:meth:`_budget_groups`), the smallest lambda >= 0 whose shrink brings the
        cost estimate of its layers down to its target.

        The estimate counts ``min(r * (W_in + W_out), W_in * W_out)`` per component (no grouping
        of identical supports), so each goal is rescaled by estimate / exact at the current
        point. All budgets are evaluated at once, for a grid of lambdas per round (a 32-way
        bisection). Returns the lambdas ``(budgets,)`` and the in and out shrink rates per
        component (shrink = lambda of its budget * rate).
        """
        in_widths = [layer.in_width for layer in self.layers]
        out_widths = [layer.out_width for layer in self.layers]
        stored_in = torch.cat([w.detach() for w in in_widths])  # in the widths' own dtype
        stored_out = torch.cat([w.detach() for w in out_widths])
        in_w, out_w = stored_in.double(), stored_out.double()
        weights = self.layer_weights()
        count = int(targets.numel())
        dense_macs = torch.zeros(count, dtype=torch.float64).index_add_(0, layer_groups, self._layer_dense * weights)
        device = in_w.device
        groups = layer_groups.to(device)[self._structure.layers]  # the budget of each component
        dense_macs = dense_macs.to(device)
        component_weights = weights.to(device)[self._structure.layers]
        in_weight, out_weight = self._shrink_weights(in_w, out_w, component_weights)
        in_rate = struct_lr * in_weight / self._preconditioners(in_widths)
        out_rate = struct_lr * out_weight / self._preconditioners(out_widths)
        in_size, out_size = self._structure.in_sizes, self._structure.out_sizes
        rank = self._structure.ranks

        def widths_after(stored, rate, lams):  # the step as step() applies it, in the widths' dtype
            return (stored - (lams * rate).to(stored.dtype)).clamp(0.0, 1.0).double()

        def estimate(lams: torch.Tensor) -> torch.Tensor:  # (budgets, P) -> (budgets, P)
            lams = lams.to(device)[groups].T  # (P, components)
            count_in = torch.round(widths_after(stored_in, in_rate, lams) * in_size)
            count_out = torch.round(widths_after(stored_out, out_rate, lams) * out_size)
            costs = group_macs(rank, count_in, count_out) * component_weights
            sums = torch.zeros(costs.shape[0], count, dtype=torch.float64, device=device).index_add_(1, groups, costs)
            return (sums / dense_macs).T

        now = estimate(torch.zeros(count, 1, dtype=torch.float64))[:, 0].cpu()
        goals = targets * now / exact_ratios.clamp(min=1e-300)
        lams = torch.zeros(count, dtype=torch.float64)
        active = (now > 0.0) & (now > goals)  # budgets already at or below their goal keep lambda 0
        if bool(active.any()):
            reach = _reach(in_w, in_rate, out_w, out_rate, groups, count).cpu()

            def reached(grid):  # (budgets, P): inactive budgets hold from the start
                return estimate(grid).cpu() <= goals[:, None]

            lams = torch.where(active, _first_true(reached, reach), lams)
        return lams, in_rate, out_rate

    # -- the step --------------------------------------------------------------------------------

    def _apply_sigma(self) -> None:
        """Sigma of the schedule, and compact layers exactly in the content phase."""
        if self.structure_phase:
            progress = self.step_count / max(1, self.planned_structure_steps)
            sigma = self.sigma_schedule(progress)
        else:
            sigma = None
        for layer in self.layers:
            layer.sigma = sigma
            if layer.compact != (sigma is None):
                layer.compact = sigma is None

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Apply the structural step for the optimizer step just taken; returns what it did
        (``flops_ratio``, ``target``, ``lambda``, ``sigma``). Non-finite widths or locations
        (from a non-finite loss or gradient) are refused here, naming the layer: one check for
        all layers, the one place a training loop on CUDA checks them."""
        check_finite_structure(
            self.layers, "after the optimizer step", names=self.names,
            cause="probably from a non-finite loss or gradient; lower the learning rate or check the data",
        )
        if self.structure_phase:
            ratios, targets, layer_groups = self._budget_groups()
            below = ratios < targets
            if bool(below.any()) and self._floor is not None:
                self._keep_floor(below[layer_groups])
                ratios, _, _ = self._budget_groups()
            lams, in_rate, out_rate = self._choose_lambda(targets, ratios, layer_groups, self._struct_lr())
            if bool((lams > 0).any()):
                per_component = lams.to(in_rate.device)[layer_groups.to(in_rate.device)[self._structure.layers]]
                sizes = [layer.in_width.numel() for layer in self.layers]
                for layer, in_shrink, out_shrink in zip(
                    self.layers, (per_component * in_rate).split(sizes), (per_component * out_rate).split(sizes)
                ):
                    layer.in_width.sub_(in_shrink.to(layer.in_width.dtype))
                    layer.out_width.sub_(out_shrink.to(layer.out_width.dtype))
            for layer in self.layers:
                layer.in_width.clamp_(0.0, 1.0)
                layer.out_width.clamp_(0.0, 1.0)
                layer.in_location.remainder_(1.0)
                layer.out_location.remainder_(1.0)
            self._floor = [width.detach().clone() for width in self._widths()]
            if self.budget == "global":
                ratio = float(ratios[0])
            else:  # the layers' ratios before this step's shrink, weighed as flops_ratio() weighs them
                weighted = self._layer_dense * self.layer_weights()
                ratio = float((ratios * weighted).sum() / weighted.sum())
            self.last = {"flops_ratio": ratio, "target": self.target_now(), "lambda": float(lams.max())}
            if self.settle_steps is not None:
                self._watch_settling()
        else:
            self._hold_structure()
            self.last = {"flops_ratio": self.last.get("flops_ratio", self.flops_ratio()), "target": self.flops_target,
                         "lambda": 0.0}
        self.step_count += 1
        self._apply_sigma()
        self.last["sigma"] = self.layers[0].sigma if self.layers[0].sigma is not None else math.inf
        if not self.structure_phase and self._frozen_structure is None:
            self._begin_content_phase()
        return dict(self.last)

    def _watch_settling(self) -> None:
        """Count the structural steps in a row that left every rounded support as it was; after
        the budget warm-up, ``settle_steps`` of them end the structure phase with this step."""
        structure = self._current_structure()
        supports = torch.stack([structure.in_widths, structure.in_locations, structure.out_widths,
                                structure.out_locations])
        unchanged = self._last_supports is not None and torch.equal(supports, self._last_supports)
        self._settled = self._settled + 1 if unchanged else 0
        self._last_supports = supports
        if self._settled >= self.settle_steps and self.step_count + 1 >= self._warmup_steps:
            self.structure_steps = self.step_count + 1

    def _keep_floor(self, layers_below: torch.Tensor) -> None:
        """Below the budget trajectory no width ends a step narrower than the last structural
        step left it (the optimizer's narrowing is undone; its widening stays): in the layers
        whose budget is below its trajectory (``layers_below``, one bool per layer)."""
        widths, floor = self._widths(), self._floor
        keep = [k for layer, below in enumerate(layers_below.tolist()) if below for k in (2 * layer, 2 * layer + 1)]
        torch._foreach_maximum_([widths[i] for i in keep], [floor[i] for i in keep])

    def _widths(self) -> list[torch.Tensor]:
        """Every layer's in and out widths, in the order of ``self._floor``."""
        return [width for layer in self.layers for width in (layer.in_width, layer.out_width)]

    def _begin_content_phase(self) -> None:
        for layer in self.layers:
            layer.in_width.clamp_(0.0, 1.0)
            layer.out_width.clamp_(0.0, 1.0)
        self._frozen_structure = [p.detach().clone() for layer in self.layers for p in layer.structural_parameters()]
        self.last["flops_ratio"] = self.flops_ratio()

    def _hold_structure(self) -> None:
        if self._frozen_structure is None:
            self._begin_content_phase()
        parameters = [p for layer in self.layers for p in layer.structural_parameters()]
        for parameter, saved in zip(parameters, self._frozen_structure):
            parameter.copy_(saved)

    # -- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "structure_steps": self.structure_steps,
            "settled": self._settled,
            "last_supports": self._last_supports,
            "initial_ratio": self.initial_ratio,
            "initial_layer_ratios": self.initial_layer_ratios,
            "frozen_structure": self._frozen_structure,
            "floor": self._floor,
            "last": dict(self.last),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.structure_steps = int(state.get("structure_steps", self.planned_structure_steps))
        self._settled = int(state.get("settled", 0))
        self._last_supports = state.get("last_supports")
        self.initial_ratio = float(state["initial_ratio"])
        self.initial_layer_ratios = list(state.get("initial_layer_ratios", self.initial_layer_ratios))
        self._frozen_structure = state["frozen_structure"]
        self._floor = state.get("floor")
        self.last = dict(state["last"])
        self._apply_sigma()
