"""Training-step cost of GBLRLinear against nn.Linear: time and memory kept for backward.

    python benchmarks/training.py [--threads 2] [--repeats 15]

A step is forward + backward (structural parameters included) of ``y.square().mean()``. GBLR
layers are in a mid-training state: K = min(in, out) rank-1 components, sigma = 10, widths
uniform in [0.3, 0.7], random locations. Both layers run interleaved in one process on the same
input; the table gives medians and the ratio GBLR / dense. "Saved" is the memory autograd keeps
for the backward pass (activations and intermediates), counted with saved-tensor hooks.
Writes docs/benchmarks/training.{json,md}.
"""

from __future__ import annotations

import argparse

import torch
from common import machine, median_ms, time_interleaved, write_outputs
from torch import nn

import gblr

SHAPES = [(768, 3072), (3072, 768)]
TOKENS = [64, 4096]


def mid_training_layer(in_features: int, out_features: int, dtype=torch.float32) -> gblr.GBLRLinear:
    layer = gblr.GBLRLinear(in_features, out_features, sigma=10.0, dtype=dtype)
    with torch.no_grad():
        layer.in_width.uniform_(0.3, 0.7)
        layer.out_width.uniform_(0.3, 0.7)
        layer.in_location.uniform_(0.0, 1.0)
        layer.out_location.uniform_(0.0, 1.0)
    return layer


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass, each storage once,
    leaving out the input and the parameters (they are held whether or not a step runs)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x).square().mean()
    for held in [x, *layer.parameters()]:
        storages.pop(held.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def step(layer: nn.Module, x: torch.Tensor):
    def run():
        layer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for in_features, out_features in SHAPES:
        dense = nn.Linear(in_features, out_features)
        structured = mid_training_layer(in_features, out_features)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features)
            samples = time_interleaved({"dense": step(dense, x), "gblr": step(structured, x)}, repeats=args.repeats)
            dense_ms, gblr_ms = median_ms(samples["dense"]), median_ms(samples["gblr"])
            row = {
                "shape": f"{in_features}x{out_features}", "tokens": tokens, "dense_ms": dense_ms, "gblr_ms": gblr_ms,
                "time_ratio": gblr_ms / dense_ms,
                "dense_saved_mb": saved_bytes(dense, x) / 2**20, "gblr_saved_mb": saved_bytes(structured, x) / 2**20,
                "path": "materialise" if structured._materialise_is_cheaper(tokens) else "thin",
            }
            row["memory_ratio"] = row["gblr_saved_mb"] / row["dense_saved_mb"]
            rows.append(row)
            print(f"{row['shape']:>9} tokens {tokens:5d}: dense {dense_ms:7.2f} ms, GBLR {gblr_ms:7.2f} ms "
                  f"({row['time_ratio']:.2f}x, {row['path']}), saved {row['dense_saved_mb']:.1f} / "
                  f"{row['gblr_saved_mb']:.1f} MB", flush=True)
    lines = [
        "# Training step: GBLRLinear vs nn.Linear",
        "",
        f"Machine: {machine()}. float32, median of {args.repeats} interleaved runs. "
        "Command: `python benchmarks/training.py`.",
        "Step = forward + backward, structural parameters included; GBLR mid-training "
        "(K = min(in, out), r = 1, sigma = 10, widths in [0.3, 0.7]).",
        "",
        "| in x out | tokens | nn.Linear (ms) | GBLRLinear (ms) | time ratio | GBLR path | saved for backward, dense / GBLR (MB) |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    lines += [
        f"| {r['shape']} | {r['tokens']} | {r['dense_ms']:.2f} | {r['gblr_ms']:.2f} | {r['time_ratio']:.2f}x | "
        f"{r['path']} | {r['dense_saved_mb']:.1f} / {r['gblr_saved_mb']:.1f} ({r['memory_ratio']:.2f}x) |"
        for r in rows
    ]
    json_path, md_path = write_outputs("training", rows, "\n".join(lines) + "\n")
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
