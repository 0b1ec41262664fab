"""Checks of the recipes' config fields, with messages that name the field and its option.

Each field of :class:`gblr.recipes.train.TrainConfig` and
:class:`gblr.recipes.compress.CompressConfig` is the command-line option of the same name
(``batch_size`` is ``--batch-size``), so an error names both: ``"batch_size (--batch-size) must
be a positive int, got 0"``.
"""

from __future__ import annotations

import math

__all__ = ["SEED_LIMIT", "option_name", "check_positive_int", "check_number", "check_seed"]

# Seeds are drawn from [0, SEED_LIMIT): the training recipe shuffles epoch e with
# seed * 1_000_003 + e, which must stay a valid torch seed.
SEED_LIMIT = 2**32


def option_name(field: str) -> str:
    """A field with its option, for error messages: ``"batch_size (--batch-size)"``."""
    return f"{field} (--{field.replace('_', '-')})"


def check_positive_int(config, name: str, optional: bool = False) -> None:
    """``config.<name>`` is a positive int (or None, if ``optional``: not set)."""
    value = getattr(config, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{option_name(name)} must be a positive int, got {value!r}")


def check_number(config, name: str, positive: bool, optional: bool = False) -> None:
    """``config.<name>`` is a finite number, > 0 if ``positive`` else >= 0 (NaN and infinity parse as
    floats, too), or None if ``optional``."""
    value = getattr(config, name)
    if optional and value is None:
        return
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not number or value < 0 or (positive and value == 0):
        raise ValueError(f"{option_name(name)} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def check_seed(config, name: str = "seed") -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{option_name(name)} must be an int in [0, 2**32), got {value!r}")
