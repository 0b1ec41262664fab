"""Which modules GBLRConfig selects: all-linear, names, regexes, exclusions, filter_fn."""

from __future__ import annotations

import pytest
from torch import nn

from conversion import BLOCK, Net, names, tiny_bert_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


def test_all_linear_skips_output_embeddings():
    assert names(Net()) == [f"layers.{i}.{name}" for i in range(2) for name in BLOCK]


def test_list_targets_match_whole_dotted_suffixes():
    assert names(Net(), target_modules=["query"]) == ["layers.0.query", "layers.1.query"]
    assert names(Net(), target_modules=["1.query", "head"]) == ["layers.1.query", "head"]
    assert names(Net(), target_modules=["layers.0.ffn.2"]) == ["layers.0.ffn.2"]


def test_regex_targets_fullmatch():
    assert names(Net(), target_modules=r"layers\.\d\.ffn\.\d") == [f"layers.{i}.ffn.{j}" for i in range(2) for j in (0, 2)]
    with pytest.raises(ValueError, match="no module matches"):
        names(Net(), target_modules="query")  # a regex must match the whole name


def test_exclude_modules_and_filter_fn():
    assert names(Net(), exclude_modules=["ffn.0", "ffn.2", "xquery"]) == ["layers.0.query", "layers.1.query"]
    assert names(Net(), exclude_modules=r".*query") == [f"layers.{i}.ffn.{j}" for i in range(2) for j in (0, 2)]
    wide = names(Net(), filter_fn=lambda name, module: module.out_features == 32)
    assert wide == ["layers.0.ffn.0", "layers.1.ffn.0"]


def test_no_match_lists_available_layers():
    with pytest.raises(ValueError, match=r"no module matches.*'layers\.0\.query'"):
        names(Net(), target_modules=["missing"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        names(nn.Sequential(nn.ReLU()))


def test_multihead_attention_projection_is_not_a_target():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    assert names(model) == ["1"]


def test_hf_all_linear_skips_the_lm_head():
    transformers = pytest.importorskip("transformers")
    model = transformers.BertForMaskedLM(tiny_bert_config())
    targets = names(model)
    assert "cls.predictions.decoder" not in targets and "cls.predictions.transform.dense" in targets
    assert len(targets) == 13
