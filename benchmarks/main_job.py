"""Record the main job's run (``scripts/dev.sh run``) in docs/benchmarks/main_job.{json,md}.

    scripts/dev.sh run                         # trains into runs/demo
    python benchmarks/main_job.py runs/demo    # writes the table the README's main-job line cites

The JSON keeps the run's whole report.json (per-layer FLOPs ratios, timings, config); the
Markdown gives the command, the machine and the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import machine, write_outputs


def markdown(report: dict, command: str) -> str:
    timings = report["timings"]
    epochs = ", ".join(f"{seconds:.1f}" for seconds in timings["epoch_seconds"])
    lines = [
        "# The main job",
        "",
        f"Command: `{command}` (a fresh clone; `python benchmarks/main_job.py runs/demo` wrote this page).",
        f"Machine: {machine()}.",
        "",
        "| dataset | model | layers | epochs | seed | test accuracy (frozen) | before freezing | FLOPs ratio (target) "
        "| training s (per epoch) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
        f"| {report['dataset']['name']} | {report['config']['model']} | {report['config']['layer']} "
        f"| {report['config']['epochs']} | {report['config']['seed']} | {report['accuracy']:.4f} "
        f"| {report['accuracy_before_freeze']:.4f} | {report['flops_ratio']:.3f} ({report['flops_target']}) "
        f"| {timings['train_seconds']:.0f} ({epochs}) |",
        "",
        "Per layer (the learned split of the budget):",
        "",
        "| layer | shape | FLOPs ratio | blocks | MACs in wide blocks |",
        "|---|---|---:|---:|---:|",
    ]
    for layer in report["layers"]:
        shape = "x".join(str(size) for size in layer["shape"])
        lines.append(f"| {layer['name']} | {shape} | {layer['flops_ratio']:.3f} | {layer.get('blocks', '-')} "
                     f"| {layer.get('wide_macs_share', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the main job's output folder (runs/demo)")
    parser.add_argument("--command", default="scripts/dev.sh run", help="the command that made the run")
    args = parser.parse_args()
    report = json.loads((args.run / "report.json").read_text())
    paths = write_outputs("main_job", [report], markdown(report, args.command))
    print("\n".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
