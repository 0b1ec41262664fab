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
        "--threads", "2", "--no-progress", "--no-pictures",
    ])
    assert config_from(args, CompressConfig) == CompressConfig(
        "m", flops=0.3, method="svd", target="encoder.*", exclude="", text="t.txt", calibration_sentences=64,
        eval_sentences=32, batch_size=8, max_length=64, distill_steps=5, distill_minutes=1.5, lr=1e-3, out="o", seed=3,
        threads=2, progress=False, pictures=False,
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
