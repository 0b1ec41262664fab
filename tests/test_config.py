"""GBLRConfig: every bad field is refused with its name; the defaults."""

from __future__ import annotations

import pytest

import gblr

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"flops_ratio": 0.0}, "flops_ratio"),
        ({"flops_ratio": 1.5}, "flops_ratio"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "layers.(0"}, "target_modules"),
        ({"target_modules": 3}, "target_modules"),
        ({"exclude_modules": "all-linear"}, "exclude_modules"),
        ({"exclude_modules": [""]}, "exclude_modules"),
        ({"overrides": {"head": 2.0}}, "overrides"),
        ({"overrides": {"(": 0.5}}, "overrides"),
        ({"overrides": [("head", 0.5)]}, "overrides"),
        ({"allocation": "greedy"}, "allocation"),
        ({"method": "tucker"}, "method"),
        ({"min_layer_ratio": 0.9}, "min_layer_ratio"),
        ({"min_layer_ratio": -0.1}, "min_layer_ratio"),
        ({"decompose_options": {"bias": None}}, "decompose_options"),
        ({"decompose_options": {"steps": 3}, "method": "svd"}, "decompose_options"),
        ({"filter_fn": "query"}, "filter_fn"),
        ({"calibration": "two-pass"}, "calibration"),
        ({"calibration": None}, "calibration"),
    ],
)
def test_config_rejects_bad_fields_naming_them(kwargs, field):
    with pytest.raises(ValueError, match=field):
        gblr.GBLRConfig(**kwargs)


def test_config_defaults():
    config = gblr.GBLRConfig(flops_ratio=0.4, target_modules=("query", "key"))
    assert config.target_modules == ["query", "key"]
    assert config.floor_ratio == pytest.approx(0.1)
    assert gblr.GBLRConfig(flops_ratio=0.4, min_layer_ratio=0.0).floor_ratio == 0.0
    assert gblr.GBLRConfig().allocation == "error" and gblr.GBLRConfig().method == "gblr"
    assert gblr.GBLRConfig().calibration == "one-shot"  # sequential: opt-in until it is fast on real LMs
