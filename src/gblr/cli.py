"""The ``gblr`` command line (also ``python -m gblr``)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import nn

import gblr


def _mask_row(values: torch.Tensor) -> str:
    shades = " .:-=+*#%@"
    return "".join(shades[min(len(shades) - 1, int(round(float(v) * (len(shades) - 1))))] for v in values.clamp(0, 1))


def demo(args: argparse.Namespace) -> int:
    """A tour of the core in a few seconds: masks, exact special cases, a layer, freezing."""
    torch.manual_seed(args.seed)
    print(f"gblr {gblr.__version__}, torch {torch.__version__}\n")

    print("1. Gaudi masks: a block of width 0.25 at location 0.875 of n=32 (it wraps around)")
    width, location = torch.tensor([0.25]), torch.tensor([0.875])
    for sigma in (None, 30.0, 10.0, 3.0):
        row = gblr.gaudi_mask(width, location, 32, sigma)[0]
        print(f"   sigma={str(sigma):>4}  |{_mask_row(row)}|  sum={row.sum():.3f}")

    print("\n2. Structured matrices are GBLR matrices, exactly and at their native cost")
    m, n = 48, 64
    p, q = torch.randn(m, 4, dtype=torch.float64), torch.randn(4, n, dtype=torch.float64)
    sparse = torch.zeros(m, n, dtype=torch.float64)
    for row, col in ((0, 0), (2, 5), (5, 7)):  # (5, 7) wraps: rows 40..47, columns 56..63 and 0..7
        rows = torch.arange(row * 8, row * 8 + 8) % m
        cols = torch.arange(col * 8 + 4, col * 8 + 12) % n
        sparse[rows[:, None], cols] = torch.randn(8, 8, dtype=torch.float64)
    blr = torch.block_diag(*[torch.randn(12, 2, dtype=torch.float64) @ torch.randn(2, 16, dtype=torch.float64)] * 4)
    cases = [
        ("low rank (R=4)", p @ q, gblr.structures.low_rank(p, q), 4 * (m + n)),
        ("block sparse (3 of 48 blocks)", sparse, gblr.structures.block_sparse(sparse, (8, 8), offset=(0, 4)), 3 * 64),
        ("block low rank (4x4 grid, r=2)", blr, gblr.structures.block_low_rank(blr, (4, 4), 2), 16 * 2 * (12 + 16)),
    ]
    for name, dense, layer, native in cases:
        error = (layer.weight - dense).norm() / dense.norm()
        print(f"   {name:<32} relative error {error:.1e}   MACs {layer.flops():>5} (native {native})")

    print("\n3. A GBLRLinear in a model (half of the dense cost at init), frozen for inference")
    model = nn.Sequential(gblr.GBLRLinear(256, 512), nn.GELU(), gblr.GBLRLinear(512, 256, init_flops_ratio=0.25))
    x = torch.randn(64, 256)
    with torch.no_grad():
        reference = model(x)
        frozen = gblr.freeze_(copy.deepcopy(model))
        difference = (frozen(x) - reference).abs().max().item()
    print(gblr.flops_report(frozen))
    print(f"   frozen vs trainable output: max difference {difference:.1e}")

    print("\n4. Gradients reach widths and locations through the masks (sigma=10)")
    layer = model[0]
    layer.sigma = 10.0
    model(x).square().mean().backward()
    print(f"   |d loss / d in_width|  mean {layer.in_width.grad.abs().mean():.2e}")
    print(f"   |d loss / d out_location| mean {layer.out_location.grad.abs().mean():.2e}")

    print("\n5. Mask cost: K=768 masks of length 3072, sigma=10, forward + backward")
    width = torch.rand(768, requires_grad=True)
    location = torch.rand(768, requires_grad=True)
    seed_grad = torch.randn(768, 3072)
    timings = {}
    for name, fn in (("gblr.gaudi_mask", gblr.gaudi_mask), ("frequency-domain definition", gblr.masks.gaudi_mask_reference)):
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            fn(width, location, 3072, 10.0).backward(seed_grad)
            samples.append(time.perf_counter() - start)
        timings[name] = sorted(samples)[2]
        print(f"   {name:<28} {timings[name] * 1e3:7.2f} ms (median of 5)")
    print(f"   speed-up {timings['frequency-domain definition'] / timings['gblr.gaudi_mask']:.1f}x")
    return 0


def train_command(args: argparse.Namespace) -> int:
    from .recipes.train import TrainConfig, train

    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{key: value for key, value in vars(args).items() if key in fields})
    try:
        report = train(config)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not report:
        print(f"stopped after epoch {config.stop_after}; continue with --resume --out {config.out}")
        return 0
    print(f"\naccuracy {report['accuracy']:.4f} (frozen model; {report['accuracy_before_freeze']:.4f} before freezing)")
    print(f"FLOPs ratio {report['flops_ratio']:.3f} of the replaced layers (target {config.flops_target})")
    print(f"training {report['timings']['train_seconds']:.0f} s; report: {Path(config.out) / 'report.json'}")
    for picture in report["pictures"]:
        print(f"picture: {picture}")
    return 0


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .recipes.models import LAYER_KINDS, MODELS
    from .recipes.train import TrainConfig

    defaults = TrainConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=defaults.dataset, choices=["fashion-mnist", "cifar10", "cifar100", "imagefolder"])
    data.add_argument("--data-dir", default=None, help="folder with the dataset files (default: standard places)")
    data.add_argument("--download", action="store_true", help="download the dataset if it is not found")
    data.add_argument("--image-size", type=int, default=None, help="resize images (required for imagefolder)")
    data.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    data.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=defaults.model, choices=list(MODELS))
    model.add_argument("--layer", default=defaults.layer, choices=list(LAYER_KINDS),
                       help="kind of the linear layers inside the blocks")
    model.add_argument("--flops-target", type=float, default=defaults.flops_target,
                       help="FLOPs ratio of the replaced layers (GBLR learns to it; baselines are built at it)")
    model.add_argument("--init-flops-ratio", type=float, default=None, help="GBLR starting ratio (default 2x target, at most 1)")
    for name in ("dim", "depth", "heads", "patch_size"):
        model.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    model.add_argument("--mlp-ratio", type=float, default=defaults.mlp_ratio)
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=defaults.epochs)
    optim.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch size")
    optim.add_argument("--lr", type=float, default=defaults.lr)
    optim.add_argument("--struct-lr", type=float, default=None, help="learning rate of widths and locations (default: --lr)")
    optim.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    optim.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    optim.add_argument("--structure-fraction", type=float, default=defaults.structure_fraction,
                       help="share of training spent learning the structure; the rest trains contents only")
    optim.add_argument("--sigma-start", type=float, default=defaults.sigma_start, help="mask smoothing at the start")
    optim.add_argument("--sigma-end", type=float, default=defaults.sigma_end, help="mask smoothing at the end of its ramp")
    optim.add_argument("--seed", type=int, default=defaults.seed)
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=defaults.out, help="output folder (log, checkpoint, report, pictures)")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    run.add_argument("--stop-after", type=int, default=None, help="stop after N epochs (resume later)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    run.add_argument("--no-pictures", dest="pictures", action="store_false", help="skip the pictures")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gblr", description="Learned generalized block low-rank weights for PyTorch.")
    parser.add_argument("--version", action="version", version=f"gblr {gblr.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    tour = commands.add_parser("demo", help="a short tour of masks, structures, layers and freezing")
    tour.add_argument("--seed", type=int, default=0)
    tour.set_defaults(handler=demo)
    trainer = commands.add_parser(
        "train", help="learn GBLR structures from scratch on an image dataset",
        description="Train a small ViT or MLP-Mixer with GBLR (or baseline) layers under a FLOPs budget.",
    )
    _add_train_arguments(trainer)
    trainer.set_defaults(handler=train_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
