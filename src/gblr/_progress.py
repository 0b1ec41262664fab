"""Optional progress bars: tqdm when it is installed and wanted, otherwise nothing."""

from __future__ import annotations


def progress_bar(total: int | None, description: str, enabled: bool = True, iterable=None):
    """A ``tqdm`` bar (over ``iterable`` if given), or ``None`` when disabled or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)
