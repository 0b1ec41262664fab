"""Text files for calibrating, training and evaluating language models (``gblr compress`` on a
causal LM, ``gblr train --dataset text``).

    files = find_text_files(["docs/", "notes/*.md", "extra.txt"])
    calibration, evaluation = split_files(files, eval_fraction=0.1, seed=0)
    texts = read_texts(evaluation)                               # lazily, one file at a time

The split is *by file*: a held-out perplexity is only honest if no evaluation text was seen
during calibration or distillation, and neighbouring paragraphs of one file share names, code
and phrasing, so splitting inside a file would leak. Which files are held out is a seeded
shuffle of the sorted paths, the same on every machine for the same files and seed.

Without ``--text``, ``gblr compress`` uses :data:`PYTHON_DOCS`, the reStructuredText sources of
the Python documentation that Debian's ``python3.11-doc`` package installs (about 500 files,
12 MB), and so does ``gblr train --dataset text`` without ``--data``. Needs only the standard
library.
"""

from __future__ import annotations

import glob
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["PYTHON_DOCS", "TEXT_SUFFIXES", "default_text", "find_text_files", "read_text", "read_texts",
           "split_files"]

# The Python documentation's reST sources, as Debian's python3.11-doc installs them.
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
# What a folder is searched for (".rst.txt", the Sphinx sources' suffix, ends in ".txt").
TEXT_SUFFIXES = (".txt", ".rst", ".md")


def default_text(option: str = "--text") -> list[str]:
    """``[PYTHON_DOCS]`` if it is installed; otherwise a FileNotFoundError saying what to pass
    (``option``: ``gblr compress --text``, ``gblr train --data``)."""
    if PYTHON_DOCS.is_dir():
        return [str(PYTHON_DOCS)]
    raise FileNotFoundError(
        f"a causal language model needs text to learn from and a held-out measure on: pass {option} with files, "
        f"folders or glob patterns (the default, the Python documentation's sources in {PYTHON_DOCS}, is not "
        "installed; on Debian or Ubuntu: apt-get install python3.11-doc)"
    )


def _folder_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and path.name.lower().endswith(TEXT_SUFFIXES)]


def find_text_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The text files that ``paths`` name, sorted and without duplicates.

    Each path is a file (taken whatever its name), a folder (searched recursively for
    :data:`TEXT_SUFFIXES`: ``*.txt``, ``*.rst``, ``*.md``, ``*.rst.txt``) or a glob pattern
    (``**`` included; matched folders are searched as folders). Raises FileNotFoundError for a
    path that does not exist or a pattern that matches nothing, ValueError for a folder without
    text files or no paths at all.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("no text paths given: pass files, folders or glob patterns")
    found: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser()
        if glob.has_magic(str(path)):
            matches = [Path(match) for match in glob.glob(str(path), recursive=True)]
            if not matches:
                raise FileNotFoundError(f"text file not found: the pattern {given} matches nothing")
        elif path.exists():
            matches = [path]
        else:
            raise FileNotFoundError(f"text file not found: {given} (pass UTF-8 text files, folders or glob patterns)")
        for match in matches:
            if match.is_dir():
                files = _folder_files(match)
                if not files and not glob.has_magic(str(path)):
                    raise ValueError(f"the folder {given} holds no text files (searched recursively for "
                                     f"{', '.join('*' + suffix for suffix in TEXT_SUFFIXES)})")
                found.update(files)
            elif match.is_file():
                found.add(match)
    if not found:
        raise ValueError(f"no text files found in {', '.join(map(str, paths))}")
    return sorted(found)


def split_files(files: Iterable[Path], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """``(calibration_files, evaluation_files)``: a seeded shuffle of the sorted ``files``, the
    first ``max(1, round(eval_fraction * len(files)))`` held out (at least one file stays for
    calibration). Needs at least 2 files."""
    files = sorted(set(files))
    if not (isinstance(eval_fraction, (int, float)) and 0 < eval_fraction < 1):
        raise ValueError(f"eval_fraction must be a number in (0, 1), got {eval_fraction!r}")
    if len(files) < 2:
        raise ValueError(
            f"need at least 2 text files to hold some out for evaluation (the split is by file, so that no evaluation "
            f"text is seen in calibration), got {len(files)}: {', '.join(map(str, files)) or 'none'}; pass more files "
            "or a folder"
        )
    order = list(files)
    random.Random(seed).shuffle(order)
    held_out = min(len(files) - 1, max(1, round(eval_fraction * len(files))))
    return order[held_out:], order[:held_out]


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``; a ValueError naming the file if it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error})") from error


def read_texts(files: Iterable[Path]) -> Iterator[str]:
    """The texts of ``files`` in order, read one at a time, skipping empty ones."""
    for path in files:
        text = read_text(path)
        if text.strip():
            yield text

