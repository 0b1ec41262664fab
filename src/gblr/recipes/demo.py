"""The tour behind ``gblr demo``: the core of the package in a few seconds, printed.

Five steps, each checked by ``tests/test_cli.py``: Gaudi masks at several smoothings; low-rank,
block-sparse and block-low-rank matrices as exact GBLR layers at their native cost; a small model
of GBLR layers, frozen, with the same outputs; gradients reaching the widths and locations; the
speed of the mask against its frequency-domain definition.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

import gblr

from ..flops import low_rank_macs

__all__ = ["demo"]


def _mask_row(values: torch.Tensor) -> str:
    shades = " .:-=+*#%@"
    return "".join(shades[min(len(shades) - 1, int(round(float(v) * (len(shades) - 1))))] for v in values.clamp(0, 1))


def demo(seed: int = 0) -> None:
    """Print a tour of the core in a few seconds: masks, exact special cases, a layer, freezing."""
    torch.manual_seed(seed)
    print(f"gblr {gblr.__version__}, torch {torch.__version__}\n")

    print("1. Gaudi masks: a block of width 0.25 at location 0.875 of n=32 (it wraps around)")
    width, location = torch.tensor([0.25]), torch.tensor([0.875])
    for sigma in (None, 30.0, 10.0, 3.0):
        row = gblr.gaudi_mask(width, location, 32, sigma)[0]
        print(f"   sigma={sigma!s:>4}  |{_mask_row(row)}|  sum={row.sum():.3f}")

    print("\n2. Structured matrices are GBLR matrices, exactly and at their native cost")
    m, n = 48, 64
    p, q = torch.randn(m, 4, dtype=torch.float64), torch.randn(4, n, dtype=torch.float64)
    sparse = torch.zeros(m, n, dtype=torch.float64)
    for row, col in ((0, 0), (2, 5), (5, 7)):  # (5, 7) wraps: rows 40..47, columns 56..63 and 0..7
        rows = torch.arange(row * 8, row * 8 + 8) % m
        cols = torch.arange(col * 8 + 4, col * 8 + 12) % n
        sparse[rows[:, None], cols] = torch.randn(8, 8, dtype=torch.float64)
    blr = torch.block_diag(*[torch.randn(12, 2, dtype=torch.float64) @ torch.randn(2, 16, dtype=torch.float64)] * 4)
    # The native cost of each structure: its factors, or its dense blocks.
    cases = [
        ("low rank (R=4)", p @ q, gblr.structures.low_rank(p, q), low_rank_macs(4, m, n)),
        ("block sparse (3 of 48 blocks)", sparse, gblr.structures.block_sparse(sparse, (8, 8), offset=(0, 4)), 3 * 64),
        ("block low rank (4x4 grid, r=2)", blr, gblr.structures.block_low_rank(blr, (4, 4), 2),
         16 * low_rank_macs(2, 12, 16)),
    ]
    for name, dense, layer, native in cases:
        error = (layer.weight - dense).norm() / dense.norm()
        print(f"   {name:<32} relative error {error:.1e}   MACs {layer.flops():>5} (native {native})")

    print("\n3. A GBLRLinear in a model (half of the dense cost at init), frozen for inference")
    model = nn.Sequential(gblr.GBLRLinear(256, 512), nn.GELU(), gblr.GBLRLinear(512, 256, init_flops_ratio=0.25))
    x = torch.randn(64, 256)
    with torch.no_grad():
        reference = model(x)
        frozen = gblr.freeze_(copy.deepcopy(model))
        difference = (frozen(x) - reference).abs().max().item()
    print(gblr.flops_report(frozen))
    print(f"   frozen vs trainable output: max difference {difference:.1e}")

    print("\n4. Gradients reach widths and locations through the masks (sigma=10)")
    layer = model[0]
    layer.sigma = 10.0
    model(x).square().mean().backward()
    print(f"   |d loss / d in_width|  mean {layer.in_width.grad.abs().mean():.2e}")
    print(f"   |d loss / d out_location| mean {layer.out_location.grad.abs().mean():.2e}")

    print("\n5. Mask cost: K=768 masks of length 3072, sigma=10, forward + backward")
    width = torch.rand(768, requires_grad=True)
    location = torch.rand(768, requires_grad=True)
    seed_grad = torch.randn(768, 3072)
    timings = {}
    for name, fn in (("gblr.gaudi_mask", gblr.gaudi_mask), ("frequency-domain definition", gblr.masks.gaudi_mask_reference)):
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            fn(width, location, 3072, 10.0).backward(seed_grad)
            samples.append(time.perf_counter() - start)
        timings[name] = sorted(samples)[2]
        print(f"   {name:<28} {timings[name] * 1e3:7.2f} ms (median of 5)")
    print(f"   speed-up {timings['frequency-domain definition'] / timings['gblr.gaudi_mask']:.1f}x")
