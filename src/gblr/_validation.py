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
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"input must have in_features={in_features} in its last dimension, got shape {tuple(x.shape)}"
        )


def layer_name(layer) -> str:
    """How error messages name a layer that does not know its name in the model:
    ``"GBLRLinear(in_features=16, out_features=8)"``."""
    return f"{type(layer).__name__}(in_features={layer.in_features}, out_features={layer.out_features})"


def check_input_dtype(x: torch.Tensor, dtype: torch.dtype, layer) -> None:
    """Refuse what ``nn.Linear`` refuses: a non-floating input, or a floating input of another
    dtype than the layer's, unless autocast is on for the input's device (autocast then chooses
    the compute dtype). Without this the layers would compute silently in the input's dtype, or
    return zeros for integer inputs. ``layer``: the module (named by :func:`layer_name`, only
    when there is an error: this runs on every forward pass) or a name."""
    if x.is_floating_point() and (x.dtype == dtype or torch.is_autocast_enabled(x.device.type)):
        return
    layer = layer if isinstance(layer, str) else layer_name(layer)
    if not x.is_floating_point():
        raise ValueError(
            f"input must be a floating point tensor of dtype {dtype} (the dtype of {layer}), got {x.dtype}; "
            f"convert it with x.to({dtype})"
        )
    raise ValueError(
        f"input has dtype {x.dtype} but {layer} has dtype {dtype}: cast the input (x.to({dtype})) or the "
        f"layer (.to({x.dtype})), or run under torch.autocast"
    )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in for input ``x``: the autocast dtype where autocast is on for
    ``x``'s device, else ``x``'s own (which :func:`check_input_dtype` has matched to the layer's)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def check_finite_number(name: str, value, minimum: float = 0.0, allow_minimum: bool = True):
    """``value`` if it is a finite real number at least ``minimum`` (above it with
    ``allow_minimum=False``); a ValueError naming ``name`` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= minimum if allow_minimum else value > minimum)
    if not ok:
        bound = f">= {minimum:g}" if allow_minimum else f"> {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


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
