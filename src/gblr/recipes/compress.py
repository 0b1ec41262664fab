"""The compression recipe behind ``gblr compress``: a pretrained sentence encoder -> GBLR layers, measured.

    report = compress(CompressConfig("all-MiniLM-L6-v2/", flops=0.5, distill_minutes=10, out="runs/minilm"))

Loads a Hugging Face or sentence-transformers folder offline, draws calibration sentences and
disjoint held-out ones (from ``text``, else generated), converts the target layers with
:func:`gblr.convert_` (calibrated on those sentences), optionally distils towards the original
(:func:`gblr.distill`), and measures the fidelity: the mean cosine similarity of the sentence
embeddings with the original model's on the held-out sentences. Writes into ``out``: ``model/``
(:func:`gblr.save_pretrained`), ``report.json`` and ``masks.png``.

Which layers: those :class:`gblr.GBLRConfig` selects with ``target_modules=target`` and
``exclude_modules=exclude``. By default every linear layer (``"all-linear"``) except the
pooler: a sentence embedding is the mean of the last hidden states, and BERT's pooler (dense +
tanh on the ``[CLS]`` token) feeds only ``pooler_output``, which the embedding never reads, so
compressing it would change nothing that is measured while counting its MACs in the ratio.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time

import torch
from torch import nn

from .._files import check_writable_folder, write_text_atomic
from .._validation import check_flops_ratio
from ..config import ALL_LINEAR, METHODS, GBLRConfig
from ..convert import convert_
from ..flops import FlopsReport, flops_report
from ..pretrained import save_pretrained
from ..targets import target_names
from . import sentences, text
from .distill import distill
from .options import check_number, check_positive_int, check_seed, option_name

__all__ = ["POOLER", "CompressConfig", "compress", "linear_targets", "target_flops"]

# Every module under a path component named "pooler" ("pooler", "pooler.dense", "bert.pooler.dense").
POOLER = r"(.*\.)?pooler(\..*)?"


@dataclasses.dataclass
class CompressConfig:
    """What :func:`compress` does; each field is the ``gblr compress`` option of the same name
    (``calibration_sentences`` is ``--calibration-sentences``, ``progress=False`` is ``--no-progress``)."""

    model_dir: str  # a Hugging Face or sentence-transformers model folder (with config.json)
    flops: float = 0.5  # FLOPs ratio of the compressed layers, in (0, 1]
    method: str = "gblr"  # one of METHODS: GBLRConfig.method
    target: str = ALL_LINEAR  # GBLRConfig.target_modules: "all-linear" or a regex matching whole names
    exclude: str | None = POOLER  # GBLRConfig.exclude_modules as a regex; None or "": nothing excluded
    text: str | None = None  # UTF-8 text file of sentences; None: generated sentences
    calibration_sentences: int = 256  # for calibration and distillation
    eval_sentences: int = 256  # held out, for the fidelity
    batch_size: int = 32
    max_length: int = 128  # tokens per sentence at most
    distill_steps: int = 0  # 0 with distill_minutes None: no distillation
    distill_minutes: float | None = None  # time limit of the distillation
    lr: float = 1e-4  # distillation learning rate
    out: str = "runs/compress"
    seed: int = 0
    threads: int | None = None  # torch CPU threads
    progress: bool = True
    pictures: bool = True

    def gblr_config(self) -> GBLRConfig:
        """The :class:`gblr.GBLRConfig` of the conversion."""
        return GBLRConfig(
            flops_ratio=self.flops, target_modules=self.target, exclude_modules=self.exclude or None, method=self.method
        )

    def validate(self) -> None:
        """Raise a ValueError naming the field (and its option) of the first bad value."""
        check_flops_ratio(self.flops, option_name("flops"))
        if self.method not in METHODS:
            raise ValueError(f"{option_name('method')} must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("calibration_sentences", "eval_sentences", "batch_size"):
            check_positive_int(self, name)
        check_positive_int(self, "threads", optional=True)
        check_positive_int(self, "max_length")
        if self.max_length <= 1:  # a sentence needs room for its [CLS] and [SEP] at least
            raise ValueError(f"{option_name('max_length')} must be > 1, got {self.max_length}")
        check_number(self, "distill_steps", positive=False)
        check_number(self, "distill_minutes", positive=True, optional=True)  # None: no time limit
        check_number(self, "lr", positive=True)
        check_seed(self)
        try:
            self.gblr_config()
        except ValueError as error:
            raise ValueError(f"{option_name('target')} / {option_name('exclude')}: {error}") from None


def linear_targets(model: nn.Module, target: str = ALL_LINEAR, exclude: str | None = POOLER) -> list[str]:
    """Names of the layers of ``model`` that ``gblr compress`` replaces with these ``target`` and
    ``exclude`` (see :class:`CompressConfig`); a ValueError when none match."""
    return target_names(model, GBLRConfig(target_modules=target, exclude_modules=exclude or None))


def target_flops(model: nn.Module, names: list[str]) -> FlopsReport:
    """The FLOPs report restricted to the named layers (dense or GBLR)."""
    wanted = set(names)
    report = flops_report(model, include_dense=True)
    return FlopsReport(tuple(layer for layer in report if layer.name in wanted))


def compress(config: CompressConfig) -> dict:
    """Compress, measure, save; returns the report (also written to ``out/report.json``).

    Raises FileNotFoundError (no model folder, no text file), OSError (an output folder it cannot
    write into), ImportError (transformers or safetensors missing) or ValueError (a bad config, an
    unusable text file, no matching layer) before any work.
    """
    config.validate()
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    gblr_config = config.gblr_config()
    # The files it needs, checked now rather than after minutes of work; the messages name the option.
    try:
        text.encoder_folder(config.model_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"model_dir: {error}") from error
    try:
        given = sentences.read_sentences(config.text) if config.text else None
    except OSError as error:
        raise type(error)(f"{option_name('text')}: {error}") from error
    except ValueError as error:
        raise ValueError(f"{option_name('text')}: {error}") from error
    out = check_writable_folder(config.out, option_name("out"))
    train_sentences, eval_sentences = sentences.split_sentences(
        given, config.calibration_sentences, config.eval_sentences, config.seed)
    print(f"loading {config.model_dir}", flush=True)
    teacher, tokenizer = text.load_sentence_encoder(config.model_dir, progress=config.progress)
    targets = target_names(teacher, gblr_config)
    torch.manual_seed(config.seed)
    load_seconds = time.perf_counter() - started
    print(f"sentences: {len(train_sentences)} for calibration and distillation, {len(eval_sentences)} held out "
          f"({'from ' + config.text if config.text else 'generated'})")

    train_batches = text.token_batches(tokenizer, train_sentences, config.batch_size, config.max_length)
    eval_batches = text.token_batches(tokenizer, eval_sentences, config.batch_size, config.max_length)
    reference = text.embed(teacher, eval_batches)
    student = copy.deepcopy(teacher)

    dense = target_flops(student, targets)
    print(f"compressing {len(targets)} linear layers ({dense.dense_macs:,} MACs per token) to {config.flops:g} "
          f"of their FLOPs with {config.method}", flush=True)
    convert_start = time.perf_counter()
    conversion = convert_(student, gblr_config, calibration=train_batches, progress=config.progress, verbose=False)
    convert_seconds = time.perf_counter() - convert_start
    flops = target_flops(student, targets)
    fidelity = {"converted": text.embedding_fidelity(student, reference, eval_batches)}
    print(f"FLOPs ratio {flops.ratio:.3f} ({flops.gblr_macs:,} of {flops.dense_macs:,} MACs per token), "
          f"{convert_seconds:.1f} s")
    print(f"fidelity (mean cosine with the original on held-out sentences): {fidelity['converted']:.4f}", flush=True)

    distillation = None
    if config.distill_steps or config.distill_minutes:
        steps = config.distill_steps or 1_000_000  # with only distill_minutes: as many steps as fit
        max_seconds = None if config.distill_minutes is None else 60.0 * config.distill_minutes
        distill_start = time.perf_counter()
        losses = distill(student, teacher, train_batches, steps, lr=config.lr, max_seconds=max_seconds,
                         progress=config.progress)
        distill_seconds = time.perf_counter() - distill_start
        fidelity["distilled"] = text.embedding_fidelity(student, reference, eval_batches)
        flops = target_flops(student, targets)
        distillation = {"steps": len(losses), "lr": config.lr, "first_loss": losses[0], "last_loss": losses[-1],
                        "seconds": distill_seconds}
        print(f"distilled {len(losses)} steps in {distill_seconds:.1f} s: fidelity {fidelity['distilled']:.4f}, "
              f"FLOPs ratio {flops.ratio:.3f}")

    model_dir = out / "model"
    save_pretrained(student, model_dir)
    report = {
        "model_dir": str(config.model_dir),
        "method": config.method,
        "flops_target": config.flops,
        "flops_ratio": flops.ratio,
        "dense_macs": flops.dense_macs,
        "macs": flops.gblr_macs,
        "fidelity": fidelity,
        "fidelity_final": fidelity.get("distilled", fidelity["converted"]),
        "layers": flops.to_dict()["layers"],
        "sentences": {"source": config.text or "generated", "seed": config.seed,
                      "calibration": len(train_sentences), "evaluation": len(eval_sentences),
                      "max_length": config.max_length, "batch_size": config.batch_size},
        "distillation": distillation,
        "conversion": conversion.to_dict(),
        "timings": {"load_seconds": load_seconds, "convert_seconds": convert_seconds,
                    "distill_seconds": distillation["seconds"] if distillation else 0.0},
        "saved": str(model_dir),
        "pictures": [],
    }
    if config.pictures:
        try:
            from ..viz import plot_masks

            report["pictures"].append(str(plot_masks(student, out / "masks.png")))
        except ImportError as error:
            print(f"no pictures: {error}")
    report["timings"]["total_seconds"] = time.perf_counter() - started
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    return report
