"""Sequential calibration: finding the blocks, running them one by one, falling back, restoring."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import gblr
from conversion import SVD, UNIFORM_SVD, Net, quiet, tiny_bert_config
from gblr.sequential import find_stages
from gblr.targets import find_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    assert config.use_cache  # a key-value cache reaches every block: sequential calibration must drop it
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(count=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 100, (2, 12), generator=generator)} for _ in range(count)]


def stages_of(model, **config):
    return find_stages(model, find_targets(model, gblr.GBLRConfig(**config)))


def no_fallback(model, config, batches):
    """convert_ with warnings as errors: sequential calibration must not fall back."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return quiet(model, config, batches)


class Shared(nn.Module):
    """Two blocks that both call one shared linear layer."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([nn.ModuleDict({"own": nn.Linear(8, 8), "shared": shared}) for _ in range(2)])


class Scaled(nn.Module):
    """Blocks that each get another keyword argument: running them with the first one's is wrong."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ScaledBlock() for _ in range(3)])

    def forward(self, x):
        for index, block in enumerate(self.blocks):
            x = block(x, scale=index + 1.0)
        return x


class ScaledBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x, scale=1.0):
        return torch.tanh(self.linear(x) * scale)


class ByKeyword(nn.Module):
    """Blocks called with keywords only, the hidden states among them."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([KeywordBlock() for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = block(gain=torch.tensor(0.5), hidden=x)
        return x


class KeywordBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, hidden, gain):
        return hidden + gain * self.down(torch.relu(self.up(hidden)))


def test_stages_are_found_by_structure():
    stages = stages_of(Net())
    assert stages.path == "layers" and len(stages) == 2 and str(stages) == "layers (2 blocks)"
    assert [[target.name for target in block] for block in stages.members] == [
        [f"layers.{i}.{name}" for name in ("query", "xquery", "ffn.0", "ffn.2")] for i in range(2)
    ]
    assert stages.outside == []  # the head is the output embedding: not a target
    stages = stages_of(Net(), target_modules="all-linear", exclude_modules=None, filter_fn=lambda name, m: True)
    assert stages.path == "layers"  # the inner Sequentials (ffn) hold fewer targets
    stages = stages_of(tiny_llama())
    assert stages.path == "model.layers" and [len(block) for block in stages.members] == [7, 7]
    stages = stages_of(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)))
    assert stages.path == "" and [[t.name for t in block] for block in stages.members] == [["0"], [], ["2"]]
    assert str(stages) == "the model (3 blocks)"
    stages = stages_of(Shared())
    assert [[t.name for t in block] for block in stages.members] == [["blocks.0.own"], ["blocks.1.own"]]
    assert [t.name for t in stages.outside] == ["blocks.0.shared"]  # in both blocks: calibrated last

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    assert stages_of(Flat()) is None


def test_sequential_llama_drops_the_cache_and_keeps_the_split():
    dense = tiny_llama()
    batches = token_batches()
    models, reports = {}, {}
    for mode in ("one-shot", "sequential"):
        models[mode] = copy.deepcopy(dense)
        config = gblr.GBLRConfig(flops_ratio=0.5, calibration=mode, **SVD)
        reports[mode] = no_fallback(models[mode], config, batches)
    report = reports["sequential"]
    assert report.calibration == "sequential" and report.stages == "model.layers (2 blocks)"
    assert "sequential calibration over model.layers (2 blocks)" in str(report)
    assert report.to_dict()["calibration"] == "sequential"
    assert report.flops_ratio <= 0.5 and all(row.calibrated for row in report.layers)
    assert [row.ratio for row in report.layers] == [row.ratio for row in reports["one-shot"].layers]  # same split
    assert all(0 <= row.relative_error < 1 for row in report.layers)
    with torch.no_grad():
        assert all(torch.isfinite(models["sequential"](**batch).logits).all() for batch in batches)
    # (Whether it beats one-shot is measured on a trained model: benchmarks/sequential_calibration.py.)


def test_padding_never_reaches_the_statistics():
    results = []
    for pad in (5, 7):
        batch = {"input_ids": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3)),
                 "attention_mask": torch.ones(2, 12, dtype=torch.long)}
        batch["attention_mask"][1, 8:] = 0
        batch["input_ids"][1, 8:] = pad  # right padding: the real tokens never attend to it
        model = tiny_llama()
        results.append(no_fallback(model, gblr.GBLRConfig(calibration="sequential", flops_ratio=0.5, **SVD), [batch]))
    assert [row.relative_error for row in results[0].layers] == [row.relative_error for row in results[1].layers]


def test_blocks_that_need_their_own_arguments_fall_back_to_one_shot():
    torch.manual_seed(0)
    model = Scaled()
    with pytest.warns(UserWarning, match=r"sequential calibration needs the targets in a list of blocks .* each with "
                                         r"the first block's keyword arguments, give another output .* calibrating "
                                         r"one-shot instead"):
        report = quiet(model, gblr.GBLRConfig(calibration="sequential", **SVD), [torch.randn(4, 16) for _ in range(2)])
    assert report.calibration == "one-shot" and report.stages is None and report.calibrated
    with pytest.warns(UserWarning, match="no nn.ModuleList or nn.Sequential of two or more blocks holds a target"):
        report = quiet(ScaledBlock(), gblr.GBLRConfig(calibration="sequential", **SVD), [torch.randn(2, 16)])
    assert report.calibration == "one-shot"


def test_blocks_called_by_keyword_and_a_one_pass_iterator():
    torch.manual_seed(0)
    model = ByKeyword()
    batches = [torch.randn(6, 16) for _ in range(2)]
    report = no_fallback(model, gblr.GBLRConfig(calibration="sequential", flops_ratio=0.5, **UNIFORM_SVD), iter(batches))
    assert report.calibration == "sequential" and len(report.converted) == 6
    assert torch.isfinite(model(batches[0])).all()


def test_an_error_in_a_later_block_puts_every_layer_back():
    torch.manual_seed(0)
    model = Net().train()
    with torch.no_grad():
        model.layers[1].ffn[2].weight[0, 0] = float("nan")  # found when block 1 is decomposed, after block 0
    originals = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"layer 'layers.1.ffn.2'.*NaN"):
        quiet(model, gblr.GBLRConfig(calibration="sequential", **UNIFORM_SVD), [torch.randn(4, 16)])
    assert all(module is originals[name] for name, module in model.named_modules())
    assert all(module.training for module in model.modules())
    assert all(len(module._forward_pre_hooks) == 0 and len(module._forward_hooks) == 0 for module in model.modules())


def test_targets_outside_the_blocks_are_calibrated_last():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(tiny_bert_config()).eval()
    batches = [{"input_ids": torch.randint(0, 100, (2, 8))} for _ in range(2)]
    report = no_fallback(model, gblr.GBLRConfig(calibration="sequential", flops_ratio=0.5, **SVD), batches)
    assert report.stages == "encoder.layer (2 blocks)"
    assert "pooler.dense" in report.converted and report["pooler.dense"].calibrated
    assert 0 < report["pooler.dense"].relative_error < 1
    assert torch.isfinite(model(**batches[0]).pooler_output).all()


@pytest.mark.parametrize("calibration", ["sequential", "one-shot"])
def test_fisher_allocation_on_a_llama_spends_the_same_budget_otherwise(calibration):
    batches = token_batches()
    ratios = {}
    for allocation in ("error", "fisher"):
        model = tiny_llama()
        config = gblr.GBLRConfig(flops_ratio=0.6, allocation=allocation, method="svd", calibration=calibration)
        report = no_fallback(model, config, batches) if calibration == "sequential" else quiet(model, config, batches)
        assert report.flops_ratio == pytest.approx(0.6, abs=0.02)
        ratios[allocation] = [row.ratio for row in report.layers]
        assert all(p.grad is None for p in model.parameters())
    assert ratios["fisher"] != ratios["error"]  # the sensitivities moved budget between layers
