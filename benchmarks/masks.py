"""Gaudi mask forward + backward: gblr.gaudi_mask against the frequency-domain definition.

    python benchmarks/masks.py [--threads 2] [--repeats 30]

Both implementations run in one process, interleaved, on the same inputs; the table gives
median milliseconds and the ratio definition / gblr. Writes docs/benchmarks/masks.{json,md}.
"""

from __future__ import annotations

import argparse

import torch
from common import machine, median_ms, time_interleaved, write_outputs

from gblr import gaudi_mask
from gblr.masks import gaudi_mask_reference

CASES = [  # (components K, length n, sigma)
    (768, 3072, 10.0),  # ViT-B MLP (the target case)
    (768, 3072, 100.0),
    (768, 768, 10.0),  # ViT-B attention projections
    (3072, 768, 1.0),
    (768, 3072, None),  # fine-tuning: sharp boxcars
]


def step(fn, width, location, n, sigma, seed_grad):
    def run():
        width.grad = location.grad = None
        fn(width, location, n, sigma).backward(seed_grad)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for K, n, sigma in CASES:
        width = torch.rand(K, device=args.device, requires_grad=True)
        location = torch.rand(K, device=args.device, requires_grad=True)
        seed_grad = torch.randn(K, n, device=args.device)
        samples = time_interleaved(
            {
                "gblr": step(gaudi_mask, width, location, n, sigma, seed_grad),
                "definition": step(gaudi_mask_reference, width, location, n, sigma, seed_grad),
            },
            repeats=args.repeats,
        )
        ours, reference = median_ms(samples["gblr"]), median_ms(samples["definition"])
        rows.append(
            {"K": K, "n": n, "sigma": sigma, "gblr_ms": ours, "definition_ms": reference, "speedup": reference / ours}
        )
        print(f"K={K:5d} n={n:5d} sigma={str(sigma):>5}: gblr {ours:7.2f} ms, definition {reference:7.2f} ms, "
              f"{reference / ours:5.1f}x")

    lines = [
        "# Gaudi mask: forward + backward",
        "",
        f"Machine: {machine()}, device `{args.device}`, float32, median of {args.repeats} interleaved runs.",
        "Command: `python benchmarks/masks.py`",
        "",
        "| K | n | sigma | gblr.gaudi_mask (ms) | frequency-domain definition (ms) | speed-up |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['K']} | {r['n']} | {r['sigma']} | {r['gblr_ms']:.2f} | {r['definition_ms']:.2f} | {r['speedup']:.1f}x |"
        for r in rows
    ]
    json_path, md_path = write_outputs("masks", rows, "\n".join(lines) + "\n")
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
