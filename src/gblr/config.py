"""GBLRConfig: what :func:`gblr.convert_` does to a model, checked when it is made.

    config = gblr.GBLRConfig(flops_ratio=0.5, exclude_modules=["pooler.dense"])

Which modules are targets is decided in :mod:`gblr.targets`, how the budget is split among them
in :mod:`gblr.allocation`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

from torch import nn

from ._validation import check_flops_ratio

__all__ = ["ALLOCATIONS", "ALL_LINEAR", "CALIBRATIONS", "METHODS", "GBLRConfig"]

ALL_LINEAR = "all-linear"
ALLOCATIONS = ("error", "fisher", "fisher-next-token", "uniform")
CALIBRATIONS = ("sequential", "one-shot")
METHODS = ("gblr", "svd")
# Keyword arguments of gblr.decompose that convert_ sets itself, per layer.
_RESERVED_OPTIONS = ("calibration", "bias", "flops_ratio", "weight")


def _check_patterns(field: str, value, allow_none: bool) -> str | list[str] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if field == "exclude_modules" and value == ALL_LINEAR:
            raise ValueError(f"exclude_modules={ALL_LINEAR!r} would exclude every target; use None or names / a regex")
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"{field} must be a valid regular expression, got {value!r}: {error}") from None
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, str) and item for item in value):
        return list(value)
    expected = f"{ALL_LINEAR!r}, a regex (str) or a non-empty list of module names"
    raise ValueError(f"{field} must be {'None, ' if allow_none else ''}{expected}, got {value!r}")


@dataclasses.dataclass
class GBLRConfig:
    """What :func:`convert_` does.

    Which modules are targets (:func:`gblr.targets.find_targets`): the candidates are every
    ``nn.Linear`` and Hugging Face ``Conv1D`` of the model, except the ``out_proj`` of
    ``nn.MultiheadAttention`` (the attention reads its weight directly instead of calling it, so
    a replacement would never run). ``target_modules`` picks among them, then
    ``exclude_modules`` removes some, then ``filter_fn`` has the last say.

    Args:
        flops_ratio: global FLOPs target over the targeted layers (without override), in ``(0, 1]``.
        target_modules: ``"all-linear"`` (default): every candidate except the model's output
            embedding layer, the module ``model.get_output_embeddings()`` returns (if the model
            has that method): it maps to the vocabulary and is usually tied to the input
            embedding. The rule is structural, never a name: a layer that some task does not
            use (such as the pooler of a sentence encoder, see ``gblr compress``) is left out
            with ``exclude_modules``. A list: module names, each matching a module's full name
            exactly or as a dotted suffix (``"query"`` matches
            ``"encoder.layer.0.attention.self.query"`` but not ``"xquery"``); any other str: a
            regex that must match the full name. A module reachable by several paths (shared)
            matches if any of its names does.
        exclude_modules: ``None`` or names / a regex in the same forms, removed from the targets.
        overrides: ``{regex: flops_ratio}``: a target whose full name matches a regex (the first
            in dict order) gets that fixed ratio and is left out of the global allocation.
        allocation: ``"error"`` (default): ranks by greedy error-per-MAC allocation
            (:mod:`gblr.allocation`), every layer's relative output error counted alike;
            ``"fisher"``: the same, each layer's error weighed by how much the model's
            predictions depend on that layer's output (:func:`gblr.calibration.fisher_sensitivities`;
            needs calibration batches and a model whose output is logits, such as a causal LM:
            on SmolLM2-135M at 0.8 of the decoder's FLOPs it gave held-out perplexity 24.0
            where ``"error"`` gave 36.9, dense 16.0); ``"fisher-next-token"``: the same with the
            calibration text's own next tokens as labels (the empirical Fisher; batches of token ids;
            whitened SVD on SmolLM2 at 0.8 / 0.6: 23.0 / 59.1 against 24.0 / 60.2 with ``"fisher"``);
            ``"uniform"``: every layer at ``flops_ratio``.
        method: ``"gblr"`` (default) decomposes with :func:`gblr.decompose`; ``"svd"`` with
            :func:`gblr.svd_decompose` (truncated SVD, activation-aware when calibrated).
        min_layer_ratio: floor of each layer's ratio in the ``"error"`` and Fisher allocations, in
            ``[0, flops_ratio]``, so that no layer is wiped out; ``None`` (default) means
            ``0.25 * flops_ratio``. A layer never gets less than rank 1.
        decompose_options: extra keyword arguments for :func:`gblr.decompose` (``method="gblr"``).
        filter_fn: ``filter_fn(name, module) -> bool``, called last on each candidate; False drops it.
        calibration: how :func:`convert_` uses calibration batches. ``"one-shot"`` (default):
            every target's statistics from one pass of the original model. ``"sequential"``:
            block by block through the model's repeated blocks (a decoder's layers), each layer
            fitted to reproduce the original model's outputs from the inputs the compressed
            blocks before it give it (:mod:`gblr.sequential`); the budget split is decided
            first, on the original model's statistics. Where the model has no such blocks,
            one-shot, with a warning. On a small trained Llama sequential calibration lowered the
            held-out KL divergence from the dense model by 26-61 % (docs/compression.md), but on
            SmolLM2-135M (30 blocks) it did not finish within 10 minutes on 2 shared cores, so it
            is not yet the default.
    """

    flops_ratio: float = 0.5
    target_modules: str | list[str] = ALL_LINEAR
    exclude_modules: str | list[str] | None = None
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    allocation: str = "error"
    method: str = "gblr"
    min_layer_ratio: float | None = None
    decompose_options: dict = dataclasses.field(default_factory=dict)
    filter_fn: Callable[[str, nn.Module], bool] | None = None
    calibration: str = "one-shot"

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
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
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
