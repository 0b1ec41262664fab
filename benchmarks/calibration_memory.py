"""Peak memory of gblr.convert_ with one-shot vs sequential calibration, as a model grows deeper.

    python benchmarks/calibration_memory.py [--layers 2 4 8 16] [--hidden 256] [--tokens 8192]

Each measurement runs in a fresh process (the peak resident set size, ``ru_maxrss``, only ever
grows): a random Llama (transformers.LlamaConfig, intermediate 8/3 * hidden, vocabulary 1024) of
the given depth, converted at FLOPs ratio 0.5 with ``method="svd"`` and the error allocation on
calibration batches of 8 sequences of 256 tokens. Reports the resident size before converting
(model and batches) and the peak during convert_, and the difference. Writes
docs/benchmarks/calibration_memory.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(layers: int, hidden: int, tokens: int, mode: str) -> dict:
    """One measurement, in this process (which must be fresh)."""
    import torch
    import transformers

    import gblr

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    sequences = max(1, tokens // (8 * 256))
    batches = [{"input_ids": torch.randint(0, 1024, (8, 256))} for _ in range(sequences)]
    parameters_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    report = gblr.convert_(model, gblr.GBLRConfig(flops_ratio=0.5, method="svd", calibration=mode), batches,
                           progress=False, verbose=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"layers": layers, "hidden": hidden, "tokens": 8 * 256 * sequences, "calibration": report.calibration,
            "parameters_mb": round(parameters_mb, 1), "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
            "convert_mb": round(peak - before, 1), "seconds": round(seconds, 1), "flops_ratio": report.flops_ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens (batches of 8 x 256)")
    parser.add_argument("--one", nargs=4, metavar=("LAYERS", "HIDDEN", "TOKENS", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.one:  # the child process: one measurement, printed as JSON
        layers, hidden, tokens, mode = args.one
        print(json.dumps(measure(int(layers), int(hidden), int(tokens), mode)))
        return
    rows = []
    for layers in args.layers:
        for mode in ("one-shot", "sequential"):
            command = [sys.executable, __file__, "--one", str(layers), str(args.hidden), str(args.tokens), mode]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(row, flush=True)
    lines = [
        "# Peak memory of convert_: one-shot vs sequential calibration",
        "",
        (
            f"`python benchmarks/calibration_memory.py --layers {' '.join(map(str, args.layers))} --hidden "
            f"{args.hidden} --tokens {args.tokens}`: a random Llama (hidden {args.hidden}, 4 heads, intermediate "
            f"{args.hidden * 8 // 3}, vocabulary 1024) converted at FLOPs ratio 0.5 (`method=\"svd\"`, error "
            f"allocation) on {rows[0]['tokens']} calibration tokens; each row a fresh process. `before`: resident "
            "size before convert_ (Python, torch, model, batches); `peak`: the peak during it; `convert_`: the "
            "difference."
        ),
        "",
        "| layers | parameters (MB) | calibration | before (MB) | peak (MB) | convert_ (MB) | seconds |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['layers']} | {r['parameters_mb']} | {r['calibration']} | {r['rss_before_mb']} | {r['peak_rss_mb']} "
              f"| {r['convert_mb']} | {r['seconds']} |" for r in rows]
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).parent))
        from common import write_outputs

        for path in write_outputs("calibration_memory", rows, "\n".join(lines) + "\n"):
            print("wrote", path)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
