"""The ``gblr`` command line (also ``python -m gblr``)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

import gblr

from ._files import write_text_atomic
from ._validation import check_flops_ratio


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
    model.add_argument("--init-full-width-share", type=float, default=defaults.init_full_width_share,
                       help="share of the starting budget in full-width GBLR components (the rest: partial blocks)")
    model.add_argument("--rank", type=int, default=defaults.rank,
                       help="rank of each GBLR component (blocks cheaper as dense blocks cost their area)")
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


# -- gblr compress ----------------------------------------------------------------------------------

# The layers `gblr compress` replaces by default: every nn.Linear except those inside a module
# named "pooler". A sentence embedding is the mean of the last hidden states; BERT's pooler (dense
# + tanh on the [CLS] token) feeds only `pooler_output`, which the embedding never reads, so
# compressing it would change nothing that is measured while counting its MACs in the ratio.
DEFAULT_TARGET = "all-linear"


def linear_targets(model: nn.Module, target: str = DEFAULT_TARGET) -> list[str]:
    r"""Names of the ``nn.Linear`` modules of ``model`` that ``gblr compress`` replaces.

    ``"all-linear"``: all of them except those under a module named ``pooler`` (a whole path
    component, e.g. ``pooler.dense``). Anything else is a regular expression that must match the
    whole module name, e.g. ``encoder\.layer\.[0-5]\..*``.
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if target == "all-linear":
        names = [name for name in linears if "pooler" not in name.split(".")]
    else:
        try:
            pattern = re.compile(target)
        except re.error as error:
            raise ValueError(f"--target must be 'all-linear' or a regular expression, got {target!r} ({error})") from None
        names = [name for name in linears if pattern.fullmatch(name)]
    if not names:
        raise ValueError(f"--target {target!r} matches none of the model's {len(linears)} linear layers "
                         f"(e.g. {', '.join(linears[:3]) or 'none'})")
    return names


def target_flops(model: nn.Module, names: list[str]) -> gblr.FlopsReport:
    """The FLOPs report restricted to the named layers (dense or GBLR)."""
    wanted = set(names)
    report = gblr.flops_report(model, include_dense=True)
    return gblr.FlopsReport(tuple(layer for layer in report if layer.name in wanted))


def _as_data(value):
    """A JSON-friendly view of a conversion report (dataclass, ``to_dict()``, or plain data)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def compress_command(args: argparse.Namespace) -> int:
    from .recipes import text

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check_flops_ratio(args.flops, "--flops")
        for name in ("calibration_sentences", "eval_sentences", "batch_size"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        if args.distill_steps < 0 or (args.distill_minutes is not None and args.distill_minutes <= 0):
            raise ValueError("--distill-steps must be >= 0 and --distill-minutes > 0")
        from .convert import GBLRConfig, convert_, save_pretrained

        source = args.text if args.text else None
        given = text.read_sentences(args.text) if source else None
        train_sentences, eval_sentences = text.split_sentences(
            given, args.calibration_sentences, args.eval_sentences, args.seed)
        print(f"loading {args.model_dir}", flush=True)
        teacher, tokenizer = text.load_sentence_encoder(args.model_dir, progress=args.progress)
        targets = linear_targets(teacher, args.target)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    torch.manual_seed(args.seed)
    load_seconds = time.perf_counter() - started
    print(f"sentences: {len(train_sentences)} for calibration and distillation, {len(eval_sentences)} held out "
          f"({'from ' + args.text if source else 'generated'})")

    train_batches = text.token_batches(tokenizer, train_sentences, args.batch_size, args.max_length)
    eval_batches = text.token_batches(tokenizer, eval_sentences, args.batch_size, args.max_length)
    reference = text.embed(teacher, eval_batches)
    student = copy.deepcopy(teacher)

    dense = target_flops(student, targets)
    print(f"compressing {len(targets)} linear layers ({dense.dense_macs:,} MACs per token) to {args.flops:g} "
          f"of their FLOPs with {args.method}", flush=True)
    convert_start = time.perf_counter()
    config = GBLRConfig(flops_ratio=args.flops, target_modules=targets, method=args.method)
    conversion = convert_(student, config, calibration=train_batches, progress=args.progress, verbose=False)
    convert_seconds = time.perf_counter() - convert_start
    flops = target_flops(student, targets)
    fidelity = {"converted": text.embedding_fidelity(student, reference, eval_batches)}
    print(f"FLOPs ratio {flops.ratio:.3f} ({flops.gblr_macs:,} of {flops.dense_macs:,} MACs per token), "
          f"{convert_seconds:.1f} s")
    print(f"fidelity (mean cosine with the original on held-out sentences): {fidelity['converted']:.4f}", flush=True)

    distillation = None
    if args.distill_steps or args.distill_minutes:
        steps = args.distill_steps or 1_000_000  # with only --distill-minutes: as many steps as fit
        max_seconds = None if args.distill_minutes is None else 60.0 * args.distill_minutes
        distill_start = time.perf_counter()
        losses = gblr.distill(student, teacher, train_batches, steps, lr=args.lr, max_seconds=max_seconds,
                              progress=args.progress)
        distill_seconds = time.perf_counter() - distill_start
        fidelity["distilled"] = text.embedding_fidelity(student, reference, eval_batches)
        flops = target_flops(student, targets)
        distillation = {"steps": len(losses), "lr": args.lr, "first_loss": losses[0], "last_loss": losses[-1],
                        "seconds": distill_seconds}
        print(f"distilled {len(losses)} steps in {distill_seconds:.1f} s: fidelity {fidelity['distilled']:.4f}, "
              f"FLOPs ratio {flops.ratio:.3f}")

    model_dir = out / "model"
    save_pretrained(student, model_dir)
    report = {
        "model_dir": str(args.model_dir),
        "method": args.method,
        "flops_target": args.flops,
        "flops_ratio": flops.ratio,
        "dense_macs": flops.dense_macs,
        "macs": flops.gblr_macs,
        "fidelity": fidelity,
        "fidelity_final": fidelity.get("distilled", fidelity["converted"]),
        "layers": flops.to_dict()["layers"],
        "sentences": {"source": args.text or "generated", "seed": args.seed, "calibration": len(train_sentences),
                      "evaluation": len(eval_sentences), "max_length": args.max_length,
                      "batch_size": args.batch_size},
        "distillation": distillation,
        "conversion": _as_data(conversion),
        "timings": {"load_seconds": load_seconds, "convert_seconds": convert_seconds,
                    "distill_seconds": distillation["seconds"] if distillation else 0.0},
        "saved": str(model_dir),
        "pictures": [],
    }
    if args.pictures:
        try:
            from .viz import plot_masks

            report["pictures"].append(str(plot_masks(student, out / "masks.png")))
        except ImportError as error:
            print(f"no pictures: {error}")
    report["timings"]["total_seconds"] = time.perf_counter() - started
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    print(f"saved {model_dir} (load with gblr.load_pretrained(base_model, {str(model_dir)!r})); "
          f"report {out / 'report.json'}; {report['timings']['total_seconds']:.0f} s in all")
    return 0


def _add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a Hugging Face or sentence-transformers model folder (with config.json)")
    parser.add_argument("--flops", type=float, default=0.5, help="FLOPs ratio of the compressed layers, in (0, 1]")
    parser.add_argument("--method", default="gblr", choices=["gblr", "svd"],
                        help="gblr: structure search per layer; svd: activation-aware truncated SVD")
    parser.add_argument("--target", default=DEFAULT_TARGET,
                        help="layers to compress: 'all-linear' (every nn.Linear except the pooler, which sentence "
                             "embeddings do not use) or a regular expression matching whole module names")
    data = parser.add_argument_group("sentences")
    data.add_argument("--text", default=None, help="UTF-8 text file, one sentence per line (default: a generated "
                                                   "English corpus)")
    data.add_argument("--calibration-sentences", type=int, default=256,
                      help="sentences for calibration and distillation")
    data.add_argument("--eval-sentences", type=int, default=256, help="held-out sentences for the fidelity")
    data.add_argument("--batch-size", type=int, default=32)
    data.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most")
    tune = parser.add_argument_group("distillation (after conversion; off by default)")
    tune.add_argument("--distill-steps", type=int, default=0, help="steps of distillation towards the original")
    tune.add_argument("--distill-minutes", type=float, default=None, help="time limit of the distillation")
    tune.add_argument("--lr", type=float, default=1e-4, help="distillation learning rate")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default="runs/compress", help="output folder (model/, report.json, masks.png)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    run.add_argument("--no-pictures", dest="pictures", action="store_false", help="skip masks.png")


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
    compressor = commands.add_parser(
        "compress", help="compress a pretrained text encoder (Hugging Face folder) and measure its fidelity",
        description="Replace the linear layers of a sentence encoder by GBLR layers at a FLOPs ratio (optionally "
                    "distilling towards the original) and report how close its sentence embeddings stay.",
    )
    _add_compress_arguments(compressor)
    compressor.set_defaults(handler=compress_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
