import pytest
import torch
from torch import nn

from gblr import GBLRLinear, StructureLearner, flops_report, freeze_
from gblr.baselines import BlockSparseConv2d, BlockSparseLinear, LowRankConv2d, LowRankLinear, MonarchLinear
from gblr.conv import FrozenGBLRConv2d, GBLRConv2d
from gblr.recipes.models import (
    CONV_KINDS, LAYER_KINDS, MLPMixer, ResNet, ViT, build_model, make_conv, make_linear, replaced_flops,
)

KINDS = {"dense": nn.Linear, "gblr": GBLRLinear, "lowrank": LowRankLinear, "monarch": MonarchLinear,
         "blocksparse": BlockSparseLinear}


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_factory_makes_the_requested_kind(kind):
    layer = make_linear(kind, 64, 128, flops_ratio=0.25)
    assert isinstance(layer, KINDS[kind]) and (layer.in_features, layer.out_features) == (64, 128)
    if kind in ("lowrank", "monarch", "blocksparse"):
        assert 0.15 <= layer.flops_ratio() <= 0.25
    if kind == "gblr":
        assert layer.flops_ratio() == pytest.approx(0.5, abs=0.03)  # starts at twice the target


@pytest.mark.parametrize("name, cls", [("vit", ViT), ("mixer", MLPMixer)])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_models_forward_and_replace_only_block_layers(name, cls, kind):
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10, layer=kind, flops_ratio=0.25, dim=32, depth=2)
    assert isinstance(model, cls)
    logits = model(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10)
    report = replaced_flops(model)
    per_block = 6 if name == "vit" else 4
    assert len(report) == 2 * per_block
    assert all(layer.name.startswith("blocks.") for layer in report)
    assert isinstance(model.head, nn.Linear) and isinstance(model.embed.projection, nn.Linear)
    if kind == "dense":
        assert report.ratio == 1.0
    elif kind != "gblr":
        assert report.ratio <= 0.25


def test_vit_attention_has_separate_projections():
    model = build_model("vit", (3, 32, 32), 100, layer="gblr", flops_ratio=0.3, dim=32, depth=1, heads=4)
    attention = model.blocks[0].attention
    assert all(isinstance(getattr(attention, n), GBLRLinear) for n in ("query", "key", "value", "output"))


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="layer kind"):
        make_linear("sparse", 4, 4)
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("convnext", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="patch_size=5"):
        build_model("vit", (1, 28, 28), 10, patch_size=5)
    with pytest.raises(ValueError, match="heads"):
        build_model("vit", (1, 28, 28), 10, dim=30, heads=4)


# -- the ResNet and its convolution factory ----------------------------------------------------------

CONVS = {"dense": nn.Conv2d, "gblr": GBLRConv2d, "lowrank": LowRankConv2d, "blocksparse": BlockSparseConv2d}


@pytest.mark.parametrize("kind", CONV_KINDS)
def test_conv_factory_makes_the_requested_kind(kind):
    layer = make_conv(kind, 16, 32, 3, flops_ratio=0.25, stride=2, padding=1)
    assert isinstance(layer, CONVS[kind])
    assert (layer.in_channels, layer.out_channels, layer.kernel_size) == (16, 32, (3, 3))
    assert (layer.stride, layer.padding) == ((2, 2), (1, 1))
    y = layer(torch.randn(2, 16, 8, 8))
    assert y.shape == (2, 32, 4, 4) and layer.output_pixels == 16  # the dense one too (a forward hook)
    if kind in ("lowrank", "blocksparse"):
        assert 0.15 <= layer.flops_ratio() <= 0.25
    if kind == "gblr":
        assert layer.components == 32 and layer.rank == 1  # min(16 * 9, 32) components
        assert layer.flops_ratio() == pytest.approx(0.5, abs=0.03)  # starts at twice the target
        assert make_conv("gblr", 16, 32, 3, rank=3).components == 11  # ceil(32 / 3)
        assert make_conv("gblr", 16, 32, 3, 0.3, init_flops_ratio=0.9).init_flops_ratio == 0.9


def test_conv_factory_refuses_monarch_and_unknown_kinds():
    with pytest.raises(ValueError, match="there is no Monarch convolution"):
        make_conv("monarch", 8, 8, 3)
    with pytest.raises(ValueError, match="there is no Monarch convolution"):
        build_model("resnet", (1, 28, 28), 10, layer="monarch", flops_ratio=0.3)
    with pytest.raises(ValueError, match="layer kind must be one of dense, gblr, lowrank, blocksparse; got 'sparse'"):
        make_conv("sparse", 8, 8, 3)


@pytest.mark.parametrize("kind", CONV_KINDS)
def test_resnet_forward_and_replace_only_block_convolutions(kind):
    torch.manual_seed(0)
    model = build_model("resnet", (1, 28, 28), 10, layer=kind, flops_ratio=0.25, width=8, depth=(1, 2, 1))
    assert isinstance(model, ResNet)
    logits = model(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10)
    report = replaced_flops(model)
    names = [layer.name for layer in report]
    assert names == [f"blocks.{b}.conv{c}" for b in range(4) for c in (1, 2)]  # no shortcut, stem or head
    assert all(isinstance(model.get_submodule(name), CONVS[kind]) for name in names)
    assert isinstance(model.head, nn.Linear) and isinstance(model.stem[0], nn.Conv2d)
    shortcuts = [name for name, _ in model.blocks.named_children() if not isinstance(model.blocks[int(name)].shortcut,
                                                                                         nn.Identity)]
    assert shortcuts == ["1", "3"]  # the first block of stages 1 and 2
    assert isinstance(model.blocks[1].shortcut[0], nn.Conv2d) and model.blocks[1].shortcut[0].stride == (2, 2)
    # channels double and the resolution halves per stage; each row counts MACs per example
    shapes = [(8, 72), (8, 72), (16, 72), (16, 144), (16, 144), (16, 144), (32, 144), (32, 288)]
    assert [layer.shape for layer in report] == shapes
    pixels = [784, 784, 196, 196, 196, 196, 49, 49]
    assert [layer.dense_macs for layer in report] == [o * i * p for (o, i), p in zip(shapes, pixels)]
    if kind == "dense":
        assert report.ratio == 1.0
    elif kind != "gblr":
        assert 0.15 <= report.ratio <= 0.25
        assert [layer.gblr_macs for layer in report] == [
            model.get_submodule(name).flops() * p for name, p in zip(names, pixels)
        ]


def test_resnet_flops_are_weighted_by_output_pixels_before_any_forward_pass():
    model = build_model("resnet", (3, 32, 32), 10, layer="lowrank", flops_ratio=0.3, width=4)
    before = replaced_flops(model)
    assert [model.get_submodule(layer.name).output_pixels for layer in before] == [1024, 1024, 256, 256, 64, 64]
    model(torch.randn(2, 3, 32, 32))
    assert replaced_flops(model) == before
    dense = build_model("resnet", (3, 32, 32), 10, layer="dense", width=4)
    assert replaced_flops(dense).dense_macs == before.dense_macs
    # the whole model counts the stem, shortcuts and head as well
    assert flops_report(dense, include_dense=True).dense_macs > replaced_flops(dense).dense_macs


def test_resnet_gblr_learns_its_budget_and_freezes():
    torch.manual_seed(0)
    model = build_model("resnet", (1, 16, 16), 4, layer="gblr", flops_ratio=0.3, width=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    learner = StructureLearner(model, optimizer, 0.3, total_steps=8)
    assert len(learner.layers) == 6
    images, labels = torch.randn(16, 1, 16, 16), torch.randint(0, 4, (16,))
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.step()
    assert replaced_flops(model).ratio == pytest.approx(0.3, abs=0.02)
    model.eval()
    before = model(images)
    freeze_(model)
    assert all(isinstance(model.blocks[b].conv1, FrozenGBLRConv2d) for b in range(3))
    torch.testing.assert_close(model(images), before, rtol=1e-4, atol=1e-5)
    assert replaced_flops(model).ratio == pytest.approx(0.3, abs=0.02)


def test_bad_resnet_arguments():
    with pytest.raises(ValueError, match="width must be a positive int, got 0"):
        ResNet((1, 28, 28), 10, width=0)
    with pytest.raises(ValueError, match=r"depth must be a positive int or a non-empty sequence .* got \(1, 0\)"):
        ResNet((1, 28, 28), 10, depth=(1, 0))
    with pytest.raises(ValueError, match="depth must be"):
        ResNet((1, 28, 28), 10, depth=())
    assert len(ResNet((1, 28, 28), 10, width=4, depth=2).blocks) == 2  # one stage of two blocks
