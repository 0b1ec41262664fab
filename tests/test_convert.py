"""convert_ (model surgery, budget allocation, calibration) and save / load of compressed models.

Most tests use ``method="svd"`` so that their cost does not grow with ``gblr.decompose``'s search.
"""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch
from torch import nn

import gblr
from gblr.convert import _allocate_ranks, _find_targets

SVD = {"method": "svd"}
UNIFORM_SVD = {"method": "svd", "allocation": "uniform"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


def quiet(model, config, calibration=None):
    return gblr.convert_(model, config, calibration, progress=False, verbose=False)


class Block(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.xquery = nn.Linear(width, width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return self.ffn(self.query(x) + self.xquery(x))


class Net(nn.Module):
    def __init__(self, width=16, classes=10):
        super().__init__()
        self.layers = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def get_output_embeddings(self):
        return self.head


def names(model, **config):
    return [target.name for target in _find_targets(model, gblr.GBLRConfig(**config))]


BLOCK = ["query", "xquery", "ffn.0", "ffn.2"]


# -- configuration ------------------------------------------------------------------------------


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


def test_convert_rejects_wrong_arguments():
    with pytest.raises(TypeError, match="config"):
        quiet(nn.Sequential(nn.Linear(4, 4)), {"flops_ratio": 0.5})
    with pytest.raises(TypeError, match="calibration"):
        quiet(nn.Sequential(nn.Linear(4, 4)), gblr.GBLRConfig(), calibration=torch.randn(3, 4))
    with pytest.raises(ValueError, match="itself is a linear layer"):
        quiet(nn.Linear(8, 8), gblr.GBLRConfig())


# -- target matching -----------------------------------------------------------------------------


def test_all_linear_skips_output_embeddings():
    assert names(Net()) == [f"layers.{i}.{name}" for i in range(2) for name in BLOCK]


def test_list_targets_match_whole_dotted_suffixes():
    assert names(Net(), target_modules=["query"]) == ["layers.0.query", "layers.1.query"]
    assert names(Net(), target_modules=["1.query", "head"]) == ["layers.1.query", "head"]
    assert names(Net(), target_modules=["layers.0.ffn.2"]) == ["layers.0.ffn.2"]


def test_regex_targets_fullmatch():
    assert names(Net(), target_modules=r"layers\.\d\.ffn\.\d") == [f"layers.{i}.ffn.{j}" for i in range(2) for j in (0, 2)]
    with pytest.raises(ValueError, match="no module matches"):
        names(Net(), target_modules="query")  # a regex must match the whole name


def test_exclude_modules_and_filter_fn():
    assert names(Net(), exclude_modules=["ffn.0", "ffn.2", "xquery"]) == ["layers.0.query", "layers.1.query"]
    assert names(Net(), exclude_modules=r".*query") == [f"layers.{i}.ffn.{j}" for i in range(2) for j in (0, 2)]
    wide = names(Net(), filter_fn=lambda name, module: module.out_features == 32)
    assert wide == ["layers.0.ffn.0", "layers.1.ffn.0"]


def test_no_match_lists_available_layers():
    with pytest.raises(ValueError, match=r"no module matches.*'layers\.0\.query'"):
        names(Net(), target_modules=["missing"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        names(nn.Sequential(nn.ReLU()))


def test_multihead_attention_projection_is_not_a_target():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    assert names(model) == ["1"]


# -- allocation ---------------------------------------------------------------------------------


def test_greedy_allocation_is_optimal_on_convex_curves():
    torch.manual_seed(0)
    shapes = [(6, 6), (8, 4), (10, 5)]
    curves = []
    for m, n in shapes:
        energy = torch.rand(min(m, n), dtype=torch.float64).sort(descending=True).values ** 2
        tail = energy.flip(0).cumsum(0).flip(0)
        curves.append(torch.cat([tail, tail.new_zeros(1)]) / tail[0])
    # Per layer: ranks 1 .. the largest rank cheaper than dense, or dense (None: cost m*n, error 0).
    options = [[*range(1, (m * n - 1) // (m + n) + 1), None] for m, n in shapes]

    def cost(choice):
        return sum(m * n if r is None else r * (m + n) for r, (m, n) in zip(choice, shapes))

    def error(choice):
        return sum(0.0 if r is None else float(curve[r]) for r, curve in zip(choice, curves))

    for budget in (40, 60, 75, 100):
        ranks = _allocate_ranks(shapes, curves, budget, floor_ratio=0.0)
        best = min(error(choice) for choice in itertools.product(*options) if cost(choice) <= budget)
        assert cost(ranks) <= budget
        # Greedy is optimal up to the step left over at the budget edge (no step gains more than 0.5).
        assert best <= error(ranks) <= best + 0.5
    assert _allocate_ranks(shapes, curves, 1000, floor_ratio=0.0) == [None, None, None]
    assert _allocate_ranks(shapes, curves, 0, floor_ratio=0.0) == [1, 1, 1]  # never below rank 1


def test_error_allocation_favours_the_layer_whose_error_falls_fastest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(32, 2) @ torch.randn(2, 32))  # rank 2
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, **SVD))
    low, full = report["0"], report["1"]
    assert low.ratio < full.ratio
    assert low.ratio == pytest.approx(2 * 64 / 1024)  # the floor (0.125) is rank 2: exact already
    assert low.relative_error < 1e-5
    assert report.flops_ratio <= 0.5
    assert isinstance(model[0], gblr.GBLRLinear) and isinstance(model[1], gblr.GBLRLinear)
    assert model[0].flops() == 128 and model[1].flops() == full.flops


def test_uniform_allocation_gives_every_layer_the_target():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16))
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, allocation="uniform", **SVD))
    assert [row.ratio for row in report.layers] == [0.5, 0.5]
    assert all(row.flops_ratio <= 0.5 for row in report.layers)


# -- convert_ -----------------------------------------------------------------------------------


def test_convert_replaces_exactly_the_targets_in_a_nested_model():
    torch.manual_seed(0)
    model = Net()
    originals = dict(model.named_modules())
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, exclude_modules=["xquery"], **UNIFORM_SVD))
    converted = [f"layers.{i}.{name}" for i in range(2) for name in ("query", "ffn.0", "ffn.2")]
    assert report.converted == converted and report.skipped == {}
    for name, module in model.named_modules():
        if name in converted:
            assert isinstance(module, gblr.GBLRLinear)
            assert report[name].flops == module.flops()
        elif isinstance(module, nn.Linear):
            assert module is originals[name]  # xquery and the head untouched
    assert {name for name, m in model.named_modules() if isinstance(m, gblr.GBLRLinear)} == set(converted)
    dense = sum(originals[name].weight.numel() for name in converted)
    assert report.dense_flops == dense
    assert report.flops == sum(model.get_submodule(name).flops() for name in converted)
    assert report.flops_ratio <= 0.5 + 1e-9
    assert model(torch.randn(3, 16)).shape == (3, 10)


def test_error_allocation_meets_the_global_target():
    torch.manual_seed(0)
    model = Net()
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.4, **SVD))
    assert [row.name for row in report.layers] == names(Net())
    assert report.flops_ratio <= 0.4 + 1e-9
    for row in report.layers:  # a layer is replaced exactly when it was not kept dense
        replaced = isinstance(model.get_submodule(row.name), gblr.GBLRLinear)
        assert replaced == (row.skipped is None)
        assert row.flops_ratio == (1.0 if row.skipped else row.ratio)
        assert row.ratio >= 0.1 or row.flops == (row.in_features + row.out_features)  # floor: 0.25 * 0.4 or rank 1


def test_convert_with_gblr_method_keeps_dtype_training_mode_and_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8, bias=False)).double().eval()
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5))
    assert report.converted == ["0", "2"]
    for index in (0, 2):
        assert model[index].u.dtype == torch.float64 and not model[index].training
    assert model[2].bias is None
    assert report.flops_ratio <= 0.5
    assert model(torch.randn(2, 12, dtype=torch.float64)).dtype == torch.float64


def test_overrides_fix_a_layer_ratio_outside_the_global_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, overrides={"0": 0.25, "2": 1.0}, **SVD))
    assert report["0"].ratio == 0.25 and report["0"].flops == 4 * 64  # rank 4
    assert report["2"].skipped == "override ratio 1" and isinstance(model[2], nn.Linear)
    assert report["1"].flops <= 0.5 * 1024
    with pytest.warns(UserWarning, match="matches no target"):
        quiet(nn.Sequential(nn.Linear(8, 8)), gblr.GBLRConfig(overrides={"nothing": 0.5}, **SVD))


def test_too_small_layer_is_kept_dense_with_a_reason():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 16), nn.Linear(16, 16))
    for allocation in ("error", "uniform"):
        report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, allocation=allocation, **SVD))
        assert report["0"].skipped.startswith("too small") and report["0"].flops == 4
        assert report["1"].skipped is None or not report["1"].skipped.startswith("too small")
        assert type(model[0]) is nn.Linear
        model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 16), nn.Linear(16, 16))
    text = str(report)
    assert "too small" in text and "total: 3 layers, 2 converted, 1 kept dense" in text  # uniform: 2 converted


def test_tied_weight_is_kept_dense():
    model = nn.Module()
    model.embed = nn.Embedding(10, 8)
    model.out = nn.Linear(8, 10, bias=False)
    model.out.weight = model.embed.weight
    model.mid = nn.Linear(8, 8)
    report = quiet(model, gblr.GBLRConfig(**SVD))
    assert report.skipped == {"out": "weight tied to another module"}
    assert report.converted == ["mid"] and model.out.weight is model.embed.weight


def test_shared_module_is_replaced_everywhere():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = quiet(model, gblr.GBLRConfig(**SVD))
    assert report.converted == ["0"]
    assert isinstance(model[0], gblr.GBLRLinear) and model[2] is model[0]


def test_a_failing_layer_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '1'.*NaN"):
        quiet(model, gblr.GBLRConfig(**SVD))
    assert all(type(module) is nn.Linear for module in model)


def test_verbose_prints_the_table(capsys):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    report = gblr.convert_(model, gblr.GBLRConfig(**UNIFORM_SVD), progress=False, verbose=True)
    printed = capsys.readouterr().out
    assert printed.strip() == str(report)
    assert "weight error" in printed and "16x16" in printed and "8x16" in printed
    data = report.to_dict()
    assert [row["name"] for row in data["layers"]] == ["0", "1"]
    assert data["flops_ratio"] == report.flops_ratio and data["converted"] == 2
    json.dumps(data)


# -- calibration --------------------------------------------------------------------------------


def test_calibration_collects_inputs_removes_hooks_and_reports_output_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).train()
    # Anisotropic inputs, so that output and weight errors differ.
    batches = [torch.randn(5, 16) * torch.linspace(0.05, 3, 16) for _ in range(3)]
    seen = {}
    for index in (0, 2):
        model[index].register_forward_hook(lambda m, args, out, i=index: seen.setdefault(i, []).append(args[0]))
    originals = {index: model[index] for index in (0, 2)}
    with torch.no_grad():
        for batch in batches:
            model(batch)
    expected = {index: torch.cat(seen[index]) for index in seen}

    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, **SVD), calibration=batches)
    assert report.calibrated and all(row.calibrated for row in report.layers)
    assert model.training and all(module.training for module in model)
    for index, original in originals.items():
        assert len(original._forward_pre_hooks) == 0
        new = model[index]
        x = expected[index][: 3 * 5]  # inputs seen during calibration
        W = original.weight.detach().double()
        output_error = ((x.double() @ (W - new.weight.detach().double()).T).norm() / (x.double() @ W.T).norm()).item()
        assert report[str(index)].relative_error == pytest.approx(output_error, rel=1e-6)
        weight_error = gblr.relative_error(W, new.weight.detach())
        assert abs(output_error - weight_error) > 1e-3
    assert "output error" in str(report)


def test_calibration_hooks_are_removed_when_the_model_fails():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).train()
    with pytest.raises(TypeError, match="bogus"):
        quiet(model, gblr.GBLRConfig(**SVD), calibration=[torch.randn(2, 8), {"bogus": torch.randn(2, 8)}])
    assert all(len(module._forward_pre_hooks) == 0 for module in model.modules())
    assert model.training and all(type(module) is nn.Linear for module in model)


def test_calibration_batch_forms():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, y=None):
            return self.a(x) + (0 if y is None else self.b(y))

    batches = [(torch.randn(2, 8), torch.randn(2, 8)), {"x": torch.randn(3, 8), "y": torch.randn(3, 8)}, torch.randn(4, 8)]
    model = TwoInputs()
    report = quiet(model, gblr.GBLRConfig(**SVD), calibration=batches)
    assert report.converted == ["a", "b"] and all(row.calibrated for row in report.layers)
    with pytest.warns(UserWarning, match="saw no input"):
        report = quiet(TwoInputs(), gblr.GBLRConfig(**SVD), calibration=[torch.randn(4, 8)])
    assert report["a"].calibrated and not report["b"].calibrated
    with pytest.raises(ValueError, match="no batches"):
        quiet(TwoInputs(), gblr.GBLRConfig(**SVD), calibration=[])


def test_calibration_counts_only_real_tokens_of_masked_batches():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)

        def forward(self, hidden, attention_mask):
            return self.proj(hidden) * attention_mask[..., None]

    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 6) * torch.linspace(0.1, 2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    padded = hidden.clone()
    padded[mask == 0] = 100.0  # padding activations must not reach the statistics
    model = Tokens()
    original = model.proj.weight.detach().clone()
    report = quiet(model, gblr.GBLRConfig(allocation="uniform", **SVD),
                   calibration=[{"hidden": padded, "attention_mask": mask}])
    real = gblr.InputStats(6)
    real.update(hidden[mask.bool()])
    expected = gblr.relative_error(original, model.proj.weight.detach(), real)
    assert report["proj"].relative_error == pytest.approx(expected, rel=1e-9)


# -- Hugging Face -------------------------------------------------------------------------------


def test_conv1d_is_converted_from_its_transposed_weight():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=12, nx=20)
    with torch.no_grad():
        conv.bias.normal_()
    model = nn.Sequential(conv)
    x = torch.randn(2, 3, 20)
    reference = gblr.svd_decompose(conv.weight.detach().T, 0.5, bias=conv.bias.detach())
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, allocation="uniform", **SVD))
    assert report.converted == ["0"] and (report["0"].in_features, report["0"].out_features) == (20, 12)
    assert isinstance(model[0], gblr.GBLRLinear)
    assert (model[0].in_features, model[0].out_features) == (20, 12)
    torch.testing.assert_close(model(x), reference(x))
    torch.testing.assert_close(model[0].weight, reference.weight)


def tiny_bert_config():
    transformers = pytest.importorskip("transformers")
    return transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )


def test_tiny_bert_converts_with_dict_calibration():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(tiny_bert_config()).eval()
    batches = [{"input_ids": torch.randint(0, 100, (2, 8))} for _ in range(2)]
    report = quiet(model, gblr.GBLRConfig(flops_ratio=0.5, **SVD), calibration=batches)
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]
    expected = [f"encoder.layer.{i}.{name}" for i in range(2) for name in per_layer] + ["pooler.dense"]
    assert [row.name for row in report.layers] == expected
    assert report.converted == expected and report.calibrated
    assert all(isinstance(model.get_submodule(name), gblr.GBLRLinear) for name in expected)
    assert report.flops_ratio <= 0.5
    assert all(0 <= row.relative_error < 1 for row in report.layers)
    output = model(**batches[0]).last_hidden_state
    assert output.shape == (2, 8, 32) and torch.isfinite(output).all()


def test_hf_all_linear_skips_the_lm_head():
    transformers = pytest.importorskip("transformers")
    model = transformers.BertForMaskedLM(tiny_bert_config())
    targets = names(model)
    assert "cls.predictions.decoder" not in targets and "cls.predictions.transform.dense" in targets
    assert len(targets) == 13


# -- save / load --------------------------------------------------------------------------------


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
