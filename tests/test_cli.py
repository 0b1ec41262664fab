import json
import re
import subprocess
import sys

import pytest
import torch

from gblr.cli import main


def test_demo_shows_exact_structures_and_a_faithful_frozen_model(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    errors = [float(value) for value in re.findall(r"relative error (\S+)", out)]
    assert len(errors) == 3 and max(errors) < 1e-10
    for macs, native in re.findall(r"MACs\s+(\d+) \(native (\d+)\)", out):
        assert macs == native
    difference = float(re.search(r"max difference (\S+)", out).group(1))
    assert difference < 1e-5
    assert float(re.search(r"speed-up (\S+)x", out).group(1)) > 1.0


def test_module_entry_point_and_version():
    result = subprocess.run([sys.executable, "-m", "gblr", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("gblr ")


# -- gblr compress ------------------------------------------------------------------------------------


def test_compress_a_tiny_bert_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import gblr
    from gblr.recipes.text import embedding_fidelity, split_sentences, token_batches
    from test_text import save_tiny_bert

    threads = torch.get_num_threads()
    folder = save_tiny_bert(tmp_path / "tiny")
    out = tmp_path / "out"
    try:
        code = main(["compress", str(folder), "--flops", "0.5", "--out", str(out), "--calibration-sentences", "48",
                     "--eval-sentences", "24", "--batch-size", "16", "--distill-steps", "12", "--lr", "1e-3",
                     "--method", "svd", "--threads", "1", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())

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


def test_compress_target_regex_text_file_and_errors(tmp_path, capsys):
    pytest.importorskip("transformers")
    from test_text import save_tiny_bert

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

    assert main(["compress", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["compress", str(folder), "--flops", "1.5"]) == 2
    assert "--flops" in capsys.readouterr().err
    assert main(["compress", str(folder), "--target", "nothing.*", "--out", str(out)]) == 2
    assert "matches none" in capsys.readouterr().err
    assert main(["compress", str(folder), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "text file not found" in capsys.readouterr().err
