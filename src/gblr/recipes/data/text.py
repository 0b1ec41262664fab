"""Text for training a small language model (``gblr train --model gpt --dataset text``).

    data = load_text(["docs/", "notes/*.md"], seq_len=128, seed=0)   # byte tokens (vocab 256)
    for inputs, targets in data.train_batches(32, count=1024, generator=g):  # (32, 128) each
        ...
    inputs, targets = data.test_windows()                              # fixed, for the held-out loss

The files are split *by file* into training and held-out files (:func:`gblr.recipes.corpus.split_files`:
a seeded shuffle, a tenth of the files held out, at least one), so that no held-out text, nor a
neighbouring paragraph of it, is ever trained on. Each side is one token stream: its files'
texts in order, each tokenized on its own (and followed by the end-of-text token where the
tokenizer has one).

Training draws windows of ``seq_len + 1`` tokens at uniformly random starts in the training
stream (the inputs are the first ``seq_len``, the targets the last ``seq_len``); the starts are a
pure function of a ``torch.Generator``, so an epoch is reproducible and resumable, identical on
every rank. The held-out windows are fixed: window ``k`` holds tokens ``k * seq_len`` to ``(k + 1)
* seq_len`` of the held-out stream, so their targets tile it without overlap and every held-out
token after the first is predicted exactly once.

Tokens are bytes by default (:class:`ByteTokenizer`: the UTF-8 bytes, vocabulary 256, nothing to
load); :class:`HuggingFaceTokenizer` uses a Hugging Face tokenizer folder instead (offline, needs
transformers). Both say how many UTF-8 bytes a run of tokens decodes to, the denominator of bits
per byte.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..corpus import find_text_files, read_texts, split_files

__all__ = ["ByteTokenizer", "HuggingFaceTokenizer", "TextData", "load_text"]


class ByteTokenizer:
    """Tokens are the UTF-8 bytes of the text: vocabulary 256, one byte per token."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decoded_bytes(self, ids: torch.Tensor) -> int:
        """How many UTF-8 bytes ``ids`` decode to: one per token."""
        return ids.numel()


class HuggingFaceTokenizer:
    """A Hugging Face tokenizer folder, loaded with ``AutoTokenizer`` offline (``local_files_only``).
    Each text is encoded without special tokens and followed by the end-of-text token if the
    tokenizer has one; the vocabulary size counts added tokens (``len(tokenizer)``)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer (--tokenizer): {folder} is not a folder (pass a Hugging Face "
                                    "tokenizer folder, with tokenizer.json or the files of a slow tokenizer)")
        try:
            import transformers
        except ImportError as error:
            raise ImportError("tokenizer (--tokenizer) needs transformers: pip install 'gblr[hf]'") from error
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as error:  # transformers' messages span lines: one line here
            reason = " ".join(str(error).split())
            raise ValueError(f"tokenizer (--tokenizer): cannot load a tokenizer from {folder} ({reason})") from error
        self.name = str(folder)
        self.vocab_size = len(self.tokenizer)
        eos = self.tokenizer.eos_token_id
        self.end = [] if eos is None else [eos]

    def encode(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return torch.tensor(list(ids) + self.end, dtype=torch.long)

    def decoded_bytes(self, ids: torch.Tensor) -> int:
        """The UTF-8 length of ``ids`` decoded as one run, special tokens (end of text) left out."""
        text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return len(text.encode("utf-8"))


@dataclasses.dataclass
class TextData:
    """Training and held-out token streams of a text corpus, split by file.

    Attributes:
        train_tokens, test_tokens: 1-D int64 token streams (each at least ``seq_len + 1`` long).
        seq_len: tokens a model sees per window (windows hold ``seq_len + 1`` tokens: inputs and
            the targets one to the right).
        tokenizer: a :class:`ByteTokenizer` or :class:`HuggingFaceTokenizer`.
        train_files, test_files: the files of each side.
        windows_per_epoch: training windows per epoch (default: as many as would tile the
            training stream once, ``len(train_tokens) // (seq_len + 1)``).
        test_limit: evaluate this many held-out windows, evenly spaced over the held-out
            stream (so over all its files); None: every window.
        name: ``"text"``, the dataset's name in ``gblr train``.
    """

    train_tokens: torch.Tensor
    test_tokens: torch.Tensor
    seq_len: int
    tokenizer: ByteTokenizer | HuggingFaceTokenizer
    train_files: tuple[Path, ...] = ()
    test_files: tuple[Path, ...] = ()
    windows_per_epoch: int | None = None
    test_limit: int | None = None
    name: str = "text"

    def __post_init__(self) -> None:
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise ValueError(f"seq_len (--seq-len) must be a positive int, got {self.seq_len!r}")
        for side, tokens in (("training", self.train_tokens), ("held-out", self.test_tokens)):
            if tokens.dim() != 1 or tokens.dtype != torch.int64:
                raise ValueError(f"the {side} tokens must be a 1-D int64 tensor, got {tuple(tokens.shape)} "
                                 f"{tokens.dtype}")
            if len(tokens) < self.seq_len + 1:
                raise ValueError(f"the {side} files hold {len(tokens)} tokens, fewer than one window of seq_len + 1 "
                                 f"= {self.seq_len + 1}: pass more text (--data) or a shorter --seq-len")
        if self.windows_per_epoch is None:
            self.windows_per_epoch = len(self.train_tokens) // (self.seq_len + 1)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_batches(
        self, batch_size: int, generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch: ``windows_per_epoch // batch_size`` minibatches ``(inputs, targets)`` of
        ``(batch_size / world_size, seq_len)`` token ids, from windows at random starts.

        The starts are drawn when this function is called (``torch.randint`` with ``generator``),
        so the generator's state before the call fully determines the epoch. ``batch_size`` is
        the global batch: rank ``r`` takes the ``r``-th contiguous slice of each, so the ranks of
        one step together see exactly the single-process batch. A last partial batch is dropped.
        """
        if batch_size % world_size:
            raise ValueError(f"batch_size (the global batch) must be divisible by world_size: {batch_size} by "
                             f"{world_size}")
        starts = torch.randint(0, len(self.train_tokens) - self.seq_len, (self.windows_per_epoch,),
                               generator=generator)
        per_rank = batch_size // world_size
        offsets = torch.arange(self.seq_len + 1)

        def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for first in range(0, len(starts) - batch_size + 1, batch_size):
                local = starts[first + rank * per_rank : first + (rank + 1) * per_rank]
                windows = self.train_tokens[local[:, None] + offsets]
                yield windows[:, :-1], windows[:, 1:]

        return generate()

    def test_windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``(windows, seq_len)``: the fixed held-out windows. Window ``k``
        of the stream predicts its tokens ``k * seq_len + 1`` to ``(k + 1) * seq_len``, so that all
        of them tile the stream; with ``test_limit`` only that many, evenly spaced."""
        windows = self.test_tokens.unfold(0, self.seq_len + 1, self.seq_len)
        if self.test_limit is not None and self.test_limit < len(windows):
            windows = windows[torch.linspace(0, len(windows) - 1, self.test_limit).round().long()]
        return windows[:, :-1], windows[:, 1:]

    @functools.cached_property
    def test_bytes(self) -> int:
        """The UTF-8 bytes the held-out targets decode to (each window's on their own)."""
        return sum(self.tokenizer.decoded_bytes(targets) for targets in self.test_windows()[1])


def _stream(tokenizer, texts: Iterable[str]) -> torch.Tensor:
    pieces = [tokenizer.encode(text) for text in texts]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def load_text(
    paths: Iterable[str | os.PathLike],
    seq_len: int,
    tokenizer: str | os.PathLike | None = None,
    seed: int = 0,
) -> TextData:
    """The files ``paths`` name (files, folders, glob patterns: :func:`~gblr.recipes.corpus.find_text_files`),
    split by file with ``seed`` and tokenized: bytes, or the Hugging Face tokenizer folder
    ``tokenizer``. Errors name the option they concern (``--data``, ``--tokenizer``, ``--seq-len``)."""
    coder = ByteTokenizer() if tokenizer is None else HuggingFaceTokenizer(tokenizer)
    try:
        train_files, test_files = split_files(find_text_files(paths), seed=seed)
        train_tokens, test_tokens = _stream(coder, read_texts(train_files)), _stream(coder, read_texts(test_files))
    except (OSError, ValueError) as error:
        raise type(error)(f"data (--data): {error}") from error
    return TextData(train_tokens, test_tokens, seq_len, coder, tuple(train_files), tuple(test_files))
