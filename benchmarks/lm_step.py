"""Where a GPT training step spends its time, GBLR with and without dense blocks.

    python benchmarks/lm_step.py [--threads 2] [--repeats 8]

Builds the GPT of benchmarks/lm.py (dim 128, depth 4, seq-len 128, batch 32) with GBLR layers at
0.3, once with rank-1 components only and once with 4 dense blocks holding 0.8 of the start
(``--dense-blocks 4 --init-dense-share 0.8``), and times the parts of a structure-phase step in
one process, alternating between the two models: forward and backward, the optimizer step
(AdamW), the learner's step. Medians over the repeats after 2 warm-up steps; writes
docs/benchmarks/lm_step.md. Timings: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import machine, write_outputs

import gblr
from gblr.recipes.models import build_model

VARIANTS = {"GBLR without dense blocks": {"dense_blocks": 0},
            "GBLR, 4 dense blocks (gblr train's default)": {"dense_blocks": 4, "init_dense_share": 0.8}}
PARTS = ("forward and backward", "optimizer step", "learner step")


def build(options: dict):
    torch.manual_seed(0)
    model = build_model("gpt", (128,), 256, layer="gblr", flops_ratio=0.3, dim=128, depth=4, heads=4,
                        layer_options=options)
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=2e-3, weight_decay=0.05))
    return model, optimizer, gblr.StructureLearner(model, optimizer, 0.3, 800)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {name: build(options) for name, options in VARIANTS.items()}
    tokens = torch.randint(0, 256, (32, 129), generator=torch.Generator().manual_seed(0))
    seconds = {name: {part: [] for part in PARTS} for name in runs}
    for repeat in range(args.repeats + 2):
        for name, (model, optimizer, learner) in runs.items():
            start = time.perf_counter()
            logits = model(tokens[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            middle = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad()
            end = time.perf_counter()
            learner.step()
            last = time.perf_counter()
            if repeat >= 2:
                for part, value in zip(PARTS, (middle - start, end - middle, last - end)):
                    seconds[name][part].append(value)
    rows = [{"variant": name, **{part: statistics.median(values) for part, values in parts.items()}}
            for name, parts in seconds.items()]
    lines = [
        "# A GPT training step: GBLR with and without dense blocks",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/lm_step.py --threads {args.threads} "
        f"--repeats {args.repeats}`.",
        "The GPT of lm.md (dim 128, depth 4, seq-len 128, batch 32), GBLR layers at 0.3, a structure-phase "
        "step (sigma from the schedule's start); milliseconds, median over the repeats, both models in one "
        "process, alternating.",
        "",
        "| layers | " + " | ".join(PARTS) + " |",
        "|---|" + "---:|" * len(PARTS),
    ]
    for row in rows:
        lines.append(f"| {row['variant']} | " + " | ".join(f"{1e3 * row[part]:.1f}" for part in PARTS) + " |")
    write_outputs("lm_step", rows, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
