"""Frozen-layer inference paths: tiled and dense agree with the torch reference."""


import torch

from fixtures import frozen_layer
from gblr.kernels.tiled import (LongRows, batch, batched_forward, long_rows_stacked, long_rows_stacked_forward, pack,
                               stack, stacked_forward, tiled_forward)


def test_tiled_product_pads_only_partial_tiles():
    # one rank-2 block on rows 8..23 (wrapping past 31 is not needed) and columns 30..33 of 40 (wraps)
    layer = frozen_layer(32, 40, [(8, 16, 30, 14, 2)], tile=8, bias=False)
    product = pack(40, 32, list(layer.blocks()), 8)
    # columns 30..39 and 0..3: tiles [24,32), [32,40), [0,8) -> 3 tiles x 8 x 2 rows; rows 8..23: 2 tiles x 8 x 2
    assert product.macs == 3 * 8 * 2 + 2 * 8 * 2
    assert product.gemms == 5 and product.rank == 2
    x = torch.randn(4, 40, dtype=torch.float64)
    torch.testing.assert_close(tiled_forward(x, product), layer.run("reference", x))


def test_batched_tiles_pad_every_tile_to_the_same_rows():
    # tile 8: block A (rank 2) covers columns 0..15 (tiles 0, 1), block B (rank 1) columns 8..11
    # (tile 1): the column tiles hold 2 and 3 rows, padded to 3; 24 columns = 3 tiles, the last empty
    layer = frozen_layer(16, 24, [(0, 16, 0, 16, 2), (4, 4, 8, 4, 1)], tile=8, bias=False)
    product = pack(24, 16, list(layer.blocks()), 8)
    batched = batch(product, torch.empty(0, dtype=torch.float64))
    assert batched.V.shape == (3, 3, 8) and batched.U.shape == (2, 3, 8)
    assert batched.macs == 3 * 3 * 8 + 2 * 3 * 8
    assert (batched.in_rows == product.rank).sum() == 9 - 5  # padding rows point at the scratch row
    for tokens in (1, 5):
        x = torch.randn(tokens, 24, dtype=torch.float64)
        torch.testing.assert_close(batched_forward(x, batched), layer.run("reference", x))


def test_stacked_factors_keep_every_rank_row_whole():
    # a rank-2 block wrapping around both edges (rows 12..19 of 16, columns 20..27 of 24) and a rank-3
    # 4x4 block, which the frozen layer keeps as a dense block (cheaper): its 4 columns are 4 rank rows
    layer = frozen_layer(16, 24, [(12, 8, 20, 8, 2), (0, 4, 4, 4, 3)], tile=8, bias=False)
    assert [right is None for *_, right in layer.blocks()] == [False, True]
    factors = stack(24, 16, list(layer.blocks()))
    assert factors.right.shape == (6, 24) and factors.left.shape == (16, 6)
    assert factors.macs == 6 * (24 + 16)
    assert (factors.right[:2, 4:20] == 0).all() and (factors.left[4:12, :2] == 0).all()  # zero off the support
    for tokens in (1, 5):
        x = torch.randn(tokens, 24, dtype=torch.float64)
        torch.testing.assert_close(stacked_forward(x, factors), layer.run("reference", x))
    costs = layer.predicted_costs(torch.zeros(1, 24, dtype=torch.float64))
    assert costs["stacked"].macs_per_token == factors.macs and costs["stacked"].calls == 2



def test_long_rows_store_a_matrix_along_its_longer_side():
    wide, tall = torch.randn(3, 7, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    kept, turned = LongRows.of(wide), LongRows.of(tall)
    assert not kept.transposed and kept.stored.shape == (3, 7)
    assert turned.transposed and turned.stored.shape == (3, 7) and turned.stored.is_contiguous()
    x, bias = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(turned.apply(x), x @ tall.T)
    torch.testing.assert_close(turned.apply(x, bias), x @ tall.T + bias)
    z = torch.randn(2, 7, dtype=torch.float64)
    torch.testing.assert_close(kept.apply(z, bias[:3]), z @ wide.T + bias[:3])


def test_long_row_paths_are_offered_only_where_a_matrix_turns():
    # 16 outputs, 24 inputs, stacked rank 6: the right factor (6, 24) stays, the left (16, 6) turns;
    # the dense weight (16, 24) stays, so "dense-t" would be "dense" again and is not offered
    layer = frozen_layer(16, 24, [(12, 8, 20, 8, 2), (0, 4, 4, 4, 3)], tile=8, bias=True)
    x = torch.randn(1, 24, dtype=torch.float64)
    right, left = long_rows_stacked(stack(24, 16, list(layer.blocks())))
    assert not right.transposed and left.transposed and left.stored.shape == (6, 16)
    costs = layer.predicted_costs(x)
    assert "dense-t" not in costs and costs["stacked-t"] == costs["stacked"]
    torch.testing.assert_close(long_rows_stacked_forward(x, (right, left)) + layer.bias, layer.run("reference", x)
                               + layer.bias)
    # 24 outputs, 16 inputs: the dense weight turns, and "dense-t" is timed beside "dense"
    taller = frozen_layer(24, 16, [(0, 8, 0, 24, 2)], tile=8, bias=True)
    costs = taller.predicted_costs(torch.randn(1, 16, dtype=torch.float64))
    assert costs["dense-t"] == costs["dense"]
    taller.kernel = "dense-t"
    z = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(taller(z), z @ taller.matrix.T + taller.bias)
