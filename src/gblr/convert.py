"""Model surgery: compress the linear layers of any model in place.

    config = gblr.GBLRConfig(flops_ratio=0.5, exclude_modules=["pooler.dense"])
    report = gblr.convert_(model, config, calibration=batches)   # like torchao's quantize_

:func:`convert_` is the orchestration of four steps, each in its own module: choose the target
layers (:mod:`gblr.targets`, the rules of :class:`gblr.GBLRConfig`); with ``calibration`` (an
iterable of model inputs), collect each target's input second moment (:mod:`gblr.calibration`),
so that every error below is the *output* error on those activations, otherwise the weight
error; split the FLOPs budget among the targets (:mod:`gblr.allocation`); decompose each target
at its ratio (:func:`gblr.decompose` or :func:`gblr.svd_decompose`) and put the new layers in.
With ``config.calibration="sequential"`` (the default) the last two steps go block by block
through the model's repeated blocks (:mod:`gblr.sequential`), each block calibrated on what the
compressed blocks before it produce. The :class:`ConversionReport` it returns has a row per
target: its ratio, cost, error, or why it was kept dense. :mod:`gblr.pretrained` saves and loads
the result.

An error leaves the model as it was: one-shot, it changes only after every layer has been
decomposed; sequentially, the layers already replaced are put back. Both need memory for the new
layers beside the old ones until the end.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ._progress import progress_bar
from .allocation import FISHER_ALLOCATIONS, Plan, plan_targets, shares_budget
from .calibration import fisher_sensitivities, check_batches, collect_stats, warn_unseen
from .config import GBLRConfig
from .conv import GBLRConv2d
from .decompose import decompose, relative_error, svd_decompose, svd_error_curve
from .flops import low_rank_macs, rank_for_ratio
from .sequential import check_stages, find_stages, run_stages
from .stats import InputStats, SplitPairedStats
from .targets import Target, find_targets, replace_module, tied_weights

__all__ = ["ConversionReport", "LayerConversion", "convert_"]


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
    ridge: float | None = None  # sequential calibration: the drift correction's ridge, chosen on held-out tokens

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
    calibration: str | None = None  # "sequential", "one-shot", or None without calibration
    stages: str | None = None  # the blocks sequential calibration went through

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
            "calibration": self.calibration,
            "stages": self.stages,
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
            f"method {self.method}"
            + (f", {self.calibration} calibration" if self.calibration else "")
            + (f" over {self.stages}" if self.stages else "")
            + f"); {self.seconds:.1f} s"
        )
        return "\n".join([line(header), rule, *map(line, rows), rule, total])


# -- the transform --------------------------------------------------------------------------------


def _decompose_one(
    target: Target, plan: Plan, config: GBLRConfig, stats: InputStats | None, weight: torch.Tensor | None = None
) -> nn.Module:
    """The GBLR layer that replaces ``target`` at ``plan``'s ratio, in the target's dtype and mode,
    approximating ``weight`` (default: the target's own) in the metric of ``stats``."""
    dtype = target.weight().dtype
    work = target.float_weight() if weight is None else weight.to(target.float_weight().dtype)
    bias = getattr(target.module, "bias", None)
    bias = None if bias is None else bias.detach().to(work.dtype)
    ratio = plan.requested_ratio
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
    if target.is_conv:
        return GBLRConv2d.from_matrix_layer(layer, target.module)
    return layer


def _convert_one(
    target: Target, plan: Plan, config: GBLRConfig, stats: InputStats | SplitPairedStats | None
) -> tuple[LayerConversion, nn.Module | None]:
    """The report row of ``target`` and the layer that replaces it (None where it stays dense).
    With :class:`SplitPairedStats` (sequential calibration) the layer approximates the
    drift-corrected weight, with the ridge that generalises best to held-out tokens, and its
    error is measured against the original layer's outputs on the original inputs."""
    m, n = target.out_features, target.in_features
    skipped, flops, error, layer, ridge = plan.skipped, m * n, 0.0, None, None
    paired = stats.merged() if isinstance(stats, SplitPairedStats) else None
    if skipped is None:
        if paired is not None:
            try:
                with torch.no_grad():
                    ridge = stats.choose_ridge(rank_for_ratio(plan.requested_ratio, m, n))
                    weight, metric = paired.corrected() if ridge is None else paired.corrected(ridge)
            except ValueError as error:
                raise ValueError(f"layer {target.name!r}: {error}") from error
            layer = _decompose_one(target, plan, config, metric, weight)
        else:
            layer = _decompose_one(target, plan, config, stats)
        if layer.flops() >= m * n:
            skipped, layer = "decomposition not cheaper than dense", None
        else:
            flops = layer.flops()
            with torch.no_grad():
                if paired is not None:
                    error = paired.relative_error(layer.matrix)
                else:
                    error = relative_error(target.float_weight(), layer.matrix, stats)
    row = LayerConversion(target.name, n, m, plan.ratio, flops, error, skipped, stats is not None, ridge)
    return row, layer


def _sensitivities(model, targets, config, batches, tied, progress) -> dict[str, float] | None:
    """For the Fisher allocations: the sensitivities of the targets that share the budget, on
    the original model (None for other allocations)."""
    if config.allocation not in FISHER_ALLOCATIONS:
        return None
    pooled = [target for target in targets if shares_budget(target, config, tied)]
    if not pooled:
        return {}
    return fisher_sensitivities(model, pooled, batches, progress, labels=FISHER_ALLOCATIONS[config.allocation])


def _convert_one_shot(model, targets, config, calibration, tied, progress):
    """Rows and new layers by target name: statistics of the original model, then every target."""
    if config.allocation in FISHER_ALLOCATIONS:  # two passes over the batches: hold them
        check_batches(calibration)
        calibration = list(calibration)
    sensitivities = _sensitivities(model, targets, config, calibration, tied, progress)
    stats = {} if calibration is None else collect_stats(model, targets, calibration, progress)
    plans = plan_targets(targets, config, stats, tied, sensitivities=sensitivities)
    rows, new_layers = {}, {}
    for target in progress_bar(len(targets), "gblr convert", progress, targets):
        rows[target.name], layer = _convert_one(target, plans[target.name], config, stats.get(target.name))
        if layer is not None:
            new_layers[target.name] = layer
    return rows, new_layers


def _convert_sequential(model, targets, config, batches, stages, tied, progress):
    """Rows and new layers by target name, block by block (:mod:`gblr.sequential`); the model's
    targets are replaced as it goes (the caller puts the originals back after an error).

    The budget split needs every layer's error curve before the first layer is compressed, so it
    is decided on the original model: a first pass runs the dense blocks one by one and keeps
    only each target's curve (:func:`gblr.svd_error_curve`), never more than one block's
    statistics. A second pass compresses each block at those ratios: each target approximates
    the weight that maps its inputs in the compressed model closest to the original model's
    outputs (:class:`gblr.stats.PairedStats`), so that it also corrects the drift of the
    compressed blocks before it, with the ridge that does best on held-out tokens
    (:meth:`gblr.stats.SplitPairedStats.choose_ridge`). Targets outside the blocks (before or after them, or shared by
    several) are calibrated last, one-shot on the model with its blocks compressed."""
    curves = {}
    pooled = {target.name for target in targets if shares_budget(target, config, tied)}
    if pooled:
        def on_dense_block(index, stats):
            for target in stages.members[index]:
                if target.name in pooled and stats[target.name].tokens:
                    curves[target.name] = svd_error_curve(target.float_weight(), stats[target.name])

        run_stages(model, stages, batches, on_dense_block, False, progress, "gblr calibration: allocation")
        outside = [target for target in stages.outside if target.name in pooled]
        if outside:
            seen = collect_stats(model, outside, batches, progress, warn=False)
            curves.update({target.name: svd_error_curve(target.float_weight(), seen[target.name])
                           for target in outside if target.name in seen})
    plans = plan_targets(targets, config, {}, tied, curves, _sensitivities(model, targets, config, batches, tied,
                                                                          progress))

    rows, new_layers, unseen = {}, {}, []

    def convert_group(group, stats):
        for target in group:
            layer_stats = stats.get(target.name)
            if layer_stats is not None and layer_stats.tokens == 0:
                unseen.append(target.name)
                layer_stats = None
            rows[target.name], layer = _convert_one(target, plans[target.name], config, layer_stats)
            if layer is not None:
                new_layers[target.name] = layer
                for path in target.names:
                    replace_module(model, path, layer)

    run_stages(model, stages, batches, lambda index, stats: convert_group(stages.members[index], stats), True,
               progress, "gblr convert")
    if stages.outside:
        stats = collect_stats(model, stages.outside, batches, progress, warn=False)
        convert_group(stages.outside, {target.name: stats.get(target.name, InputStats(target.in_features))
                                       for target in stages.outside})
    warn_unseen(unseen, stacklevel=5)
    return rows, new_layers


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
            error on those activations instead of the weight error. ``config.calibration``
            says how: block by block (``"sequential"``, which iterates the batches several
            times and so holds them in a list) or in one pass (``"one-shot"``).
        progress: show tqdm progress bars (if tqdm is installed).
        verbose: print the report table.

    Returns a :class:`ConversionReport`. The layers' dtype and device are kept. After an error
    the model is as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = GBLRConfig() if config is None else config
    if not isinstance(config, GBLRConfig):
        raise TypeError(f"config must be a gblr.GBLRConfig, got {type(config).__name__}")
    start = time.perf_counter()
    targets = find_targets(model, config)
    tied = tied_weights(model)
    if config.allocation in FISHER_ALLOCATIONS and calibration is None:
        raise ValueError(f"allocation={config.allocation!r} weighs each layer by its calibrated sensitivity: pass "
                         "calibration batches, or use allocation='error'")
    mode = None if calibration is None else config.calibration
    stages = None
    if mode == "sequential":
        check_batches(calibration)
        calibration = list(calibration)
        if not calibration:
            raise ValueError("calibration yielded no batches")
        stages = find_stages(model, targets)
        modes = [(module, module.training) for module in model.modules()]
        try:
            model.eval()
            with torch.no_grad():
                reason = ("no nn.ModuleList or nn.Sequential of two or more blocks holds a target" if stages is None
                          else check_stages(model, stages, calibration[0]))
        finally:
            for module, training in modes:
                module.training = training
        if reason is not None:
            warnings.warn(f"sequential calibration needs the targets in a list of blocks that the model runs one "
                          f"after the other: {reason}; calibrating one-shot instead", stacklevel=2)
            mode, stages = "one-shot", None

    if stages is None:
        rows, new_layers = _convert_one_shot(model, targets, config, calibration, tied, progress)
        for target in targets:  # the model changes only now: an error above left it untouched
            if target.name in new_layers:
                for path in target.names:
                    replace_module(model, path, new_layers[target.name])
    else:
        originals = {path: model.get_submodule(path) for target in targets for path in target.names}
        modes = [(module, module.training) for module in model.modules()]
        try:
            model.eval()
            with torch.no_grad():
                rows, new_layers = _convert_sequential(model, targets, config, calibration, stages, tied, progress)
        except BaseException:
            for path, module in originals.items():  # as it was: every target back in place
                replace_module(model, path, module)
            raise
        finally:
            for module, training in modes:
                module.training = training
        for target in targets:  # the new layers were made in eval mode: give them their originals' mode
            if target.name in new_layers:
                new_layers[target.name].train(target.module.training)
    rows = [rows[target.name] for target in targets]
    empty = [row.name for row in rows if row.skipped is None and row.flops == 0]
    if empty:
        warnings.warn(
            f"{len(empty)} layer(s) got no block at their ratio and now output only their bias: "
            f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''} (raise flops_ratio or use allocation='error')",
            stacklevel=2,
        )
    report = ConversionReport(
        tuple(rows), config.flops_ratio, config.allocation, config.method, any(row.calibrated for row in rows),
        time.perf_counter() - start, mode, None if stages is None else str(stages),
    )
    if verbose:
        print(report)
    return report
