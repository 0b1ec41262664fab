"""The compression recipe behind `gblr compress`: which layers, the config's checks, a whole run on a
tiny BERT folder (conversion, distillation, fidelity, saved layers that load back), and the command
line around it (options, exit codes, error messages)."""

import json

import pytest
import torch
from torch import nn

import gblr
from gblr.cli import main
from gblr.recipes.compress import POOLER, CompressConfig, compress, linear_targets


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100)
    return transformers.BertModel(config)


ENCODER = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense"]


def test_default_targets_are_all_linear_but_the_pooler():
    model = tiny_bert()
    encoder = [f"encoder.layer.{i}.{name}" for i in range(2) for name in ENCODER]
    assert linear_targets(model) == encoder
    # The pooler is left out by the recipe's exclude default, not by "all-linear" itself.
    assert CompressConfig("m").gblr_config().exclude_modules == POOLER
    assert linear_targets(model, exclude=None) == linear_targets(model, exclude="") == [*encoder, "pooler.dense"]
    assert linear_targets(model, r"encoder\.layer\.1\..*") == encoder[6:]
    # The exclusion matches whole path components named "pooler", wherever they sit, not substrings.
    model = nn.ModuleDict({
        "pooler": nn.Linear(4, 4),
        "bert": nn.ModuleDict({"pooler": nn.ModuleDict({"dense": nn.Linear(4, 4)})}),
        "poolers": nn.ModuleDict({"dense": nn.Linear(4, 4)}),
        "xpooler": nn.Linear(4, 4),
    })
    assert linear_targets(model) == ["poolers.dense", "xpooler"]


@pytest.mark.parametrize(
    "changes, option",
    [
        ({"flops": 1.5}, "--flops"),
        ({"flops": 0}, "--flops"),
        ({"method": "tucker"}, "--method"),
        ({"calibration_sentences": 0}, "--calibration-sentences"),
        ({"eval_sentences": -1}, "--eval-sentences"),
        ({"batch_size": 0}, "--batch-size"),
        ({"distill_steps": -1}, "--distill-steps"),
        ({"distill_minutes": 0}, "--distill-minutes"),
        ({"distill_loss": "kld"}, "--distill-loss"),
        ({"allocation": "greedy"}, "--allocation"),
        ({"target": "encoder.("}, "--target"),
        ({"exclude": "all-linear"}, "--exclude"),
    ],
)
def test_config_names_the_bad_field_and_its_option(changes, option):
    field = next(iter(changes))
    with pytest.raises(ValueError, match=f"{field} \\({option}\\)"):
        compress(CompressConfig("nowhere", **changes))


def test_compress_a_tiny_bert_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from fixtures import save_tiny_bert

    from gblr.recipes.sentences import split_sentences
    from gblr.recipes.text import embedding_fidelity, token_batches

    threads = torch.get_num_threads()
    folder = save_tiny_bert(tmp_path / "tiny")
    out = tmp_path / "out"
    try:
        returned = compress(CompressConfig(str(folder), flops=0.5, out=str(out), calibration_sentences=48,
                                           eval_sentences=24, batch_size=16, distill_steps=12, lr=1e-3, method="svd",
                                           threads=1, progress=False))
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(returned, default=str))

    # FLOPs: the 12 encoder linears of a 2-layer BERT (hidden 32, intermediate 64), not the pooler.
    names = [layer["name"] for layer in report["layers"]]
    assert len(names) == 12 and not any(name.startswith("pooler") for name in names)
    assert report["dense_macs"] == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert report["macs"] == sum(layer["gblr_macs"] for layer in report["layers"])
    assert report["flops_ratio"] == pytest.approx(report["macs"] / report["dense_macs"])
    assert report["flops_ratio"] <= 0.5 + 1e-9
    assert f"FLOPs ratio {report['flops_ratio']:.3f}" in printed
    # Fidelity before and after distillation, both printed; the final one is the distilled one.
    assert 0.3 < report["fidelity"]["converted"] < 1.0 and 0.3 < report["fidelity"]["distilled"] <= 1.0
    assert report["fidelity_final"] == report["fidelity"]["distilled"]
    assert f"{report['fidelity']['converted']:.4f}" in printed and f"{report['fidelity']['distilled']:.4f}" in printed
    assert report["distillation"]["steps"] == 12
    assert report["sentences"] == {"source": "generated", "seed": 0, "calibration": 48, "evaluation": 24,
                                   "max_length": 128, "batch_size": 16}
    assert report["conversion"]["method"] == "svd" and report["conversion"]["calibrated"]
    assert (out / "masks.png").stat().st_size > 1000 and report["pictures"] == [str(out / "masks.png")]

    # The saved layers, put into a fresh copy of the base model, give the same embeddings: the
    # held-out fidelity in the report is reproduced.
    base = transformers.AutoModel.from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    _, held_out = split_sentences(None, 48, 24, seed=0)
    batches = token_batches(tokenizer, held_out, batch_size=16)
    original = transformers.AutoModel.from_pretrained(str(folder)).eval()
    loaded = gblr.load_pretrained(base, out / "model")
    # (the allocation may keep a layer dense; those stay the base model's nn.Linear)
    converted = report["conversion"]["converted"]
    assert converted >= 6 and sum(isinstance(m, gblr.GBLRLinear) for m in loaded.modules()) == converted
    assert embedding_fidelity(loaded, original, batches) == pytest.approx(report["fidelity_final"], abs=1e-6)


# -- the command line ------------------------------------------------------------------------------------


def test_compress_target_regex_text_file_and_errors(tmp_path, capsys):
    pytest.importorskip("transformers")
    from fixtures import save_tiny_bert

    threads = torch.get_num_threads()
    folder = save_tiny_bert(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"The chef baked bread number {i}. The pilot flew {i} times!" for i in range(30)))
    out = tmp_path / "out"
    try:
        code = main(["compress", str(folder), "--flops", "0.3", "--out", str(out), "--text", str(text),
                     "--target", r"encoder\.layer\.0\..*", "--calibration-sentences", "40", "--eval-sentences", "20",
                     "--threads", "1", "--no-progress", "--no-pictures"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [layer["name"].split(".")[2] for layer in report["layers"]] == ["0"] * 6
    assert report["sentences"]["source"] == str(text)
    assert (report["sentences"]["calibration"], report["sentences"]["evaluation"]) == (40, 20)
    assert report["distillation"] is None and "distilled" not in report["fidelity"]
    assert report["flops_ratio"] <= 0.3 + 1e-9 and not (out / "masks.png").exists()
    capsys.readouterr()

    assert main(["compress", str(folder), "--flops", "0.3", "--out", str(out)]) == 2  # it holds a model now
    assert "--overwrite" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "nowhere"), "--out", str(out), "--overwrite"]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["compress", str(folder), "--flops", "1.5"]) == 2
    assert "--flops" in capsys.readouterr().err
    assert main(["compress", str(folder), "--target", "nothing.*", "--out", str(out), "--overwrite"]) == 2
    assert "matches none" in capsys.readouterr().err
    assert main(["compress", str(folder), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "text file not found" in capsys.readouterr().err


def test_every_file_of_a_compression_follows_the_umask(tmp_path):
    pytest.importorskip("transformers")
    import os

    from fixtures import save_tiny_bert

    folder = save_tiny_bert(tmp_path / "tiny")
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    previous = os.umask(0o022)
    try:
        assert main(["compress", str(folder), "--flops", "0.5", "--method", "svd", "--out", str(out),
                     "--calibration-sentences", "16", "--eval-sentences", "8", "--threads", "1",
                     "--no-progress"]) == 0
    finally:
        os.umask(previous)
        torch.set_num_threads(threads)
    files = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    assert "report.json" in files and "masks.png" in files and any(name.startswith("model/") for name in files)
    for path in [out, *out.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


@pytest.mark.parametrize("argv, option", [
    (["--max-length", "1"], "--max-length"),
    (["--lr", "0"], "--lr"),
    (["--distill-minutes", "-1"], "--distill-minutes"),
    (["--distill-minutes", "nan"], "--distill-minutes"),
    (["--threads", "0"], "--threads"),
    (["--seed", "-1"], "--seed"),
])
def test_bad_options_are_argument_errors_before_any_work(tmp_path, capsys, argv, option):
    # Before: a traceback (or, for --distill-minutes nan, a run with no time limit).
    assert main(["compress", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and option in err.strip().splitlines()[-1]
    assert err.strip().splitlines()[-1].startswith("gblr compress: error:")


@pytest.mark.parametrize("learn", [False, True])
def test_distillation_keeps_the_converted_structure_unless_asked_to_learn_it(learn):
    from gblr.recipes.compress import ENCODER as ENCODER_KIND
    from gblr.recipes.compress import run_distillation

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    student = nn.Sequential(gblr.GBLRLinear(32, 64, sigma=5.0), nn.GELU(), gblr.GBLRLinear(64, 32, sigma=5.0))
    layers = [student[0], student[2]]
    structure = [p.detach().clone() for layer in layers for p in layer.structural_parameters()]
    batches = [torch.randn(64, 32) for _ in range(2)]
    config = CompressConfig("unused", distill_steps=30, lr=3e-3, distill_loss="mse", distill_structure=learn,
                            progress=False)
    entry, losses = run_distillation(student, teacher, batches, config, ENCODER_KIND, struct_lr=5e-2)
    assert losses[-1] < losses[0] and entry["structure"] == ("learned" if learn else "fixed")
    moved = [not torch.equal(p.detach(), q) for p, q in zip(
        [p for layer in layers for p in layer.structural_parameters()], structure)]
    assert any(moved) == learn
