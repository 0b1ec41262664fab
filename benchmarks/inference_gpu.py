"""GPU inference: each path of a frozen GBLR layer against dense F.linear, bf16 by default.

    python benchmarks/inference_gpu.py                  # on a CUDA machine: a few minutes
    bash benchmarks/gpu_check.sh                        # the CUDA tests, then this table
    TRITON_INTERPRET=1 python benchmarks/inference_gpu.py --device cpu --smoke   # checks the script

For each shape, FLOPs ratio and token count: the time of F.linear with the dense weight and of
the frozen layer's paths (tiled, tiled-batched, triton, and "auto", the layer's own choice),
medians of triton.testing.do_bench (CUDA events, the L2 cache flushed before every call, so
weights come from memory as inside a model), plus each path's error relative to the reference
path run in float32. Structure: "random", GBLRLinear's initial structure at the ratio (full-width
components for half the budget, partial blocks at random places for the rest). Writes
docs/benchmarks/<name>.{md,json} (default name: inference_gpu).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from common import machine, write_outputs

import gblr
from gblr.kernels import segmented

GPU_SHAPES = ((768, 3072), (3072, 768), (4096, 4096), (4096, 11008))  # (in_features, out_features)
GPU_TOKENS = (1, 16, 256, 4096, 8192)
PATHS = ("tiled-batched", "triton", "auto")  # "tiled" (one GEMM per tile) is 0.01-0.3x here: left out
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench_ms(fn, device: str) -> float:
    """Median milliseconds of ``fn``: do_bench on CUDA, a short timed loop elsewhere (smoke runs)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.float() - reference).norm() / reference.norm().clamp_min(1e-30))


def run(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    rows = []
    paths = [p for p in PATHS if p != "triton" or segmented.available()]
    for n, m in args.shapes:
        for ratio in args.ratios:
            torch.manual_seed(0)
            exact = gblr.GBLRLinear(n, m, bias=False, init_flops_ratio=ratio).freeze().to(args.device)
            layer = copy.deepcopy(exact).to(dtype)
            with torch.no_grad():
                weight = layer.weight
            for tokens in args.tokens:
                x = torch.randn(tokens, n, device=args.device).to(dtype)
                with torch.inference_mode():
                    reference = exact._reference(x.float())
                    row = {
                        "shape": f"{n}x{m}", "ratio": ratio, "tokens": tokens, "dtype": args.dtype,
                        "flops_ratio": layer.flops_ratio(),
                        "padded_ratio": {"tiled": layer.tiled_product().macs / (n * m)},
                        "dense_ms": bench_ms(lambda: F.linear(x, weight), args.device),
                        "ms": {}, "error": {},
                    }
                    if "triton" in paths:
                        row["padded_ratio"]["triton"] = layer.packed("triton", x).macs / (n * m)
                    for path in paths:
                        layer.kernel = path
                        try:
                            row["error"][path] = relative_error(layer(x), reference)
                            row["ms"][path] = bench_ms(lambda: layer(x), args.device)
                        except Exception as error:  # noqa: BLE001 - one failing path must not end the table
                            print(f"{path} failed: {type(error).__name__}: {error}"[:2000], flush=True)
                            row["error"][path], row["ms"][path] = float("nan"), float("inf")
                    layer.kernel = "auto"
                    row["auto_path"] = layer.path_for(tokens, x)
                rows.append(row)
                print(f"{row['shape']} ratio {ratio:g} {tokens:>5} tokens: dense {row['dense_ms']:.4f} ms, "
                      + ", ".join(f"{p} {row['dense_ms'] / row['ms'][p]:.2f}x (err {row['error'][p]:.1e})"
                                  for p in paths)
                      + f"; auto chose {row['auto_path']}", flush=True)
    return rows


def dense_as_segmented(weight: torch.Tensor, out_block: int, block_k: int) -> segmented.SegmentedGEMM:
    """A dense ``x @ weight.T`` as one segmented GEMM (every group one segment of all columns)."""
    out_features, in_features = weight.shape
    reads = segmented.round_up(in_features, block_k)
    slabs = [weight[start : start + out_block].T for start in range(0, out_features, out_block)]
    slabs = [F.pad(slab, (0, out_block - slab.shape[1], 0, reads - in_features)) for slab in slabs]
    return segmented._gemm(slabs, out_features, reads, block_k, weight)


def sweep(args) -> None:
    """Launch settings of the Triton kernel: a dense GEMM through it against F.linear (how close
    the kernel itself comes to cuBLAS), then the frozen 4096x11008 layer at ratio 0.25."""
    dtype = DTYPES[args.dtype]
    tokens, n, m = (8192, 4096, 11008) if not args.smoke else (64, 96, 160)
    torch.manual_seed(0)
    x = torch.randn(tokens, n, device=args.device).to(dtype)
    weight = torch.randn(m, n, device=args.device).to(dtype) / n**0.5
    reference = F.linear(x.float(), weight.float())
    dense = bench_ms(lambda: F.linear(x, weight), args.device)
    print(f"sweep: dense F.linear {tokens}x{n}x{m}: {dense:.4f} ms", flush=True)
    launches = [dict(block_t=128, num_warps=4, num_stages=3), dict(block_t=128, num_warps=8, num_stages=3),
                dict(block_t=128, num_warps=4, num_stages=4), dict(block_t=256, num_warps=8, num_stages=3)]

    def attempt(label, fn, reference=None):
        try:
            y = fn()
            ms = bench_ms(fn, args.device)
            error = "" if reference is None else f" (err {relative_error(y, reference):.1e})"
            print(f"sweep {label}: {ms:.4f} ms, {dense / ms:.3f}x of dense{error}", flush=True)
        except Exception as error:  # noqa: BLE001 - a failing configuration must not end the sweep
            print(f"sweep {label} failed: {type(error).__name__}: {error}"[:600], flush=True)

    for out_block, block_k in ((128, 64),) if args.skip_dense else ((64, 32), (64, 64), (128, 32), (128, 64)):
        gemm = dense_as_segmented(weight, out_block, block_k)
        padded = F.pad(x, (0, gemm.reads - n))  # segments read whole K steps
        for launch in launches[:2] if args.skip_dense else launches:
            out = x.new_empty(tokens, m)
            attempt(f"dense-as-segmented N{out_block} K{block_k} {launch}",
                    lambda: segmented.launch(padded, tokens, gemm, out, tokens, **launch), reference)
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(n, m, bias=False, init_flops_ratio=0.25).freeze().to(args.device, dtype)
    with torch.no_grad():
        reference = layer.to(torch.float32)._reference(x.float())
    layer = layer.to(dtype)
    for packing in ((128, 64, 64), (128, 128, 64), (64, 64, 64)):
        product = segmented.pack_triton(n, m, list(layer.blocks()), *packing)
        label = f"layer packing {packing} padded {product.macs / (n * m):.3f}"
        for launch in launches if packing == (128, 64, 64) else launches[:2]:
            attempt(f"{label} {launch}", lambda: segmented.triton_forward(x, product, **launch), reference)
        launch = launches[0]
        h = x.new_zeros(product.first.columns, tokens)
        attempt(f"{label} stage 1 alone (stage MACs {product.first.macs / (n * m):.3f}) {launch}",
                lambda: segmented.launch(x, tokens, product.first, h.T, tokens, **launch))
        y = x.new_empty(tokens, m)
        attempt(f"{label} stage 2 alone (stage MACs {product.second.macs / (n * m):.3f}) {launch}",
                lambda: segmented.launch(h.T, tokens, product.second, y, tokens, **launch))


def render(rows: list[dict], args) -> str:
    paths = [p for p in PATHS if rows and p in rows[0]["ms"]]
    lines = [
        f"# Frozen GBLR inference on {'a GPU' if args.device == 'cuda' else args.device}, {args.dtype}",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/inference_gpu.py --dtype {args.dtype} --ratios "
        + " ".join(f"{r:g}" for r in args.ratios) + " --tokens " + " ".join(map(str, args.tokens))
        + (" --smoke --device cpu" if args.smoke else "") + "`.",
        "Speed-up = median time of `F.linear` with the dense weight / median time of the frozen layer's path "
        "(triton.testing.do_bench: CUDA events, L2 flushed before every call). Structure: random (GBLRLinear's "
        "initial structure at the ratio). padded: MACs each path does, zero padding included, / dense MACs. "
        "error: relative to the reference path in float32.",
        "",
        "| shape | ratio | tokens | dense ms | " + " | ".join(f"{p} speed-up" for p in paths)
        + " | auto chose | padded (tiled / triton) | max error |",
        "|---|---:|---:|---:|" + "---:|" * len(paths) + "---|---:|---:|",
    ]
    for row in rows:
        padded = " / ".join(f"{row['padded_ratio'][k]:.3f}" for k in ("tiled", "triton") if k in row["padded_ratio"])
        lines.append(
            f"| {row['shape']} | {row['ratio']:g} | {row['tokens']} | {row['dense_ms']:.4f} | "
            + " | ".join(f"{row['dense_ms'] / row['ms'][p]:.2f}x" for p in paths)
            + f" | {row['auto_path']} | {padded} | {max(row['error'].values()):.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25])
    parser.add_argument("--tokens", type=int, nargs="+", default=list(GPU_TOKENS))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script (e.g. on CPU)")
    parser.add_argument("--name", default=None, help="output name under docs/benchmarks")
    parser.add_argument("--sweep", action="store_true", help="only the Triton kernel's launch-settings sweep")
    parser.add_argument("--skip-dense", action="store_true",
                        help="with --sweep: the dense GEMM through the kernel at the default packing only")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark is for GPUs (--device cpu --smoke checks the script)")
    args.shapes = [(96, 160), (160, 96)] if args.smoke else list(GPU_SHAPES)
    if args.smoke:
        args.tokens = [t for t in args.tokens if t <= 64] or [1, 33]
    if args.sweep:
        return sweep(args)
    args.name = args.name or ("inference_gpu_smoke" if args.smoke else "inference_gpu")
    rows = run(args)
    if not args.smoke:
        write_outputs(args.name, rows, render(rows, args))
        print(f"wrote docs/benchmarks/{args.name}.md")
    else:
        print(render(rows, args))


if __name__ == "__main__":
    main()
