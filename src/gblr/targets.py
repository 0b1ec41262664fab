"""Which modules :func:`gblr.convert_` replaces, and how a target is read and replaced.

Targets are ``nn.Linear`` layers, Hugging Face ``Conv1D`` layers (GPT-2 style, weight stored
``(in, out)``) and ``nn.Conv2d`` layers with ``groups=1`` and zero padding (their kernel's
``(out, in * kh * kw)`` matrix view, replaced by a :class:`gblr.GBLRConv2d`), chosen by :class:`gblr.GBLRConfig`'s ``target_modules`` / ``exclude_modules`` /
``filter_fn``. The rule for ``"all-linear"`` lives here, in :func:`find_targets`, and is
structural: every candidate but the model's output embeddings (``get_output_embeddings()``).
The ``out_proj`` of ``nn.MultiheadAttention`` is never a candidate: the attention reads its
weight directly instead of calling it. A module reachable by several paths (shared) is one
target with all its names.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from .config import ALL_LINEAR, GBLRConfig
from .flops import hf_conv1d_type
from .frozen import FrozenGBLRLinear
from .linear import GBLRLinear

__all__ = [
    "Target",
    "find_targets",
    "is_conv",
    "is_linear",
    "linear_features",
    "module_device",
    "name_matches",
    "replace_module",
    "target_names",
    "tied_weights",
]


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Conv2d`` that a :class:`gblr.GBLRConv2d` can replace
    (``groups=1``, ``padding_mode="zeros"``)."""
    return type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear``, a Hugging Face ``Conv1D`` or a convertible
    ``nn.Conv2d`` (:func:`is_conv`): a layer whose weight is a matrix gblr can replace."""
    conv1d = hf_conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)) or is_conv(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an nn.Linear, a Conv1D, a GBLR layer or an nn.Conv2d
    (``in_channels * kh * kw``, ``out_channels``: its kernel's matrix view)."""
    if isinstance(module, (nn.Linear, GBLRLinear, FrozenGBLRLinear)):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return int(module.weight[0].numel()), module.out_channels
    return tuple(module.weight.shape)  # Conv1D: weight is (in, out)


@dataclasses.dataclass
class Target:
    """A linear module to convert, with every path to it."""

    name: str  # the first of names, as named_modules gives it
    names: list[str]  # every path to the module (a shared module has several)
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return not isinstance(self.module, (nn.Linear, nn.Conv2d))

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def in_features(self) -> int:
        return linear_features(self.module)[0]

    @property
    def out_features(self) -> int:
        return linear_features(self.module)[1]

    def weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight, as nn.Linear stores it (a convolution's kernel as its
        ``(out, in * kh * kw)`` matrix view)."""
        weight = self.module.weight.detach()
        if self.is_conv:
            return weight.reshape(weight.shape[0], -1)
        return weight.T if self.transposed else weight

    def float_weight(self) -> torch.Tensor:
        """:meth:`weight` in float32 or float64 (half precision is raised to float32), the
        precision the decompositions and error measures work in."""
        weight = self.weight()
        return weight if weight.dtype in (torch.float32, torch.float64) else weight.float()


def name_matches(names: list[str], patterns: str | list[str]) -> bool:
    """Whether any of ``names`` matches ``patterns``: a regex matching a whole name, or a list of
    names, each equal to a name or to a dotted suffix of it."""
    if isinstance(patterns, str):
        return any(re.fullmatch(patterns, name) for name in names)
    return any(name == pattern or name.endswith("." + pattern) for name in names for pattern in patterns)


def _candidates(model: nn.Module) -> list[Target]:
    """Every linear module (nn.Linear, Conv1D, convertible Conv2d) with all its paths, in model order."""
    paths: dict[int, Target] = {}
    attention_projections = {
        id(module.out_proj) for module in model.modules() if isinstance(module, nn.MultiheadAttention)
    }
    for name, module in model.named_modules(remove_duplicate=False):
        if not is_linear(module) or id(module) in attention_projections:
            continue
        if id(module) in paths:
            paths[id(module)].names.append(name)
        else:
            paths[id(module)] = Target(name, [name], module)
    return list(paths.values())


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def find_targets(model: nn.Module, config: GBLRConfig) -> list[Target]:
    """The modules of ``model`` that ``config`` selects, in model order (see :class:`GBLRConfig`).

    Raises a ValueError when nothing matches (listing the model's linear modules) or when the
    model itself is a linear layer (it cannot be replaced in place).
    """
    candidates = _candidates(model)
    if not candidates:
        raise ValueError("the model has no nn.Linear, Conv1D or Conv2d (groups=1) module to convert")
    if config.target_modules == ALL_LINEAR:
        output = _output_embeddings(model)
        targets = [target for target in candidates if target.module is not output]
    else:
        targets = [target for target in candidates if name_matches(target.names, config.target_modules)]
    if config.exclude_modules is not None:
        targets = [target for target in targets if not name_matches(target.names, config.exclude_modules)]
    if config.filter_fn is not None:
        targets = [target for target in targets if config.filter_fn(target.name, target.module)]
    if not targets:
        shown = ", ".join(repr(target.name) for target in candidates[:8])
        more = f", ... ({len(candidates)} in all)" if len(candidates) > 8 else ""
        raise ValueError(
            f"no module matches target_modules={config.target_modules!r}, exclude_modules="
            f"{config.exclude_modules!r}{' and filter_fn' if config.filter_fn else ''}: that selection matches "
            f"none of the model's {len(candidates)} linear modules ({shown}{more})"
        )
    roots = [target for target in targets if "" in target.names]
    if roots:
        raise ValueError(
            "the model itself is a linear layer and cannot be replaced in place; use gblr.decompose(layer.weight, ...)"
        )
    return targets


def target_names(model: nn.Module, config: GBLRConfig) -> list[str]:
    """The names of the modules :func:`find_targets` selects (the first name of a shared one)."""
    return [target.name for target in find_targets(model, config)]


def tied_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {key for key, count in owners.items() if count > 1}


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (a dotted name from ``named_modules``, not ``""``) in ``model``."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)  # ModuleList / Sequential children are named "0", "1", ...


def module_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter (or buffer); None if it holds no tensor."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None
