"""Fashion-MNIST: dense, GBLR, low-rank, Monarch and block-sparse ViTs (or ResNets) at equal epochs.

    python benchmarks/fashion_mnist.py [--epochs 5] [--seeds 0 1] [--ratios 0.25 0.5]
    python benchmarks/fashion_mnist.py --ablation --epochs 3 --seeds 0 --ratios 0.25
    python benchmarks/fashion_mnist.py --model resnet --epochs 3 --ratios 0.3   # the 3x3 convolutions

Every run uses the same recipe (gblr.recipes.train); only the linear layers inside the blocks
change. Baselines are built at the requested FLOPs ratio (they report what they achieve); GBLR
learns its structure down to it. Each finished run is saved in docs/benchmarks/fashion_mnist.json
as it completes, so an interrupted sweep continues where it stopped. Writes the table to
docs/benchmarks/fashion_mnist.md.

``--ablation`` trains GBLR only, once per variant of the structure-learning recipe (ABLATION:
the default, no dense blocks, another share of the start in them, and, measured before dense
blocks were the default, variants of the layer without them: other starting ratios, other splits
of the starting budget between full-width components and partial blocks, a 2.5x structural
learning rate, a shorter structure phase, components of higher rank), and writes
docs/benchmarks/fashion_mnist_ablation.md with the final training loss and the share of the
learned MACs in wide blocks beside the accuracy: it is how we look for why GBLR trails a
baseline. Without ``--ablation``, ``--variants`` adds rows of GBLR variants to the comparison
(``gblr (no dense blocks)``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
from common import DOCS, machine, write_outputs

from gblr.recipes.train import TrainConfig, train

KINDS = ("gblr", "lowrank", "monarch", "blocksparse")
ABLATION = {  # variant -> TrainConfig overrides, given the FLOPs target
    "default": lambda ratio: {},  # 4 dense blocks with 0.8 of the start (gblr.recipes.train.DENSE_BLOCKS)
    "no dense blocks": lambda ratio: {"dense_blocks": 0},  # the paper's layer; the default before 2026-11-30
    "0.5 of the start in the dense blocks": lambda ratio: {"init_dense_share": 0.5},
    # measured before dense blocks were the default: variants of the layer without them
    "no dense blocks, start at the target": lambda ratio: {"dense_blocks": 0, "init_flops_ratio": ratio},
    "no dense blocks, start at 1.0": lambda ratio: {"dense_blocks": 0, "init_flops_ratio": 1.0},
    "no dense blocks, start with full-width components only": lambda ratio: {"dense_blocks": 0,
                                                                             "init_full_width_share": 1.0},
    "no dense blocks, start with partial blocks only": lambda ratio: {"dense_blocks": 0,
                                                                      "init_full_width_share": 0.0},
    "no dense blocks, struct-lr 5e-3 (2.5x)": lambda ratio: {"dense_blocks": 0, "struct_lr": 5e-3},
    "no dense blocks, structure-fraction 0.6": lambda ratio: {"dense_blocks": 0, "structure_fraction": 0.6},
    "no dense blocks, rank-4 components (a quarter as many)": lambda ratio: {"dense_blocks": 0, "rank": 4},
    "no dense blocks, rank-16 components (a sixteenth as many)": lambda ratio: {"dense_blocks": 0, "rank": 16},
}


def run_key(layer: str, ratio: float, seed: int, variant: str = "") -> str:
    return f"{layer}{f'[{variant}]' if variant else ''}@{ratio:g}#seed{seed}"


def summarise(values: list[float]) -> str:
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--kinds", nargs="+", default=None, choices=KINDS,
                        help="structured layers to compare (default: all; the ResNet has no Monarch convolution)")
    parser.add_argument("--model", default="vit", choices=("vit", "resnet"))
    parser.add_argument("--width", type=int, default=16, help="ResNet first-stage channels (every run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64, help="ViT width (every run)")
    parser.add_argument("--mlp-ratio", type=float, default=2.0, help="ViT MLP width / dim (every run)")
    parser.add_argument("--limit-train", type=int, default=None, help="fewer training images (quick checks)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--name", default=None, help="output name under docs/benchmarks")
    parser.add_argument("--render-only", action="store_true", help="rewrite the table from the saved runs")
    parser.add_argument("--ablation", action="store_true", help="GBLR recipe variants instead of the baselines")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(ABLATION),
                        help="GBLR variants (default: with --ablation all, else the default alone)")
    args = parser.parse_args()
    if args.kinds is None:
        args.kinds = [kind for kind in KINDS if not (args.model == "resnet" and kind == "monarch")]
    args.name = args.name or default_name(args)
    if args.variants is None:
        args.variants = list(ABLATION) if args.ablation else ["default"]
    torch.set_num_threads(args.threads)
    render = render_ablation if args.ablation else render_comparison

    results_path = DOCS / f"{args.name}.json"
    finished = {}
    if results_path.exists():
        finished = {row["key"]: row for row in json.loads(results_path.read_text())["rows"]}
    if args.render_only:
        write_outputs(args.name, list(finished.values()), render(finished, args))
        return
    if args.ablation:
        plan = [("gblr", variant, ratio, seed) for ratio in args.ratios for variant in args.variants
                for seed in args.seeds]
    else:
        plan = [("dense", "", 1.0, seed) for seed in args.seeds]
        plan += [(kind, variant, ratio, seed) for ratio in args.ratios for kind in args.kinds
                 for variant in (comparison_variants(args) if kind == "gblr" else [""]) for seed in args.seeds]
    for layer, variant, ratio, seed in plan:
        key = run_key(layer, ratio, seed, variant)
        if key in finished:
            continue
        overrides = ABLATION[variant](ratio) if variant else {}
        with tempfile.TemporaryDirectory() as out:
            report = train(TrainConfig(
                model=args.model, layer=layer, flops_target=ratio, epochs=args.epochs, seed=seed,
                threads=args.threads, dim=args.dim, mlp_ratio=args.mlp_ratio, width=args.width,
                limit_train=args.limit_train, data_dir=args.data_dir, out=out, progress=False, pictures=False,
                **overrides,
            ))
        finished[key] = {
            "key": key, "layer": layer, "variant": variant, "target": ratio, "seed": seed, "epochs": args.epochs,
            "accuracy": report["accuracy"], "flops_ratio": report["flops_ratio"],
            "train_loss": report["train_loss"], "train_seconds": report["timings"]["train_seconds"],
            "layers": report["layers"], "command": command_line(args),
        }
        print(f"{key}: accuracy {report['accuracy']:.4f}, FLOPs ratio {report['flops_ratio']:.3f}, "
              f"{report['timings']['train_seconds']:.0f} s", flush=True)
        write_outputs(args.name, list(finished.values()), render(finished, args))
    write_outputs(args.name, list(finished.values()), render(finished, args))
    print(f"wrote {DOCS / (args.name + '.md')}")


def comparison_variants(args) -> list[str]:
    """The GBLR variants of a comparison table: "" for the default (its rows are plain ``gblr``)."""
    return ["" if variant == "default" else variant for variant in args.variants]


def default_name(args) -> str:
    return ("fashion_mnist_ablation" if args.ablation else "fashion_mnist") + (
        "_resnet" if args.model == "resnet" else "")


def commands(finished: dict, args) -> str:
    """The commands that produced the rows (a table may grow over several runs of the script)."""
    used = dict.fromkeys(row.get("command", command_line(args)) for row in finished.values()) or [command_line(args)]
    return ("Command: " if len(used) == 1 else "Commands: ") + "; ".join(f"`{command}`" for command in used)


def command_line(args) -> str:
    """The command that reproduces the table: the options that differ from their defaults."""
    parts = ["python benchmarks/fashion_mnist.py"] + (["--ablation"] if args.ablation else [])
    if args.variants != (list(ABLATION) if args.ablation else ["default"]):
        parts.append("--variants " + " ".join(repr(variant) for variant in args.variants))
    parts += [f"--epochs {args.epochs}", f"--seeds {' '.join(map(str, args.seeds))}"]
    if args.ratios != [0.25, 0.5] or args.ablation:
        parts.append(f"--ratios {' '.join(f'{r:g}' for r in args.ratios)}")
    if args.model != "vit":
        parts.append(f"--model {args.model}")
    default_kinds = [kind for kind in KINDS if not (args.model == "resnet" and kind == "monarch")]
    if args.kinds != default_kinds and not args.ablation:
        parts.append(f"--kinds {' '.join(args.kinds)}")
    if args.width != 16:
        parts.append(f"--width {args.width}")
    if args.dim != 64:
        parts.append(f"--dim {args.dim}")
    if args.mlp_ratio != 2.0:
        parts.append(f"--mlp-ratio {args.mlp_ratio:g}")
    if args.name != default_name(args):
        parts.append(f"--name {args.name}")
    return " ".join(parts)


def render_ablation(finished: dict, args) -> str:
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in finished.values():
        groups.setdefault((row["variant"], row["target"]), []).append(row)
    lines = [
        "# Fashion-MNIST: variants of GBLR's structure-learning recipe",
        "",
        f"Machine: {machine()}. {commands(finished, args)}.",
        f"The {'ResNet' if args.model == 'resnet' else 'ViT'} recipe of {default_name(argparse.Namespace(ablation=False, model=args.model))}.md "
        "with GBLR layers; each variant changes one setting of "
        "`gblr train`. Accuracy of the frozen model on the test set; training loss of the last epoch "
        "(mean over seeds). Wide MACs: the share of the learned MACs in blocks spanning at least half "
        "of their layer's rows and columns (low-rank-like bands; the rest are local blocks), mean over seeds.",
        "",
        "| variant | target | FLOPs ratio | test accuracy (%) | final training loss | wide MACs | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, target in sorted(groups, key=lambda item: (item[1], list(ABLATION).index(item[0]))):
        rows = groups[(variant, target)]
        lines.append(
            f"| {variant} | {target:g} | {statistics.mean(r['flops_ratio'] for r in rows):.3f} | "
            f"{summarise([100 * r['accuracy'] for r in rows])} | "
            f"{statistics.mean(r['train_loss'] for r in rows):.4f} | "
            f"{statistics.mean(wide_share(r['layers']) for r in rows):.2f} | {len(rows)} |"
        )
    return "\n".join(lines) + "\n"


def wide_share(layers: list[dict]) -> float:
    """The share of all GBLR MACs in wide blocks (the report's per-layer wide_macs_share)."""
    macs = [layer["flops_ratio"] * layer["shape"][0] * layer["shape"][1] for layer in layers]
    wide = sum(m * layer["wide_macs_share"] for m, layer in zip(macs, layers))
    return wide / sum(macs)


def render_comparison(finished: dict, args) -> str:
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in finished.values():  # a GBLR variant's rows: "gblr (variant)"
        label = f"{row['layer']} ({row['variant']})" if row.get("variant") else row["layer"]
        groups.setdefault((label, row["target"]), []).append(row)
    dense = groups.get(("dense", 1.0), [])
    dense_seconds = min(r["train_seconds"] for r in dense) if dense else None
    lines = [
        "# Fashion-MNIST: GBLR against dense and structured baselines",
        "",
        f"Machine: {machine()}. {commands(finished, args)}.",
        (f"ViT (dim {args.dim}, depth 4, 4 heads, patch 4, MLP ratio {args.mlp_ratio:g}), {args.epochs} epochs, "
         "AdamW, batch 128, the same recipe for every row; only the 24 linear layers inside the blocks change. "
         if args.model == "vit" else
         f"ResNet (width {args.width}, one basic block per stage, 3 stages), {args.epochs} epochs, AdamW, batch 128, "
         "the same recipe for every row; only the 6 3x3 convolutions inside the blocks change (stem, shortcuts "
         "and head stay dense); FLOPs count each convolution's MACs per output pixel times its output pixels. ")
        + 
        "Accuracy: test set, mean ± standard deviation over seeds, of the deployed (for GBLR: frozen) model. "
        "FLOPs ratio: MACs of the replaced layers / dense MACs, as achieved. Final training loss: of the "
        "last epoch, mean over seeds. Train time: the faster "
        "seed's, relative to the faster dense run, runs one after another on an otherwise idle machine; "
        "rows made by different commands may come from different sessions, and this shared machine's speed "
        "differs between sessions by up to 1.5x (fashion_mnist_timing.md times dense and both GBLR layers in "
        "one session; per-layer timings: training.md).",
        "",
        "| layers | target | FLOPs ratio | test accuracy (%) | final training loss | seeds | train time vs dense |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = sorted(groups, key=lambda item: (-item[1], not item[0].startswith("gblr"), item[0] != "gblr", item[0]))
    for layer, target in order:
        rows = groups[(layer, target)]
        seconds = min(r["train_seconds"] for r in rows)
        relative = f"{seconds / dense_seconds:.2f}x" if dense_seconds else "-"
        losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
        loss = f"{statistics.mean(losses):.4f}" if len(losses) == len(rows) else "-"
        lines.append(
            f"| {layer} | {target:g} | {statistics.mean(r['flops_ratio'] for r in rows):.3f} | "
            f"{summarise([100 * r['accuracy'] for r in rows])} | {loss} | {len(rows)} | {relative} |"
        )
    lines += render_allocation(groups, args)
    return "\n".join(lines) + "\n"


def render_allocation(groups: dict[tuple[str, float], list[dict]], args) -> list[str]:
    """GBLR's learned FLOPs ratio per kind of layer (ViT: the last part of its name: query, fc1,
    ...; ResNet: each convolution), mean over the blocks and seeds, for every GBLR row (variants
    too): how the global budget was split."""
    labels = sorted(((label, target) for label, target in groups if label.startswith("gblr")),
                    key=lambda item: (-item[1], item[0] != "gblr", item[0]))
    if not labels:
        return []

    def kind_of(name: str) -> str:
        return name.removeprefix("blocks.") if args.model == "resnet" else name.rsplit(".", 1)[-1]

    kinds = list(dict.fromkeys(kind_of(entry["name"]) for entry in groups[labels[0]][0]["layers"]))
    lines = [
        "",
        "GBLR's learned budgets: FLOPs ratio of each "
        + ("convolution, mean over the seeds" if args.model == "resnet"
           else "kind of layer, mean over the 4 blocks and the seeds")
        + " (the global ratio is held at the target; the split is learned).",
        "",
        "| layers | target | " + " | ".join(kinds) + " |",
        "|---|---:|" + "---:|" * len(kinds),
    ]
    for label, target in labels:
        ratios = {kind: [] for kind in kinds}
        for row in groups[(label, target)]:
            for entry in row["layers"]:
                ratios[kind_of(entry["name"])].append(entry["flops_ratio"])
        lines.append(f"| {label} | {target:g} | "
                     + " | ".join(f"{statistics.mean(ratios[kind]):.3f}" for kind in kinds) + " |")
    return lines


if __name__ == "__main__":
    main()
