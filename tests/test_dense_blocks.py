"""Dense blocks of GBLRLinear (``dense_blocks``): full-rank blocks whose places and sizes are learned."""

import math

import pytest
import torch

import gblr
from gblr.baselines import diagonal_blocks
from gblr.flops import group_macs
from gblr.linear import spread_diagonals
from gblr.viz import coverage


def layer_with_blocks(n=48, m=40, components=10, blocks=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    return gblr.GBLRLinear(n, m, components=components, dense_blocks=blocks, dtype=torch.float64, **kwargs)


def expected_macs(layer):
    """The cost by hand: each component min(r (a + b), a b), each dense block a b (no shared supports)."""
    w_in, _, w_out, _ = layer.supports()
    K = layer.components
    low_rank = sum(group_macs(layer.rank, a, b) for a, b in zip(w_in[:K].tolist(), w_out[:K].tolist()) if a and b)
    return low_rank + sum(a * b for a, b in zip(w_in[K:].tolist(), w_out[K:].tolist()))


def test_the_start_puts_equal_blocks_on_the_diagonal_within_the_budget():
    layer = layer_with_blocks(n=64, m=64, components=16, blocks=4, init_flops_ratio=0.5, init_dense_share=0.5)
    K = layer.components
    side = math.sqrt(0.5 * 0.5 / 4)
    assert torch.allclose(layer.in_width[K:], torch.full((4,), side, dtype=layer.in_width.dtype))
    assert torch.allclose(layer.out_width[K:], torch.full((4,), side, dtype=layer.in_width.dtype))
    assert torch.allclose(layer.in_location[K:], torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=layer.in_width.dtype))
    assert torch.equal(layer.in_location[K:], layer.out_location[K:])
    assert layer.flops() == expected_macs(layer)
    assert layer.flops_ratio() == pytest.approx(0.5, abs=0.03)  # rounding of widths to whole elements
    assert layer.block_weight.shape == (64, 64)
    assert layer.block_weight.abs().max() <= 1 / math.sqrt(64)


def test_many_blocks_start_on_block_sparses_spread_diagonals():
    # 64 blocks of 1/16 of each side: the 4 spread diagonals of a 16 x 16 grid, block-sparse's pattern at 0.25
    layer = layer_with_blocks(n=128, m=128, components=8, blocks=64, init_flops_ratio=0.3, init_dense_share=0.25 / 0.3)
    w_in, l_in, w_out, l_out = (s[8:] for s in layer.supports())
    assert w_in.eq(8).all() and w_out.eq(8).all()
    placed = {(row // 8, col // 8) for row, col in zip(l_out.tolist(), l_in.tolist())}
    assert placed == set(diagonal_blocks(16, 4))
    with torch.no_grad():
        layer.in_width[:8] = 0.0  # the blocks alone: every row and column meets 4 blocks of rank 8
    counts = coverage(layer)
    assert counts.sum(dim=0).eq(4 * 8 * 8).all() and counts.sum(dim=1).eq(4 * 8 * 8).all()


def test_spread_diagonals_fill_a_diagonal_before_the_next():
    assert spread_diagonals(4, 0.25) == ([0.0, 0.25, 0.5, 0.75], [0.0, 0.25, 0.5, 0.75])
    out_starts, in_starts = spread_diagonals(6, 1 / 3)  # two diagonals of three, the second offset by 2 / 3
    assert out_starts == [0.0, 1 / 3, 2 / 3] * 2
    assert in_starts == [0.0, 1 / 3, 2 / 3, 2 / 3, 0.0, 1 / 3]
    assert spread_diagonals(3, 0.0) == ([0.0, 1 / 3, 2 / 3], [0.0, 1 / 3, 2 / 3])  # no budget: still distinct
    for blocks, side in ((5, 0.41), (2, 0.7), (9, 0.9), (64, 0.2)):  # wide blocks: never two in one cell
        starts = list(zip(*spread_diagonals(blocks, side)))
        assert len(set(starts)) == blocks
    assert spread_diagonals(0, 0.5) == ([], [])


def test_many_small_dense_blocks_keep_the_masked_product_in_the_content_phase():
    # 64 blocks of 8 x 16 cropped one by one cost more than folding them into the materialised weight
    layer = gblr.GBLRLinear(128, 256, dense_blocks=64, init_dense_share=0.8, init_flops_ratio=0.6, sigma=None)
    layer.compact = True
    assert layer.compact_plan(4096) is None
    x = torch.randn(4096, 128)
    with torch.no_grad():
        expected = x @ layer.matrix.T + layer.bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sigma", [None, 4.0])
def test_forward_is_the_matrix_of_components_plus_masked_blocks(sigma):
    layer = layer_with_blocks(sigma=sigma)
    x = torch.randn(5, 48, dtype=torch.float64)
    mask_in, mask_out = layer.masks()
    K = layer.components
    blocks = layer.block_weight * (mask_out[K:].T @ mask_in[K:])
    low_rank = sum(torch.outer(mask_out[k] * layer.u[k, :, 0], layer.v[k, 0] * mask_in[k]) for k in range(K))
    expected = x @ (low_rank + blocks).T + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-12)
    assert torch.allclose(layer.matrix, low_rank + blocks, atol=1e-12)


def test_blocks_get_structural_gradients_while_learned():
    layer = layer_with_blocks(sigma=4.0)
    layer(torch.randn(6, 48, dtype=torch.float64)).square().sum().backward()
    K = layer.components
    for parameter in layer.structural_parameters():
        assert parameter.grad[K:].abs().min() > 0  # every block can move and resize
    assert layer.block_weight.grad.abs().sum() > 0


def test_freeze_keeps_the_output_and_the_cost():
    layer = layer_with_blocks()
    layer.sigma = None
    with torch.no_grad():
        K = layer.components
        layer.in_location[K], layer.in_width[K] = 0.9, 0.4  # a block that wraps past the last column
    x = torch.randn(7, 48, dtype=torch.float64)
    frozen = layer.freeze()
    assert torch.allclose(frozen(x), layer(x), atol=1e-12)
    assert frozen.flops() == layer.flops() == expected_macs(layer)


def test_a_component_on_a_blocks_support_merges_into_that_dense_block():
    layer = layer_with_blocks(components=4, blocks=1)
    layer.sigma = None
    with torch.no_grad():
        for name in ("in_width", "in_location", "out_width", "out_location"):
            getattr(layer, name)[0] = getattr(layer, name)[4]  # component 0 on the block's support
        layer.in_width[1:4] = 0.0
    w_in, _, w_out, _ = layer.supports()
    assert layer.flops() == int(w_in[4] * w_out[4])  # the component adds no MACs to a dense block
    frozen = layer.freeze()
    assert len(list(frozen.blocks())) == 1 and next(frozen.blocks())[2] is None  # one dense block
    x = torch.randn(3, 48, dtype=torch.float64)
    assert torch.allclose(frozen(x), layer(x), atol=1e-12)


@pytest.mark.parametrize("cropped", [False, True])
def test_compact_gives_the_masked_products_output_and_gradients(cropped, monkeypatch):
    if cropped:  # the compact product and cropped blocks, as in a large layer
        monkeypatch.setattr(gblr.linear, "masked_cost", lambda *args, **kwargs: float("inf"))
    layer = layer_with_blocks()
    layer.sigma = None
    with torch.no_grad():
        K = layer.components
        layer.in_location[K], layer.in_width[K] = 0.9, 0.4  # a block that wraps past the last column
    x = torch.randn(9, 48, dtype=torch.float64, requires_grad=True)
    results = []
    for compact in (False, True):
        layer.compact = compact
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        (y * torch.linspace(-1, 1, 40, dtype=torch.float64)).sum().backward()
        results.append([y.detach(), x.grad, layer.u.grad, layer.v.grad, layer.block_weight.grad, layer.bias.grad])
    assert (layer.compact_plan(9) is not None) == cropped
    for masked, compact in zip(*results):
        assert torch.allclose(masked, compact, atol=1e-12)


def test_coverage_counts_a_dense_block_by_its_full_rank():
    layer = gblr.GBLRLinear(32, 32, components=1, dense_blocks=1, sigma=None)
    with torch.no_grad():
        layer.in_width[0] = 0.0  # no component
        layer.in_width[1], layer.out_width[1] = 0.25, 0.5  # an 8-column, 16-row block
        layer.in_location[1], layer.out_location[1] = 0.0, 0.0
    counts = coverage(layer)
    assert counts[:16, :8].eq(8).all() and counts.sum() == 8 * 16 * 8
    assert torch.equal(counts, coverage(layer.freeze()))


def test_learning_keeps_the_budget_and_moves_the_blocks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(gblr.GBLRLinear(32, 32, dense_blocks=2, init_flops_ratio=0.6), torch.nn.GELU(),
                                gblr.GBLRLinear(32, 8, dense_blocks=2, init_flops_ratio=0.6))
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-2))
    learner = gblr.StructureLearner(model, optimizer, flops_target=0.3, total_steps=60)
    start = [layer.in_width.detach().clone() for layer in learner.layers]
    x = torch.randn(256, 32)
    target = torch.randn(32, 8)
    for _ in range(60):
        loss = (model(x) - x @ target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        learner.step()
    assert learner.flops_ratio() == pytest.approx(0.3, abs=0.02)
    moved = [(layer.in_width[layer.components:] - before[layer.components:]).abs().max()
             for layer, before in zip(learner.layers, start)]
    assert max(moved) > 0.01
    frozen = gblr.freeze_(model)
    assert gblr.flops_report(frozen).ratio == pytest.approx(learner.flops_ratio(), abs=1e-9)


def test_save_and_load_keep_the_blocks(tmp_path):
    pytest.importorskip("safetensors")
    model = torch.nn.Sequential(layer_with_blocks(blocks=2))
    gblr.save_pretrained(model, tmp_path)
    fresh = torch.nn.Sequential(torch.nn.Linear(48, 40).double())
    loaded = gblr.load_pretrained(fresh, tmp_path)
    assert loaded[0].dense_blocks == 2
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for name, value in saved.items():
        assert torch.equal(value, restored[name]) if isinstance(value, torch.Tensor) else value == restored[name], name


@pytest.mark.parametrize("value", [-1, True, 1.5])
def test_a_bad_count_of_blocks_is_refused(value):
    with pytest.raises(ValueError, match="dense_blocks must be an int >= 0"):
        gblr.GBLRLinear(8, 8, dense_blocks=value)


def test_the_train_recipe_refuses_blocks_for_convolutions():
    from gblr.recipes.train import TrainConfig

    with pytest.raises(ValueError, match="dense-blocks"):
        TrainConfig(model="resnet", dense_blocks=2).validate()


def test_the_train_recipe_gives_linear_gblr_layers_dense_blocks_by_default():
    from gblr.recipes.train import DENSE_BLOCKS, TrainConfig

    assert DENSE_BLOCKS == 4 and TrainConfig().init_dense_share == 0.8
    assert TrainConfig(model="gpt").resolved().dense_blocks == DENSE_BLOCKS
    assert TrainConfig(model="resnet").resolved().dense_blocks == 0  # convolutions have none
    assert TrainConfig(layer="lowrank").resolved().dense_blocks == 0  # nor do the baselines
    assert TrainConfig(dense_blocks=0).resolved().dense_blocks == 0  # the paper's layer, on request
    config = TrainConfig(dense_blocks=2)
    assert config.resolved() is config


@pytest.mark.parametrize("sigma", [None, 4.0])
def test_one_gemm_for_both_terms_gives_the_thin_products_output_and_gradients(sigma):
    layer = layer_with_blocks(sigma=sigma)
    x = torch.randn(2, 5, 48, dtype=torch.float64, requires_grad=True)
    results = []
    for product in ("factored", "materialise"):
        layer.product = product
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        (y * torch.linspace(-1, 1, 40, dtype=torch.float64)).sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for p in layer.parameters()])
    assert layer.materialises(10) and not layer_with_blocks(product="factored").materialises(10)
    for factored, materialised in zip(*results):
        assert torch.allclose(factored, materialised, atol=1e-10)


def test_blocks_make_materialising_the_weight_pay_sooner():
    layer = layer_with_blocks(n=256, m=256, components=64, blocks=2)
    plain = gblr.GBLRLinear(256, 256, components=64)
    tokens = 200  # two thin products beat building the weight, unless a dense product is due anyway
    assert not plain.materialises(tokens) and layer.materialises(tokens)


def test_the_gpt_recipe_gives_every_replaced_linear_its_dense_blocks():
    from gblr.learning import gblr_layers
    from gblr.recipes.models import build_model

    model = build_model("gpt", (16,), 256, layer="gblr", flops_ratio=0.3, dim=32, depth=1, heads=2,
                        layer_options={"dense_blocks": 2, "init_dense_share": 0.8})
    layers = gblr_layers(model)
    assert len(layers) == 6 and all(layer.dense_blocks == 2 and layer.init_dense_share == 0.8 for layer in layers)
    tokens = torch.randint(0, 256, (2, 16))
    assert model(tokens).shape == (2, 16, 256)
