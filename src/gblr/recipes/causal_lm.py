"""Causal language models for ``gblr compress``: loading, token windows, perplexity, generation
and decode speed.

    model, tokenizer = load_causal_lm("SmolLM2-135M-Instruct.Q4_1.gguf")   # or a Hugging Face folder
    windows = token_windows(tokenizer, corpus.read_texts(files), seq_len=256, count=64)
    batches = window_batches(windows, batch_size=4)                       # [{"input_ids": (4, 256)}, ...]
    gblr.convert_(student, config, calibration=batches)                    # model(**batch) per batch
    perplexity(student, held_out_batches)
    greedy_continuation(student, tokenizer, "def fibonacci(n):", new_tokens=32)
    decode_speed({"dense": model, "frozen": frozen}, tokenizer, PROMPTS[0], new_tokens=32, repeats=5)

A model is a Hugging Face folder (``config.json``) or a ``.gguf`` file: the folder holding it is
the ``from_pretrained`` folder and its name the ``gguf_file`` (transformers dequantises the
weights to float32; needs the ``gguf`` package). :func:`model_kind` tells causal LMs from
encoders by the config alone, without loading weights. Only :func:`load_causal_lm` and the
generation helpers need transformers.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .text import encoder_folder

__all__ = [
    "CAUSAL_LM",
    "CAUSAL_MODEL_TYPES",
    "ENCODER",
    "PROMPTS",
    "decode_speed",
    "greedy_continuation",
    "load_causal_lm",
    "logits_output",
    "max_positions",
    "model_kind",
    "perplexity",
    "resolve_model",
    "token_windows",
    "window_batches",
]

CAUSAL_LM, ENCODER = "causal-lm", "encoder"
# Hugging Face model types that are decoder-only language models (used when config.json names no
# architecture, as a GGUF file's config does not).
CAUSAL_MODEL_TYPES = frozenset({
    "bloom", "codegen", "cohere", "deepseek_v2", "deepseek_v3", "falcon", "gemma", "gemma2", "gemma3_text", "gpt2",
    "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "granite", "internlm2", "llama", "mistral", "mixtral", "mpt",
    "nemotron", "olmo", "olmo2", "opt", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3",
    "stablelm", "starcoder2",
})
# Fixed prompts for the greedy generations in the report (the first one is also the decode-speed prompt).
PROMPTS = ("The Python standard library", "def fibonacci(n):\n", "To read a file line by line in Python,")
# A first pass over the texts takes at most ceil(count / SPREAD) windows from each, so that the
# windows come from at least SPREAD texts where there are that many.
SPREAD = 16


# -- which model, and loading it ----------------------------------------------------------------------


def resolve_model(model: str | os.PathLike) -> tuple[Path, str | None]:
    """``(folder, gguf_file)`` of a model path: a ``.gguf`` file gives its folder and its name; a
    folder with ``config.json`` (or a sentence-transformers ``modules.json``) gives ``(folder,
    None)``; a folder without them but with exactly one ``.gguf`` file gives that file."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.name.lower().endswith(".gguf"):
            return path.parent, path.name
        raise FileNotFoundError(f"{path} is a file but not a .gguf file: pass a model folder (with config.json) or "
                                "a .gguf file")
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if (path / "config.json").is_file() or (path / "modules.json").is_file():
        return path, None
    ggufs = sorted(candidate.name for candidate in path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise FileNotFoundError(f"{path} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}): pass the one to load")
    return path, (ggufs[0] if ggufs else None)


def _is_causal(config: dict) -> bool:
    architectures = config.get("architectures") or []
    if architectures:
        return any(str(name).endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)
    return config.get("model_type") in CAUSAL_MODEL_TYPES


def model_kind(model: str | os.PathLike) -> str:
    """:data:`CAUSAL_LM` or :data:`ENCODER`, from the config alone: a ``.gguf`` file is a causal LM;
    a folder is one if ``config.json`` names an architecture ending in ``ForCausalLM`` or
    ``LMHeadModel`` (or, naming none, has a ``model_type`` in :data:`CAUSAL_MODEL_TYPES`)."""
    folder, gguf_file = resolve_model(model)
    if gguf_file is not None:
        return CAUSAL_LM
    config_file = encoder_folder(folder) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not a JSON file ({error})") from error
    return CAUSAL_LM if isinstance(config, dict) and _is_causal(config) else ENCODER


def load_causal_lm(model: str | os.PathLike, *, progress: bool = True) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` of a causal LM folder or ``.gguf`` file via transformers'
    ``AutoModelForCausalLM`` and ``AutoTokenizer``, offline (``local_files_only``), in eval mode.
    The same call gives the base model that :func:`gblr.load_pretrained` puts saved layers into."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError("loading Hugging Face models needs transformers: pip install 'gblr[hf]'") from error
    folder, gguf_file = resolve_model(model)
    options = {"local_files_only": True} | ({"gguf_file": gguf_file} if gguf_file else {})
    bars = transformers.utils.logging
    shown = bars.is_progress_bar_enabled()
    if not progress:
        bars.disable_progress_bar()
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **options)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **options)
    except ImportError as error:
        if gguf_file:
            raise ImportError(f"loading {gguf_file} needs the gguf package: pip install gguf ({error})") from error
        raise
    finally:
        if shown:
            bars.enable_progress_bar()
    return loaded.eval(), tokenizer


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow, if its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# -- text -> token windows --------------------------------------------------------------------------------


def token_windows(tokenizer, texts: Iterable[str], seq_len: int, count: int) -> torch.Tensor:
    """Up to ``count`` windows of ``seq_len`` consecutive tokens, an int64 tensor ``(windows, seq_len)``.

    Each text is tokenised without special tokens and followed by the end-of-text token (if the
    tokenizer has one); the pieces are concatenated and cut into windows (a window may span two
    texts). A first pass takes at most ``ceil(count / 16)`` windows' worth of tokens from the
    start of each text, so that the windows come from many texts; only if that falls short does
    a second pass take the rest of each text, in the same order. Fewer than ``count`` windows
    come back when the texts hold fewer tokens. Texts are read only as far as needed.
    """
    for name, value, least in (("seq_len", seq_len, 2), ("count", count, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    end = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    per_text = seq_len * max(1, math.ceil(count / SPREAD))
    stream: list[int] = []
    windows: list[list[int]] = []
    rest: list[torch.Tensor] = []

    def take(tokens: list[int]) -> None:
        stream.extend(tokens)
        while len(stream) >= seq_len and len(windows) < count:
            windows.append(stream[:seq_len])
            del stream[:seq_len]

    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) + end
        take(ids[:per_text])
        rest.append(torch.tensor(ids[per_text:], dtype=torch.long))
        if len(windows) >= count:
            break
    for ids in rest:
        if len(windows) >= count:
            break
        take(ids.tolist())
    return torch.tensor(windows, dtype=torch.long).reshape(len(windows), seq_len)


def window_batches(windows: torch.Tensor, batch_size: int) -> list[dict]:
    """``[{"input_ids": windows[i : i + batch_size]}, ...]``: batches to call as ``model(**batch)``
    (what :func:`gblr.convert_` does with calibration batches)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return [{"input_ids": windows[start : start + batch_size]} for start in range(0, len(windows), batch_size)]


# -- measuring ---------------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def logits_output(model: nn.Module, batch: dict) -> torch.Tensor:
    """The logits at every position of a batch of windows, ``(tokens, vocab)``: the output that
    ``gblr.distill(..., output_fn=logits_output, loss="mse")`` matches between student and teacher."""
    ids = batch["input_ids"].to(_device(model))
    logits = model(input_ids=ids, use_cache=False).logits
    return logits.reshape(-1, logits.shape[-1])


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict]) -> float:
    """``exp`` of the mean next-token cross-entropy over every position of every window (each
    window predicts its tokens 2..T from those before it; no context crosses windows), in eval
    mode. The model's train/eval mode is restored afterwards."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"].to(_device(model))
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                   reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("batches hold no tokens to predict: nothing to measure")
    return math.exp(total / count)


def _greedy(model: nn.Module, tokenizer, prompt: str, new_tokens: int, exact: bool) -> tuple[torch.Tensor, int]:
    """Greedy decoding with the KV cache; ``exact``: exactly ``new_tokens`` tokens (for timing),
    else up to the end-of-text token. Returns the whole sequence and the prompt's length."""
    import transformers

    encoded = tokenizer(prompt, return_tensors="pt")
    ids = encoded["input_ids"].to(_device(model))
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    config = transformers.GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens if exact else 0, do_sample=False, use_cache=True,
        eos_token_id=eos, pad_token_id=pad if pad is not None else eos,
    )
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return output, ids.shape[1]


def greedy_continuation(model: nn.Module, tokenizer, prompt: str, new_tokens: int = 32) -> str:
    """The model's greedy continuation of ``prompt`` (at most ``new_tokens`` tokens, the prompt not included)."""
    with torch.inference_mode():
        output, start = _greedy(model, tokenizer, prompt, new_tokens, exact=False)
    return tokenizer.decode(output[0, start:], skip_special_tokens=True)


def decode_speed(models: dict[str, nn.Module], tokenizer, prompt: str, new_tokens: int = 32,
                 repeats: int = 5) -> dict[str, dict]:
    """Greedy decoding speed at batch 1 with the KV cache, per model: ``{name: {"tokens_per_s":
    median, "seconds": [...]}}``. Each run generates exactly ``new_tokens`` tokens after
    ``prompt`` (its prefill included in the time); the models run in turn, ``repeats`` times
    after one untimed warm-up each (frozen GBLR layers time their paths on first use), so that
    changes in machine load hit all alike. Runs under ``torch.inference_mode``, where frozen
    layers take their fast paths."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats <= 0:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            _greedy(model, tokenizer, prompt, new_tokens, exact=True)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                output, length = _greedy(model, tokenizer, prompt, new_tokens, exact=True)
                seconds[name].append(time.perf_counter() - start)
                if output.shape[1] - length != new_tokens:  # the timing assumes exactly new_tokens tokens
                    raise RuntimeError(f"{name}: generated {output.shape[1] - length} tokens, not {new_tokens}")
    return {name: {"tokens_per_s": new_tokens / statistics.median(times), "seconds": times}
            for name, times in seconds.items()}
