"""The ``gblr`` command line (also ``python -m gblr``): it only parses, the recipes do the work.

``gblr train`` runs :func:`gblr.recipes.train.train`, ``gblr compress``
:func:`gblr.recipes.compress.compress` and ``gblr demo`` :func:`gblr.recipes.demo.demo`. The
options of ``train`` and ``compress`` are generated from the fields of their config dataclasses
(:class:`~gblr.recipes.train.TrainConfig`, :class:`~gblr.recipes.compress.CompressConfig`):
field ``batch_size`` is option ``--batch-size`` with the field's default, a bool field that
defaults to True is a ``--no-...`` flag, a ``list[...]`` field takes one or more values, and a
field without default is positional. This module
adds only the grouping, the help texts and the choices; every option's help ends with its default.

Bad input ends the command before any work, with exit code 2 and a one-line message naming the
option: argparse's own errors, the config's ``validate()`` (reported through ``parser.error``)
and what the recipe finds unusable before it starts (a folder it cannot write, missing data, a
checkpoint that is not one; printed as ``error: ...``). Ctrl-C ends it with exit code 130 and a
line saying what was kept (``gblr train``: how to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import types
import typing
from pathlib import Path

import gblr

# Imported by scripts (benchmarks/minilm.py) that select and count layers as `gblr compress` does.

# Option tables: {group title (None: no group): {field: help text or {argparse keywords}}}.
Options = dict[str | None, dict[str, typing.Any]]


def _value_type(hint) -> type:
    """``int`` for ``int``, ``int | None`` or ``Optional[int]``; ``str`` for ``list[str]`` (see :func:`_list_field`)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is list:
        (hint,) = typing.get_args(hint)
    return hint


def _list_field(hint) -> bool:
    """Whether a field's type is ``list[...]`` (or ``list[...] | None``): an option taking one or more values."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(typing.get_origin(arg) is list for arg in typing.get_args(hint))
    return typing.get_origin(hint) is list


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type, options: Options,
                         internal: tuple[str, ...] = ()) -> None:
    """Add an option per field of the dataclass ``config_type``, grouped and described by ``options``.

    Every field must be in ``options`` or in ``internal`` (fields that are not options), so that a
    new field cannot be forgotten. Each option's help ends with its default: the field's value
    (``(default: 128)``), ``(default: off)`` for a flag, or the help text's own words where it
    mentions its default already, which it must where the default is None (``(default: all)``
    says more than ``None``).
    """
    fields = {field.name: field for field in dataclasses.fields(config_type)}
    hints = typing.get_type_hints(config_type)
    placed = [name for group in options.values() for name in group]
    unplaced = set(fields) - set(placed) - set(internal)
    if unplaced or len(placed) != len(set(placed)) or not set(placed) <= set(fields):
        raise RuntimeError(f"options of {config_type.__name__} out of step with its fields: {sorted(unplaced)}")
    for title, group_options in options.items():
        group = parser.add_argument_group(title) if title else parser
        for name, spec in group_options.items():
            keywords = {"help": spec} if isinstance(spec, str) or spec is None else dict(spec)
            field, hint = fields[name], hints[name]
            flag = "--" + name.replace("_", "-")
            text = keywords.get("help") or ""
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                group.add_argument(name, type=_value_type(hint), **keywords)
                continue
            if hint is bool:
                keywords["help"] = f"{text} (default: off)".strip()
            elif "default" not in text:
                if field.default is None:
                    raise RuntimeError(f"the help of {flag} must say what its default (None) means")
                keywords["help"] = f"{text} (default: %(default)s)".strip()
            if hint is bool and field.default:
                group.add_argument("--no-" + flag[2:], dest=name, action="store_false", **keywords)
            elif hint is bool:
                group.add_argument(flag, action="store_true", **keywords)
            else:
                if _list_field(hint):  # a list field takes one or more values: --text a.txt docs/
                    keywords.setdefault("nargs", "+")
                group.add_argument(flag, type=_value_type(hint), default=field.default, **keywords)


def config_from(args: argparse.Namespace, config_type: type):
    """The ``config_type`` instance of the parsed ``args`` (the options of its fields)."""
    names = {field.name for field in dataclasses.fields(config_type)}
    return config_type(**{key: value for key, value in vars(args).items() if key in names})


def checked_config(args: argparse.Namespace, config_type: type, parser: argparse.ArgumentParser):
    """:func:`config_from`, validated: a bad value ends the command as an argparse error does
    (usage, the config's message naming the option, exit code 2) instead of a traceback later."""
    config = config_from(args, config_type)
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))
    return config


def _check_seed(seed: int, parser: argparse.ArgumentParser) -> None:
    from .recipes.options import SEED_LIMIT

    if not 0 <= seed < SEED_LIMIT:
        parser.error(f"seed (--seed) must be an int in [0, 2**32), got {seed}")


# -- gblr train ---------------------------------------------------------------------------------------


def _train_options() -> Options:
    from .recipes.corpus import PYTHON_DOCS
    from .recipes.data import DATASETS
    from .learning import BUDGETS
    from .recipes.models import LAYER_KINDS, MODELS

    return {
        "data": {
            "dataset": {"choices": list(DATASETS),
                        "help": "an image dataset, or text (for --model gpt: a language model on --data)"},
            "data_dir": "images: folder with the dataset files (default: standard places)",
            "download": "images: download the dataset if it is not found",
            "image_size": "images: resize to N x N, required for imagefolder (default: the dataset's own size)",
            "data": {"metavar": "PATH",
                     "help": "text: UTF-8 files, folders (searched recursively for *.txt, *.rst, *.md) or glob "
                             "patterns, split by file into training and held-out files (a tenth, at least one; "
                             f"seeded by --seed) (default: the Python documentation's sources, {PYTHON_DOCS})"},
            "tokenizer": {"metavar": "FOLDER",
                          "help": "text: a Hugging Face tokenizer folder, loaded offline (default: none, UTF-8 "
                                  "bytes are the tokens, vocabulary 256)"},
            "limit_train": "images: use only the first N training images; text: an epoch is N random windows "
                           "(default: all images; text: training tokens // (seq-len + 1) windows, about one pass)",
            "limit_test": "images: use only the first N test images; text: the first N held-out windows of "
                          "--seq-len predicted tokens (default: all)",
        },
        "model": {
            "model": {"choices": list(MODELS),
                      "help": "vit and mixer replace the linear layers inside their blocks, resnet the 3x3 "
                              "convolutions inside its residual blocks, gpt (a decoder-only language model, with "
                              "--dataset text) the attention and MLP linears inside its blocks"},
            "layer": {"choices": list(LAYER_KINDS),
                      "help": "kind of the replaced layers (resnet: no monarch, there is no Monarch convolution)"},
            "flops_target": "FLOPs ratio of the replaced layers (GBLR learns to it; baselines are built at it)",
            "init_flops_ratio": "GBLR starting ratio (default: 2x target, at most 1)",
            "init_full_width_share": "share of the starting budget in full-width GBLR components (the rest: "
                                     "partial blocks)",
            "rank": "rank of each GBLR component (blocks cheaper as dense blocks cost their area)",
            "dense_blocks": "full-rank dense blocks per GBLR layer, placed and sized by learning like the "
                            "components (start: on spread block diagonals); not for resnet (default: 4 for "
                            "vit, mixer and gpt, none for resnet)",
            "init_dense_share": "share of the starting budget in the dense blocks",
            "dim": "vit, mixer, gpt: token width",
            "depth": "vit, mixer, gpt: number of blocks",
            "heads": "vit, gpt: attention heads",
            "patch_size": "vit, mixer: side of the square patches",
            "mlp_ratio": "vit, gpt: MLP hidden width over --dim",
            "seq_len": "gpt: tokens per window (its context; training windows hold one more, for the targets)",
            "width": "resnet: channels of the first stage, doubled in each of its 3 stages",
            "stage_depth": "resnet: residual blocks per stage",
        },
        "optimisation": {
            "epochs": None,
            "batch_size": "global batch size",
            "lr": None,
            "struct_lr": "learning rate of widths and locations (default: --lr)",
            "weight_decay": None,
            "warmup_epochs": None,
            "structure_fraction": "share of training spent learning the structure; the rest trains contents only",
            "budget": {"choices": list(BUDGETS),
                       "help": "GBLR: one FLOPs budget that learning splits among the layers, or every layer at "
                               "--flops-target on its own"},
            "settle_steps": "end the structure phase early once no block has moved for N steps (after the budget "
                            "warm-up); report.json gives the step it ended at (default: never early)",
            "sigma_start": "mask smoothing at the start",
            "sigma_end": "mask smoothing at the end of its ramp",
            "seed": None,
        },
        "run": {
            "out": "output folder (log, checkpoint, report, pictures); refused if it holds a run, unless "
                   "--resume or --overwrite",
            "resume": "continue the run in OUT from OUT/checkpoint.pt (with the same options)",
            "overwrite": "start afresh in an OUT that holds a run, deleting that run's checkpoint, log, report and "
                         "pictures",
            "stop_after": "stop after N epochs, to --resume later (default: none, train all epochs)",
            "threads": "torch CPU threads (default: torch's choice)",
            "progress": "hide the progress bar",
            "pictures": "skip the pictures",
        },
    }


def train_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .recipes.train import TrainConfig, TrainingInterrupted, train

    config = checked_config(args, TrainConfig, parser)
    try:
        report = train(config)
    except TrainingInterrupted as interrupt:  # Ctrl-C: how many epochs are saved, how to continue
        print(interrupt, file=sys.stderr)
        return 130
    except (OSError, ValueError, ImportError) as error:  # found before training: folders, data, checkpoint
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not report:
        print(f"stopped after epoch {config.stop_after}; continue with --resume --out {config.out}")
        return 0
    if "bits_per_byte" in report:  # a language model, on the held-out text files
        print(f"\nheld-out text: {report['bits_per_byte']:.4f} bits per byte, perplexity {report['perplexity']:.3f} "
              f"per token, next-token accuracy {report['accuracy']:.4f} (frozen model; "
              f"{report['bits_per_byte_before_freeze']:.4f} bits per byte before freezing)")
    else:
        print(f"\naccuracy {report['accuracy']:.4f} (frozen model; {report['accuracy_before_freeze']:.4f} before "
              "freezing)")
    print(f"FLOPs ratio {report['flops_ratio']:.3f} of the replaced layers (target {config.flops_target})")
    print(f"training {report['timings']['train_seconds']:.0f} s; report: {Path(config.out) / 'report.json'}")
    for picture in report["pictures"]:
        print(f"picture: {picture}")
    return 0


# -- gblr compress ------------------------------------------------------------------------------------


def _compress_options() -> Options:
    from .config import ALLOCATIONS, CALIBRATIONS, METHODS
    from .recipes.causal_lm import PROMPTS
    from .recipes.distill import LOSSES
    from .recipes.corpus import PYTHON_DOCS

    return {
        None: {
            "model_dir": "a Hugging Face or sentence-transformers model folder (with config.json), or a causal LM's "
                         ".gguf file; causal LMs (config naming ...ForCausalLM / ...LMHeadModel, or a .gguf) are "
                         "measured by perplexity, encoders by sentence-embedding fidelity",
            "flops": "FLOPs ratio of the compressed layers, in (0, 1]",
            "method": {"choices": list(METHODS),
                       "help": "gblr: structure search per layer; svd: activation-aware truncated SVD"},
            "target": "layers to compress: 'all-linear' (every nn.Linear and Conv1D but the output embeddings, "
                      "so never an LM's lm_head) or a regular expression matching whole module names",
            "exclude": "layers to leave dense, a regular expression matching whole module names (default: the "
                       "pooler, which sentence embeddings do not use; '' for none)",
            "calibration": {"choices": list(CALIBRATIONS),
                            "help": "sequential: the model's blocks (a decoder's layers) one at a time, each "
                                    "calibrated on the compressed blocks before it; one-shot: all layers from one "
                                    "pass of the original model (faster)"},
            "allocation": {"choices": list(ALLOCATIONS),
                           "help": "how the FLOPs budget is split among the layers: error: by each layer's relative "
                                   "output error; fisher: that error weighed by how much the predictions depend on "
                                   "the layer (needs logits); fisher-next-token: the same, judged on the text's own next "
                                   "tokens (causal LMs); uniform: every layer at --flops (default: fisher for "
                                   "causal LMs, error for encoders)"},
        },
        "text": {
            "text": {"metavar": "PATH",
                     "help": "UTF-8 text files, folders (searched recursively for *.txt, *.rst, *.md) or glob "
                             "patterns. Encoders: sentences, one per line or in paragraphs (default: a generated "
                             "English corpus). Causal LMs: split by file into calibration and held-out files "
                             f"(default: the Python documentation's sources, {PYTHON_DOCS})"},
            "batch_size": "sentences or token windows per batch (default: 32 sentences for encoders, 4 windows for "
                          "causal LMs)",
            "seed": "seed of the sentence draw or of the file split",
        },
        "sentence encoders": {
            "calibration_sentences": "sentences for calibration and distillation",
            "eval_sentences": "held-out sentences for the fidelity",
            "max_length": "tokens per sentence at most",
        },
        "causal language models": {
            "eval_fraction": "share of the text files held out for the perplexity (never used in calibration)",
            "seq_len": "tokens per window",
            "calibration_tokens": "tokens for calibration, in windows of --seq-len",
            "distill_tokens": "tokens for distillation, in windows of --seq-len from the calibration files",
            "eval_tokens": "held-out tokens for the perplexity, in windows of --seq-len",
            "generate_tokens": f"new tokens per greedy generation ({len(PROMPTS)} fixed prompts) and per timed "
                               "decoding run",
            "decode_repeats": "timed decoding runs per model, at batch 1 with the KV cache (0: no timing)",
        },
        "distillation (after conversion; off by default)": {
            "distill_steps": "steps of distillation towards the original",
            "distill_minutes": "time limit of the distillation (default: none)",
            "distill_loss": {"help": "kl: the next-token distributions' KL divergence (causal LMs); mse: of the "
                                     "outputs (logits or embeddings); cosine: of the sentence embeddings (default: kl "
                                     "for causal LMs, cosine for encoders)", "choices": LOSSES},
            "lr": "distillation learning rate",
            "distill_structure": "let the distillation move the blocks' widths and locations too, no layer's FLOPs "
                                 "growing (otherwise the converted structure stays and only the blocks' contents "
                                 "train, which recovered SmolLM2 better)",
        },
        "run": {
            "out": "output folder (model/, report.json, masks.png); refused if it holds a compressed model, unless "
                   "--overwrite",
            "overwrite": "replace the compressed model, report and picture OUT already holds",
            "threads": "torch CPU threads (default: torch's choice)",
            "progress": "hide the progress bars",
            "pictures": "skip masks.png",
        },
    }


def compress_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .recipes.compress import CompressConfig, compress

    config = checked_config(args, CompressConfig, parser)
    try:
        report = compress(config)
    except (OSError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if report.get("kind") == "causal-lm":
        base = f"gblr.recipes.causal_lm.load_causal_lm({config.model_dir!r})[0]"
        ppl = report["perplexity"]
        print("held-out perplexity: " + ", ".join(f"{name} {value:.3f}" for name, value in ppl.items()))
    else:
        base = "base_model"
    print(f"saved {report['saved']} (load with gblr.load_pretrained({base}, {report['saved']!r})); "
          f"report {Path(config.out) / 'report.json'}; {report['timings']['total_seconds']:.0f} s in all")
    return 0


# -- gblr demo ----------------------------------------------------------------------------------------


def demo_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .recipes.demo import demo

    _check_seed(args.seed, parser)
    demo(args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .recipes.compress import CompressConfig
    from .recipes.train import TrainConfig

    parser = argparse.ArgumentParser(prog="gblr", description="Learned generalized block low-rank weights for PyTorch.")
    parser.add_argument("--version", action="version", version=f"gblr {gblr.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    tour = commands.add_parser("demo", help="a short tour of masks, structures, layers and freezing")
    tour.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    tour.set_defaults(handler=functools.partial(demo_command, parser=tour))
    trainer = commands.add_parser(
        "train", help="learn GBLR structures from scratch on an image dataset or text",
        description="Train a small ViT, MLP-Mixer or ResNet on images, or a small GPT on text, with GBLR (or "
                    "baseline) layers under a FLOPs budget.",
    )
    add_config_arguments(trainer, TrainConfig, _train_options(), internal=("eval_batch_size",))
    trainer.set_defaults(handler=functools.partial(train_command, parser=trainer))
    compressor = commands.add_parser(
        "compress", help="compress a pretrained sentence encoder or causal LM and measure what it keeps",
        description="Replace the linear layers of a sentence encoder or a causal language model (a Hugging Face "
                    "folder or a .gguf file) by GBLR layers at a FLOPs ratio, optionally distilling towards the "
                    "original, and report how close it stays: sentence-embedding fidelity for encoders; held-out "
                    "perplexity, greedy generations and decode speed for causal LMs.",
    )
    add_config_arguments(compressor, CompressConfig, _compress_options())
    compressor.set_defaults(handler=functools.partial(compress_command, parser=compressor))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command and return its exit code: 0, 2 for bad input (found before any work), 130
    after Ctrl-C. Never raises SystemExit (argparse's way to end on an error, ``--help`` or
    ``--version``): its code is returned, so that callers and tests see one kind of outcome."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    except KeyboardInterrupt:  # where no command said more (gblr train says how to resume)
        print("interrupted", file=sys.stderr)
        return 130
