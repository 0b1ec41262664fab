"""The compression recipe behind ``gblr compress``: a pretrained model -> GBLR layers, measured.

    report = compress(CompressConfig("all-MiniLM-L6-v2/", flops=0.5, distill_minutes=10, out="runs/minilm"))
    report = compress(CompressConfig("SmolLM2-135M-Instruct.Q4_1.gguf", flops=0.8, text=["docs/"]))

Two kinds of model, told apart by their config (:func:`gblr.recipes.causal_lm.model_kind`):

* **Sentence encoders** (a Hugging Face or sentence-transformers folder): draws calibration
  sentences and disjoint held-out ones (from ``text``, else generated), converts the target
  layers with :func:`gblr.convert_` (calibrated on those sentences), optionally distils towards
  the original (:func:`gblr.distill`), and measures the fidelity: the mean cosine similarity of
  the sentence embeddings with the original model's on the held-out sentences.
* **Causal language models** (a folder whose config names a ``...ForCausalLM`` or
  ``...LMHeadModel``, or a ``.gguf`` file): :mod:`gblr.recipes.compress_lm` splits the text
  files into calibration and held-out files, converts on token windows, optionally distils on
  the logits, and measures the held-out perplexity, greedy generations and decode speed.

Both write into ``out``: ``model/`` (:func:`gblr.save_pretrained`), ``report.json`` and ``masks.png``.

Which layers: those :class:`gblr.GBLRConfig` selects with ``target_modules=target`` and
``exclude_modules=exclude``. By default every linear layer (``"all-linear"``: never the output
embeddings, a causal LM's ``lm_head``) except the pooler: a sentence embedding is the mean of
the last hidden states, and BERT's pooler (dense + tanh on the ``[CLS]`` token) feeds only
``pooler_output``, which the embedding never reads, so compressing it would change nothing that
is measured while counting its MACs in the ratio. A causal LM has no pooler: its attention and
MLP linears are the targets.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from .._files import check_writable_folder, write_text_atomic
from .._validation import check_flops_ratio
from ..config import ALL_LINEAR, ALLOCATIONS, CALIBRATIONS, METHODS, GBLRConfig
from ..convert import ConversionReport, convert_
from ..flops import FlopsReport, flops_report
from ..pretrained import CONFIG_FILE, save_pretrained
from ..targets import target_names
from . import corpus, sentences, text
from .causal_lm import CAUSAL_LM, ENCODER, model_kind
from .distill import LOSSES, distill
from .options import check_number, check_positive_int, check_seed, option_name

__all__ = ["POOLER", "CompressConfig", "compress", "convert_targets", "linear_targets", "run_distillation",
           "target_flops", "with_option"]

# Every module under a path component named "pooler" ("pooler", "pooler.dense", "bert.pooler.dense").
POOLER = r"(.*\.)?pooler(\..*)?"
# Batch sizes when batch_size is None: sentences of an encoder, token windows of a causal LM.
ENCODER_BATCH, CAUSAL_LM_BATCH = 32, 4


@dataclasses.dataclass
class CompressConfig:
    """What :func:`compress` does; each field is the ``gblr compress`` option of the same name
    (``calibration_sentences`` is ``--calibration-sentences``, ``progress=False`` is ``--no-progress``)."""

    model_dir: str  # a Hugging Face or sentence-transformers model folder (with config.json), or a .gguf file
    flops: float = 0.5  # FLOPs ratio of the compressed layers, in (0, 1]
    method: str = "gblr"  # one of METHODS: GBLRConfig.method
    target: str = ALL_LINEAR  # GBLRConfig.target_modules: "all-linear" or a regex matching whole names
    exclude: str | None = POOLER  # GBLRConfig.exclude_modules as a regex; None or "": nothing excluded
    calibration: str = GBLRConfig.calibration  # one of CALIBRATIONS: GBLRConfig.calibration
    # one of ALLOCATIONS: GBLRConfig.allocation; None: "fisher" for causal LMs, "error" for encoders
    allocation: str | None = None
    # Text files, folders or glob patterns (a str is one path). Encoders: sentences, None:
    # generated. Causal LMs: split by file into calibration and evaluation, None: corpus.PYTHON_DOCS.
    text: list[str] | None = None
    calibration_sentences: int = 256  # encoders: for calibration and distillation
    eval_sentences: int = 256  # encoders: held out, for the fidelity
    batch_size: int | None = None  # None: ENCODER_BATCH sentences, CAUSAL_LM_BATCH token windows
    max_length: int = 128  # encoders: tokens per sentence at most
    eval_fraction: float = 0.1  # causal LMs: share of the text files held out for the perplexity
    seq_len: int = 256  # causal LMs: tokens per window
    calibration_tokens: int = 16384  # causal LMs: for calibration (seq_len-token windows)
    distill_tokens: int = 131072  # causal LMs: for distillation, windows of the calibration files
    eval_tokens: int = 16384  # causal LMs: held out, for the perplexity
    generate_tokens: int = 32  # causal LMs: new tokens per greedy generation and per decode-speed run
    decode_repeats: int = 5  # causal LMs: timed decoding runs per model (0: no timing)
    distill_steps: int = 0  # 0 with distill_minutes None: no distillation
    distill_minutes: float | None = None  # time limit of the distillation
    # distill's loss (LOSSES); None: "kl" on the logits for causal LMs, "cosine" of the embeddings for encoders
    distill_loss: str | None = None
    lr: float = 1e-4  # distillation learning rate
    # distillation also moves widths and locations (each layer's FLOPs bounded); off: the structure
    # from the conversion stays and only the block contents train (recovered better on SmolLM2)
    distill_structure: bool = False
    out: str = "runs/compress"
    overwrite: bool = False  # replace the model and report an ``out`` already holds
    seed: int = 0
    threads: int | None = None  # torch CPU threads
    progress: bool = True
    pictures: bool = True

    def __post_init__(self) -> None:
        # One path given as a str (or path) is a list of one: CompressConfig(m, text="a.txt").
        if isinstance(self.text, (str, os.PathLike)):
            self.text = [os.fspath(self.text)]
        elif isinstance(self.text, tuple):
            self.text = list(self.text)

    def batch(self, kind: str) -> int:
        """The batch size for a model of ``kind`` (``batch_size`` or that kind's default)."""
        return self.batch_size or (CAUSAL_LM_BATCH if kind == CAUSAL_LM else ENCODER_BATCH)

    def gblr_config(self, kind: str = ENCODER) -> GBLRConfig:
        """The :class:`gblr.GBLRConfig` of the conversion of a model of ``kind``."""
        allocation = self.allocation or ("fisher" if kind == CAUSAL_LM else "error")
        return GBLRConfig(
            flops_ratio=self.flops, target_modules=self.target, exclude_modules=self.exclude or None, method=self.method,
            calibration=self.calibration, allocation=allocation,
        )

    def recovery_loss(self, kind: str) -> str:
        """The loss :func:`gblr.distill` recovers a model of ``kind`` with: ``distill_loss``, or
        the kind's default (the next-token KL for a causal LM, the embeddings' cosine otherwise)."""
        return self.distill_loss or ("kl" if kind == CAUSAL_LM else "cosine")

    def validate(self) -> None:
        """Raise a ValueError naming the field (and its option) of the first bad value."""
        check_flops_ratio(self.flops, option_name("flops"))
        if self.method not in METHODS:
            raise ValueError(f"{option_name('method')} must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise ValueError(f"{option_name('allocation')} must be one of {', '.join(ALLOCATIONS)}, got "
                             f"{self.allocation!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"{option_name('calibration')} must be one of {', '.join(CALIBRATIONS)}, got "
                             f"{self.calibration!r}")
        if self.text is not None and (not isinstance(self.text, list) or not self.text
                                      or not all(isinstance(path, str) and path for path in self.text)):
            raise ValueError(f"{option_name('text')} must be None or a non-empty list of paths, got {self.text!r}")
        for name in ("calibration_sentences", "eval_sentences", "seq_len", "calibration_tokens", "distill_tokens",
                     "eval_tokens", "generate_tokens"):
            check_positive_int(self, name)
        check_positive_int(self, "batch_size", optional=True)
        check_positive_int(self, "threads", optional=True)
        check_positive_int(self, "max_length")
        if self.max_length <= 1:  # a sentence needs room for its [CLS] and [SEP] at least
            raise ValueError(f"{option_name('max_length')} must be > 1, got {self.max_length}")
        if self.seq_len <= 1:  # a window predicts its tokens 2..seq_len
            raise ValueError(f"{option_name('seq_len')} must be > 1, got {self.seq_len}")
        for name in ("calibration_tokens", "distill_tokens", "eval_tokens"):
            if getattr(self, name) < self.seq_len:
                raise ValueError(f"{option_name(name)} must be at least one window of {option_name('seq_len')} = "
                                 f"{self.seq_len} tokens, got {getattr(self, name)}")
        check_number(self, "eval_fraction", positive=True)
        if self.eval_fraction >= 1:
            raise ValueError(f"{option_name('eval_fraction')} must be in (0, 1), got {self.eval_fraction!r}")
        if isinstance(self.decode_repeats, bool) or not isinstance(self.decode_repeats, int) or self.decode_repeats < 0:
            raise ValueError(f"{option_name('decode_repeats')} must be an int >= 0, got {self.decode_repeats!r}")
        check_number(self, "distill_steps", positive=False)
        if self.distill_loss is not None and self.distill_loss not in LOSSES:
            raise ValueError(f"{option_name('distill_loss')} must be one of {', '.join(LOSSES)}, got "
                             f"{self.distill_loss!r}")
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
    """The FLOPs report restricted to the named layers: a GBLR layer's own cost, a layer still
    dense (nn.Linear or Conv1D) at ``in * out`` MACs."""
    wanted = set(names)
    return FlopsReport(tuple(layer for layer in flops_report(model, include_dense=True) if layer.name in wanted))


def convert_targets(student: nn.Module, targets: list[str], gblr_config: GBLRConfig, batches: list,
                    config: CompressConfig) -> tuple[ConversionReport, FlopsReport, float]:
    """Convert ``student``'s ``targets`` in place with :func:`gblr.convert_`, calibrated on
    ``batches``, saying what it does; returns the conversion report, the targets' FLOPs after it
    and the seconds it took. The step both recipes (encoders and causal LMs) share."""
    dense = target_flops(student, targets)
    print(f"compressing {len(targets)} linear layers ({dense.dense_macs:,} MACs per token) to {config.flops:g} "
          f"of their FLOPs with {config.method}", flush=True)
    start = time.perf_counter()
    conversion = convert_(student, gblr_config, calibration=batches, progress=config.progress, verbose=False)
    return conversion, target_flops(student, targets), time.perf_counter() - start


def with_option(error: Exception, field: str) -> Exception:
    """``error`` with its message prefixed by the option it concerns (same type, where it allows)."""
    kind = type(error) if isinstance(error, (OSError, ValueError, ImportError)) else ValueError
    prefix = "model_dir" if field == "model_dir" else option_name(field)
    return kind(f"{prefix}: {error}")


def run_distillation(student: nn.Module, teacher: nn.Module, batches: list, config: CompressConfig, kind: str,
                     **options) -> tuple[dict, list[float]]:
    """:func:`gblr.distill` of a model of ``kind`` with the config's steps, time limit, learning
    rate and loss (``options``: its other keywords); returns the report's ``distillation`` entry
    and the losses."""
    steps = config.distill_steps or 1_000_000  # with only distill_minutes: as many steps as fit
    max_seconds = None if config.distill_minutes is None else 60.0 * config.distill_minutes
    loss = config.recovery_loss(kind)
    start = time.perf_counter()
    losses = distill(student, teacher, batches, steps, lr=config.lr, loss=loss, max_seconds=max_seconds,
                     train_structure=config.distill_structure, progress=config.progress, **options)
    seconds = time.perf_counter() - start
    return {"steps": len(losses), "lr": config.lr, "loss": loss, "first_loss": losses[0], "last_loss": losses[-1],
            "structure": "learned" if config.distill_structure else "fixed", "seconds": seconds}, losses


def compress(config: CompressConfig) -> dict:
    """Compress, measure, save; returns the report (also written to ``out/report.json``).

    Raises FileNotFoundError (no model folder, no text file), OSError (an output folder it cannot
    write into), ImportError (transformers or safetensors missing) or ValueError (a bad config, an
    unusable text file, no matching layer) before any work.
    """
    config.validate()
    _check_fresh_out(config)
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    # The files it needs, checked now rather than after minutes of work; the messages name the option.
    try:
        kind = model_kind(config.model_dir)
    except (FileNotFoundError, ValueError) as error:
        raise with_option(error, "model_dir") from error
    gblr_config = config.gblr_config(kind)
    if kind == CAUSAL_LM:
        from .compress_lm import compress_causal_lm  # it uses this module's helpers

        student, report = compress_causal_lm(config, gblr_config, started)
    else:
        student, report = _compress_encoder(config, gblr_config, started)
    out = Path(config.out)
    model_dir = out / "model"
    save_pretrained(student, model_dir)
    report["saved"] = str(model_dir)
    report["pictures"] = []
    if config.pictures:
        try:
            from ..viz import plot_masks

            report["pictures"].append(str(plot_masks(student, out / "masks.png")))
        except ImportError as error:
            print(f"no pictures: {error}")
    report["timings"]["total_seconds"] = time.perf_counter() - started
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    return report


def _check_fresh_out(config: CompressConfig) -> None:
    """Refuse an ``out`` that already holds a compressed model or a report, unless ``overwrite``:
    a second run would replace them without being asked to (as ``gblr train`` refuses a run)."""
    out = Path(config.out)
    held = [path for path in (out / "report.json", out / "model" / CONFIG_FILE) if path.exists()]
    if held and not config.overwrite:
        raise FileExistsError(f"{out} already holds a compressed model ({', '.join(str(p) for p in held)}): pass "
                              f"{option_name('overwrite')} to replace it, or choose another {option_name('out')}")


def _compress_encoder(config: CompressConfig, gblr_config: GBLRConfig, started: float) -> tuple[nn.Module, dict]:
    """The sentence-encoder path: the compressed model and the report (without ``saved``,
    ``pictures`` and the total time, which :func:`compress` adds)."""
    try:
        given = None
        if config.text:
            given = [s for path in corpus.find_text_files(config.text) for s in sentences.read_sentences(path)]
    except (OSError, ValueError) as error:
        raise with_option(error, "text") from error
    source = (config.text[0] if len(config.text) == 1 else list(config.text)) if config.text else "generated"
    check_writable_folder(config.out, option_name("out"))
    batch_size = config.batch(ENCODER)
    train_sentences, eval_sentences = sentences.split_sentences(
        given, config.calibration_sentences, config.eval_sentences, config.seed)
    print(f"loading {config.model_dir}", flush=True)
    teacher, tokenizer = text.load_sentence_encoder(config.model_dir, progress=config.progress)
    targets = target_names(teacher, gblr_config)
    torch.manual_seed(config.seed)
    load_seconds = time.perf_counter() - started
    print(f"sentences: {len(train_sentences)} for calibration and distillation, {len(eval_sentences)} held out "
          f"({'from ' + ', '.join(config.text) if config.text else 'generated'})")

    train_batches = text.token_batches(tokenizer, train_sentences, batch_size, config.max_length)
    eval_batches = text.token_batches(tokenizer, eval_sentences, batch_size, config.max_length)
    reference = text.embed(teacher, eval_batches)
    student = copy.deepcopy(teacher)
    conversion, flops, convert_seconds = convert_targets(student, targets, gblr_config, train_batches, config)
    fidelity = {"converted": text.embedding_fidelity(student, reference, eval_batches)}
    print(f"FLOPs ratio {flops.ratio:.3f} ({flops.gblr_macs:,} of {flops.dense_macs:,} MACs per token), "
          f"{convert_seconds:.1f} s")
    print(f"fidelity (mean cosine with the original on held-out sentences): {fidelity['converted']:.4f}", flush=True)

    distillation = None
    if config.distill_steps or config.distill_minutes:
        distillation, _ = run_distillation(student, teacher, train_batches, config, ENCODER)
        fidelity["distilled"] = text.embedding_fidelity(student, reference, eval_batches)
        flops = target_flops(student, targets)
        print(f"distilled {distillation['steps']} steps in {distillation['seconds']:.1f} s: fidelity "
              f"{fidelity['distilled']:.4f}, FLOPs ratio {flops.ratio:.3f}")

    report = {
        "model_dir": str(config.model_dir),
        "kind": ENCODER,
        "method": config.method,
        "flops_target": config.flops,
        "flops_ratio": flops.ratio,
        "dense_macs": flops.dense_macs,
        "macs": flops.gblr_macs,
        "fidelity": fidelity,
        "fidelity_final": fidelity.get("distilled", fidelity["converted"]),
        "layers": flops.to_dict()["layers"],
        "sentences": {"source": source, "seed": config.seed,
                      "calibration": len(train_sentences), "evaluation": len(eval_sentences),
                      "max_length": config.max_length, "batch_size": batch_size},
        "distillation": distillation,
        "conversion": conversion.to_dict(),
        "timings": {"load_seconds": load_seconds, "convert_seconds": convert_seconds,
                    "distill_seconds": distillation["seconds"] if distillation else 0.0},
    }
    return student, report
