"""Model surgery: compress the linear layers of any model in place.

    config = gblr.GBLRConfig(flops_ratio=0.5, exclude_modules=["pooler.dense"])
    report = gblr.convert_(model, config, calibration=batches)   # like torchao's quantize_

:func:`convert_` is the orchestration of four steps, each in its own module: choose the target
layers (:mod:`gblr.targets`, the rules of :class:`gblr.GBLRConfig`); with ``calibration`` (an
iterable of model inputs), collect each target's input second moment (:mod:`gblr.calibration`),
so that every error below is the *output* error on those activations, otherwise the weight
error; split the FLOPs budget among the targets (:mod:`gblr.allocation`); decompose each target
at its ratio (:func:`gblr.decompose` or :func:`gblr.svd_decompose`) and put the new layers in.
The :class:`ConversionReport` it returns has a row per target: its ratio, cost, error, or why
it was kept dense. :mod:`gblr.pretrained` saves and loads the result.

The model is changed only after every layer has been decomposed, so an error leaves it as it
was; that needs memory for the new layers beside the old ones until the swap.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ._progress import progress_bar
from .allocation import Plan, plan_targets
from .calibration import InputStats, collect_stats
from .config import GBLRConfig
from .decompose import decompose, relative_error, svd_decompose
from .flops import low_rank_macs
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


def _decompose_one(target: Target, plan: Plan, config: GBLRConfig, stats: InputStats | None) -> nn.Module:
    """The GBLR layer that replaces ``target`` at ``plan``'s ratio, in the target's dtype and mode."""
    dtype = target.weight().dtype
    work = target.float_weight()
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
    targets = find_targets(model, config)
    stats = {} if calibration is None else collect_stats(model, targets, calibration, progress)
    plans = plan_targets(targets, config, stats, tied_weights(model))

    new_layers: dict[str, nn.Module] = {}
    rows = []
    for target in progress_bar(len(targets), "gblr convert", progress, targets):
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
                    error = relative_error(target.float_weight(), layer.weight, layer_stats)
        rows.append(
            LayerConversion(target.name, n, m, plan.ratio, flops, error, skipped, calibrated=layer_stats is not None)
        )

    for target in targets:
        if target.name in new_layers:
            for path in target.names:
                replace_module(model, path, new_layers[target.name])
    empty = [row.name for row in rows if row.skipped is None and row.flops == 0]
    if empty:
        warnings.warn(
            f"{len(empty)} layer(s) got no block at their ratio and now output only their bias: "
            f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''} (raise flops_ratio or use allocation='error')",
            stacklevel=2,
        )
    report = ConversionReport(
        tuple(rows), config.flops_ratio, config.allocation, config.method, bool(stats), time.perf_counter() - start
    )
    if verbose:
        print(report)
    return report
