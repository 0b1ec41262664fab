"""The sentences of the text recipes (gblr.recipes.sentences): the generated corpus, sentences
read from a file, and the disjoint calibration / evaluation split."""

import pytest

from gblr.recipes.sentences import generated_sentences, read_sentences, split_sentences

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
