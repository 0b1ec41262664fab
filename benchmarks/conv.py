"""Frozen GBLR convolutions against dense F.conv2d, and the choice of the kernel's matrix view.

    python benchmarks/conv.py                  # about 5 minutes on 2 cores
    python benchmarks/conv.py --run runs/resnet-dense-s0   # plus: view quality on trained kernels

Part 1, speed: speed-up = time of F.conv2d with the dense kernel / time of the frozen layer on
its automatic path (measured once for the batch shape, then kept), same process, interleaved
repeats, medians. Structures at each FLOPs ratio: "low rank" (one full-width block of the
largest rank within budget), "channel blocks" (dense blocks on the block diagonal of a grid of
channel groups, block-sparse's unit), "initial" (GBLRConv2d's initial structure: full-width
components for half the budget, square partial blocks at random places for the rest) and
"learned" (a GBLRConv2d trained from scratch with gblr.StructureLearner to imitate a random
teacher convolution on random images).

Part 2, which matrix view deploys faster. The kernel as the ``(out, in * kh * kw)`` matrix
(gblr's view: a low-rank block is one kh x kw convolution into R channels and one 1x1
convolution out) against one ``(out, in)`` matrix per tap (the paper's reference code: rank R'
per tap is one 1x1 convolution into kh * kw * R' channels and kh * kw shifted 1x1 convolutions
out), both at the same MACs.

Part 3 (with --run): which view approximates trained kernels better at equal MACs: the relative
error of the best low-rank approximation of every 3x3 kernel of a trained model in each view.

Writes docs/benchmarks/conv.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from common import DOCS, machine, median_ms, time_interleaved, write_outputs

import gblr
from gblr.flops import max_low_rank

SHAPES = [  # (channels in, channels out, image size, batch)
    (256, 256, 28, 16),
    (128, 128, 28, 16),
    (64, 64, 56, 16),
]
RATIOS = (0.25, 0.5, 1.0)
STRUCTURES = ("low rank", "channel blocks", "initial", "learned")


def low_rank(c_in: int, c_out: int, ratio: float) -> gblr.GBLRConv2d:
    layer = gblr.GBLRConv2d(c_in, c_out, 3, padding=1)
    rank = max(1, max_low_rank(ratio * c_in * 9 * c_out, c_out, c_in * 9))
    with torch.no_grad():
        layer.in_width.zero_()
        layer.out_width.zero_()
        layer.in_width[:rank] = 1.0
        layer.out_width[:rank] = 1.0
        layer.in_location.zero_()
        layer.out_location.zero_()
    return layer


def channel_blocks(c_in: int, c_out: int, ratio: float) -> gblr.GBLRConv2d:
    """Dense blocks on the diagonal of a grid x grid grid of channel groups, grid = 1 / ratio."""
    grid = max(1, round(1 / ratio))
    layer = gblr.GBLRConv2d(c_in, c_out, 3, padding=1, components=c_out)
    with torch.no_grad():
        for k in range(c_out):
            block = k * grid // c_out
            layer.in_width[k] = layer.out_width[k] = 1 / grid
            layer.in_location[k] = layer.out_location[k] = block / grid
    return layer


def learned(c_in: int, c_out: int, ratio: float, steps: int = 150) -> gblr.GBLRConv2d:
    torch.manual_seed(0)
    teacher = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    layer = gblr.GBLRConv2d(c_in, c_out, 3, padding=1, bias=False, init_flops_ratio=min(1.0, 2 * ratio))
    optimizer = torch.optim.AdamW(gblr.param_groups(layer, lr=1e-3, weight_decay=0.0))
    learner = gblr.StructureLearner(layer, optimizer, ratio, total_steps=steps)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, c_in, 8, 8, generator=generator)
        with torch.no_grad():
            target = teacher(x)
        F.mse_loss(layer(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
        learner.step()
    return layer


def build(structure: str, c_in: int, c_out: int, ratio: float) -> gblr.GBLRConv2d:
    torch.manual_seed(0)
    if structure == "low rank":
        return low_rank(c_in, c_out, ratio)
    if structure == "channel blocks":
        return channel_blocks(c_in, c_out, ratio)
    if structure == "initial":
        return gblr.GBLRConv2d(c_in, c_out, 3, padding=1, init_flops_ratio=ratio)
    return learned(c_in, c_out, ratio)


def speed_rows(repeats: int) -> list[dict]:
    rows = []
    for c_in, c_out, size, batch in SHAPES:
        x = torch.randn(batch, c_in, size, size)
        for ratio in RATIOS:
            for structure in STRUCTURES:
                if ratio == 1.0 and structure in ("channel blocks", "learned"):
                    continue  # one block / nothing to learn at the dense cost
                frozen = build(structure, c_in, c_out, ratio).freeze()
                kernel = frozen.weight.detach().clone()
                with torch.no_grad():
                    path = frozen.path_for_batch(x)
                    samples = time_interleaved(
                        {"dense": lambda: F.conv2d(x, kernel, None, 1, 1), "gblr": lambda: frozen(x)}, repeats
                    )
                dense_ms, gblr_ms = median_ms(samples["dense"]), median_ms(samples["gblr"])
                rows.append({
                    "part": "speed", "shape": f"{c_in}->{c_out} 3x3, {size}x{size}, batch {batch}",
                    "structure": structure, "flops_ratio": round(frozen.flops_ratio(), 4),
                    "blocks": len(frozen.supports), "path": path, "dense_ms": round(dense_ms, 3),
                    "gblr_ms": round(gblr_ms, 3), "speedup": round(dense_ms / gblr_ms, 3),
                })
                print(rows[-1], flush=True)
    return rows


def per_tap_low_rank(x: torch.Tensor, first: torch.Tensor, seconds: list[torch.Tensor], rank: int) -> torch.Tensor:
    """The per-tap view at rank ``rank`` per tap: one 1x1 convolution into 9 * rank channels, then
    for each tap a 1x1 convolution of its rank channels, shifted by the tap's offset, summed."""
    hidden = F.pad(F.conv2d(x, first), (1, 1, 1, 1))
    height, width = x.shape[-2:]
    y = None
    for tap, second in enumerate(seconds):
        i, j = divmod(tap, 3)
        part = F.conv2d(hidden[:, tap * rank : (tap + 1) * rank, i : i + height, j : j + width], second)
        y = part if y is None else y.add_(part)
    return y


def view_speed_rows(repeats: int) -> list[dict]:
    rows = []
    for c_in, c_out, size, batch in SHAPES:
        x = torch.randn(batch, c_in, size, size)
        dense_kernel = torch.randn(c_out, c_in, 3, 3) / (9 * c_in) ** 0.5
        for ratio in (0.25, 0.5):
            budget = ratio * c_in * 9 * c_out
            flat_rank = max_low_rank(budget, c_out, c_in * 9)
            tap_rank = max_low_rank(budget / 9, c_out, c_in)
            right = torch.randn(flat_rank, c_in, 3, 3)
            left = torch.randn(c_out, flat_rank, 1, 1)
            first = torch.randn(9 * tap_rank, c_in, 1, 1)
            seconds = [torch.randn(c_out, tap_rank, 1, 1) for _ in range(9)]
            with torch.no_grad():
                samples = time_interleaved({
                    "dense": lambda: F.conv2d(x, dense_kernel, None, 1, 1),
                    "matrix view": lambda: F.conv2d(F.conv2d(x, right, None, 1, 1), left),
                    "per-tap view": lambda: per_tap_low_rank(x, first, seconds, tap_rank),
                }, repeats)
            dense_ms = median_ms(samples["dense"])
            for view, macs in (("matrix view", flat_rank * (c_in * 9 + c_out)),
                               ("per-tap view", 9 * tap_rank * (c_in + c_out))):
                rows.append({
                    "part": "view speed", "shape": f"{c_in}->{c_out} 3x3, {size}x{size}, batch {batch}",
                    "view": view, "flops_ratio": round(macs / (c_in * 9 * c_out), 4),
                    "rank": flat_rank if view == "matrix view" else tap_rank,
                    "speedup": round(dense_ms / median_ms(samples[view]), 3),
                })
                print(rows[-1], flush=True)
    return rows


def view_quality_rows(run: Path) -> list[dict]:
    """Relative Frobenius error of the best low-rank approximation of each trained 3x3 kernel, in
    both views, at the same MACs (0.25 and 0.5 of dense)."""
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    state = state.get("model", state)
    rows = []
    for name, kernel in state.items():
        if not (name.endswith("weight") and kernel.dim() == 4 and kernel.shape[-2:] == (3, 3)) or kernel.shape[1] < 4:
            continue  # 3x3 kernels over at least 4 channels (not the stem over the image's channels)
        c_out, c_in = kernel.shape[:2]
        matrix = kernel.reshape(c_out, -1).double()
        taps = kernel.permute(2, 3, 0, 1).reshape(9, c_out, c_in).double()
        flat_s = torch.linalg.svdvals(matrix)
        tap_s = torch.linalg.svdvals(taps)  # (9, min(c_out, c_in))
        total = float(matrix.square().sum())
        for ratio in (0.25, 0.5):
            budget = ratio * c_in * 9 * c_out
            flat_rank = max_low_rank(budget, c_out, c_in * 9)
            tap_rank = max_low_rank(budget / 9, c_out, c_in)
            flat_error = float(flat_s[flat_rank:].square().sum()) / total
            tap_error = float(tap_s[:, tap_rank:].square().sum()) / total
            rows.append({"part": "view quality", "layer": name, "shape": f"{c_out}x{c_in}x3x3", "flops_ratio": ratio,
                         "matrix_view_error": round(flat_error**0.5, 4), "per_tap_view_error": round(tap_error**0.5, 4)})
            print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Frozen GBLR convolutions on the CPU", "",
        f"Command: `{command}`. Machine: {machine()}. fp32.", "",
        "## Speed against F.conv2d (3x3, padding 1)", "",
        "speed-up = dense F.conv2d time / frozen GBLRConv2d time (its automatic path), medians of interleaved "
        "repeats in one process.", "",
        "| shape | structure | FLOPs ratio | blocks | path | dense ms | GBLR ms | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in (r for r in rows if r["part"] == "speed"):
        lines.append(f"| {row['shape']} | {row['structure']} | {row['flops_ratio']:.3f} | {row['blocks']} | "
                     f"{row['path']} | {row['dense_ms']:.1f} | {row['gblr_ms']:.1f} | {row['speedup']:.2f}x |")
    lines += ["", "## Matrix view: (out, in x kh x kw) against one (out, in) matrix per tap", "",
              "Low rank at the same MACs in each view; speed-up over dense F.conv2d.", "",
              "| shape | view | FLOPs ratio | rank | speed-up |", "|---|---|---|---|---|"]
    for row in (r for r in rows if r["part"] == "view speed"):
        lines.append(f"| {row['shape']} | {row['view']} | {row['flops_ratio']:.3f} | {row['rank']} | "
                     f"{row['speedup']:.2f}x |")
    quality = [r for r in rows if r["part"] == "view quality"]
    if quality:
        lines += ["", "## Matrix view: approximation of trained kernels", "",
                  "Relative error of the best low-rank approximation at equal MACs (lower is better).", "",
                  "| layer | shape | FLOPs ratio | (out, in x 9) view | per-tap view |", "|---|---|---|---|---|"]
        for row in quality:
            lines.append(f"| {row['layer']} | {row['shape']} | {row['flops_ratio']} | {row['matrix_view_error']:.3f} | "
                         f"{row['per_tap_view_error']:.3f} |")
        for ratio in (0.25, 0.5):
            flat = [r["matrix_view_error"] for r in quality if r["flops_ratio"] == ratio]
            taps = [r["per_tap_view_error"] for r in quality if r["flops_ratio"] == ratio]
            lines.append(f"| median | | {ratio} | {statistics.median(flat):.3f} | {statistics.median(taps):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--run", type=Path, help="a finished `gblr train --model resnet --layer dense` run folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the table from docs/benchmarks/conv.json, recomputing only the view quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/conv.py" + (f" --run {args.run}" if args.run else "")
    if args.render_only:
        saved = json.loads((DOCS / "conv.json").read_text())["rows"]
        rows = [row for row in saved if row["part"] != "view quality"]
    else:
        rows = speed_rows(args.repeats) + view_speed_rows(args.repeats)
    if args.run is not None:
        rows += view_quality_rows(args.run)
    write_outputs("conv", rows, markdown(rows, command))
    print(json.dumps({"rows": len(rows)}))


if __name__ == "__main__":
    main()
