"""Model surgery: compress the linear layers of any model in place, save and load the result.

    config = gblr.GBLRConfig(flops_ratio=0.5, exclude_modules=["pooler.dense"])
    report = gblr.convert_(model, config, calibration=batches)   # like torchao's quantize_
    gblr.save_pretrained(model, "out/")                          # only the GBLR layers
    model = gblr.load_pretrained(base_model, "out/")             # a fresh base model + those layers

Targets are ``nn.Linear`` layers and Hugging Face ``Conv1D`` layers (GPT-2 style, weight stored
``(in, out)``), chosen by ``target_modules`` / ``exclude_modules`` / ``filter_fn`` (see
:class:`GBLRConfig`). With ``calibration`` (an iterable of model inputs) each target's input
second moment is collected with forward pre-hooks, and every error below is the *output* error
on those activations; without it, the weight error. For dict batches with a 2-D
``attention_mask`` (Hugging Face style), inputs of shape ``(batch, tokens, features)`` count only
at the real tokens, not at the padding.

Budget allocation (``allocation="error"``, the default). The layers share one MACs budget,
``flops_ratio * sum(m * n)`` over the targets that have no override. The best rank-``r``
approximation of layer ``l`` leaves a relative squared error ``e_l(r)``
(:func:`gblr.svd_error_curve`, activation-aware when calibrated); one more rank costs
``m + n`` MACs and gains ``e_l(r) - e_l(r + 1)``. Every layer starts at its floor rank (the
largest rank within ``min_layer_ratio``, at least 1); then rank steps are taken greedily in
decreasing gain per MAC over all layers until the budget is spent. Since each ``e_l`` is convex
(its steps are the squared singular values, in decreasing order), this minimises the sum over
layers of the relative squared output errors (up to the one step that does not fit at the end of
the budget): layers whose error falls slowly with rank give up budget to those where it falls
fast. The last step of a layer goes from the largest rank still cheaper than dense to the dense
layer itself (error 0); a layer that earns it is kept dense. The ranks set
each layer's FLOPs ratio ``r * (m + n) / (m * n)``; the layer is then decomposed at that ratio
by :func:`gblr.decompose` (``method="gblr"``, which may spend it on a better GBLR structure than
low rank) or :func:`gblr.svd_decompose` (``method="svd"``, the baseline). With
``allocation="uniform"`` every layer gets ``flops_ratio``.

Layers kept dense, with the reason in the report: a layer where even rank 1 costs as much as
dense (``m + n >= m * n``), a ratio of 1 (allocated or overridden), a weight tied to another
module (an output embedding shared with the input embedding, say). Kept-dense layers count at
their dense cost in the global ratio. The ``out_proj`` of ``nn.MultiheadAttention`` is never a
target: the attention reads its weight directly instead of calling it.

The model is changed only after every layer has been decomposed, so an error leaves it as it
was; that needs memory for the new layers beside the old ones until the swap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ._files import write_text_atomic
from ._progress import progress_bar
from ._validation import check_flops_ratio
from .decompose import InputStats, decompose, relative_error, svd_decompose, svd_error_curve
from .flops import Support, largest_cheaper_rank, low_rank_macs, max_low_rank
from .linear import FrozenGBLRLinear, GBLRLinear

__all__ = ["GBLRConfig", "convert_", "ConversionReport", "LayerConversion", "save_pretrained", "load_pretrained"]

CONFIG_FILE = "gblr_config.json"
TENSORS_FILE = "gblr_layers.safetensors"
FORMAT = "gblr-layers"
FORMAT_VERSION = 1

_ALLOCATIONS = ("error", "uniform")
_METHODS = ("gblr", "svd")
_RESERVED_OPTIONS = ("calibration", "bias", "flops_ratio", "weight")


# -- configuration ------------------------------------------------------------------------------


def _check_patterns(field: str, value, allow_none: bool) -> str | list[str] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if field == "exclude_modules" and value == "all-linear":
            raise ValueError("exclude_modules='all-linear' would exclude every target; use None or names / a regex")
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"{field} must be a valid regular expression, got {value!r}: {error}") from None
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, str) and item for item in value):
        return list(value)
    expected = "'all-linear', a regex (str) or a non-empty list of module names"
    raise ValueError(f"{field} must be {'None, ' if allow_none else ''}{expected}, got {value!r}")


@dataclasses.dataclass
class GBLRConfig:
    """What :func:`convert_` does.

    Args:
        flops_ratio: global FLOPs target over the targeted layers (without override), in ``(0, 1]``.
        target_modules: ``"all-linear"`` (default): every ``nn.Linear`` and HF ``Conv1D`` except
            the model's output embedding layer (``model.get_output_embeddings()``, if the model
            has that method); a list: module names, each matching a module's full name exactly
            or as a dotted suffix (``"query"`` matches ``"encoder.layer.0.attention.self.query"``
            but not ``"xquery"``); any other str: a regex that must match the full name.
        exclude_modules: ``None`` or names / a regex in the same forms, removed from the targets.
        overrides: ``{regex: flops_ratio}``: a target whose full name matches a regex (the first
            in dict order) gets that fixed ratio and is left out of the global allocation.
        allocation: ``"error"`` (default): ranks by greedy error-per-MAC allocation (module
            docstring); ``"uniform"``: every layer at ``flops_ratio``.
        method: ``"gblr"`` (default) decomposes with :func:`gblr.decompose`; ``"svd"`` with
            :func:`gblr.svd_decompose` (truncated SVD, activation-aware when calibrated).
        min_layer_ratio: floor of each layer's ratio in ``"error"`` allocation, in
            ``[0, flops_ratio]``, so that no layer is wiped out; ``None`` (default) means
            ``0.25 * flops_ratio``. A layer never gets less than rank 1.
        decompose_options: extra keyword arguments for :func:`gblr.decompose` (``method="gblr"``).
        filter_fn: ``filter_fn(name, module) -> bool``, called last on each candidate; False drops it.
    """

    flops_ratio: float = 0.5
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    allocation: str = "error"
    method: str = "gblr"
    min_layer_ratio: float | None = None
    decompose_options: dict = dataclasses.field(default_factory=dict)
    filter_fn: Callable[[str, nn.Module], bool] | None = None

    def __post_init__(self) -> None:
        self.flops_ratio = check_flops_ratio(self.flops_ratio)
        self.target_modules = _check_patterns("target_modules", self.target_modules, allow_none=False)
        self.exclude_modules = _check_patterns("exclude_modules", self.exclude_modules, allow_none=True)
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides must be a dict {{regex: flops_ratio}}, got {self.overrides!r}")
        overrides = {}
        for pattern, ratio in self.overrides.items():
            if not isinstance(pattern, str):
                raise ValueError(f"overrides keys must be regex strings, got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"overrides key {pattern!r} is not a valid regular expression: {error}") from None
            overrides[pattern] = check_flops_ratio(ratio, f"overrides[{pattern!r}]")
        self.overrides = overrides
        if self.allocation not in _ALLOCATIONS:
            raise ValueError(f"allocation must be one of {_ALLOCATIONS}, got {self.allocation!r}")
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        if self.min_layer_ratio is not None:
            value = self.min_layer_ratio
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= self.flops_ratio:
                raise ValueError(
                    f"min_layer_ratio must be None (0.25 * flops_ratio) or a number in [0, flops_ratio="
                    f"{self.flops_ratio}], got {value!r}"
                )
            self.min_layer_ratio = float(value)
        if not isinstance(self.decompose_options, Mapping) or not all(
            isinstance(key, str) for key in self.decompose_options
        ):
            raise ValueError(f"decompose_options must be a dict of keyword arguments, got {self.decompose_options!r}")
        reserved = sorted(set(self.decompose_options) & set(_RESERVED_OPTIONS))
        if reserved:
            raise ValueError(f"decompose_options must not set {reserved}: convert_ passes those itself")
        if self.decompose_options and self.method != "gblr":
            raise ValueError(
                f"decompose_options are for method='gblr' (gblr.decompose); method={self.method!r} takes none, "
                f"got {dict(self.decompose_options)!r}"
            )
        self.decompose_options = dict(self.decompose_options)
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError(f"filter_fn must be None or a callable (name, module) -> bool, got {self.filter_fn!r}")

    @property
    def floor_ratio(self) -> float:
        """The effective ``min_layer_ratio``."""
        return 0.25 * self.flops_ratio if self.min_layer_ratio is None else self.min_layer_ratio


# -- targets ------------------------------------------------------------------------------------


def _conv1d_type() -> type | None:
    """transformers' ``Conv1D`` if transformers is loaded (a model holding one has loaded it);
    never imports transformers itself."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _is_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an nn.Linear, a Conv1D or a GBLR layer."""
    if isinstance(module, (nn.Linear, GBLRLinear, FrozenGBLRLinear)):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D: weight is (in, out)


@dataclasses.dataclass
class _Target:
    name: str  # the first of names, as named_modules gives it
    names: list[str]  # every path to the module (a shared module has several)
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return not isinstance(self.module, nn.Linear)

    @property
    def in_features(self) -> int:
        return _features(self.module)[0]

    @property
    def out_features(self) -> int:
        return _features(self.module)[1]

    def weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight, as nn.Linear stores it."""
        weight = self.module.weight.detach()
        return weight.T if self.transposed else weight


def _name_matches(names: list[str], patterns: str | list[str]) -> bool:
    if isinstance(patterns, str):
        return any(re.fullmatch(patterns, name) for name in names)
    return any(name == pattern or name.endswith("." + pattern) for name in names for pattern in patterns)


def _candidates(model: nn.Module) -> list[_Target]:
    """Every linear module (nn.Linear, Conv1D) with all its paths, in model order."""
    paths: dict[int, _Target] = {}
    attention_projections = {
        id(module.out_proj) for module in model.modules() if isinstance(module, nn.MultiheadAttention)
    }
    for name, module in model.named_modules(remove_duplicate=False):
        if not _is_linear(module) or id(module) in attention_projections:
            continue
        if id(module) in paths:
            paths[id(module)].names.append(name)
        else:
            paths[id(module)] = _Target(name, [name], module)
    return list(paths.values())


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def _find_targets(model: nn.Module, config: GBLRConfig) -> list[_Target]:
    candidates = _candidates(model)
    if not candidates:
        raise ValueError("the model has no nn.Linear or Conv1D module to convert")
    if config.target_modules == "all-linear":
        output = _output_embeddings(model)
        targets = [target for target in candidates if target.module is not output]
    else:
        targets = [target for target in candidates if _name_matches(target.names, config.target_modules)]
    if config.exclude_modules is not None:
        targets = [target for target in targets if not _name_matches(target.names, config.exclude_modules)]
    if config.filter_fn is not None:
        targets = [target for target in targets if config.filter_fn(target.name, target.module)]
    if not targets:
        shown = ", ".join(repr(target.name) for target in candidates[:8])
        more = f", ... ({len(candidates)} in all)" if len(candidates) > 8 else ""
        raise ValueError(
            f"no module matches target_modules={config.target_modules!r}, exclude_modules="
            f"{config.exclude_modules!r}{' and filter_fn' if config.filter_fn else ''}; "
            f"linear modules in the model: {shown}{more}"
        )
    roots = [target for target in targets if "" in target.names]
    if roots:
        raise ValueError(
            "the model itself is a linear layer and cannot be replaced in place; use gblr.decompose(layer.weight, ...)"
        )
    return targets


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {key for key, count in owners.items() if count > 1}


# -- calibration --------------------------------------------------------------------------------


def _progress(iterable, total: int | None, description: str, enabled: bool):
    bar = progress_bar(total, description, enabled, iterable)
    return iterable if bar is None else bar


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def _to_device(batch, device: torch.device | None):
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        values = [_to_device(value, device) for value in batch]
        return type(batch)(*values) if hasattr(batch, "_fields") else type(batch)(values)
    return batch


def _collect_stats(model: nn.Module, targets: list[_Target], calibration: Iterable, progress: bool):
    """Input second moments of every target over the calibration batches (forward pre-hooks,
    always removed; every module's training flag restored)."""
    if isinstance(calibration, (torch.Tensor, Mapping)) or not isinstance(calibration, Iterable):
        raise TypeError(
            "calibration must be an iterable of batches (a list, a DataLoader, ...), each a tensor, a tuple of "
            f"positional inputs or a dict of keyword inputs; got {type(calibration).__name__} (wrap one batch in a list)"
        )
    stats = {
        target.name: InputStats(target.in_features, device=target.module.weight.device) for target in targets
    }

    tokens: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(layer_stats: InputStats):
        def hook(module, args, kwargs):
            inputs = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(inputs, torch.Tensor):
                mask = tokens["mask"]
                if mask is not None and inputs.shape[:-1] == mask.shape:
                    inputs = inputs[mask]  # real tokens only: padding never reaches the output
                layer_stats.update(inputs)

        return hook

    modes = [(module, module.training) for module in model.modules()]
    device = _model_device(model)
    handles = []
    batches = 0
    try:
        for target in targets:
            handles.append(target.module.register_forward_pre_hook(hook_for(stats[target.name]), with_kwargs=True))
        model.eval()
        try:
            total = len(calibration)
        except TypeError:
            total = None
        with torch.no_grad():
            for batch in _progress(calibration, total, "gblr calibration", progress):
                batch = _to_device(batch, device)
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                tokens["mask"] = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                if isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
    if batches == 0:
        raise ValueError("calibration yielded no batches")
    unseen = [name for name, layer_stats in stats.items() if layer_stats.tokens == 0]
    if unseen:
        warnings.warn(
            f"{len(unseen)} target layer(s) saw no input during calibration and use the weight error instead: "
            f"{', '.join(unseen[:5])}{', ...' if len(unseen) > 5 else ''}",
            stacklevel=3,
        )
    return {name: layer_stats for name, layer_stats in stats.items() if layer_stats.tokens > 0}


# -- budget allocation ----------------------------------------------------------------------------


def _allocate_ranks(
    shapes: list[tuple[int, int]], curves: list[torch.Tensor], budget: float, floor_ratio: float
) -> list[int | None]:
    """Per layer, the rank from greedy error-per-MAC allocation (module docstring), or None where
    the layer should stay dense. Every layer must have ``largest_cheaper_rank >= 1``."""
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


@dataclasses.dataclass
class _Plan:
    ratio: float  # allocated FLOPs ratio (1.0 when kept dense by the allocation)
    skipped: str | None = None
    decompose_ratio: float | None = None  # what decompose is asked for (a hair above ratio, see below)


def _plan(targets: list[_Target], config: GBLRConfig, stats: dict, tied: set[int]) -> dict[str, _Plan]:
    plans: dict[str, _Plan] = {}
    pool: list[_Target] = []  # the layers that share the global budget
    dense_macs = 0  # of the layers without override
    kept_dense_macs = 0  # of those, kept dense before allocation
    for target in targets:
        m, n = target.out_features, target.in_features
        override = next(
            (ratio for pattern, ratio in config.overrides.items() if _name_matches(target.names, pattern)), None
        )
        if override is None:
            dense_macs += m * n
        reason = None
        if id(target.module.weight) in tied:
            reason = "weight tied to another module"
        elif largest_cheaper_rank(m, n) < 1:
            reason = f"too small: rank 1 costs m+n={low_rank_macs(1, m, n)} >= m*n={m * n} MACs"
        if reason is not None:
            plans[target.name] = _Plan(1.0, reason)
            kept_dense_macs += m * n if override is None else 0
        elif override is not None:
            plans[target.name] = _Plan(override, "override ratio 1" if override >= 1 else None)
        elif config.allocation == "uniform":
            plans[target.name] = _Plan(config.flops_ratio, "flops_ratio 1" if config.flops_ratio >= 1 else None)
        else:
            pool.append(target)
    for pattern in config.overrides:
        if not any(_name_matches(target.names, pattern) for target in targets):
            warnings.warn(f"overrides pattern {pattern!r} matches no target layer", stacklevel=3)
    if not pool:
        return plans
    shapes = [(target.out_features, target.in_features) for target in pool]
    curves = []
    for target in pool:
        try:
            curves.append(svd_error_curve(_float(target.weight()), stats.get(target.name)))
        except ValueError as error:
            raise ValueError(f"layer {target.name!r}: {error}") from error
    budget = config.flops_ratio * dense_macs - kept_dense_macs
    ranks = _allocate_ranks(shapes, curves, budget, config.floor_ratio)
    for target, (m, n), rank in zip(pool, shapes, ranks):
        if rank is None:
            plans[target.name] = _Plan(1.0, "allocation: dense is cheaper than the rank it earned")
        else:
            # Half a MAC above rank * (m + n), so that decompose's rank rounding cannot lose the last rank.
            macs = low_rank_macs(rank, m, n)
            plans[target.name] = _Plan(macs / (m * n), None, (macs + 0.5) / (m * n))
    return plans


def _float(weight: torch.Tensor) -> torch.Tensor:
    return weight if weight.dtype in (torch.float32, torch.float64) else weight.float()


# -- the report -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerConversion:
    """One targeted layer: its allocated ``ratio``, the MACs of what replaced it (``flops``: the
    dense cost if it was kept), its ``relative_error`` (output error if ``calibrated``, else weight
    error; 0 if kept dense) and why it was kept dense (``skipped``), or None."""

    name: str
    in_features: int
    out_features: int
    ratio: float
    flops: int
    relative_error: float
    skipped: str | None = None
    calibrated: bool = False

    @property
    def dense_flops(self) -> int:
        return self.in_features * self.out_features

    @property
    def flops_ratio(self) -> float:
        """Achieved FLOPs ratio of the layer."""
        return self.flops / self.dense_flops


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_` did: per-layer rows (:class:`LayerConversion`) and totals over the
    targeted layers. ``str()`` gives a table, :meth:`to_dict` plain data."""

    layers: tuple[LayerConversion, ...]
    target_ratio: float
    allocation: str
    method: str
    calibrated: bool
    seconds: float

    @property
    def dense_flops(self) -> int:
        return sum(layer.dense_flops for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def flops_ratio(self) -> float:
        """Achieved global FLOPs ratio over all targeted layers (kept-dense ones at ratio 1)."""
        return self.flops / self.dense_flops if self.layers else float("nan")

    @property
    def converted(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.skipped is None]

    @property
    def skipped(self) -> dict[str, str]:
        return {layer.name: layer.skipped for layer in self.layers if layer.skipped is not None}

    def __getitem__(self, name: str) -> LayerConversion:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "layers": [dataclasses.asdict(layer) | {"flops_ratio": layer.flops_ratio} for layer in self.layers],
            "target_ratio": self.target_ratio,
            "allocation": self.allocation,
            "method": self.method,
            "calibrated": self.calibrated,
            "seconds": self.seconds,
            "dense_flops": self.dense_flops,
            "flops": self.flops,
            "flops_ratio": self.flops_ratio,
            "converted": len(self.converted),
            "skipped": len(self.skipped),
        }

    def __str__(self) -> str:
        error = "output error" if self.calibrated else "weight error"
        header = ("layer", "shape", "allocated", "achieved", error, "kept dense because")
        rows = [
            (
                layer.name,
                f"{layer.out_features}x{layer.in_features}",
                f"{layer.ratio:.3f}",
                f"{layer.flops_ratio:.3f}",
                "-" if layer.skipped else f"{layer.relative_error:.4f}",
                layer.skipped or "",
            )
            for layer in self.layers
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row):
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(row[1:5], widths[1:5])]
            return "  ".join(cells + [row[5]]).rstrip()

        rule = "  ".join("-" * width for width in widths)
        total = (
            f"total: {len(self.layers)} layers, {len(self.converted)} converted, {len(self.skipped)} kept dense; "
            f"FLOPs ratio {self.flops_ratio:.3f} (target {self.target_ratio:.3f}, {self.allocation} allocation, "
            f"method {self.method}); {self.seconds:.1f} s"
        )
        return "\n".join([line(header), rule, *map(line, rows), rule, total])


# -- the transform --------------------------------------------------------------------------------


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)  # ModuleList / Sequential children are named "0", "1", ...


def _decompose_one(target: _Target, plan: _Plan, config: GBLRConfig, stats: InputStats | None) -> nn.Module:
    weight = target.weight()
    dtype = weight.dtype
    work = _float(weight)
    bias = getattr(target.module, "bias", None)
    bias = None if bias is None else bias.detach().to(work.dtype)
    ratio = plan.decompose_ratio if plan.decompose_ratio is not None else plan.ratio
    try:
        if config.method == "svd":  # low rank has no partial blocks: at least one full component
            m, n = target.out_features, target.in_features
            layer = svd_decompose(work, max(ratio, low_rank_macs(1, m, n) / (m * n)), calibration=stats, bias=bias)
        else:
            layer = decompose(work, ratio, calibration=stats, bias=bias, **config.decompose_options)
    except ValueError as error:
        raise ValueError(f"layer {target.name!r}: {error}") from error
    if dtype != work.dtype:  # half precision: the content follows the model, the structure stays float32
        for parameter in layer.content_parameters():
            parameter.data = parameter.data.to(dtype)
    layer.train(target.module.training)
    return layer


def convert_(
    model: nn.Module,
    config: GBLRConfig | None = None,
    calibration: Iterable | None = None,
    *,
    progress: bool = True,
    verbose: bool = True,
) -> ConversionReport:
    """Replace the targeted linear layers of ``model`` by :class:`gblr.GBLRLinear`, in place.

    Args:
        model: any ``nn.Module`` (Hugging Face models included).
        config: a :class:`GBLRConfig` (default ``GBLRConfig()``: all linear layers, ratio 0.5).
        calibration: optional iterable of model inputs (a dict batch is called as
            ``model(**batch)``, a tuple / list as ``model(*batch)``, anything else as
            ``model(batch)``; tensors are moved to the model's device). The model runs on them in
            eval mode without gradients; allocation and decomposition then minimise the output
            error on those activations instead of the weight error.
        progress: show tqdm progress bars (if tqdm is installed).
        verbose: print the report table.

    Returns a :class:`ConversionReport`. The layers' dtype and device are kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = GBLRConfig() if config is None else config
    if not isinstance(config, GBLRConfig):
        raise TypeError(f"config must be a gblr.GBLRConfig, got {type(config).__name__}")
    start = time.perf_counter()
    targets = _find_targets(model, config)
    stats = {} if calibration is None else _collect_stats(model, targets, calibration, progress)
    plans = _plan(targets, config, stats, _tied_weights(model))

    new_layers: dict[str, nn.Module] = {}
    rows = []
    for target in _progress(targets, len(targets), "gblr convert", progress):
        plan = plans[target.name]
        m, n = target.out_features, target.in_features
        layer_stats = stats.get(target.name)
        skipped, flops, error = plan.skipped, m * n, 0.0
        if skipped is None:
            layer = _decompose_one(target, plan, config, layer_stats)
            if layer.flops() >= m * n:
                skipped = "decomposition not cheaper than dense"
            else:
                new_layers[target.name] = layer
                flops = layer.flops()
                with torch.no_grad():
                    error = relative_error(_float(target.weight()), layer.weight, layer_stats)
        rows.append(
            LayerConversion(target.name, n, m, plan.ratio, flops, error, skipped, calibrated=layer_stats is not None)
        )

    for target in targets:
        if target.name in new_layers:
            for path in target.names:
                _replace(model, path, new_layers[target.name])
    report = ConversionReport(
        tuple(rows), config.flops_ratio, config.allocation, config.method, bool(stats), time.perf_counter() - start
    )
    if verbose:
        print(report)
    return report


# -- save and load --------------------------------------------------------------------------------


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            "gblr.save_pretrained / load_pretrained need the safetensors package: pip install gblr[hf]"
        ) from error
    return safetensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from(name: str, layer: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"layer {layer!r} in {CONFIG_FILE}: dtype must name a float torch dtype, got {name!r}")
    return dtype


def _layer_entry(name: str, layer: nn.Module) -> dict:
    entry = {
        "name": name,
        "class": type(layer).__name__,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
    }
    if isinstance(layer, GBLRLinear):
        entry.update(components=layer.components, rank=layer.rank, sigma=layer.sigma, dtype=_dtype_name(layer.u.dtype))
    else:
        entry["dtype"] = _dtype_name(layer.dtype)
        entry["blocks"] = [
            {**dataclasses.asdict(support), "rank": None if right is None else left.shape[1]}
            for support, left, right in layer.blocks()
        ]
    return entry


def _tensor_key(layer: str, tensor: str) -> str:
    return f"{layer}.{tensor}" if layer else tensor


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the GBLR layers of ``model`` (trainable and frozen) to ``directory``.

    ``gblr_config.json`` describes each layer (name, class, sizes, structure, dtype);
    ``gblr_layers.safetensors`` holds only their tensors, named ``"<layer name>.<tensor name>"``.
    Everything else comes from the base model at :func:`load_pretrained`. Both files are written
    atomically (tensors first, the JSON that points to them last). Returns the directory.
    """
    safetensors = _safetensors()
    from . import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [
        (name, module) for name, module in model.named_modules() if isinstance(module, (GBLRLinear, FrozenGBLRLinear))
    ]
    if not layers:
        raise ValueError("the model has no GBLRLinear or FrozenGBLRLinear layer to save; run gblr.convert_ first")
    tensors = {}
    for name, layer in layers:
        for key, value in layer.state_dict().items():
            if isinstance(value, torch.Tensor):
                tensors[_tensor_key(name, key)] = value.detach().to("cpu").contiguous()
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gblr_version": __version__,
        "tensors": TENSORS_FILE,
        "layers": [_layer_entry(name, layer) for name, layer in layers],
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / TENSORS_FILE
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{TENSORS_FILE}.")
    os.close(handle)
    try:
        safetensors.torch.save_file(tensors, temporary, metadata={"format": "pt", "gblr_format": FORMAT})
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    write_text_atomic(directory / CONFIG_FILE, json.dumps(document, indent=2) + "\n")
    return directory


def _entry_value(entry: dict, key: str, kind, name: str):
    if key not in entry or not isinstance(entry[key], kind) or isinstance(entry[key], bool) and kind is int:
        raise ValueError(f"layer {name!r} in {CONFIG_FILE}: missing or malformed {key!r} (got {entry.get(key)!r})")
    return entry[key]


def _build_layer(entry: dict, name: str, device: torch.device) -> nn.Module:
    """The layer described by ``entry``, built on the meta device and moved (uninitialised) to ``device``."""
    in_features = _entry_value(entry, "in_features", int, name)
    out_features = _entry_value(entry, "out_features", int, name)
    bias = _entry_value(entry, "bias", bool, name)
    dtype = _dtype_from(entry.get("dtype"), name)
    kind = entry.get("class")
    if kind == "GBLRLinear":
        layer = GBLRLinear(
            in_features, out_features, bias=bias, components=_entry_value(entry, "components", int, name),
            rank=_entry_value(entry, "rank", int, name), sigma=entry.get("sigma"), device="meta", dtype=dtype,
        )
    elif kind == "FrozenGBLRLinear":
        blocks = []
        for block in _entry_value(entry, "blocks", list, name):
            support = Support(*(_entry_value(block, key, int, name) for key in ("in_start", "in_width", "out_start",
                                                                                  "out_width")))
            # A dense block (rank None) is stored as one (out_width, in_width) matrix; any rank at which
            # the constructor multiplies the factors out (min of the widths) rebuilds that shape.
            rank = block.get("rank") or min(support.in_width, support.out_width)
            left = torch.empty(support.out_width, rank, device="meta", dtype=dtype)
            right = torch.empty(rank, support.in_width, device="meta", dtype=dtype)
            blocks.append((support, left, right))
        bias_tensor = torch.empty(out_features, device="meta", dtype=dtype) if bias else None
        layer = FrozenGBLRLinear(in_features, out_features, blocks, bias_tensor, dtype=dtype, device="meta")
    else:
        raise ValueError(f"layer {name!r} in {CONFIG_FILE}: class must be GBLRLinear or FrozenGBLRLinear, got {kind!r}")
    return layer.to_empty(device=device)


def load_pretrained(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put the GBLR layers saved by :func:`save_pretrained` into ``base_model``, in place.

    Each saved layer replaces the module of the same name, which must be an ``nn.Linear``, a
    ``Conv1D`` or a GBLR layer with the same in / out features. Tensors are loaded exactly, in
    their saved dtype, on the device of the module they replace. Returns ``base_model`` (or the
    loaded layer, if the saved model was a single layer).
    """
    _safetensors()
    from safetensors import safe_open

    directory = Path(directory)
    config_path, tensors_path = directory / CONFIG_FILE, directory / TENSORS_FILE
    for path in (config_path, tensors_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {directory} a directory written by gblr.save_pretrained?")
    try:
        document = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a gblr layers file (format {FORMAT!r} expected)")
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version {document.get('format_version')!r}; this gblr reads {FORMAT_VERSION}"
        )
    entries = document.get("layers")
    if not isinstance(entries, list):
        raise ValueError(f"{config_path}: 'layers' must be a list")

    new_layers = []
    with safe_open(str(tensors_path), framework="pt", device="cpu") as handle:
        available = set(handle.keys())
        used = set()
        for entry in entries:
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str):
                raise ValueError(f"{config_path}: every layer needs a 'name' string, got {entry!r}")
            if name:
                try:
                    base = base_model.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"layer {name!r} saved in {directory} has no module of that name in the model") from None
            else:
                base = base_model
            if not (_is_linear(base) or isinstance(base, (GBLRLinear, FrozenGBLRLinear))):
                raise ValueError(
                    f"layer {name!r}: the model's module there is a {type(base).__name__}, not an nn.Linear, Conv1D or "
                    f"GBLR layer"
                )
            saved = (entry.get("in_features"), entry.get("out_features"))
            if _features(base) != saved:
                raise ValueError(
                    f"layer {name!r}: saved with (in_features, out_features) = {saved}, but the model's module has "
                    f"{_features(base)}; the checkpoint is for a model of another shape"
                )
            layer = _build_layer(entry, name, _model_device(base) or torch.device("cpu"))
            with torch.no_grad():
                for key, value in layer.state_dict(keep_vars=True).items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    stored_key = _tensor_key(name, key)
                    if stored_key not in available:
                        raise ValueError(f"layer {name!r}: tensor {stored_key!r} missing from {tensors_path}")
                    tensor = handle.get_tensor(stored_key)
                    if tuple(tensor.shape) != tuple(value.shape):
                        raise ValueError(
                            f"layer {name!r}: tensor {stored_key!r} has shape {tuple(tensor.shape)} in {tensors_path}, "
                            f"the layer described in {CONFIG_FILE} needs {tuple(value.shape)}"
                        )
                    if tensor.dtype == value.dtype:
                        value.copy_(tensor)
                    else:  # e.g. structural parameters cast with the model: keep what was saved
                        value.data = tensor.to(value.device)
                    used.add(stored_key)
            layer.train(base.training)
            new_layers.append((name, layer))
    unexpected = sorted(available - used)
    if unexpected:
        raise ValueError(f"{tensors_path} holds tensors {CONFIG_FILE} does not describe: {unexpected[:5]}")
    for name, layer in new_layers:
        if not name:  # the saved model was one layer: it cannot replace itself in place
            return layer
        _replace(base_model, name, layer)
    return base_model
