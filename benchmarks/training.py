"""Training-step cost of GBLRLinear against nn.Linear: time and peak memory.

    python benchmarks/training.py [--threads 2] [--repeats 15]

A step is forward + backward of one layer given an upstream gradient (no loss function, so the
layers alone are timed), structural parameters included. Two cases: an inner layer, whose input
needs a gradient (most layers of a network), and a first layer, whose input does not (both
layers then skip the input gradient). GBLR layers have K = min(in, out) rank-1 components at
random locations, in one of two phases: *structure* (mid-way through structure learning: sigma =
10, widths uniform in [0.3, 0.7]) or *content* (the last phase: sigma = None, the structure
fixed, ``compact`` on; widths uniform in [0.1, 0.4], about 0.3 of the dense FLOPs, hundreds of
overlapping blocks). Both layers run interleaved in one process on the same input; the table
gives medians and the ratio GBLR / dense. Peak memory = parameters + input + upstream gradient + the largest growth of allocated
memory during the step (the profiler's allocation events).

End to end (``--model-steps``, default 40): training steps of the Fashion-MNIST ViT recipe
(`gblr train`'s default architecture, batch 128, AdamW with foreach=True as the recipe uses)
with dense layers and with GBLR layers at FLOPs target 0.3 (the recipe's default, 4 dense blocks
per layer, and without them), mid-way through structure learning and in the content phase (the
StructureLearner's step included), in alternating blocks of 5
steps; an epoch is 468 such steps, so the ratio of step times is the ratio of epoch times.
Writes docs/benchmarks/training.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from common import machine, median_ms, time_interleaved, write_outputs
from torch import nn
from torch.profiler import ProfilerActivity, profile

import gblr
from gblr.learning import gblr_layers
from gblr.recipes.models import build_model
from gblr.recipes.train import DENSE_BLOCKS

SHAPES = [(768, 3072), (3072, 768)]
TOKENS = [64, 4096]
CASES = {"inner": True, "first": False}  # case -> does the input need a gradient


# phase -> (sigma, the range widths are drawn from, compact)
PHASES = {"structure": (10.0, (0.3, 0.7), False), "content": (None, (0.1, 0.4), True)}


def phase_layer(in_features: int, out_features: int, phase: str, dtype=torch.float32) -> gblr.GBLRLinear:
    """A layer of K = min(in, out) rank-1 components at random locations, as in ``phase``."""
    sigma, (low, high), compact = PHASES[phase]
    layer = gblr.GBLRLinear(in_features, out_features, sigma=sigma, dtype=dtype)
    with torch.no_grad():
        layer.in_width.uniform_(low, high)
        layer.out_width.uniform_(low, high)
        layer.in_location.uniform_(0.0, 1.0)
        layer.out_location.uniform_(0.0, 1.0)
    layer.compact = compact
    return layer


def path_of(layer: gblr.GBLRLinear, tokens: int) -> str:
    """The product the layer's last forward pass took (a compact layer may keep the masked one)."""
    if layer.compact and layer.compact_plan(tokens) is not None:
        return "compact"
    return "materialise" if layer.materialises(tokens) else "thin"


def step(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor):
    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad_y)

    return run


def peak_bytes(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> int:
    """Bytes of the parameters, the input and the upstream gradient (each storage once) plus the
    largest growth of allocated CPU memory during forward + backward (the profiler's allocation
    and free events, in order). Gradients are cleared before the profiled region: frees of
    blocks allocated before it are not reported, so a free inside it would go uncounted."""
    step(layer, x, grad_y)()  # warm: caches and lazily built tables are not part of a step
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        layer(x).backward(grad_y)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = growth = 0
    for event in events:
        live += event.nbytes()
        growth = max(growth, live)
    held = [x, grad_y, *layer.parameters()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    return sum(storages.values()) + growth


def model_steps(steps: int, block: int = 5) -> dict:
    """Median seconds per training step of the ViT recipe, dense and GBLR (see the docstring)."""
    runs = {}
    phases = (("structure phase", 1800), ("content phase", 4000))
    variants = [("dense", None, 0)] + [(f"gblr {phase}", start, DENSE_BLOCKS) for phase, start in phases] + [
        (f"gblr without dense blocks, {phase}", start, 0) for phase, start in phases]
    for name, start, dense_blocks in variants:
        torch.manual_seed(0)
        model = build_model("vit", (1, 28, 28), 10, layer="dense" if start is None else "gblr", flops_ratio=0.3,
                            layer_options={"dense_blocks": dense_blocks} if start is not None else None)
        optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=2e-3, weight_decay=0.05), foreach=True)
        learner = None
        if start is not None:  # 10 epochs' worth of steps (3744 of structure learning), from step `start`
            learner = gblr.StructureLearner(model, optimizer, 0.3, total_steps=4680)
            if start > learner.structure_steps:  # the structure at the target, then fixed
                with torch.no_grad():
                    for layer in gblr_layers(model):
                        layer.in_width.mul_(0.5)
                        layer.out_width.mul_(0.5)
            learner.load_state_dict({**learner.state_dict(), "step_count": start})
        images, labels = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

        def run(model=model, optimizer=optimizer, learner=learner, images=images, labels=labels):
            for _ in range(block):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if learner is not None:
                    learner.step()

        runs[name] = run
    samples = time_interleaved(runs, repeats=max(1, steps // block))
    return {name: median_ms(times) / block for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--model-steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for (in_features, out_features), phase in itertools.product(SHAPES, PHASES):
        dense = nn.Linear(in_features, out_features)
        structured = phase_layer(in_features, out_features, phase)
        for tokens in TOKENS:
            grad_y = torch.randn(tokens, out_features)
            for case, input_grad in CASES.items():
                x = torch.randn(tokens, in_features, requires_grad=input_grad)
                runs = {"dense": step(dense, x, grad_y), "gblr": step(structured, x, grad_y)}
                samples = time_interleaved(runs, repeats=args.repeats)
                dense_ms, gblr_ms = median_ms(samples["dense"]), median_ms(samples["gblr"])
                peaks = {name: peak_bytes(layer, x, grad_y) / 2**20
                         for name, layer in (("dense", dense), ("gblr", structured))}
                row = {
                    "shape": f"{in_features}x{out_features}", "phase": phase, "flops_ratio": structured.flops_ratio(),
                    "tokens": tokens, "case": case,
                    "dense_ms": dense_ms, "gblr_ms": gblr_ms, "time_ratio": gblr_ms / dense_ms,
                    "dense_peak_mb": peaks["dense"], "gblr_peak_mb": peaks["gblr"],
                    "memory_ratio": peaks["gblr"] / peaks["dense"],
                    "path": path_of(structured, tokens),
                }
                rows.append(row)
                print(f"{row['shape']:>9} {phase:9} tokens {tokens:5d} {case:5}: dense {dense_ms:7.2f} ms, GBLR {gblr_ms:7.2f} ms "
                      f"({row['time_ratio']:.2f}x, {row['path']}), peak {peaks['dense']:.1f} / {peaks['gblr']:.1f} MB "
                      f"({row['memory_ratio']:.2f}x)", flush=True)
    model = model_steps(args.model_steps)
    for name, ms in model.items():
        print(f"ViT recipe step, {name}: {ms:.1f} ms ({ms / model['dense']:.2f}x dense)")
    lines = [
        "# Training step: GBLRLinear vs nn.Linear",
        "",
        f"Machine: {machine()}. float32, median of {args.repeats} interleaved runs. "
        "Command: `python benchmarks/training.py`.",
        "Step = forward + backward of the layer given an upstream gradient, structural parameters included; "
        "GBLR with K = min(in, out) rank-1 components at random locations, in the *structure* phase (sigma = 10, "
        "widths in [0.3, 0.7]: the masked product) or the *content* phase (sigma = None, structure fixed, widths in "
        "[0.1, 0.4]: the compact product over the cropped blocks). "
        "*inner*: the input needs a gradient (most layers); *first*: it does not. "
        "Peak memory: parameters + input + upstream gradient + the largest growth of allocated memory during the step.",
        "",
        "| in x out | phase | GBLR FLOPs ratio | tokens | layer | nn.Linear (ms) | GBLRLinear (ms) | time ratio | "
        "GBLR path | peak memory, dense / GBLR (MB) |",
        "|---|---|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    lines += [
        f"| {r['shape']} | {r['phase']} | {r['flops_ratio']:.3f} | {r['tokens']} | {r['case']} | {r['dense_ms']:.2f} | "
        f"{r['gblr_ms']:.2f} | "
        f"{r['time_ratio']:.2f}x | {r['path']} | {r['dense_peak_mb']:.1f} / {r['gblr_peak_mb']:.1f} "
        f"({r['memory_ratio']:.2f}x) |"
        for r in rows
    ]
    lines += [
        "",
        "## End to end: the Fashion-MNIST ViT recipe",
        "",
        f"Training step (forward, backward, AdamW, structural step) of `gblr train`'s default ViT, batch 128, "
        f"median over {args.model_steps} steps in alternating blocks of 5; GBLR at FLOPs target 0.3 (with the "
        f"recipe's {DENSE_BLOCKS} dense blocks per layer, and without), mid-way through structure learning, and in "
        "the content phase (structure fixed near 0.3, compact layers). An epoch is 468 steps, so the step ratio is "
        "the epoch-time ratio.",
        "",
        "| layers | ms per step | epoch time vs dense |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {ms:.1f} | {ms / model['dense']:.2f}x |" for name, ms in model.items()]
    rows += [{"shape": "vit-recipe", "phase": name, "ms": ms, "time_ratio": ms / model["dense"]}
             for name, ms in model.items()]
    json_path, md_path = write_outputs("training", rows, "\n".join(lines) + "\n")
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
