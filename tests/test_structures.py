import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gblr import structures

DTYPE = torch.float64


def assert_exact(layer, dense):
    torch.testing.assert_close(layer.weight.detach(), dense, rtol=1e-5, atol=1e-5 * dense.abs().max().item())


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), rank=st.integers(1, 6), seed=st.integers(0, 1000))
def test_low_rank_is_exact_at_native_cost(m, n, rank, seed):
    generator = torch.Generator().manual_seed(seed)
    p = torch.randn(m, rank, generator=generator, dtype=DTYPE)
    q = torch.randn(rank, n, generator=generator, dtype=DTYPE)
    layer = structures.low_rank(p, q)
    assert (layer.out_features, layer.in_features) == (m, n)
    assert_exact(layer, p @ q)
    assert layer.flops() == min(rank * (m + n), m * n)


def make_block_sparse(m, n, block_shape, keep, offset, generator):
    b_out, b_in = block_shape
    dense = torch.zeros(m, n, dtype=DTYPE)
    nonzero = 0
    for i in range(m // b_out):
        for j in range(n // b_in):
            if torch.rand((), generator=generator) < keep:
                rows = (offset[0] + i * b_out + torch.arange(b_out)) % m
                cols = (offset[1] + j * b_in + torch.arange(b_in)) % n
                dense[rows[:, None], cols] = torch.randn(b_out, b_in, generator=generator, dtype=DTYPE)
                nonzero += 1
    return dense, nonzero


@settings(max_examples=30, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    block_shape=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    offset=st.tuples(st.integers(-10, 10), st.integers(-10, 10)),
    keep=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_block_sparse_is_exact_at_native_cost(grid, block_shape, offset, keep, seed):
    m, n = grid[0] * block_shape[0], grid[1] * block_shape[1]
    dense, nonzero = make_block_sparse(m, n, block_shape, keep, offset, torch.Generator().manual_seed(seed))
    layer = structures.block_sparse(dense, block_shape, offset=offset)
    assert_exact(layer, dense)
    # Random blocks are full rank almost surely: native cost b_o * b_i per nonzero block.
    assert layer.flops() == nonzero * block_shape[0] * block_shape[1]


def test_block_sparse_wraps_around_the_last_row_and_column():
    generator = torch.Generator().manual_seed(0)
    dense = torch.zeros(12, 20, dtype=DTYPE)
    rows, cols = torch.tensor([10, 11, 0, 1]), torch.tensor([17, 18, 19, 0, 1])
    dense[rows[:, None], cols] = torch.randn(4, 5, generator=generator, dtype=DTYPE)
    layer = structures.block_sparse(dense, (4, 5), offset=(10, 17))
    assert_exact(layer, dense)
    assert layer.flops() == 20
    w_in, l_in, w_out, l_out = layer.supports()
    assert set(l_in.tolist()) == {17} and set(l_out.tolist()) == {10}
    assert set(w_in.tolist()) == {5} and set(w_out.tolist()) == {4}
    frozen = layer.freeze()
    x = torch.randn(3, 20, dtype=DTYPE)
    torch.testing.assert_close(frozen(x), x @ dense.T)


def test_block_sparse_uses_the_rank_of_each_block():
    dense = torch.zeros(8, 8, dtype=DTYPE)
    dense[:4, :4] = torch.randn(4, 1, dtype=DTYPE) @ torch.randn(1, 4, dtype=DTYPE)  # rank 1
    dense[4:, 4:] = torch.randn(4, 4, dtype=DTYPE)  # rank 4
    layer = structures.block_sparse(dense, (4, 4))
    assert layer.components == 1 + 4
    assert layer.flops() == 1 * (4 + 4) + 16
    assert_exact(layer, dense)


def test_all_zero_matrix_costs_nothing():
    layer = structures.block_sparse(torch.zeros(6, 9), (3, 3))
    assert layer.flops() == 0 and torch.equal(layer.weight.detach(), torch.zeros(6, 9))


@settings(max_examples=30, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    block_shape=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    offset=st.tuples(st.integers(-10, 10), st.integers(-10, 10)),
    data=st.data(),
)
def test_block_low_rank_is_exact_at_native_cost(grid, block_shape, offset, data):
    rank = data.draw(st.integers(1, min(block_shape)))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    m, n = grid[0] * block_shape[0], grid[1] * block_shape[1]
    shifted = torch.zeros(m, n, dtype=DTYPE)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = torch.randn(block_shape[0], rank, generator=generator, dtype=DTYPE) @ torch.randn(
                rank, block_shape[1], generator=generator, dtype=DTYPE
            )
            shifted[i * block_shape[0] : (i + 1) * block_shape[0], j * block_shape[1] : (j + 1) * block_shape[1]] = block
    dense = torch.roll(shifted, shifts=offset, dims=(0, 1))
    layer = structures.block_low_rank(dense, grid, rank, offset=offset)
    assert_exact(layer, dense)
    blocks = grid[0] * grid[1]
    assert layer.flops() == blocks * min(rank * sum(block_shape), block_shape[0] * block_shape[1])


def test_block_low_rank_is_a_projection():
    dense = torch.randn(12, 16, dtype=DTYPE)
    once = structures.block_low_rank(dense, (3, 2), 2).weight.detach()
    twice = structures.block_low_rank(once, (3, 2), 2).weight.detach()
    torch.testing.assert_close(twice, once)
    # and it is the blockwise optimum: each block's error is its tail singular values
    block = dense[:4, :8]
    tail = torch.linalg.svdvals(block)[2:].square().sum().sqrt()
    torch.testing.assert_close((once[:4, :8] - block).norm(), tail)


def test_bias_and_dtype_carry_over():
    p, q = torch.randn(6, 2, dtype=torch.float32), torch.randn(2, 5, dtype=torch.float32)
    bias = torch.randn(6)
    layer = structures.low_rank(p, q, bias=bias)
    assert layer.u.dtype == torch.float32 and torch.equal(layer.bias.detach(), bias)
    x = torch.randn(4, 5)
    torch.testing.assert_close(layer(x), x @ (p @ q).T + bias)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: structures.low_rank(torch.randn(4, 2), torch.randn(3, 5)), "must match"),
        (lambda: structures.low_rank(torch.randn(4), torch.randn(1, 5)), "p must be a 2-D"),
        (lambda: structures.block_sparse(torch.full((4, 4), float("nan")), (2, 2)), "NaN"),
        (lambda: structures.block_sparse(torch.randn(6, 6), (4, 3)), "block_shape=.* must divide"),
        (lambda: structures.block_sparse(torch.randn(6, 6), (0, 3)), "block_shape must be a pair"),
        (lambda: structures.block_sparse(torch.randn(6, 6), (3, 3), offset=(1.5, 0)), "offset"),
        (lambda: structures.block_low_rank(torch.randn(6, 6), (2, 2), 4), "rank must be"),
        (lambda: structures.block_low_rank(torch.randn(6, 6), (4, 2), 1), "grid=.* must divide"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
