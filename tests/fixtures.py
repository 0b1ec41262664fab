"""Shared test helpers: small synthetic datasets written to disk in the real formats (recipe and
CLI tests), frozen layers built from block lists and a strategy for random block lists (the
inference-path tests), structure setters for trainable layers, and a tiny offline BERT with its
tokenizer (text, distillation and compression tests)."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import torch
from hypothesis import strategies as st

from gblr.flops import Support
from gblr.frozen import FrozenGBLRLinear
from gblr.recipes.sentences import generated_sentences


def write_idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + b"".join(struct.pack(">i", size) for size in array.shape)
    data = header + array.to(torch.uint8).contiguous().numpy().tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(data)


def write_fashion_mnist(directory: Path, train: int = 256, test: int = 128, seed: int = 0) -> Path:
    """Fashion-MNIST-shaped IDX files whose classes are learnable: class k lights up band k."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = torch.randint(0, 10, (count,), generator=generator)
        images = torch.randint(0, 60, (count, 28, 28), generator=generator)
        for index, label in enumerate(labels.tolist()):
            row = 2 + 2 * label
            images[index, row : row + 3, 4:24] += 180
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images.clamp(0, 255))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


def frozen_layer(m: int, n: int, spec, seed: int = 0, dtype=torch.float64, bias: bool = True, **kwargs) -> FrozenGBLRLinear:
    """A FrozenGBLRLinear from ``(out_start, out_width, in_start, in_width, rank)`` tuples, with
    random factors (and bias)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for out_start, out_width, in_start, in_width, rank in spec:
        support = Support(in_start, in_width, out_start, out_width)
        left = torch.randn(out_width, rank, generator=generator, dtype=dtype)
        right = torch.randn(rank, in_width, generator=generator, dtype=dtype)
        blocks.append((support, left, right))
    b = torch.randn(m, generator=generator, dtype=dtype) if bias else None
    return FrozenGBLRLinear(n, m, blocks, b, dtype=dtype, **kwargs)


def block_specs(max_side: int, max_blocks: int):
    """``(m, n, spec)`` with sides 5..max_side and up to ``max_blocks`` blocks for
    :func:`frozen_layer`: wrap-around, overlapping, one-element and full blocks, rank 1-3 (dense
    blocks where the rank reaches a width)."""
    return st.integers(5, max_side).flatmap(
        lambda m: st.integers(5, max_side).flatmap(
            lambda n: st.tuples(
                st.just(m),
                st.just(n),
                st.lists(
                    st.tuples(st.integers(0, m - 1), st.integers(1, m), st.integers(0, n - 1), st.integers(1, n),
                              st.integers(1, 3)),
                    min_size=0, max_size=max_blocks,
                ),
            )
        )
    )


def set_structure(layer, in_widths, in_locations, out_widths, out_locations):
    """Set supports given in elements."""
    n, m = layer.in_features, layer.out_features
    with torch.no_grad():
        layer.in_width.copy_(torch.tensor(in_widths, dtype=layer.in_width.dtype) / n)
        layer.in_location.copy_(torch.tensor(in_locations, dtype=layer.in_width.dtype) / n)
        layer.out_width.copy_(torch.tensor(out_widths, dtype=layer.in_width.dtype) / m)
        layer.out_location.copy_(torch.tensor(out_locations, dtype=layer.in_width.dtype) / m)


def random_structure(layer, generator, zero_fraction=0.2):
    with torch.no_grad():
        for width, size in ((layer.in_width, layer.in_features), (layer.out_width, layer.out_features)):
            elements = torch.randint(0, size + 1, width.shape, generator=generator)
            elements[torch.rand(width.shape, generator=generator) < zero_fraction] = 0
            elements[torch.rand(width.shape, generator=generator) < 0.15] = 1
            width.copy_(elements / size)
        for location in (layer.in_location, layer.out_location):
            location.uniform_(0, 1, generator=generator)


def tiny_tokenizer(directory: Path):
    """A BertTokenizerFast over every word of the generated corpus (plus the special tokens)."""
    import transformers

    words = sorted({w for s in generated_sentences(3000) for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    # positional: the vocabulary file (``vocab_file=`` in transformers 4, ``vocab=`` in 5)
    tokenizer = transformers.BertTokenizerFast(str(vocab))
    assert tokenizer.vocab_size == len(words) + 5
    return tokenizer


def tiny_bert(tokenizer, seed: int = 0, initializer_range: float = 0.3):
    """A random 2-layer BERT (hidden 32). The large init makes the linear layers matter: with
    BERT's default 0.02 the embeddings pass through almost unchanged and any compression keeps a
    cosine of 0.99999."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def save_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """A Hugging Face model folder (config.json, weights, tokenizer files) of a tiny BERT."""
    tokenizer = tiny_tokenizer(directory / "vocab")
    model = tiny_bert(tokenizer, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
