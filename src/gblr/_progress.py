"""The package's one progress bar: tqdm when it is installed and wanted, otherwise a silent stand-in.

:func:`progress_bar` always returns an object with the part of tqdm's interface that gblr uses
(iteration over the wrapped iterable, ``update``, ``set_postfix``, ``close``, the ``disable``
flag, use as a context manager), so callers never test for a missing bar.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class NoProgress:
    """Stands in for a tqdm bar when progress is disabled or tqdm is not installed.

    Iterating it iterates the wrapped iterable unchanged; every other method does nothing.
    ``disable`` is True, as on a disabled tqdm bar, so a caller can skip work done only for the
    bar (such as reading a loss off the GPU for its postfix).
    """

    disable = True

    def __init__(self, iterable: Iterable | None = None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress bar wraps no iterable")
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NoProgress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def progress_bar(
    total: int | None, description: str, enabled: bool = True, iterable: Iterable | None = None, *, unit: str = "it"
):
    """A transient ``tqdm`` bar (over ``iterable`` if given), or a :class:`NoProgress`.

    ``total`` is the expected count (None when unknown) and ``description`` the label. The bar
    is a :class:`NoProgress` when ``enabled`` is false or tqdm is not installed. ``unit="B"``
    makes a byte bar for downloads: counts are shown scaled by 1024 (kB, MB, ...).
    """
    if not enabled:
        return NoProgress(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return NoProgress(iterable)
    scale = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
    return tqdm(iterable, total=total, desc=description, unit=unit, leave=False, dynamic_ncols=True, **scale)
