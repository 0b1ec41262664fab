"""Text: a small GPT with dense, GBLR, low-rank, Monarch and block-sparse linears at equal epochs.

    python benchmarks/lm.py [--ratios 0.3 0.5] [--seeds 0 1 2]
    python benchmarks/lm.py --data notes/ --tokenizer models/gpt2 --name lm_notes
    python benchmarks/lm.py --render-only            # rewrite the table from the saved runs
    python benchmarks/lm.py --kinds gblr --gblr-options init_full_width_share=1   # a learner variant

``--gblr-options NAME=VALUE ...`` sets options of the GBLR runs (fields of
``gblr.recipes.train.TrainConfig``: ``init_full_width_share``, ``struct_lr``, ``structure_fraction``,
...); such runs are rows of their own, ``gblr[NAME=VALUE ...]``, beside the default GBLR row.

Every run is ``gblr train --model gpt --dataset text`` (gblr.recipes.train) with the same recipe;
only the six linear layers inside each block change: dense once per seed, then GBLR, low-rank,
Monarch and block-sparse at each ``--ratios`` FLOPs ratio, once per seed. Baselines are built at
the requested ratio (they report what they achieve); GBLR learns its structure down to it. The
text is ``--data`` (default: the reStructuredText sources of the Python documentation), split by
file (the same held-out files for every seed); the held-out metric is bits per byte on
``--limit-test`` windows spread evenly over the held-out files (docs/training.md, "Language
models on text").

The defaults (dim 128, depth 4, 4 heads, seq-len 128, batch 32, 4 epochs of 2048 windows, 512
held-out windows, 2 threads) are sized so that one run takes a few minutes on a 2-core CPU; the
issue's budget is about 20 minutes per run at most, so larger settings should stay under that.

Each finished run is saved in docs/benchmarks/<name>.json (``--name``, default ``lm``) as it
completes, so an interrupted sweep continues where it stopped; a saved run is reused only when
its settings (everything but the seed, layer, ratio and thread count) match this command's, and
saved runs of other settings are dropped (use another ``--name`` to keep them). Writes the table
to docs/benchmarks/<name>.md, with one line per ratio saying which row has the lowest held-out
bits per byte and whether GBLR beats every baseline by more than the larger of the two seed
standard deviations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile

import torch
from common import DOCS, machine, write_outputs

from gblr.recipes.train import TrainConfig, train

KINDS = ("gblr", "lowrank", "monarch", "blocksparse")
BASELINES = ("lowrank", "monarch", "blocksparse")
# argparse dest -> (option, default); the order is the order of the command line written to the table.
OPTIONS = {
    "ratios": ("--ratios", [0.3, 0.5]),
    "seeds": ("--seeds", [0, 1, 2]),
    "kinds": ("--kinds", list(KINDS)),
    "data": ("--data", None),
    "tokenizer": ("--tokenizer", None),
    "dim": ("--dim", 128),
    "depth": ("--depth", 4),
    "heads": ("--heads", 4),
    "mlp_ratio": ("--mlp-ratio", 2.0),
    "seq_len": ("--seq-len", 128),
    "batch_size": ("--batch-size", 32),
    "epochs": ("--epochs", 4),
    "lr": ("--lr", 2e-3),
    "limit_train": ("--limit-train", 2048),
    "limit_test": ("--limit-test", 512),
    "gblr_options": ("--gblr-options", []),
    "threads": ("--threads", 2),
    "name": ("--name", "lm"),
}
# The options that change a run's result (the seed, layer and ratio are in its key).
SETTINGS = ("data", "tokenizer", "dim", "depth", "heads", "mlp_ratio", "seq_len", "batch_size", "epochs", "lr",
            "limit_train", "limit_test")


def run_key(layer: str, ratio: float, seed: int) -> str:
    return f"{layer}@{ratio:g}#seed{seed}"


def gblr_options(pairs: list[str]) -> dict:
    """``["init_full_width_share=1", ...]`` -> TrainConfig overrides for the GBLR runs."""
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    options = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in fields or not text:
            raise SystemExit(f"--gblr-options takes NAME=VALUE with NAME a TrainConfig field, got {pair!r}")
        for kind in (int, float):
            try:
                options[name] = kind(text)
                break
            except ValueError:
                continue
        else:
            options[name] = None if text == "None" else text
    return options


def layer_label(layer: str, pairs: list[str]) -> str:
    """The row's name: the layer kind, and a GBLR variant's options."""
    return f"gblr[{' '.join(pairs)}]" if layer == "gblr" and pairs else layer


def settings_of(args) -> dict:
    return {name: getattr(args, name) for name in SETTINGS}


def summarise(values: list[float], digits: int = 3) -> str:
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=OPTIONS["ratios"][1],
                        help="FLOPs ratios of the structured layers")
    parser.add_argument("--seeds", type=int, nargs="+", default=OPTIONS["seeds"][1],
                        help="seeds (of the model and the data order; the held-out files are the same for all)")
    parser.add_argument("--kinds", nargs="+", default=OPTIONS["kinds"][1], choices=KINDS,
                        help="structured layers to compare (default: all)")
    parser.add_argument("--data", nargs="+", default=None,
                        help="text files, folders, glob patterns (default: the Python documentation's sources)")
    parser.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer folder (default: bytes)")
    parser.add_argument("--dim", type=int, default=OPTIONS["dim"][1])
    parser.add_argument("--depth", type=int, default=OPTIONS["depth"][1])
    parser.add_argument("--heads", type=int, default=OPTIONS["heads"][1])
    parser.add_argument("--mlp-ratio", type=float, default=OPTIONS["mlp_ratio"][1])
    parser.add_argument("--seq-len", type=int, default=OPTIONS["seq_len"][1], help="tokens per window")
    parser.add_argument("--batch-size", type=int, default=OPTIONS["batch_size"][1])
    parser.add_argument("--epochs", type=int, default=OPTIONS["epochs"][1])
    parser.add_argument("--lr", type=float, default=OPTIONS["lr"][1])
    parser.add_argument("--limit-train", type=int, default=OPTIONS["limit_train"][1], help="windows per epoch")
    parser.add_argument("--limit-test", type=int, default=OPTIONS["limit_test"][1], help="held-out windows")
    parser.add_argument("--gblr-options", nargs="+", default=[], metavar="NAME=VALUE",
                        help="TrainConfig options of the GBLR runs (a variant: rows of its own)")
    parser.add_argument("--threads", type=int, default=OPTIONS["threads"][1])
    parser.add_argument("--name", default=OPTIONS["name"][1], help="output name under docs/benchmarks")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--render-only", action="store_true", help="rewrite the table from the saved runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results_path = DOCS / f"{args.name}.json"
    finished: dict[str, dict] = {}
    if results_path.exists():
        saved = json.loads(results_path.read_text())["rows"]
        finished = {row["key"]: row for row in saved if row.get("settings") == settings_of(args)}
        if len(finished) < len(saved) and args.render_only:
            sys.exit(f"{len(saved) - len(finished)} of the {len(saved)} runs saved in {results_path} used other "
                     "settings: pass the options of the command that made them (see its .md)")
        if len(finished) < len(saved):
            print(f"{len(saved) - len(finished)} of the {len(saved)} runs saved in {results_path} used other "
                  "settings: they are not reused and will be dropped (pass another --name to keep them)",
                  file=sys.stderr)
    if args.render_only:
        write_outputs(args.name, list(finished.values()), render(finished, args))
        print(f"wrote {DOCS / (args.name + '.md')}")
        return
    plan = [("dense", 1.0, seed) for seed in args.seeds]
    plan += [(kind, ratio, seed) for ratio in args.ratios for kind in args.kinds for seed in args.seeds]
    variant = gblr_options(args.gblr_options)
    for layer, ratio, seed in plan:
        label = layer_label(layer, args.gblr_options)
        key = run_key(label, ratio, seed)
        if key in finished:
            continue
        with tempfile.TemporaryDirectory() as out:
            report = train(TrainConfig(
                dataset="text", model="gpt", data=args.data, tokenizer=args.tokenizer, layer=layer,
                flops_target=ratio, seed=seed, dim=args.dim, depth=args.depth, heads=args.heads,
                mlp_ratio=args.mlp_ratio, seq_len=args.seq_len, batch_size=args.batch_size, epochs=args.epochs,
                lr=args.lr, limit_train=args.limit_train, limit_test=args.limit_test, threads=args.threads,
                out=out, progress=args.progress, pictures=False, **(variant if layer == "gblr" else {}),
            ))
        dataset = report["dataset"]
        finished[key] = {
            "key": key, "layer": label, "target": ratio, "seed": seed, "settings": settings_of(args),
            "bits_per_byte": report["bits_per_byte"], "perplexity": report["perplexity"],
            "accuracy": report["accuracy"], "flops_ratio": report["flops_ratio"],
            "train_loss": report["train_loss"], "train_seconds": report["timings"]["train_seconds"],
            "parameters": report["parameters"],
            "dataset": {name: dataset[name] for name in ("tokenizer", "vocab_size", "train_files", "train_tokens",
                                                         "windows_per_epoch", "test_tokens", "test_bytes")}
            | {"test_files": len(dataset["test_files"])},
            "layers": report["layers"], "structure_steps": report["structure_steps"],
            "planned_structure_steps": report["planned_structure_steps"], "command": command_line(args),
        }
        print(f"{key}: {report['bits_per_byte']:.4f} bits per byte, perplexity {report['perplexity']:.3f}, "
              f"FLOPs ratio {report['flops_ratio']:.3f}, {report['timings']['train_seconds']:.0f} s", flush=True)
        write_outputs(args.name, list(finished.values()), render(finished, args))
    write_outputs(args.name, list(finished.values()), render(finished, args))
    print(f"wrote {DOCS / (args.name + '.md')}")


def command_line(args) -> str:
    """The command that reproduces the table: the options that differ from their defaults."""
    parts = ["python benchmarks/lm.py"]
    for name, (option, default) in OPTIONS.items():
        value = getattr(args, name)
        if value == default:
            continue
        values = value if isinstance(value, list) else [value]
        parts.append(f"{option} {' '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)}")
    if not args.progress:
        parts.append("--no-progress")
    return " ".join(parts)


def commands(finished: dict, args) -> str:
    """The commands that produced the rows (a table may grow over several runs of the script)."""
    used = dict.fromkeys(row.get("command", command_line(args)) for row in finished.values()) or [command_line(args)]
    return ("Command: " if len(used) == 1 else "Commands: ") + "; ".join(f"`{command}`" for command in used)


def render(finished: dict, args) -> str:
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in finished.values():
        groups.setdefault((row["layer"], row["target"]), []).append(row)
    dense = groups.get(("dense", 1.0), [])
    dense_seconds = statistics.median(r["train_seconds"] for r in dense) if dense else None
    data = "the Python documentation's reST sources" if args.data is None else ", ".join(args.data)
    tokens = "UTF-8 bytes (vocabulary 256)" if args.tokenizer is None else f"the tokenizer in {args.tokenizer}"
    sizes = ""
    if finished:
        first = next(iter(finished.values()))["dataset"]
        sizes = (f" ({first['train_files']} training files, "
                 f"{first['train_tokens']} tokens; {first['test_files']} held-out files, of which "
                 f"{first['test_tokens']} tokens, {first['test_bytes']} bytes, are evaluated)")
    lines = [
        "# Text: a small GPT with GBLR against dense and structured linears",
        "",
        f"Machine: {machine()}. {commands(finished, args)}.",
        f"GPT (dim {args.dim}, depth {args.depth}, {args.heads} heads, MLP ratio {args.mlp_ratio:g}, "
        f"seq-len {args.seq_len}) trained on {data}, tokens: {tokens}; the files are split by file, the same "
        f"split for every seed{sizes}. {args.epochs} epoch{'' if args.epochs == 1 else 's'} of {args.limit_train} random windows, AdamW, lr {args.lr:g}, "
        f"batch {args.batch_size}, the same recipe for every row; only the {6 * args.depth} linear layers inside "
        "the blocks change (embeddings and head stay dense). "
        f"Bits per byte: on the first {args.limit_test} held-out windows, of the deployed (for GBLR: frozen) "
        "model, mean ± standard deviation over seeds. Perplexity: per "
        "token, mean over seeds. FLOPs ratio: MACs of the replaced layers / dense MACs, as achieved, mean over "
        "seeds. Train time: the median over seeds of the training seconds, relative to dense's median, runs "
        "one after another (docs/training.md, \"Language models on text\").",
        "",
        "| layers | target | FLOPs ratio | held-out bits per byte | perplexity | train time vs dense | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = sorted(groups, key=lambda item: (-item[1], item[0] != "gblr", item[0]))
    for layer, target in order:
        rows = groups[(layer, target)]
        seconds = statistics.median(r["train_seconds"] for r in rows)
        relative = f"{seconds / dense_seconds:.2f}x" if dense_seconds else "-"
        lines.append(
            f"| {layer} | {target:g} | {statistics.mean(r['flops_ratio'] for r in rows):.3f} | "
            f"{summarise([r['bits_per_byte'] for r in rows])} | "
            f"{statistics.mean(r['perplexity'] for r in rows):.2f} | {relative} | {len(rows)} |"
        )
    if any(layer.startswith("gblr") for layer, _ in groups):
        lines += ["", "`gblr` rows have `gblr train`'s default layer: 4 dense blocks holding 0.8 of the start beside "
                  "the rank-1 components; `gblr[dense_blocks=0]` is the layer without dense blocks (the default "
                  "before 2026-11-30), and other labels name the options that differ from the default."]
    if any(layer.endswith("diagonal start]") for layer, _ in groups):
        lines += ["", "Rows labelled `[..., diagonal start]` were measured while dense blocks started side by side on "
                  "the main diagonal (before commit 3106511); their command now starts them on spread block "
                  "diagonals (docs/method.md section 10), which these labels keep apart."]
    verdicts = [verdict(groups, target) for target in sorted({t for layer, t in groups if layer != "dense"})]
    if verdicts:
        lines += ["", *[f"- {line}" for line in verdicts]]
    lines += render_allocation(groups, args)
    return "\n".join(lines) + "\n"


def render_allocation(groups: dict[tuple[str, float], list[dict]], args) -> list[str]:
    """Where each GBLR row's learner put the budget: the FLOPs ratio of each block (its six
    linears' MACs over their dense MACs) and of each kind of linear (mean over the blocks), mean
    over the seeds."""
    keys = sorted(((layer, target) for layer, target in groups if layer.startswith("gblr")),
                  key=lambda item: (-item[1], item[0] != "gblr", item[0]))
    if not keys:
        return []
    kinds = ("query", "key", "value", "output", "fc1", "fc2")
    size = {kind: args.mlp_ratio if kind.startswith("fc") else 1.0 for kind in kinds}  # dense MACs / dim^2
    lines = [
        "",
        "Where the learner put the budget (the global ratio is held at the target; the split is learned): FLOPs "
        "ratio of each block (its six linears' MACs / their dense MACs) and of each kind of linear (mean over "
        "the blocks), mean over the seeds.",
        "",
        "| layers | target | " + " | ".join(f"block {b}" for b in range(args.depth)) + " | " + " | ".join(kinds) + " |",
        "|---|---:|" + "---:|" * (args.depth + len(kinds)),
    ]
    for layer, target in keys:
        blocks = [[] for _ in range(args.depth)]
        by_kind = {kind: [] for kind in kinds}
        for row in groups[(layer, target)]:
            macs, dense = [0.0] * args.depth, [0.0] * args.depth
            for entry in row["layers"]:  # names: blocks.<b>.attention.<kind> or blocks.<b>.mlp.<kind>
                parts = entry["name"].split(".")
                block, kind = int(parts[1]), parts[-1]
                macs[block] += entry["flops_ratio"] * size[kind]
                dense[block] += size[kind]
                by_kind[kind].append(entry["flops_ratio"])
            for block in range(args.depth):
                blocks[block].append(macs[block] / dense[block])
        cells = [f"{statistics.mean(values):.3f}" for values in blocks]
        cells += [f"{statistics.mean(by_kind[kind]):.3f}" for kind in kinds]
        lines.append(f"| {layer} | {target:g} | " + " | ".join(cells) + " |")
    return lines


def verdict(groups: dict[tuple[str, float], list[dict]], target: float) -> str:
    """Which row at ``target`` has the lowest mean bits per byte, and whether each GBLR row (the
    default and every variant measured on 2 seeds or more) beats every baseline by more than the
    larger of the two seed standard deviations."""
    stats = {}
    for (layer, ratio), rows in groups.items():
        if ratio == target:
            values = [r["bits_per_byte"] for r in rows]
            stats[layer] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)
    best = min(stats, key=lambda layer: stats[layer][0])
    line = f"Ratio {target:g}: lowest mean bits per byte: {best} ({stats[best][0]:.3f})."
    baselines = [layer for layer in BASELINES if layer in stats]
    candidates = [layer for layer in stats if layer == "gblr" or (layer.startswith("gblr[") and stats[layer][1])]
    if not candidates or not baselines:
        return line + " GBLR against the baselines: not measured (GBLR and at least one baseline are needed)."
    if any(stats[layer][1] is None for layer in baselines):
        return line + " GBLR against the baselines: undecided (a standard deviation needs at least 2 seeds)."
    return "\n".join([line, *(f"  - {comparison(stats, layer, baselines)}" for layer in sorted(candidates))])


def comparison(stats: dict[str, tuple[float, float | None]], gblr: str, baselines: list[str]) -> str:
    """Whether the GBLR row ``gblr`` beats every baseline by more than the larger seed standard deviation."""
    gblr_mean, gblr_std = stats[gblr]
    if gblr_std is None:
        return f"{gblr}: undecided (a standard deviation needs at least 2 seeds)."
    margins = {layer: (stats[layer][0] - gblr_mean, max(gblr_std, stats[layer][1])) for layer in baselines}
    failed = [layer for layer, (gain, std) in margins.items() if gain <= std]
    detail = "; ".join(f"{layer} {gain:+.3f} (needs > {std:.3f})" for layer, (gain, std) in margins.items())
    if failed:
        return (f"{gblr} does not beat every baseline by more than the larger seed standard deviation "
                f"(not {', '.join(failed)}); baseline minus GBLR bits per byte: {detail}.")
    return (f"{gblr} beats every baseline by more than the larger seed standard deviation; baseline minus "
            f"GBLR bits per byte: {detail}.")


if __name__ == "__main__":
    main()
