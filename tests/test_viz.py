import pytest
import torch
from torch import nn

import gblr
from gblr import structures
from gblr.viz import coverage, panel_image, plot_budgets, plot_masks


def test_coverage_counts_overlapping_blocks_with_their_rank():
    layer = gblr.GBLRLinear(8, 6, components=3, rank=2)
    with torch.no_grad():
        # component 0: columns 6, 7, 0 (wraps), rows 0-1; component 1: everything; component 2: empty
        layer.in_width.copy_(torch.tensor([3 / 8, 1.0, 0.0]))
        layer.in_location.copy_(torch.tensor([6 / 8, 0.0, 0.5]))
        layer.out_width.copy_(torch.tensor([2 / 6, 1.0, 0.5]))
        layer.out_location.copy_(torch.tensor([0.0, 0.0, 0.0]))
    expected = torch.full((6, 8), 2.0)
    expected[0:2, [6, 7, 0]] += 2.0
    assert torch.equal(coverage(layer), expected)
    assert torch.equal(coverage(layer.freeze()), expected)


def test_frozen_dense_blocks_count_their_rank():
    weight = torch.zeros(4, 4)
    weight[:2, :2] = torch.randn(2, 2)
    frozen = structures.block_sparse(weight, (2, 2)).freeze()
    counts = coverage(frozen)
    assert counts[:2, :2].tolist() == [[2.0, 2.0], [2.0, 2.0]] and counts.sum() == 8


def test_pictures_are_written(tmp_path):
    model = nn.Sequential(gblr.GBLRLinear(16, 16), nn.ReLU(), gblr.GBLRLinear(16, 8))
    masks = plot_masks(model, tmp_path / "masks.png")
    budgets = plot_budgets(gblr.flops_report(model), tmp_path / "sub" / "budgets.png", target=0.5)
    assert masks.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and budgets.stat().st_size > 1000
    with pytest.raises(ValueError, match="no GBLR layers"):
        plot_masks(nn.Linear(2, 2), tmp_path / "none.png")


def test_mask_titles_drop_the_shared_prefix():
    from gblr.viz import _common_prefix

    assert _common_prefix(["encoder.layer.0.attention.self.key", "encoder.layer.1.output.dense"]) == "encoder.layer."
    assert _common_prefix(["blocks.0.q", "blocks.0.k"]) == "blocks.0."
    assert _common_prefix(["a.b", "a.b"]) == "a."  # never a whole name
    assert _common_prefix(["only.one"]) == "" and _common_prefix(["0", "2"]) == ""


def test_convolution_panels_show_channels_averaged_over_taps(tmp_path):
    layer = gblr.GBLRConv2d(4, 6, 3, components=2)
    with torch.no_grad():  # component 0: all of input channel 1 (columns 9..17) into rows 0-2; component 1: empty
        layer.in_width.copy_(torch.tensor([9 / 36, 0.0]))
        layer.in_location.copy_(torch.tensor([9 / 36, 0.0]))
        layer.out_width.copy_(torch.tensor([3 / 6, 0.0]))
        layer.out_location.copy_(torch.tensor([0.0, 0.0]))
    image, label = panel_image(layer)
    expected = torch.zeros(6, 4)
    expected[:3, 1] = 1.0
    assert label == " (channels)" and torch.equal(image, expected)
    assert torch.equal(panel_image(layer.freeze())[0], expected)
    assert plot_masks(nn.Sequential(layer), tmp_path / "conv.png").stat().st_size > 1000
