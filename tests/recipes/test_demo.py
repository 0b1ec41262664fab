"""The tour of the core (gblr.recipes.demo, `gblr demo`)."""

import re

from gblr.cli import main


def test_demo_shows_exact_structures_and_a_faithful_frozen_model(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    errors = [float(value) for value in re.findall(r"relative error (\S+)", out)]
    assert len(errors) == 3 and max(errors) < 1e-10
    for macs, native in re.findall(r"MACs\s+(\d+) \(native (\d+)\)", out):
        assert macs == native
    difference = float(re.search(r"max difference (\S+)", out).group(1))
    assert difference < 1e-5
    # the timing is printed, never asserted: a busy machine may make either side slower
    assert float(re.search(r"speed-up (\S+)x", out).group(1)) > 0.0
