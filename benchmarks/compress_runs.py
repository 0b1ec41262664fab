"""Record finished ``gblr compress`` runs of a causal LM in docs/benchmarks/<name>.{json,md}.

    gblr compress SmolLM2-135M-Instruct.Q4_1.gguf --flops 0.8 --method gblr --out runs/smol_gblr ...
    gblr compress SmolLM2-135M-Instruct.Q4_1.gguf --flops 0.8 --method svd --out runs/smol_svd ...
    python benchmarks/compress_runs.py runs/smol_gblr runs/smol_svd --command "..." --name smollm2_compress

The JSON keeps each run's whole report.json; the Markdown gives the command, the machine and one row
per run: held-out perplexity (text files the calibration never saw), conversion time, decode speed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import machine, write_outputs


def markdown(reports: list[dict], command: str, note: str) -> str:
    first = reports[0]
    text = first["text"]
    lines = [
        f"# Compressing {Path(first['model_dir']).name}",
        "",
        f"Command: `{command}` (then `python benchmarks/compress_runs.py ...` wrote this page).",
        f"Machine: {machine()}.",
        f"Text: {len(text['calibration_files'])} files for calibration ({text['calibration_windows']} windows of "
        f"{text['seq_len']} tokens), {len(text['evaluation_files'])} other files held out "
        f"({text['evaluation_windows']} windows); the split is by file, seed {text['seed']}.",
        "",
        "| method | allocation | FLOPs ratio | held-out perplexity: dense | converted | final | conversion s "
        "| recovery | decode tokens/s: dense | frozen | speed-up | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for report in reports:
        ppl = report["perplexity"]
        no_decode = dict.fromkeys(("dense_tokens_per_s", "frozen_tokens_per_s", "speedup"), float("nan"))
        decode = report["decode"] or no_decode  # --decode-repeats 0: not measured
        distilled = report["distillation"]
        # reports from before --distill-structure have no "structure": their distillation learned it
        recovery = (f"{distilled['steps']} steps of {distilled['loss']}, {distilled['seconds']:.0f} s, structure "
                    f"{distilled.get('structure', 'learned')}" if distilled else "none")
        lines.append(
            f"| {report['method']} | {report['conversion']['allocation']} | {report['flops_ratio']:.3f} "
            f"| {ppl['dense']:.3f} | {ppl['converted']:.3f} "
            f"| {report['perplexity_final']:.3f} | {report['timings']['convert_seconds']:.0f} | {recovery} "
            f"| {decode['dense_tokens_per_s']:.1f} | {decode['frozen_tokens_per_s']:.1f} "
            f"| {decode['speedup']:.2f}x | {report['peak_rss_mb']:.0f} |"
        )
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of gblr compress (causal LMs)")
    parser.add_argument("--command", required=True, help="the gblr compress command the runs used")
    parser.add_argument("--name", required=True, help="output name under docs/benchmarks")
    parser.add_argument("--note", default="", help="a sentence under the table")
    args = parser.parse_args()
    reports = [json.loads((run / "report.json").read_text()) for run in args.runs]
    paths = write_outputs(args.name, reports, markdown(reports, args.command, args.note))
    print("\n".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
