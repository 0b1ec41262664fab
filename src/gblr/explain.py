"""``gblr.explain(model)``: which inference path each GBLR layer takes, and why."""

from __future__ import annotations

import dataclasses
import numbers

from torch import nn

from .conv import FrozenGBLRConv2d
from .frozen import FrozenGBLRLinear
from .linear import GBLRLinear

__all__ = ["Explanation", "LayerPaths", "explain"]


@dataclasses.dataclass(frozen=True)
class LayerPaths:
    """One row of :func:`explain`: a layer, its cost, and the path it takes per token count."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    flops_ratio: float
    padded_ratio: float | None  # MACs of the tiled path (tiles padded) / dense MACs; None if not frozen
    gemms: int | None
    kernel: str  # the layer's setting, one of gblr.frozen.KERNELS; "trainable" for GBLRLinear
    paths: dict[int, tuple[str, dict[str, float]]]  # tokens -> (path, measured seconds per path)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What :func:`explain` returns: one :class:`LayerPaths` per GBLR layer; ``str()`` gives a table."""

    layers: list[LayerPaths]
    tokens: tuple[int, ...]

    def __str__(self) -> str:
        header = f"{'layer':<40} {'shape':>11} {'FLOPs':>6} {'tiled':>6} {'GEMMs':>5}  " + "  ".join(
            f"{f'{t} tok':>18}" for t in self.tokens
        )
        lines = [header, "-" * len(header)]
        for row in self.layers:
            shape = f"{row.shape[0]}x{row.shape[1]}"
            padded = "-" if row.padded_ratio is None else f"{row.padded_ratio:.3f}"
            gemms = "-" if row.gemms is None else str(row.gemms)
            cells = []
            for t in self.tokens:
                if row.kernel == "trainable":
                    cells.append(f"{'training form':>18}")
                elif t in row.paths and row.paths[t][1]:
                    path, seconds = row.paths[t]
                    speedup = seconds["dense"] / seconds[path]
                    cells.append(f"{path + f' {speedup:.2f}x':>18}")
                else:
                    cells.append(f"{row.kernel + ' (fixed)':>18}")
            lines.append(f"{row.name:<40} {shape:>11} {row.flops_ratio:>6.3f} {padded:>6} {gemms:>5}  " + "  ".join(cells))
        lines += [
            "",
            "FLOPs: the layer's MACs / dense MACs. tiled: MACs of the tiled path with its tiles padded / dense.",
            "Per token count: the path taken and its speed over the dense product of the same layer (measured once",
            "per power-of-two bucket of token counts with kernel='auto'; 'fixed' where the layer's kernel is set).",
            "Trainable GBLRLinear layers run their training form: freeze them (gblr.freeze_) for the fast paths.",
        ]
        return "\n".join(lines)


def explain(model: nn.Module, tokens=(1, 16, 256, 4096)) -> Explanation:
    """Measure and report the inference path of every GBLR layer of ``model`` at each token
    count in ``tokens`` (random inputs on the layer's device and dtype)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise ValueError(f"tokens must be a sequence of positive ints (token counts), got {tokens!r}")
    tokens = tuple(tokens)
    if not tokens or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t > 0 for t in tokens):
        raise ValueError(f"tokens must be a sequence of positive ints (token counts), got {tokens!r}")
    tokens = tuple(int(t) for t in tokens)
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, FrozenGBLRConv2d):  # paths depend on image batches: the choices made so far
            rows.append(LayerPaths(name or "(model)", (module.out_features, module.in_features), module.flops_ratio(),
                                   None, None, f"conv {module.kernel}: " + ", ".join(
                                       f"{key[-3:]} batch<={key[2]}: {path}" for key, (path, _) in module.choices.items()
                                   ) if module.choices else f"conv {module.kernel}", {}))
        elif isinstance(module, FrozenGBLRLinear):
            paths = {}
            for t in tokens:
                path = module.path_for(t)  # measured on random rows where not yet known
                measured = module.choices[module.choice_key(t)][1] if module.kernel == "auto" else {}
                paths[t] = (path, measured)
            product = module.tiled_product()
            rows.append(LayerPaths(
                name or "(model)", (module.out_features, module.in_features), module.flops_ratio(),
                product.macs / (module.in_features * module.out_features), product.gemms, module.kernel, paths,
            ))
        elif isinstance(module, GBLRLinear):
            rows.append(LayerPaths(name or "(model)", (module.out_features, module.in_features),
                                   module.flops_ratio(), None, None, "trainable", {}))
    if not rows:
        raise ValueError("model has no GBLR layers (see gblr.convert_ or gblr.GBLRLinear)")
    return Explanation(rows, tokens)
