"""The deployed layer (gblr.frozen): freezing keeps outputs and cost, merges supports, and
its inference paths agree, cache correctly and train through the reference path."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gblr
from fixtures import block_specs, frozen_layer, random_structure, set_structure
from gblr import FrozenGBLRLinear, GBLRLinear
from gblr.kernels.choice import MEASURED_PATHS


def outputs_by_path(layer, x):
    outputs = {}
    with torch.no_grad():
        for kernel in ("reference", *MEASURED_PATHS):
            layer.kernel = kernel
            outputs[kernel] = layer(x)
    layer.kernel = "auto"
    return outputs


@settings(max_examples=40, deadline=None)
@given(
    in_features=st.integers(1, 24),
    out_features=st.integers(1, 24),
    components=st.integers(1, 8),
    rank=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_freeze_is_equivalent(in_features, out_features, components, rank, bias, seed):
    rank = min(rank, in_features, out_features)  # a larger rank is refused (tests/test_bad_inputs.py)
    generator = torch.Generator().manual_seed(seed)
    layer = GBLRLinear(in_features, out_features, bias=bias, components=components, rank=rank, dtype=torch.float64)
    random_structure(layer, generator)
    if components > 1:  # force one duplicated support so that merging is exercised
        with torch.no_grad():
            for parameter in layer.structural_parameters():
                parameter[1] = parameter[0]
    frozen = layer.freeze()
    assert isinstance(frozen, FrozenGBLRLinear)
    x = torch.randn(5, in_features, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), layer(x))
        torch.testing.assert_close(frozen.weight, layer.weight)
    assert frozen.flops() == layer.flops()
    stored = sum(p.numel() for p in frozen.parameters()) - (out_features if bias else 0)
    assert stored <= max(layer.flops(), 0)  # memory follows the cost


def test_freeze_uses_sharp_masks_and_merges_supports():
    torch.manual_seed(0)
    layer = GBLRLinear(30, 20, components=4, sigma=4.0, dtype=torch.float64)
    set_structure(layer, [6, 6, 30, 2], [27, 27, 0, 3], [5, 5, 20, 2], [18, 18, 0, 1])
    frozen = layer.freeze()
    layer.sigma = None
    x = torch.randn(3, 30, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), layer(x))
    assert len(frozen.supports) == 3  # components 0 and 1 merged; the 2x2 block stored dense
    assert any(right is None for _, _, right in frozen.blocks())
    assert "blocks=3" in repr(frozen)


def test_freeze_in_place_on_a_model():
    model = nn.Sequential(GBLRLinear(8, 8), nn.ReLU(), nn.Sequential(GBLRLinear(8, 4, bias=False)))
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
    returned = gblr.freeze_(model)
    assert returned is model
    assert isinstance(model[0], FrozenGBLRLinear) and isinstance(model[2][0], FrozenGBLRLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    assert isinstance(gblr.freeze_(GBLRLinear(4, 4)), FrozenGBLRLinear)


@settings(max_examples=60, deadline=None)
@given(st.tuples(block_specs(40, 8), st.integers(1, 16)))
def test_tiled_and_dense_agree_with_reference_on_random_structures(case):
    # wrap-around, overlapping, one-element and full blocks, rank 1-3, dense blocks (rank >= widths)
    (m, n, spec), tile = case
    layer = frozen_layer(m, n, [(o % m, a, i % n, b, r) for o, a, i, b, r in spec], tile=tile)
    x = torch.randn(3, 7, n, dtype=torch.float64)
    outputs = outputs_by_path(layer, x)
    torch.testing.assert_close(outputs["tiled"], outputs["reference"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs["dense"], outputs["reference"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs["tiled-coarse"], outputs["reference"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs["tiled-batched"], outputs["reference"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_paths_agree_in_lower_precision(dtype, tolerance):
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(96, 160, init_flops_ratio=0.3).to(dtype).freeze()
    x = torch.randn(33, 96).to(dtype)
    outputs = outputs_by_path(layer, x)
    scale = outputs["reference"].float().abs().max()
    for kernel in MEASURED_PATHS:
        assert outputs[kernel].dtype == dtype
        assert (outputs[kernel].float() - outputs["reference"].float()).abs().max() <= tolerance * scale


def test_cached_tiles_follow_edits_training_steps_loads_and_dtype_changes():
    layer = frozen_layer(24, 20, [(0, 10, 5, 12, 2), (20, 8, 0, 20, 1)], tile=4, kernel="tiled")
    x = torch.randn(6, 20, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        layer.left0.mul_(2.0)
        assert torch.equal(layer(x), before)  # in-place edits outside autograd need refresh()
        layer.refresh()
        after = layer(x)
        layer.kernel = "reference"
        expected = layer(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)
    # a training step (reference path with autograd) drops the caches
    layer.kernel = "tiled"
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        trained = layer(x)
        layer.kernel = "reference"
        torch.testing.assert_close(trained, layer(x))
    # so does loading a state dict
    layer.kernel = "tiled"
    state = {key: value * 0.5 if value.is_floating_point() else value for key, value in layer.state_dict().items()}
    layer.load_state_dict(state)
    with torch.no_grad():
        loaded = layer(x)
        layer.kernel = "reference"
        torch.testing.assert_close(loaded, layer(x))
        expected = layer(x)
    layer.kernel = "tiled"
    layer32 = layer.float()
    with torch.no_grad():
        y32 = layer32(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, expected.float(), rtol=1e-5, atol=1e-5)


def test_gradients_use_the_reference_path():
    layer = frozen_layer(16, 12, [(2, 6, 3, 5, 1), (0, 16, 0, 12, 2)], kernel="auto")
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.left0.grad is not None and x.grad is not None
    assert layer.choices == {}  # nothing measured: training never takes the inference paths


def test_bad_kernel_name_is_rejected():
    with pytest.raises(ValueError, match="kernel must be one of"):
        frozen_layer(8, 8, [(0, 4, 0, 4, 1)], kernel="fast")


def test_dtype_and_device_follow_module_casts_even_without_blocks():
    empty = GBLRLinear(6, 4, bias=False)
    with torch.no_grad():
        empty.in_width.zero_()
    frozen = empty.freeze()
    assert len(frozen.supports) == 0 and frozen.dtype == torch.float32 and frozen.device == torch.device("cpu")
    frozen = frozen.to(torch.float64)
    assert frozen.dtype == torch.float64
    assert frozen.weight.dtype == torch.float64 and torch.equal(frozen.weight, torch.zeros(4, 6, dtype=torch.float64))


# -- bad inputs, supports in the state, casts (the reliability issue) --------------------------------


def test_integer_and_other_dtype_inputs_are_refused():
    # An integer input used to give only the bias; a float64 one computed silently in float64.
    frozen = GBLRLinear(16, 8).freeze()
    with pytest.raises(ValueError, match=r"floating point tensor of dtype torch.float32.*got torch.int64"):
        frozen(torch.randint(-3, 4, (2, 16)))
    with pytest.raises(ValueError, match=r"input has dtype torch.float64 but FrozenGBLRLinear\(in_features=16, "
                                         r"out_features=8\) has dtype torch.float32"):
        frozen(torch.randn(2, 16, dtype=torch.float64))
    frozen.kernel = "reference"
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # autocast decides, as before
        frozen(torch.randn(2, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("kernel", ["auto", "reference", *MEASURED_PATHS])
@pytest.mark.parametrize("shape", [(0, 12), (2, 0, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_an_empty_batch_gives_an_empty_output_on_every_path(kernel, shape, bias):
    # kernel="auto" and "tiled-batched" used to fail with "cannot reshape tensor of 0 elements".
    layer = frozen_layer(16, 12, [(2, 6, 3, 5, 1), (0, 16, 0, 12, 2)], kernel=kernel, bias=bias)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        assert y.shape == (*shape[:-1], 16) == torch.nn.functional.linear(x, layer.weight, layer.bias).shape
        if kernel != "auto":
            assert layer.run(kernel, x.reshape(0, 12)).shape == (0, 16)
    assert layer.choices == {}  # nothing timed on zero rows
    y = layer(x)  # with autograd: the reference path
    assert y.shape == (*shape[:-1], 16)


def two_frozen_layers_with_other_supports():
    torch.manual_seed(0)
    layer = GBLRLinear(16, 8, init_flops_ratio=0.4)
    other = GBLRLinear(16, 8, init_flops_ratio=0.4)
    with torch.no_grad():
        for mine, theirs in zip(other.structural_parameters(), layer.structural_parameters()):
            mine.copy_(theirs)
        other.in_location.add_(0.25)  # same block shapes, other places
    return layer.freeze(), other.freeze()


def test_loading_the_state_of_other_supports_is_refused():
    # It used to report all keys matched and give other outputs (up to 0.54 apart).
    frozen, other = two_frozen_layers_with_other_supports()
    assert [(s.in_width, s.out_width) for s in frozen.supports] == [(s.in_width, s.out_width) for s in other.supports]
    index = next(i for i, (a, b) in enumerate(zip(frozen.supports, other.supports)) if a != b)
    before = {key: value.clone() for key, value in frozen.state_dict().items()}
    with pytest.raises(RuntimeError, match=rf"FrozenGBLRLinear\(in_features=16, out_features=8\).*block {index} "
                                           r"differs: the state dict has Support\("):
        frozen.load_state_dict(other.state_dict())
    for key, value in frozen.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key
    fewer = frozen_layer(8, 16, [(0, 8, 0, 16, 1)], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="the state dict has 1 blocks, this layer"):
        frozen.load_state_dict(fewer.state_dict())


def test_supports_are_state_and_older_state_dicts_still_load():
    frozen, _ = two_frozen_layers_with_other_supports()
    state = frozen.state_dict()
    rows = [[s.in_start, s.in_width, s.out_start, s.out_width] for s in frozen.supports]
    assert state["block_supports"].dtype == torch.int64 and state["block_supports"].tolist() == rows
    x = torch.randn(3, 16)
    older = frozen_like(frozen)
    result = older.load_state_dict({key: value for key, value in state.items() if key != "block_supports"})
    assert not result.missing_keys and not result.unexpected_keys  # written before supports were state
    with torch.no_grad():
        assert torch.equal(older(x), frozen(x))
    # deepcopy, casts and to_empty keep the buffer equal to the supports
    assert copy.deepcopy(frozen).state_dict()["block_supports"].tolist() == rows
    assert frozen.double().state_dict()["block_supports"].dtype == torch.int64
    empty = frozen_like(frozen, device="meta").to_empty(device="cpu")
    assert empty.state_dict()["block_supports"].tolist() == rows
    empty.load_state_dict(frozen.float().state_dict())


def frozen_like(frozen, device=None):
    """A fresh frozen layer with ``frozen``'s structure and random factors (a dense block given
    as factors of full rank, which the constructor multiplies out again)."""
    blocks = []
    for support, left, right in frozen.blocks():
        rank = min(support.in_width, support.out_width) if right is None else left.shape[1]
        blocks.append((support, torch.randn(support.out_width, rank, device=device),
                       torch.randn(rank, support.in_width, device=device)))
    bias = None if frozen.bias is None else torch.zeros(frozen.out_features, device=device)
    return FrozenGBLRLinear(frozen.in_features, frozen.out_features, blocks, bias, device=device)


CAST_STEPS = {
    "to float16": lambda model, device: model.to(torch.float16),
    "to bfloat16": lambda model, device: model.to(torch.bfloat16),
    "to float64": lambda model, device: model.to(torch.float64),
    "to float32": lambda model, device: model.to(torch.float32),
    "half": lambda model, device: model.half(),
    "bfloat16": lambda model, device: model.bfloat16(),
    "double": lambda model, device: model.double(),
    "float": lambda model, device: model.float(),
    "to device": lambda model, device: model.to(device),
    "to device, float16": lambda model, device: model.to(device, torch.float16),
    "to device, float64": lambda model, device: model.to(device, torch.float64),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def block_supports_of(model):
    return [(layer.supports, layer.block_supports.tolist()) for layer in model if isinstance(layer, FrozenGBLRLinear)]


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.tuples(st.sampled_from([3, 17, 40]), st.sampled_from([3, 40, 3072]), st.sampled_from([3, 17, 40])),
    casts=st.lists(st.sampled_from(sorted(CAST_STEPS)), min_size=1, max_size=3),
    device=st.sampled_from(DEVICES),
    seed=st.integers(0, 2**16),
)
def test_casts_keep_supports_and_frozen_state_round_trips_exactly(sizes, casts, device, seed):
    # Any module-wide dtype or device cast keeps every layer's supports exactly (a cast to half
    # precision used to move the locations of trainable layers), and a frozen model's state dict
    # loads into a freshly frozen model of the same structure with exactly the same outputs.
    a, b, c = sizes
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    trainable = GBLRLinear(a, b, components=min(a, b, 8))
    random_structure(trainable, generator)
    frozen = GBLRLinear(b, c, components=min(b, c, 8))
    random_structure(frozen, generator)
    model = nn.Sequential(trainable, nn.ReLU(), frozen.freeze())
    supports = trainable.supports()
    frozen_supports = trainable.freeze().supports
    blocks = block_supports_of(model)
    for cast in casts:
        CAST_STEPS[cast](model, device)
    assert all(torch.equal(got, expected.to(got.device)) for got, expected in zip(trainable.supports(), supports))
    assert trainable.freeze().supports == frozen_supports
    assert block_supports_of(model) == blocks

    deployed = gblr.freeze_(copy.deepcopy(model))
    fresh = copy.deepcopy(model)  # the same structure, other values
    with torch.no_grad():
        for parameter in [*fresh[0].content_parameters(), *fresh[2].parameters()]:
            parameter.copy_(torch.randn(parameter.shape))
    gblr.freeze_(fresh)
    fresh.load_state_dict(deployed.state_dict())
    for layer in (deployed[0], deployed[2], fresh[0], fresh[2]):
        layer.kernel = "reference"
    x = torch.randn(4, a, generator=generator).to(device, fresh[0].dtype)
    with torch.no_grad():
        assert torch.equal(fresh(x), deployed(x))


@pytest.mark.parametrize("kernel", ["reference", *MEASURED_PATHS, "auto"])
def test_every_path_computes_in_the_autocast_dtype_like_nn_linear(kernel):
    torch.manual_seed(0)
    layer = GBLRLinear(64, 96, init_flops_ratio=0.25).freeze()
    layer.kernel = kernel
    x = torch.randn(5, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)  # autocast's own bf16 product
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_auto_keeps_only_the_packed_forms_of_its_choices():
    # timing packs every candidate path; afterwards only the chosen paths' forms stay cached
    layer = frozen_layer(48, 40, [(0, 24, 0, 20, 2), (30, 18, 25, 15, 1), (0, 48, 0, 40, 1)], tile=8,
                         dtype=torch.float32)
    with torch.no_grad():
        for tokens in (1, 64):
            x = torch.randn(tokens, 40)
            torch.testing.assert_close(layer(x), layer.run("reference", x) + layer.bias)
    chosen = {kept.path for kept in layer.choices.values()}
    assert set(layer._packed) == chosen
