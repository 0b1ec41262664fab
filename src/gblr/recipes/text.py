"""Sentence embeddings of Hugging Face text encoders, for compressing them (``gblr compress``).

    sentences = generated_sentences(512)                       # gblr.recipes.sentences
    model, tokenizer = load_sentence_encoder("all-MiniLM-L6-v2/")
    batches = token_batches(tokenizer, sentences)
    reference = embed(model, batches)                          # (N, hidden), unit length
    ... compress a copy of model ...
    embedding_fidelity(student, reference, batches)            # mean cosine similarity

Embeddings are what sentence-transformers computes for all-MiniLM-L6-v2 and similar models: the
mean of the last hidden states over the real (unpadded) tokens, scaled to unit length. Only
:func:`load_sentence_encoder` and :func:`token_batches` need ``transformers``; everything else
needs only torch. The sentences themselves come from :mod:`gblr.recipes.sentences`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "encoder_folder",
    "load_sentence_encoder",
    "token_batches",
    "mean_pool",
    "sentence_output",
    "token_output",
    "embed",
    "embedding_fidelity",
]


# -- models and batches -------------------------------------------------------------------------------


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError("loading Hugging Face models needs transformers: pip install 'gblr[hf]'") from error
    return transformers


def encoder_folder(model_dir: str | os.PathLike) -> Path:
    """The folder holding ``config.json`` of a Hugging Face model folder or a sentence-transformers
    folder (the model itself, or the Transformer module that ``modules.json`` names)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if (folder / "config.json").is_file():
        return folder
    modules = folder / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Transformer") and (folder / module.get("path", "") / "config.json").is_file():
                return folder / module.get("path", "")
    raise FileNotFoundError(
        f"{folder} is not a Hugging Face model folder: it has no config.json (nor a sentence-transformers "
        "modules.json naming one)"
    )


def load_sentence_encoder(model_dir: str | os.PathLike, *, progress: bool = True) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` from a local folder via ``transformers.AutoModel`` and
    ``AutoTokenizer``, without network access (``local_files_only``); the model is in eval mode.
    ``progress=False`` hides transformers' loading bars."""
    folder = encoder_folder(model_dir)
    transformers = _transformers()
    bars = transformers.utils.logging
    shown = bars.is_progress_bar_enabled()
    if not progress:
        bars.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    finally:
        if shown:
            bars.enable_progress_bar()
    return model.eval(), tokenizer


def token_batches(tokenizer, sentences: Iterable[str], batch_size: int = 32, max_length: int = 128) -> list[dict]:
    """Tokenised batches, in order: dicts of ``input_ids``, ``attention_mask`` and, if the
    tokenizer makes them, ``token_type_ids`` (padded to the longest sentence of the batch,
    truncated to ``max_length`` tokens). Pass a batch to a model as ``model(**batch)``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 1:
        raise ValueError(f"max_length must be an int > 1, got {max_length!r}")
    sentences = list(sentences)
    if not sentences:
        raise ValueError("sentences is empty: nothing to tokenise")
    keys = ("input_ids", "attention_mask", "token_type_ids")
    batches = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
        batches.append({key: encoded[key] for key in keys if key in encoded})
    return batches


# -- embeddings ----------------------------------------------------------------------------------------


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden (B, T, H)`` over the tokens where ``attention_mask (B, T)`` is 1."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def _move(batch, device):
    if isinstance(batch, dict):
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return batch


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def sentence_output(model: nn.Module, batch) -> torch.Tensor:
    """Run ``model`` on one batch: for a dict batch ``model(**batch)``, mean-pooled over
    ``attention_mask`` if the batch has one (not normalised); otherwise ``model(batch)``. The
    output's ``last_hidden_state`` (or first element) is used when it is not a tensor."""
    batch = _move(batch, _device(model))
    output = model(**batch) if isinstance(batch, dict) else model(batch)
    if not isinstance(output, torch.Tensor):
        hidden = getattr(output, "last_hidden_state", None)
        output = hidden if hidden is not None else output[0]
    if isinstance(batch, dict) and "attention_mask" in batch and output.dim() == 3:
        output = mean_pool(output, batch["attention_mask"])
    return output


def token_output(model: nn.Module, batch) -> torch.Tensor:
    """The last hidden state at the real tokens of a dict batch, ``(tokens, H)``: a richer
    distillation target than the pooled sentence embedding (``gblr.distill(..., output_fn=
    token_output)`` matches every token's hidden state)."""
    batch = _move(batch, _device(model))
    output = model(**batch)
    hidden = output if isinstance(output, torch.Tensor) else getattr(output, "last_hidden_state", None)
    hidden = hidden if hidden is not None else output[0]
    return hidden[batch["attention_mask"].bool()]


@torch.no_grad()
def embed(model: nn.Module, batches: Iterable, output_fn: Callable | None = None) -> torch.Tensor:
    """Unit-length sentence embeddings ``(N, H)`` (float32, on the CPU) of all batches, in eval
    mode and without gradients: mean pooling over the real tokens, then L2 normalisation (what
    sentence-transformers does for all-MiniLM-L6-v2). ``output_fn(model, batch)`` replaces
    :func:`sentence_output`. The model's train/eval mode is restored afterwards."""
    output_fn = output_fn or sentence_output
    was_training = model.training
    model.eval()
    try:
        parts = [F.normalize(output_fn(model, batch).float(), dim=-1).cpu() for batch in batches]
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("batches is empty: nothing to embed")
    return torch.cat(parts)


def embedding_fidelity(student: nn.Module, teacher: nn.Module | torch.Tensor, batches: Iterable,
                       output_fn: Callable | None = None) -> float:
    """Mean cosine similarity between the student's sentence embeddings and the teacher's (a
    model, or its embeddings of the same batches from :func:`embed`); 1.0 for identical models."""
    batches = list(batches)
    ours = embed(student, batches, output_fn)
    theirs = teacher if isinstance(teacher, torch.Tensor) else embed(teacher, batches, output_fn)
    if theirs.shape != ours.shape:
        raise ValueError(
            f"teacher embeddings have shape {tuple(theirs.shape)}, the student's for these batches {tuple(ours.shape)}"
        )
    return float(F.cosine_similarity(ours, theirs.to(ours.device, ours.dtype), dim=-1).mean())
