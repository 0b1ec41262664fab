import argparse
import dataclasses
import subprocess
import sys

import pytest

from gblr.cli import add_config_arguments, build_parser, config_from




def test_module_entry_point_and_version():
    result = subprocess.run([sys.executable, "-m", "gblr", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("gblr ")


# -- options generated from the recipe configs -------------------------------------------------------


def test_compress_options_are_the_config_fields():
    from gblr.recipes.compress import CompressConfig

    parser = build_parser()
    assert config_from(parser.parse_args(["compress", "m"]), CompressConfig) == CompressConfig("m")
    args = parser.parse_args([
        "compress", "m", "--flops", "0.3", "--method", "svd", "--target", "encoder.*", "--exclude", "", "--text", "t.txt",
        "--calibration-sentences", "64", "--eval-sentences", "32", "--batch-size", "8", "--max-length", "64",
        "--distill-steps", "5", "--distill-minutes", "1.5", "--lr", "1e-3", "--out", "o", "--seed", "3",
        "--threads", "2", "--no-progress", "--no-pictures", "--calibration", "one-shot",
    ])
    assert config_from(args, CompressConfig) == CompressConfig(
        "m", flops=0.3, method="svd", target="encoder.*", exclude="", text="t.txt", calibration_sentences=64,
        eval_sentences=32, batch_size=8, max_length=64, distill_steps=5, distill_minutes=1.5, lr=1e-3, out="o", seed=3,
        threads=2, progress=False, pictures=False, calibration="one-shot",
    )
    # The causal-LM options; --text takes several paths.
    args = parser.parse_args([
        "compress", "m.gguf", "--text", "docs/", "*.md", "--eval-fraction", "0.2", "--seq-len", "128",
        "--calibration-tokens", "4096", "--eval-tokens", "2048", "--generate-tokens", "16", "--decode-repeats", "0",
    ])
    assert config_from(args, CompressConfig) == CompressConfig(
        "m.gguf", text=["docs/", "*.md"], eval_fraction=0.2, seq_len=128, calibration_tokens=4096, eval_tokens=2048,
        generate_tokens=16, decode_repeats=0,
    )


def test_train_options_are_the_config_fields():
    from gblr.recipes.data import DATASETS
    from gblr.recipes.train import TrainConfig

    parser = build_parser()
    assert config_from(parser.parse_args(["train"]), TrainConfig) == TrainConfig()
    args = parser.parse_args(["train", "--dataset", "cifar10", "--download", "--init-flops-ratio", "0.6", "--resume",
                              "--patch-size", "8", "--struct-lr", "0.01", "--no-progress", "--no-pictures"])
    assert config_from(args, TrainConfig) == TrainConfig(dataset="cifar10", download=True, init_flops_ratio=0.6,
                                                         resume=True, patch_size=8, struct_lr=0.01, progress=False,
                                                         pictures=False)
    for dataset in DATASETS:  # the choices are the datasets the recipe loads, no other
        assert parser.parse_args(["train", "--dataset", dataset]).dataset == dataset
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--dataset", "mnist"])


def test_every_config_field_must_have_a_place_among_the_options():
    @dataclasses.dataclass
    class Config:
        size: int = 1
        forgotten: bool = False

    with pytest.raises(RuntimeError, match="forgotten"):
        add_config_arguments(argparse.ArgumentParser(), Config, {None: {"size": "a size"}})
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Config, {None: {"size": "a size"}}, internal=("forgotten",))
    assert vars(parser.parse_args(["--size", "4"])) == {"size": 4}


# -- help ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "compress", "demo"])
def test_help_shows_every_options_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapped help texts
    from gblr.cli import main

    assert main([command, "--help"]) == 0
    entries = []  # an option's entry: its line, and the next one if a long option put its help there
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif line.startswith("   ") and entries and entries[-1].startswith("--"):
            entries[-1] += " " + line.strip()
    lines = [entry for entry in entries if entry.startswith("--")]
    assert len(lines) == {"train": 43, "compress": 29, "demo": 1}[command]  # every option but -h
    for line in lines:
        assert "(default: " in line, line
    shown = {line.split()[0]: line for line in lines}
    expected = {
        "train": {"--batch-size": "(default: 128)", "--lr": "(default: 0.002)", "--out": "(default: runs/gblr)",
                  "--dataset": "(default: fashion-mnist)", "--limit-test": "(default: all)",
                  "--limit-train": "windows, about one pass)", "--seq-len": "(default: 128)",
                  "--tokenizer": "vocabulary 256)", "--settle-steps": "(default: never early)", "--resume": "(default: off)", "--no-progress": "(default: off)"},
        "compress": {"--flops": "(default: 0.5)", "--method": "(default: gblr)", "--distill-minutes": "(default: none)",
                     "--distill-loss": "(default: kl for causal LMs, cosine for encoders)",
                     "--distill-structure": "(default: off)",
                     "--out": "(default: runs/compress)"},
        "demo": {"--seed": "(default: 0)"},
    }[command]
    for option, default in expected.items():
        assert shown[option].endswith(default), shown[option]


def test_an_option_defaulting_to_none_must_say_what_that_means():
    @dataclasses.dataclass
    class Config:
        limit: int | None = None

    with pytest.raises(RuntimeError, match="--limit"):
        add_config_arguments(argparse.ArgumentParser(), Config, {None: {"limit": "use only N"}})
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Config, {None: {"limit": "use only N (default: all)"}})
    assert parser.parse_args([]).limit is None
