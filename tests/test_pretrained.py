"""save_pretrained / load_pretrained: exact round trips, clear errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import gblr
from conversion import UNIFORM_SVD, quiet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


def small_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 4))


def gblr_tensor_keys(model):
    return {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, (gblr.GBLRLinear, gblr.FrozenGBLRLinear))
        for key, value in module.state_dict().items()
        if isinstance(value, torch.Tensor)
    }


def test_save_load_round_trip_is_exact(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    model = small_model(0)
    quiet(model, gblr.GBLRConfig(flops_ratio=0.5, exclude_modules=["4"], **UNIFORM_SVD))
    model[0].sigma = 3.0
    x = torch.randn(5, 16)
    gblr.save_pretrained(model, tmp_path)

    document = json.loads((tmp_path / "gblr_config.json").read_text())
    assert [entry["name"] for entry in document["layers"]] == ["0", "2"]
    assert document["layers"][0]["class"] == "GBLRLinear" and document["layers"][0]["sigma"] == 3.0
    assert document["gblr_version"] == gblr.__version__
    with safetensors.safe_open(str(tmp_path / "gblr_layers.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == gblr_tensor_keys(model) and "4.weight" not in keys and "0.u" in keys
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gblr_config.json", "gblr_layers.safetensors"]

    loaded = gblr.load_pretrained(small_model(1), tmp_path)
    assert isinstance(loaded[0], gblr.GBLRLinear) and loaded[0].sigma == 3.0
    assert type(loaded[4]) is nn.Linear
    loaded[4].load_state_dict(model[4].state_dict())  # the dense part comes from the base model
    assert torch.equal(loaded(x), model(x))
    for name in ("0", "2"):
        for (key, a), (_, b) in zip(model.get_submodule(name).state_dict().items(),
                                    loaded.get_submodule(name).state_dict().items()):
            assert not isinstance(a, torch.Tensor) or (torch.equal(a, b) and a.dtype == b.dtype), key


def test_save_load_round_trip_of_frozen_layers_is_exact(tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    model = small_model(0)
    quiet(model, gblr.GBLRConfig(flops_ratio=0.5, **UNIFORM_SVD))
    # A block-sparse layer whose 2x2 blocks are full rank: the frozen form keeps them dense.
    model[4] = gblr.structures.block_sparse(torch.randn(4, 8), (2, 2), bias=torch.randn(4))
    gblr.freeze_(model)
    model = model.double()
    x = torch.randn(5, 16, dtype=torch.float64)
    gblr.save_pretrained(model, tmp_path)
    blocks = json.loads((tmp_path / "gblr_config.json").read_text())["layers"][2]["blocks"]
    assert len(blocks) == 8 and all(block["rank"] is None for block in blocks)

    loaded = gblr.load_pretrained(small_model(1), tmp_path)
    for name in ("0", "2", "4"):
        original, copy = model.get_submodule(name), loaded.get_submodule(name)
        assert isinstance(copy, gblr.FrozenGBLRLinear)
        assert copy.supports == original.supports and copy.flops() == original.flops()
        assert [None if r is None else r.shape for _, _, r in copy.blocks()] == [
            None if r is None else r.shape for _, _, r in original.blocks()
        ]
    assert loaded[4].right0 is None and loaded[0].left0.dtype == torch.float64
    assert torch.equal(loaded(x), model(x))
    assert gblr_tensor_keys(loaded) == gblr_tensor_keys(model)


def test_load_into_a_model_of_another_shape_fails_clearly(tmp_path):
    pytest.importorskip("safetensors")
    model = small_model(0)
    quiet(model, gblr.GBLRConfig(**UNIFORM_SVD))
    gblr.save_pretrained(model, tmp_path)
    other = nn.Sequential(nn.Linear(16, 20), nn.ReLU(), nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"layer '0'.*\(16, 24\).*\(16, 20\)"):
        gblr.load_pretrained(other, tmp_path)
    assert type(other[0]) is nn.Linear  # nothing replaced
    with pytest.raises(ValueError, match="no module of that name"):
        gblr.load_pretrained(nn.Sequential(nn.Linear(16, 24)), tmp_path)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        gblr.load_pretrained(nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.ReLU()), tmp_path)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        gblr.load_pretrained(other, tmp_path / "missing")
    with pytest.raises(ValueError, match="no GBLRLinear"):
        gblr.save_pretrained(small_model(0), tmp_path / "dense")


def test_save_and_load_without_safetensors_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"pip install gblr\[hf\]"):
        gblr.save_pretrained(small_model(0), tmp_path)
    with pytest.raises(ImportError, match=r"pip install gblr\[hf\]"):
        gblr.load_pretrained(small_model(0), tmp_path)


def test_a_nan_width_in_the_file_is_refused_naming_the_layer_and_the_file(tmp_path):
    # It used to be accepted, and failed later in the forward pass.
    safetensors = pytest.importorskip("safetensors.torch")
    model = small_model(0)
    quiet(model, gblr.GBLRConfig(flops_ratio=0.5, **UNIFORM_SVD))
    gblr.save_pretrained(model, tmp_path)
    path = tmp_path / "gblr_layers.safetensors"
    tensors = safetensors.load_file(str(path))
    tensors["2.out_location"][0] = float("nan")
    safetensors.save_file(tensors, str(path))
    base = small_model(1)
    with pytest.raises(ValueError, match=r"layer '2' \(GBLRLinear\(in_features=24, out_features=8\)\): out_location "
                                         r"contain NaN or infinite values as loaded from .*gblr_layers.safetensors"):
        gblr.load_pretrained(base, tmp_path)
    assert type(base[2]) is nn.Linear  # nothing replaced


def test_frozen_supports_come_from_the_json_not_the_tensors_file(tmp_path):
    # The supports buffer of frozen layers is rebuilt from gblr_config.json, so the tensors file
    # is as before and folders written before the buffer existed load unchanged.
    safetensors = pytest.importorskip("safetensors.torch")
    model = small_model(0)
    quiet(model, gblr.GBLRConfig(flops_ratio=0.5, **UNIFORM_SVD))
    gblr.freeze_(model)
    gblr.save_pretrained(model, tmp_path)
    stored = safetensors.load_file(str(tmp_path / "gblr_layers.safetensors"))
    assert not any(key.endswith("block_supports") for key in stored)
    loaded = gblr.load_pretrained(small_model(1), tmp_path)
    assert loaded[0].block_supports.tolist() == model[0].block_supports.tolist()
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    fresh = gblr.load_pretrained(small_model(2), tmp_path)
    fresh.load_state_dict(model.state_dict())  # the supports in the state match
