"""The causal-LM path of ``gblr compress``: held-out perplexity, generations and decode speed.

    gblr compress SmolLM2-135M-Instruct.Q4_1.gguf --flops 0.8 --text docs/ --out runs/smollm2

Steps (:func:`compress_causal_lm`, called by :func:`gblr.recipes.compress.compress`):

1. The text files (``--text``; default the Python documentation's sources,
   :data:`gblr.recipes.corpus.PYTHON_DOCS`) are split *by file* into calibration files and
   held-out evaluation files (``--eval-fraction``, seeded), and each side is cut into windows of
   ``--seq-len`` tokens (``--calibration-tokens``, ``--eval-tokens``).
2. The dense model's held-out perplexity and its greedy generations for three fixed prompts.
3. :func:`gblr.convert_` of a copy, calibrated on the calibration windows (each batch is
   ``{"input_ids": (batch, seq_len)}``, called as ``model(**batch)``), timed; its perplexity.
4. Optionally :func:`gblr.distill` on windows of the calibration files (``--distill-tokens``,
   more than calibration needs): the student's next-token
   distribution at every position is matched to the original's (``output_fn=logits_output``;
   ``--distill-loss``, default ``"kl"``: the mean token-level KL divergence; ``"mse"``: logit
   matching). Only the blocks' contents train unless ``--distill-structure`` (then widths and
   locations too, each layer's FLOPs bounded by its cost after conversion). The teacher's
   logits, ``batch * seq_len * vocab * 4`` bytes per batch (200 MB for 4 windows of 256 tokens
   over a 49k vocabulary), are cached for the first 2 GiB of batches and recomputed for the
   others.
5. Greedy generations of the compressed model, and decode speed: tokens/s at batch 1 with the
   KV cache, the original against a frozen copy of the compressed model (:func:`gblr.freeze_`,
   under ``torch.inference_mode``), interleaved, median of ``--decode-repeats`` runs.

The report adds to the encoder report's FLOPs and layers: ``perplexity`` (``dense``,
``converted``, ``distilled``), ``generations``, ``decode``, ``text`` (the files on each side)
and ``peak_rss_mb`` (``resource.getrusage``: the process's peak resident memory so far).
"""

from __future__ import annotations

import copy
import resource
import sys
import time

import torch
from torch import nn

from .._files import check_writable_folder
from ..config import GBLRConfig
from ..frozen import freeze_
from ..targets import target_names
from . import corpus
from .causal_lm import (
    CAUSAL_LM,
    PROMPTS,
    decode_speed,
    greedy_continuation,
    load_causal_lm,
    logits_output,
    max_positions,
    perplexity,
    token_windows,
    window_batches,
)
from .compress import CompressConfig, convert_targets, run_distillation, target_flops, with_option
from .options import option_name

__all__ = ["compress_causal_lm", "peak_rss_mb"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _windows(tokenizer, files, config: CompressConfig, tokens: int, side: str) -> torch.Tensor:
    """``tokens // seq_len`` windows from ``files``; a ValueError naming --text if there are none."""
    wanted = tokens // config.seq_len
    try:
        windows = token_windows(tokenizer, corpus.read_texts(files), config.seq_len, wanted)
    except ValueError as error:  # a file that is not UTF-8
        raise with_option(error, "text") from error
    if len(windows) == 0:
        raise ValueError(f"{option_name('text')}: the {len(files)} {side} file(s) hold fewer than "
                         f"{option_name('seq_len')} = {config.seq_len} tokens; pass more text, a shorter --seq-len "
                         "or a larger --eval-fraction")
    if len(windows) < wanted:
        print(f"note: the {side} files hold only {len(windows)} windows of {config.seq_len} tokens "
              f"({wanted} wanted)")
    return windows


def _generations(model: nn.Module, tokenizer, new_tokens: int) -> list[str]:
    return [greedy_continuation(model, tokenizer, prompt, new_tokens) for prompt in PROMPTS]


def compress_causal_lm(config: CompressConfig, gblr_config: GBLRConfig, started: float) -> tuple[nn.Module, dict]:
    """Compress and measure a causal LM; returns the compressed model and the report (without
    ``saved``, ``pictures`` and the total time, which :func:`gblr.recipes.compress.compress` adds)."""
    # The files, checked before the model is loaded; messages name the option.
    try:
        paths = config.text or corpus.default_text()
        files = corpus.find_text_files(paths)
        calibration_files, eval_files = corpus.split_files(files, config.eval_fraction, config.seed)
    except (OSError, ValueError) as error:
        raise with_option(error, "text") from error
    check_writable_folder(config.out, option_name("out"))
    batch_size = config.batch(CAUSAL_LM)
    print(f"loading {config.model_dir}", flush=True)
    teacher, tokenizer = load_causal_lm(config.model_dir, progress=config.progress)
    positions = max_positions(teacher)
    if positions is not None and config.seq_len > positions:
        raise ValueError(f"{option_name('seq_len')} = {config.seq_len} is longer than the model's {positions} "
                         "positions; pass a shorter --seq-len")
    targets = target_names(teacher, gblr_config)
    torch.manual_seed(config.seed)
    load_seconds = time.perf_counter() - started

    train_windows = _windows(tokenizer, calibration_files, config, config.calibration_tokens, "calibration")
    eval_windows = _windows(tokenizer, eval_files, config, config.eval_tokens, "evaluation")
    train_batches = window_batches(train_windows, batch_size)
    eval_batches = window_batches(eval_windows, batch_size)
    print(f"text: {len(files)} files ({', '.join(paths)}), {len(calibration_files)} for calibration "
          f"({len(train_windows)} windows of {config.seq_len} tokens), {len(eval_files)} held out "
          f"({len(eval_windows)} windows)", flush=True)

    evaluation_start = time.perf_counter()
    ppl = {"dense": perplexity(teacher, eval_batches)}
    dense_texts = _generations(teacher, tokenizer, config.generate_tokens)
    evaluation_seconds = time.perf_counter() - evaluation_start
    print(f"held-out perplexity of the original: {ppl['dense']:.3f}", flush=True)

    student = copy.deepcopy(teacher)
    conversion, flops, convert_seconds = convert_targets(student, targets, gblr_config, train_batches, config)
    ppl["converted"] = perplexity(student, eval_batches)
    print(f"FLOPs ratio {flops.ratio:.3f} ({flops.gblr_macs:,} of {flops.dense_macs:,} MACs per token), "
          f"{convert_seconds:.1f} s; held-out perplexity {ppl['converted']:.3f}", flush=True)

    distillation = None
    if config.distill_steps or config.distill_minutes:
        # More windows than calibration needs: a few dozen windows are fitted within minutes
        # and held-out perplexity then stops improving (the teacher runs again on batches
        # beyond distill's cache of its logits).
        distill_windows = _windows(tokenizer, calibration_files, config, config.distill_tokens, "distillation")
        distillation, _ = run_distillation(student, teacher, window_batches(distill_windows, batch_size), config,
                                           CAUSAL_LM, output_fn=logits_output)
        distillation |= {"output": "logits", "windows": len(distill_windows)}
        ppl["distilled"] = perplexity(student, eval_batches)
        flops = target_flops(student, targets)
        print(f"distilled {distillation['steps']} steps in {distillation['seconds']:.1f} s: held-out perplexity "
              f"{ppl['distilled']:.3f}, FLOPs ratio {flops.ratio:.3f}", flush=True)

    compressed_texts = _generations(student, tokenizer, config.generate_tokens)
    generations = [{"prompt": prompt, "dense": ours, "compressed": theirs}
                   for prompt, ours, theirs in zip(PROMPTS, dense_texts, compressed_texts)]
    decode = None
    if config.decode_repeats:
        frozen = freeze_(copy.deepcopy(student))
        speed = decode_speed({"dense": teacher, "frozen": frozen}, tokenizer, PROMPTS[0], config.generate_tokens,
                             config.decode_repeats)
        decode = {"prompt": PROMPTS[0], "new_tokens": config.generate_tokens, "repeats": config.decode_repeats,
                  "batch": 1, "threads": torch.get_num_threads(),
                  "dense_tokens_per_s": speed["dense"]["tokens_per_s"],
                  "frozen_tokens_per_s": speed["frozen"]["tokens_per_s"],
                  "speedup": speed["frozen"]["tokens_per_s"] / speed["dense"]["tokens_per_s"],
                  "seconds": {name: entry["seconds"] for name, entry in speed.items()}}
        del frozen
        print(f"decoding at batch 1: {decode['dense_tokens_per_s']:.1f} tokens/s dense, "
              f"{decode['frozen_tokens_per_s']:.1f} frozen ({decode['speedup']:.2f}x)", flush=True)

    report = {
        "model_dir": str(config.model_dir),
        "kind": CAUSAL_LM,
        "method": config.method,
        "flops_target": config.flops,
        "flops_ratio": flops.ratio,
        "dense_macs": flops.dense_macs,
        "macs": flops.gblr_macs,
        "perplexity": ppl,
        "perplexity_final": ppl.get("distilled", ppl["converted"]),
        "generations": generations,
        "decode": decode,
        "layers": flops.to_dict()["layers"],
        "text": {"source": list(paths), "seed": config.seed, "eval_fraction": config.eval_fraction,
                 "seq_len": config.seq_len, "batch_size": batch_size,
                 "calibration_windows": len(train_windows), "evaluation_windows": len(eval_windows),
                 "calibration_files": [str(path) for path in calibration_files],
                 "evaluation_files": [str(path) for path in eval_files]},
        "distillation": distillation,
        "conversion": conversion.to_dict(),
        "timings": {"load_seconds": load_seconds, "convert_seconds": convert_seconds,
                    "dense_evaluation_seconds": evaluation_seconds,
                    "distill_seconds": distillation["seconds"] if distillation else 0.0},
        "peak_rss_mb": peak_rss_mb(),
    }
    return student, report
