"""Finding text files (files, folders, glob patterns) and splitting them by file (gblr.recipes.corpus)."""

import pytest

from fixtures import write_corpus
from gblr.recipes import corpus
from gblr.recipes.corpus import find_text_files, read_texts, split_files


def test_files_folders_and_patterns(tmp_path):
    folder = write_corpus(tmp_path / "docs", files=6)
    names = ["a.txt", "b.rst", "c.md", "d.rst.txt", "f.TXT", "sub/e.txt"]
    # A folder is searched recursively for *.txt, *.rst, *.md (any case); notes.bin is not text.
    assert [str(path.relative_to(folder)) for path in find_text_files([folder])] == sorted(names)
    # Patterns (** included) and files, overlapping: each file once, sorted.
    found = find_text_files([str(folder / "*.txt"), str(folder / "**" / "e.txt"), folder / "a.txt"])
    assert [path.name for path in found] == ["a.txt", "d.rst.txt", "e.txt"]
    # A file is taken whatever its name; a str is one path.
    assert find_text_files(str(folder / "notes.bin")) == [folder / "notes.bin"]

    with pytest.raises(FileNotFoundError, match="text file not found: .*missing.txt"):
        find_text_files([folder / "a.txt", tmp_path / "missing.txt"])
    with pytest.raises(FileNotFoundError, match="matches nothing"):
        find_text_files([str(folder / "*.pdf")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        find_text_files([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no text paths"):
        find_text_files([])


def test_split_by_file_is_seeded_disjoint_and_keeps_both_sides(tmp_path):
    files = find_text_files([write_corpus(tmp_path / "docs", files=20)])
    calibration, evaluation = split_files(files, 0.25, seed=0)
    assert len(evaluation) == 5 and len(calibration) == 15
    assert sorted(calibration + evaluation) == files and not set(calibration) & set(evaluation)
    assert split_files(list(reversed(files)), 0.25, seed=0) == (calibration, evaluation)  # order-free
    assert split_files(files, 0.25, seed=1) != (calibration, evaluation)
    # At least one file on each side.
    assert [len(side) for side in split_files(files[:2], 0.01)] == [1, 1]
    assert [len(side) for side in split_files(files[:2], 0.99)] == [1, 1]
    with pytest.raises(ValueError, match="at least 2 text files"):
        split_files(files[:1])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_files(files, 1.0)


def test_texts_are_read_lazily_and_must_be_utf8(tmp_path):
    (tmp_path / "a.txt").write_text("one\n")
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    texts = read_texts([tmp_path / "a.txt", tmp_path / "blank.txt", tmp_path / "latin1.txt"])
    assert next(texts) == "one\n"  # the blank file is skipped
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        next(texts)


def test_default_text_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "PYTHON_DOCS", tmp_path)
    assert corpus.default_text() == [str(tmp_path)]
    monkeypatch.setattr(corpus, "PYTHON_DOCS", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="pass --text.*apt-get install python3.11-doc"):
        corpus.default_text()
