"""One-shot vs sequential calibration on a small trained Llama: held-out perplexity and KL.

    python benchmarks/sequential_calibration.py [--layers 8] [--hidden 128] [--steps 800]
                                                [--ratios 0.8 0.6 0.4] [--calibration-batches 8]

A random model has no structure worth keeping, so this trains one first (cached in
``--cache``): a Llama (transformers.LlamaConfig; 4 heads, 2 key-value heads, intermediate
8/3 * hidden, tied embeddings) on a synthetic language of 256 tokens, sequences of 64 whose
first half is an order-1 Markov chain (each token has 8 successors, Zipf-distributed) and whose
second half repeats the first (so attention has to copy). Then, for each FLOPs ratio, method
(svd, gblr) and allocation (error, uniform), it converts a copy with ``calibration="one-shot"``
and ``"sequential"`` on calibration batches of 8 sequences and reports the perplexity on 256
held-out sequences and the mean KL divergence of the next-token distributions from the dense
model's. Writes docs/benchmarks/sequential_calibration.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from pathlib import Path

import torch
import transformers
from common import write_outputs

import gblr

VOCABULARY, LENGTH = 256, 64


def sampler(seed: int):
    """Batches of the synthetic language (module docstring), from a generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCABULARY, (VOCABULARY, 8), generator=torch.Generator().manual_seed(123))
    weights = 1.0 / torch.arange(1, 9, dtype=torch.float)

    def batch(size: int) -> torch.Tensor:
        x = torch.empty(size, LENGTH, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCABULARY, (size,), generator=generator)
        for t in range(1, LENGTH // 2):
            choice = torch.multinomial(weights.expand(size, 8), 1, generator=generator)[:, 0]
            x[:, t] = successors[x[:, t - 1], choice]
        x[:, LENGTH // 2:] = x[:, : LENGTH // 2]
        return x

    return batch


def trained_model(layers: int, hidden: int, steps: int, cache: Path) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCABULARY, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    path = cache / f"llama_{layers}x{hidden}_{steps}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    data = sampler(1)
    for step in range(steps):
        x = data(32)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"training step {step}: loss {loss.item():.4f}", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def evaluate(model, dense, held_out) -> tuple[float, float]:
    """Held-out perplexity of ``model`` and the mean KL(dense || model) per predicted token."""
    nll, kl, count = 0.0, 0.0, 0
    for x in held_out:
        log_p = model(input_ids=x).logits[:, :-1].float().log_softmax(-1)
        log_q = dense(input_ids=x).logits[:, :-1].float().log_softmax(-1)
        nll += float(torch.nn.functional.nll_loss(log_p.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        kl += float((log_q.exp() * (log_q - log_p)).sum())
        count += x[:, 1:].numel()
    return math.exp(nll / count), kl / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    parser.add_argument("--methods", nargs="+", default=["svd", "gblr"])
    parser.add_argument("--calibration-batches", type=int, nargs="+", default=[8], help="of 8 sequences of 64 tokens")
    parser.add_argument("--cache", type=Path, default=Path("runs/benchmark_cache"))
    parser.add_argument("--name", default="sequential_calibration")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dense = trained_model(args.layers, args.hidden, args.steps, args.cache)
    held = sampler(99)
    held_out = [held(32) for _ in range(8)]
    dense_ppl, _ = evaluate(dense, dense, held_out)
    print(f"dense: held-out perplexity {dense_ppl:.4f}", flush=True)
    rows = []
    for batches in args.calibration_batches:
        data = sampler(7)
        calibration = [{"input_ids": data(8)} for _ in range(batches)]
        for ratio in args.ratios:
            for method in args.methods:
                for allocation in ("error", "uniform"):
                    for mode in ("one-shot", "sequential"):
                        model = copy.deepcopy(dense)
                        config = gblr.GBLRConfig(flops_ratio=ratio, method=method, allocation=allocation,
                                                 calibration=mode)
                        start = time.perf_counter()
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            report = gblr.convert_(model, config, calibration, progress=False, verbose=False)
                        seconds = time.perf_counter() - start
                        ppl, kl = evaluate(model, dense, held_out)
                        row = {"calibration_tokens": batches * 8 * LENGTH, "ratio": ratio, "method": method,
                               "allocation": allocation, "calibration": mode, "flops_ratio": report.flops_ratio,
                               "perplexity": ppl, "kl": kl, "seconds": seconds}
                        rows.append(row)
                        print(row, flush=True)
    lines = [
        "# One-shot vs sequential calibration (a small trained Llama)",
        "",
        (
            f"`python benchmarks/sequential_calibration.py --layers {args.layers} --hidden {args.hidden} --steps "
            f"{args.steps} --ratios {' '.join(map(str, args.ratios))} --calibration-batches "
            f"{' '.join(map(str, args.calibration_batches))}`: a {args.layers}-layer Llama of width {args.hidden} "
            "trained on a synthetic language (the script's docstring), converted by `gblr.convert_`; perplexity on "
            f"256 held-out sequences (dense: {dense_ppl:.4f}) and the mean KL divergence of the next-token "
            "distributions from the dense model's (lower is better)."
        ),
        "",
        "| calibration tokens | FLOPs ratio | method | allocation | one-shot: perplexity | KL | sequential: perplexity | KL |",
        "|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for one_shot, sequential in zip(rows[0::2], rows[1::2]):
        lines.append(
            f"| {one_shot['calibration_tokens']} | {one_shot['flops_ratio']:.3f} | {one_shot['method']} | "
            f"{one_shot['allocation']} | {one_shot['perplexity']:.4f} | {one_shot['kl']:.4f} | "
            f"{sequential['perplexity']:.4f} | {sequential['kl']:.4f} |"
        )
    for path in write_outputs(args.name, rows, "\n".join(lines) + "\n"):
        print("wrote", path)


if __name__ == "__main__":
    main()
