"""The recipes' field checks (gblr.recipes.options): messages name the field and its option."""

import dataclasses
import math

import pytest

from gblr.recipes.options import SEED_LIMIT, check_number, check_positive_int, check_seed, option_name


@dataclasses.dataclass
class Fields:
    batch_size: object = 8
    lr: object = 1e-3
    seed: object = 0


def test_option_name():
    assert option_name("batch_size") == "batch_size (--batch-size)"


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "8", None])
def test_positive_int_rejects(value):
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) must be a positive int"):
        check_positive_int(Fields(batch_size=value), "batch_size")


def test_positive_int_accepts_and_optional_allows_none():
    check_positive_int(Fields(batch_size=3), "batch_size")
    check_positive_int(Fields(batch_size=None), "batch_size", optional=True)


@pytest.mark.parametrize("value, positive", [(0.0, True), (-1e-9, False), (math.nan, False), (math.inf, True),
                                             (True, True), ("1", True)])
def test_number_rejects(value, positive):
    with pytest.raises(ValueError, match=r"lr \(--lr\) must be a finite number"):
        check_number(Fields(lr=value), "lr", positive=positive)


def test_number_accepts():
    check_number(Fields(lr=0), "lr", positive=False)
    check_number(Fields(lr=3), "lr", positive=True)
    check_number(Fields(lr=None), "lr", positive=True, optional=True)


@pytest.mark.parametrize("value", [-1, SEED_LIMIT, 1.0, False])
def test_seed_rejects(value):
    with pytest.raises(ValueError, match=r"seed \(--seed\) must be an int in \[0, 2\*\*32\)"):
        check_seed(Fields(seed=value))
    check_seed(Fields(seed=SEED_LIMIT - 1))
