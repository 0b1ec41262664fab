import pytest
import torch
from torch import nn

from gblr import GBLRLinear
from gblr.baselines import BlockSparseLinear, LowRankLinear, MonarchLinear
from gblr.recipes.models import LAYER_KINDS, MLPMixer, ViT, build_model, make_linear, replaced_flops

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
        build_model("resnet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="patch_size=5"):
        build_model("vit", (1, 28, 28), 10, patch_size=5)
    with pytest.raises(ValueError, match="heads"):
        build_model("vit", (1, 28, 28), 10, dim=30, heads=4)
