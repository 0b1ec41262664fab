"""Calibration statistics: the second moment of a layer's inputs, and collecting it from a model.

    stats = gblr.InputStats(linear.in_features); stats.update(activations)
    layer = gblr.decompose(linear.weight, 0.5, calibration=stats)            # output error

With calibration, the error a decomposition minimises is the *output* error on the calibration
activations, ``||(W - W_hat) C^(1/2)||_F`` with ``C`` the inputs' second moment, instead of the
weight error. :func:`collect_stats` gathers ``C`` for many layers at once: it runs the model on
calibration batches with forward pre-hooks on the layers. For dict batches with a 2-D
``attention_mask`` (Hugging Face style), inputs of shape ``(batch, tokens, features)`` count only
at the real tokens, not at the padding.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ._progress import progress_bar
from .targets import Target, module_device

__all__ = ["InputStats", "collect_stats", "to_device"]


class InputStats:
    """Running second moment ``C = mean(x x^T)`` of a layer's inputs (float64).

    ``update(x)`` takes activations of shape ``(..., features)``; :meth:`from_second_moment`
    wraps a precomputed ``(features, features)`` matrix.
    """

    def __init__(self, features: int, device=None) -> None:
        self.features = int(features)
        self.sum = torch.zeros(self.features, self.features, dtype=torch.float64, device=device)
        self.tokens = 0

    @classmethod
    def from_second_moment(cls, matrix: torch.Tensor, tokens: int = 1) -> InputStats:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a second-moment matrix must be square, got shape {tuple(matrix.shape)}")
        stats = cls(matrix.shape[0], device=matrix.device)
        stats.sum = matrix.detach().to(torch.float64) * tokens
        stats.tokens = int(tokens)
        return stats

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.features:
            raise ValueError(f"activations must have {self.features} features in the last dimension, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"activations must be a floating point tensor, got {x.dtype}")
        flat = x.detach().reshape(-1, self.features).to(self.sum.device, torch.float64)
        if not bool(torch.isfinite(flat).all()):  # one NaN would poison C and every SVD built on it
            raise ValueError("activations contain NaN or infinite values")
        self.sum.addmm_(flat.T, flat)
        self.tokens += flat.shape[0]

    @property
    def second_moment(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("InputStats has seen no activations; call update() with some inputs first")
        return self.sum / self.tokens


def to_device(batch, device: torch.device | None):
    """``batch`` (a tensor, or dicts / tuples / lists / named tuples of them) with its tensors on
    ``device``; unchanged when ``device`` is None."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        values = [to_device(value, device) for value in batch]
        return type(batch)(*values) if hasattr(batch, "_fields") else type(batch)(values)
    return batch


def collect_stats(
    model: nn.Module, targets: list[Target], calibration: Iterable, progress: bool = True
) -> dict[str, InputStats]:
    """Input second moments of every target over the calibration batches, by target name.

    Each batch is moved to the model's device and called as ``model(**batch)`` (a dict),
    ``model(*batch)`` (a tuple / list) or ``model(batch)``, in eval mode without gradients. The
    forward pre-hooks are always removed and every module's training flag restored, also when
    the model fails. Targets that saw no input are left out, with a warning (they fall back to
    the weight error).
    """
    if isinstance(calibration, (torch.Tensor, Mapping)) or not isinstance(calibration, Iterable):
        raise TypeError(
            "calibration must be an iterable of batches (a list, a DataLoader, ...), each a tensor, a tuple of "
            f"positional inputs or a dict of keyword inputs; got {type(calibration).__name__} (wrap one batch in a list)"
        )
    stats = {
        target.name: InputStats(target.in_features, device=target.module.weight.device) for target in targets
    }

    tokens: dict[str, torch.Tensor | None] = {"mask": None}
    batches = 0

    def hook_for(name: str, layer_stats: InputStats):
        def hook(module, args, kwargs):
            inputs = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(inputs, torch.Tensor):
                mask = tokens["mask"]
                if mask is not None and inputs.shape[:-1] == mask.shape:
                    inputs = inputs[mask]  # real tokens only: padding never reaches the output
                try:
                    layer_stats.update(inputs)
                except ValueError as error:  # say where: which layer, which batch
                    raise ValueError(f"calibration batch {batches} (counting from 0): the inputs of layer {name!r}: "
                                     f"{error}") from None

        return hook

    modes = [(module, module.training) for module in model.modules()]
    device = module_device(model)
    handles = []
    try:
        for target in targets:
            handles.append(
                target.module.register_forward_pre_hook(hook_for(target.name, stats[target.name]), with_kwargs=True)
            )
        model.eval()
        try:
            total = len(calibration)
        except TypeError:
            total = None
        with torch.no_grad():
            for batch in progress_bar(total, "gblr calibration", progress, calibration):
                batch = to_device(batch, device)
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
