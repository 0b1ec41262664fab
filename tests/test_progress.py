"""The package's progress bar (gblr._progress): tqdm when wanted and installed, else a silent stand-in."""

import sys

import pytest

from gblr._progress import NoProgress, progress_bar


@pytest.fixture
def without_tqdm(monkeypatch):
    """Make ``from tqdm.auto import tqdm`` raise ImportError, as when tqdm is not installed."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)


def use_like_a_caller(bar):
    """What gblr's callers do with a bar; none of them checks what kind of bar it is."""
    with bar:
        bar.update()
        bar.update(3)
        bar.set_postfix(loss="0.123")
    bar.close()


@pytest.mark.parametrize("reason", ["disabled", "no tqdm"])
def test_stand_in_is_silent_and_iterates_the_iterable(request, capsys, reason):
    enabled = reason == "no tqdm"  # asked for, but tqdm is missing
    if enabled:
        request.getfixturevalue("without_tqdm")
    bar = progress_bar(4, "work", enabled, iterable=[1, 2, 3])
    assert isinstance(bar, NoProgress) and bar.disable
    assert list(bar) == [1, 2, 3] and list(bar) == [1, 2, 3]  # iterable again, like the wrapped list
    use_like_a_caller(bar)
    byte_bar = progress_bar(None, "file.gz", enabled, unit="B")
    use_like_a_caller(byte_bar)
    with pytest.raises(TypeError):
        iter(byte_bar)  # it wraps no iterable
    assert capsys.readouterr() == ("", "")


def test_tqdm_bar_counts_and_wraps(capsys):
    pytest.importorskip("tqdm")
    bar = progress_bar(3, "steps", iterable=iter("abc"))
    assert not bar.disable
    assert list(bar) == ["a", "b", "c"] and bar.n == 3
    counter = progress_bar(10, "steps")
    use_like_a_caller(counter)
    assert counter.n == 4 and counter.total == 10 and counter.desc == "steps"


def test_byte_bar_scales_by_1024():
    pytest.importorskip("tqdm")
    bar = progress_bar(2048, "data.gz", unit="B")
    assert bar.unit == "B" and bar.unit_scale and bar.unit_divisor == 1024
    bar.close()
    plain = progress_bar(5, "epoch 1/2")
    assert plain.unit == "it" and not plain.unit_scale
    plain.close()
