"""Decode speed of compressed causal LMs at batch 1: frozen GBLR against the dense model.

    gblr compress SmolLM2-135M-Instruct.Q4_1.gguf --flops 0.5 --out runs/smollm2-0.5   # and 0.8, 0.6
    python benchmarks/decode.py runs/smollm2-0.8 runs/smollm2-0.6 runs/smollm2-0.5

For each run folder of ``gblr compress`` (its ``report.json`` names the base model, ``model/`` holds
the saved layers): the base model is loaded three times, as it is ("dense"), with the saved layers
frozen ("frozen", ``gblr.freeze_``, ``kernel="auto"``), and as a control with every decoder
linear's weight stored along its longer side ("dense, long rows": ``x @ W`` on ``W.T`` made
contiguous where a layer has more outputs than inputs, the storage the frozen layers' ``-t`` paths
use), so that the table tells the speed-up of the structure from the speed-up of the storage.
Greedy decoding, KV cache, ``model.generate`` under ``torch.inference_mode``, the models in turn
(:func:`gblr.recipes.causal_lm.decode_speed`: one warm-up each, medians over repeats).
Writes docs/benchmarks/<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
from pathlib import Path

import torch
from common import machine, write_outputs
from torch import nn

import gblr
from gblr.kernels.tiled import LongRows
from gblr.recipes.causal_lm import PROMPTS, decode_speed, greedy_continuation, load_causal_lm


class LongRowLinear(nn.Module):
    """The control: an ``nn.Linear``'s product on long-row storage (:class:`gblr.kernels.tiled.LongRows`)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.weight = LongRows.of(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return self.weight.apply(flat, self.bias).reshape(*x.shape[:-1], self.out_features)


def long_rows_model(model: nn.Module) -> nn.Module:
    """``model`` with every linear of its decoder layers (not the embeddings nor the head) replaced
    by a :class:`LongRowLinear` of the same weight."""
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LongRowLinear(child))
    return model


def paths_at_one_token(model: nn.Module) -> dict[str, int]:
    """How many frozen layers hold each path for one token."""
    counts = collections.Counter()
    for module in model.modules():
        if isinstance(module, gblr.FrozenGBLRLinear):
            kept = module.choices.get(module.choice_key(1))
            counts[kept.path if kept is not None else "(not chosen)"] += 1
    return dict(sorted(counts.items()))


def layout_timings(shapes=((1536, 576), (576, 1536), (576, 576), (192, 576)), tokens=(1, 8), repeats: int = 7):
    """Microseconds of one product ``x @ W.T`` as ``F.linear`` and on long-row storage, weights read
    from memory as in decoding: the product runs over enough distinct matrices (about 700 MB) that
    none is in cache; median over ``repeats`` passes."""
    rows = []
    for out_features, in_features in shapes:
        count = max(4, 200 * 1536 * 576 // (out_features * in_features))
        weights = [torch.randn(out_features, in_features) for _ in range(count)]
        stored = [LongRows.of(weight) for weight in weights]
        for n in tokens:
            x = torch.randn(n, in_features)
            runs = {"F.linear": lambda: [torch.nn.functional.linear(x, weight) for weight in weights],
                    "long rows": lambda: [matrix.apply(x) for matrix in stored]}
            times = {name: [] for name in runs}
            with torch.inference_mode():
                for _ in range(repeats):
                    for name, run in runs.items():
                        start = time.perf_counter()
                        run()
                        times[name].append((time.perf_counter() - start) / count * 1e6)
            medians = {name: statistics.median(values) for name, values in times.items()}
            rows.append({"out": out_features, "in": in_features, "tokens": n, "us": medians,
                         "transposed": stored[0].transposed})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="output folders of gblr compress (report.json and model/)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="decode")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    layouts = layout_timings()
    rows = []
    for run in map(Path, args.runs):
        report = json.loads((run / "report.json").read_text())
        base = report["model_dir"]
        dense, tokenizer = load_causal_lm(base)
        compressed, _ = load_causal_lm(base)
        frozen = gblr.freeze_(gblr.load_pretrained(compressed, run / "model")).eval()
        control, _ = load_causal_lm(base)
        models = {"dense": dense.eval(), "frozen": frozen, "dense, long rows": long_rows_model(control).eval()}
        speed = decode_speed(models, tokenizer, PROMPTS[0], args.new_tokens, args.repeats)
        tokens_per_s = {name: result["tokens_per_s"] for name, result in speed.items()}
        rows.append({
            "run": str(run), "model": base, "flops_ratio": report["flops_ratio"],
            "tokens_per_s": tokens_per_s, "seconds": {name: result["seconds"] for name, result in speed.items()},
            "speedup": tokens_per_s["frozen"] / tokens_per_s["dense"],
            "control_speedup": tokens_per_s["dense, long rows"] / tokens_per_s["dense"],
            "speedup_over_control": tokens_per_s["frozen"] / tokens_per_s["dense, long rows"],
            "paths_at_one_token": paths_at_one_token(frozen),
            "remeasured": sum(sum(m.watch.remeasured.values()) for m in frozen.modules()
                              if isinstance(m, gblr.FrozenGBLRLinear)),
            "generation": {"prompt": PROMPTS[0], "dense": greedy_continuation(dense, tokenizer, PROMPTS[0]),
                           "frozen": greedy_continuation(frozen, tokenizer, PROMPTS[0])},
        })
        print(json.dumps(rows[-1], indent=1), flush=True)
        del dense, frozen, control, models
    lines = [
        "# Decode speed at batch 1: frozen GBLR against the dense model", "",
        f"Command: `python benchmarks/decode.py {' '.join(args.runs)} --new-tokens {args.new_tokens} --repeats "
        f"{args.repeats} --threads {args.threads}`, on the output folders of `gblr compress` (their report.json "
        f"names the command's model). Machine: {machine()}. fp32.", "",
        f"Greedy decoding of {args.new_tokens} new tokens after {PROMPTS[0]!r} (prefill included), KV cache, "
        "`model.generate` under `torch.inference_mode`; the three models in turn, one warm-up each, median of "
        f"{args.repeats} runs. 'dense, long rows': the dense model with every decoder linear stored along its "
        "longer side (the storage of the frozen layers' -t paths), a control that separates the speed-up of the "
        "structure from that of the storage.", "",
        "| run | FLOPs ratio | dense tokens/s | frozen | speed-up | dense, long rows | frozen over long-row dense | "
        "frozen paths at 1 token | re-measured |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        t = r["tokens_per_s"]
        paths = ", ".join(f"{path} {count}" for path, count in r["paths_at_one_token"].items())
        lines.append(f"| {r['run']} | {r['flops_ratio']:.3f} | {t['dense']:.2f} | {t['frozen']:.2f} | "
                     f"**{r['speedup']:.2f}x** | {t['dense, long rows']:.2f} ({r['control_speedup']:.2f}x) | "
                     f"{r['speedup_over_control']:.2f}x | {paths} | {r['remeasured']} |")
    lines += ["", "Greedy continuations (dense / frozen):", ""]
    for r in rows:
        lines.append(f"- {r['run']}: {r['generation']['dense']!r} / {r['generation']['frozen']!r}")
    lines += ["", "## One product, weights from memory", "",
              "Microseconds of `x @ W.T` for one matrix, as `F.linear` on `W (out, in)` and on long-row storage "
              "(`gblr.kernels.tiled.LongRows`: `W.T` made contiguous where out > in), each timed over enough "
              "distinct matrices (about 700 MB) that none is in cache; median of 7 passes.", "",
              "| out x in | tokens | F.linear us | long rows us | long rows stored transposed | F.linear / long rows |",
              "|---|---:|---:|---:|---|---:|"]
    for r in layouts:
        lines.append(f"| {r['out']}x{r['in']} | {r['tokens']} | {r['us']['F.linear']:.1f} | "
                     f"{r['us']['long rows']:.1f} | "
                     f"{'yes' if r['transposed'] else 'no (the same product)'} | "
                     f"{r['us']['F.linear'] / r['us']['long rows']:.2f} |")
    write_outputs(args.name, {"runs": rows, "layouts": layouts}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
