"""Argument checks shared by the layers: each raises a ValueError naming the argument."""

from __future__ import annotations

import math

import torch


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_flops_ratio(value, name: str = "flops_ratio") -> float:
    """Return ``value`` as a float if it lies in ``(0, 1]``; raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_share(value, name: str) -> float:
    """Return ``value`` as a float if it lies in ``[0, 1]``; raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_sigma(sigma) -> float | None:
    """``None`` (sharp boxcars) or a positive finite number, returned as a float."""
    if sigma is not None and not (
        isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma) and sigma > 0
    ):
        raise ValueError(f"sigma must be None (sharp boxcars) or a positive finite number, got {sigma!r}")
    return None if sigma is None else float(sigma)


def check_input(x: torch.Tensor, in_features: int) -> None:
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"input must have in_features={in_features} in its last dimension, got shape {tuple(x.shape)}"
        )


def check_matrix(name: str, value) -> torch.Tensor:
    """``value`` detached, if it is a non-empty, finite, 2-D floating point tensor."""
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a 2-D floating point tensor, got {shape}")
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value.detach()
