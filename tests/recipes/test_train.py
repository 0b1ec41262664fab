import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from fixtures import write_fashion_mnist

from gblr import FrozenGBLRLinear, flops_report
from gblr.conv import FrozenGBLRConv2d
from gblr.cli import main
from gblr.recipes.train import TrainConfig, fit, train

TINY = dict(dim=16, depth=1, heads=2, patch_size=7, batch_size=32, eval_batch_size=64, progress=False, threads=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=512, test=128)


def config(data_dir, out, **overrides):
    values = dict(TINY, data_dir=str(data_dir), out=str(out), epochs=2, lr=1e-2, flops_target=0.3)
    values.update(overrides)
    return TrainConfig(**values)


def test_train_writes_report_log_checkpoint_and_pictures(data_dir, tmp_path):
    model, report = fit(config(data_dir, tmp_path, epochs=3))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["accuracy"] == report["accuracy"]
    assert report["accuracy"] > 0.5  # the synthetic classes are easy; chance is 0.1
    assert report["flops_ratio"] == pytest.approx(0.3, abs=0.02)
    assert len(report["layers"]) == 6
    assert {"name", "shape", "flops_ratio"} <= set(report["layers"][0])
    assert report["layers"][0]["name"] == "blocks.0.attention.query"
    for row in report["layers"]:  # what each frozen layer kept, from its blocks
        layer = model.get_submodule(row["name"])
        wide = [macs for support, macs in layer.block_macs()
                if 2 * support.in_width >= layer.in_features and 2 * support.out_width >= layer.out_features]
        assert row["blocks"] == len(layer.supports) > 0
        assert row["wide_macs_share"] == pytest.approx(sum(wide) / layer.flops())
        dense = [s.in_width * s.out_width for s, _, right in layer.blocks() if right is None]
        assert row["dense_macs_share"] == pytest.approx(sum(dense) / layer.flops())
    assert set(report["timings"]) >= {"train_seconds", "epoch_seconds", "eval_seconds"}
    # the deployed model is frozen, and its cost is the reported one
    assert all(isinstance(m, FrozenGBLRLinear) for m in (model.blocks[0].mlp.fc1, model.blocks[0].attention.key))
    assert flops_report(model).ratio == pytest.approx(report["flops_ratio"])
    # freezing changes nothing: the last phase trained with the structure fixed and sharp
    assert report["accuracy"] == report["accuracy_before_freeze"]
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert float(rows[-1]["test_accuracy"]) == pytest.approx(report["accuracy_before_freeze"])
    assert report["train_loss"] == pytest.approx(float(rows[-1]["train_loss"]))
    for picture in ("masks.png", "budgets.png"):
        assert (tmp_path / picture).stat().st_size > 1000
    assert (tmp_path / "checkpoint.pt").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left


def test_settle_steps_ends_the_structure_phase_early(data_dir, tmp_path):
    # a vanishing structural learning rate: only the budget moves the supports, and only in its warm-up
    report = train(config(data_dir, tmp_path, struct_lr=1e-9, settle_steps=2))
    assert report["total_steps"] == 2 * (512 // 32)
    assert report["planned_structure_steps"] == round(0.8 * report["total_steps"])
    assert report["planned_structure_steps"] / 2 <= report["structure_steps"] < report["planned_structure_steps"]
    assert report["accuracy"] == report["accuracy_before_freeze"]
    baseline = train(config(data_dir, tmp_path / "lowrank", layer="lowrank"))
    assert baseline["structure_steps"] is None


def test_resume_gives_the_same_result_as_an_uninterrupted_run(data_dir, tmp_path):
    straight = train(config(data_dir, tmp_path / "straight", epochs=3))
    interrupted = train(config(data_dir, tmp_path / "resumed", epochs=3, stop_after=1))
    assert interrupted == {}
    assert not (tmp_path / "resumed" / "report.json").exists()
    resumed = train(config(data_dir, tmp_path / "resumed", epochs=3, resume=True))
    assert resumed["accuracy"] == straight["accuracy"]
    assert resumed["layers"] == straight["layers"]
    first = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    second = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["model"]
    for key in first:
        if isinstance(first[key], torch.Tensor):
            assert torch.equal(first[key], second[key]), key


def test_resume_refuses_a_checkpoint_of_other_settings(data_dir, tmp_path):
    train(config(data_dir, tmp_path, epochs=2, stop_after=1))
    with pytest.raises(ValueError, match="epochs=2 there, 3 here"):
        train(config(data_dir, tmp_path, epochs=3, resume=True))
    # a checkpoint written before a setting existed had that setting's default
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del checkpoint["config"]["init_full_width_share"]
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="init_full_width_share=0.5 there, 1.0 here"):
        train(config(data_dir, tmp_path, epochs=2, resume=True, init_full_width_share=1.0))
    assert train(config(data_dir, tmp_path, epochs=2, resume=True))["flops_ratio"] > 0


@pytest.mark.parametrize("layer", ["dense", "lowrank", "monarch", "blocksparse"])
def test_baseline_layers_train_at_their_ratio(data_dir, tmp_path, layer):
    report = train(config(data_dir, tmp_path, layer=layer, epochs=1, pictures=True))
    if layer == "dense":
        assert report["flops_ratio"] == 1.0
    else:
        assert 0.15 <= report["flops_ratio"] <= 0.3
    assert (tmp_path / "budgets.png").exists() and not (tmp_path / "masks.png").exists()


def test_cli_train_prints_the_outcome(data_dir, tmp_path, capsys):
    code = main(["train", "--data-dir", str(data_dir), "--out", str(tmp_path), "--epochs", "1", "--dim", "16",
                 "--depth", "1", "--heads", "2", "--patch-size", "7", "--batch-size", "32", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "FLOPs ratio" in out and str(tmp_path / "masks.png") in out


def test_cli_missing_data_says_how_to_get_it(tmp_path, capsys):
    code = main(["train", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_config_errors_name_the_field(data_dir, tmp_path):
    with pytest.raises(ValueError, match="flops_target"):
        train(config(data_dir, tmp_path, flops_target=0.0))
    with pytest.raises(ValueError, match="layer must be one of"):
        train(config(data_dir, tmp_path, layer="sparse"))
    with pytest.raises(ValueError, match="batch_size=1024 is larger"):
        train(config(data_dir, tmp_path, batch_size=1024))
    with pytest.raises(ValueError, match="init_full_width_share"):
        train(config(data_dir, tmp_path, init_full_width_share=1.5))


def test_starting_budget_split_reaches_the_layers(data_dir, tmp_path):
    # (no dense blocks: they would hold most of the start, whatever the components' split)
    banded = train(config(data_dir, tmp_path / "bands", epochs=1, init_full_width_share=1.0, dense_blocks=0,
                          pictures=False))
    local = train(config(data_dir, tmp_path / "blocks", epochs=1, init_full_width_share=0.0, dense_blocks=0,
                         pictures=False))
    # started without full-width components, the learned layers keep only local blocks; started
    # with full-width components only, mostly wide ones
    assert all(row["wide_macs_share"] == 0.0 for row in local["layers"])
    macs = [row["flops_ratio"] * row["shape"][0] * row["shape"][1] for row in banded["layers"]]
    assert sum(m * row["wide_macs_share"] for m, row in zip(macs, banded["layers"])) > 0.5 * sum(macs)


WORKER = """
import sys, torch
import gblr.linear
from gblr.recipes.train import TrainConfig, fit
out, data_dir = sys.argv[1], sys.argv[2]
# the compact product in the content phase even for layers this small (the structure's parameters must
# still take part in the loss under DistributedDataParallel)
gblr.linear.masked_cost = lambda *args, **kwargs: float("inf")
model, _ = fit(TrainConfig(data_dir=data_dir, out=out, epochs=1, limit_train=160, limit_test=32, batch_size=32,
                           dim=16, depth=1, heads=2, patch_size=7, lr=3e-3, flops_target=0.3, progress=False,
                           pictures=False, threads=1, structure_fraction=0.4))
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}, f"{out}/rank{rank}.pt")
"""


def test_distributed_training_matches_single_process(data_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    subprocess.run([sys.executable, str(script), str(single), str(data_dir)], check=True, env=env, timeout=300)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         str(script), str(multi), str(data_dir)],
        check=True, env=env, timeout=300,
    )
    reference = torch.load(single / "rank0.pt")
    ranks = [torch.load(multi / f"rank{r}.pt") for r in (0, 1)]
    for key, value in reference.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs across ranks"
        # The key bias has a zero true gradient (softmax ignores a per-query constant); AdamW turns
        # the rounding noise left in it into full-size steps, so only it may drift further.
        tolerance = 3e-4 if key.endswith("attention.key.bias") else 1e-6
        torch.testing.assert_close(ranks[0][key], value, rtol=0, atol=tolerance,
                                   msg=lambda m: f"{key} differs from 1 process: {m}")


# -- the run's folder, checkpoints, Ctrl-C and the files it writes --------------------------------------

TINY_ARGS = ["--dim", "16", "--depth", "1", "--heads", "2", "--patch-size", "7", "--batch-size", "32",
             "--threads", "1", "--no-progress"]


def cli_train(data_dir, out, *extra):
    """``gblr train`` on the tiny data, pictures off unless asked for."""
    return main(["train", "--data-dir", str(data_dir), "--out", str(out), *TINY_ARGS, "--lr", "0.01", *extra])


def saved_epoch(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_new_run_refuses_a_folder_that_holds_a_run(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_train(data_dir, out, "--epochs", "2", "--no-pictures") == 0
    checkpoint = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    # Before: the second run replaced epoch 2's checkpoint with its epoch 1. Now it refuses, and
    # says what to pass instead; the first run's files are untouched.
    assert cli_train(data_dir, out, "--epochs", "1", "--no-pictures") == 2
    message = one_line(capsys.readouterr().err)
    assert message.startswith("error:") and str(out) in message
    assert "--resume to continue" in message and "--overwrite to start afresh" in message
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(config(data_dir, out, epochs=1))
    # --overwrite starts afresh: none of the first run's files is left beside the new run's
    # (here stopped after 1 of 2 epochs: no report yet)
    assert (out / "report.json").exists()
    assert cli_train(data_dir, out, "--epochs", "2", "--stop-after", "1", "--overwrite") == 0
    assert saved_epoch(out) == 1 and not (out / "report.json").exists()
    assert [int(row["epoch"]) for row in csv.DictReader((out / "log.csv").open())] == [1]
    # --resume continues it; the two together are refused as argument errors
    assert cli_train(data_dir, out, "--epochs", "2", "--resume", "--no-pictures") == 0
    assert saved_epoch(out) == 2 and (out / "report.json").exists()
    capsys.readouterr()
    assert cli_train(data_dir, out, "--epochs", "2", "--resume", "--overwrite") == 2
    assert "--overwrite" in capsys.readouterr().err.strip().splitlines()[-1]


def test_an_overwrite_that_fails_to_start_leaves_the_previous_run(data_dir, tmp_path):
    out = tmp_path / "run"
    train(config(data_dir, out, epochs=1, pictures=False))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(ValueError, match="larger than the training set"):
        train(config(data_dir, out, epochs=1, overwrite=True, batch_size=4096))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_checkpoints_hold_plain_data_and_load_with_weights_only(data_dir, tmp_path):
    train(config(data_dir, tmp_path, epochs=2, stop_after=1))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # no pickled objects in it
    assert state["epoch"] == 1 and state["config"]["epochs"] == 2 and state["rng"].dtype == torch.uint8


class RunsCode:
    """A pickled object that, when unpickled, runs code: here it creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("content", ["text", "truncated", "empty", "code", "not a checkpoint"])
def test_resume_names_a_file_that_is_not_a_checkpoint(data_dir, tmp_path, capsys, content):
    out = tmp_path / "run"
    train(config(data_dir, out, epochs=2, stop_after=1))
    path = out / "checkpoint.pt"
    marker = tmp_path / "code-ran"
    if content == "text":
        path.write_text("epoch 1 of 2, loss 0.5\n")
    elif content == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "code":  # someone else's checkpoint: loading it must not run its code
        state = torch.load(path, weights_only=True)
        state["learner"]["extra"] = RunsCode(marker)
        torch.save(state, path)
    else:
        torch.save({"weights": torch.ones(3)}, path)
    with pytest.raises(ValueError, match=f"cannot resume \\(--resume\\) from {path}"):
        train(config(data_dir, out, epochs=2, resume=True))
    assert cli_train(data_dir, out, "--epochs", "2", "--resume") == 2
    assert str(path) in one_line(capsys.readouterr().err)
    assert not marker.exists()


def test_resume_without_a_checkpoint_says_it_starts_a_new_run(data_dir, tmp_path, capsys):
    out = tmp_path / "fresh"
    assert cli_train(data_dir, out, "--epochs", "1", "--resume", "--no-pictures") == 0
    assert f"no checkpoint in {out}: starting a new run" in capsys.readouterr().err
    assert saved_epoch(out) == 1


def test_an_output_folder_below_a_file_fails_before_training(data_dir, tmp_path, capsys, monkeypatch):
    import gblr.recipes.train as recipe

    def no_training(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(recipe, "batches", no_training)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    # Before: an epoch of training, then a traceback when the first checkpoint was written.
    assert cli_train(data_dir, blocker / "run", "--epochs", "1") == 2
    message = one_line(capsys.readouterr().err)
    assert message == f"error: out (--out): {blocker / 'run'} lies below {blocker}, which is a file, not a folder"
    assert cli_train(data_dir, blocker, "--epochs", "1") == 2
    assert "is a file" in one_line(capsys.readouterr().err)


class Interrupt:
    """Stands in for the recipe's ``batches``: the real batches, with Ctrl-C (KeyboardInterrupt)
    after ``after`` batches of epoch ``epoch`` (counted from 0)."""

    def __init__(self, epoch, after):
        from gblr.recipes.data import batches

        self.batches, self.epoch, self.after, self.calls = batches, epoch, after, 0

    def __call__(self, *args, **kwargs):
        epoch, self.calls = self.calls, self.calls + 1
        for index, batch in enumerate(self.batches(*args, **kwargs)):
            if epoch == self.epoch and index == self.after:
                raise KeyboardInterrupt
            yield batch


def test_ctrl_c_keeps_the_last_epoch_and_resumes_to_the_same_result(data_dir, tmp_path, capsys, monkeypatch):
    import gblr.recipes.train as recipe

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert cli_train(data_dir, straight, "--epochs", "3", "--no-pictures") == 0
    monkeypatch.setattr(recipe, "batches", Interrupt(epoch=1, after=5))
    capsys.readouterr()
    # Before: a traceback. Now: exit code 130 and one line saying what is saved and how to go on.
    assert cli_train(data_dir, interrupted, "--epochs", "3", "--no-pictures") == 130
    message = one_line(capsys.readouterr().err)
    assert message == (f"interrupted; {interrupted / 'checkpoint.pt'} holds 1 of 3 epochs: continue with the "
                       "same options and --resume")
    assert saved_epoch(interrupted) == 1
    assert not [p for p in os.listdir(interrupted) if p.startswith(".")]  # no temporary files left
    monkeypatch.undo()
    assert cli_train(data_dir, interrupted, "--epochs", "3", "--no-pictures", "--resume") == 0
    first = torch.load(straight / "checkpoint.pt", weights_only=True)
    second = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    for key, value in first["model"].items():
        assert torch.equal(value, second["model"][key]) if isinstance(value, torch.Tensor) else \
            value == second["model"][key], key
    assert json.loads((straight / "report.json").read_text())["accuracy"] == \
        json.loads((interrupted / "report.json").read_text())["accuracy"]


def test_ctrl_c_in_the_first_epoch_says_nothing_was_saved(data_dir, tmp_path, capsys, monkeypatch):
    import gblr.recipes.train as recipe

    monkeypatch.setattr(recipe, "batches", Interrupt(epoch=0, after=2))
    assert cli_train(data_dir, tmp_path / "run", "--epochs", "2") == 130
    assert "nothing was saved" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    monkeypatch.setattr(recipe, "batches", Interrupt(epoch=0, after=2))
    with pytest.raises(KeyboardInterrupt):  # for library callers, still a KeyboardInterrupt
        train(config(data_dir, tmp_path / "library", epochs=2))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_of_a_run_follows_the_umask(data_dir, tmp_path, umask):
    out = tmp_path / "run"
    previous = os.umask(umask)
    try:
        assert cli_train(data_dir, out, "--epochs", "1") == 0
    finally:
        os.umask(previous)
    names = sorted(path.name for path in out.rglob("*"))
    assert {"checkpoint.pt", "log.csv", "report.json", "masks.png", "budgets.png"} <= set(names), names
    for path in [out, *out.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, (path.name, oct(path.stat().st_mode & 0o777))


@pytest.mark.parametrize("field, value", [("limit_train", 0), ("limit_test", -1), ("epochs", 0), ("lr", -1.0),
                                          ("lr", float("nan")), ("threads", 0), ("stop_after", 0), ("seed", -1)])
def test_config_rejects_values_that_used_to_mean_something_else(field, value):
    # --limit-train 0 trained on everything (0 read as "no limit"), --lr -1 trained backwards
    option = "--" + field.replace("_", "-")
    with pytest.raises(ValueError, match=f"{field} \\({option}\\)"):
        TrainConfig(**{field: value}).validate()


# -- the ResNet: its 3x3 convolutions are the replaced layers ------------------------------------------

RESNET = dict(model="resnet", width=4, limit_train=64, limit_test=64, epochs=2)


def test_resnet_trains_gblr_convolutions_to_the_target_and_freezes_them(data_dir, tmp_path):
    model, report = fit(config(data_dir, tmp_path, **RESNET))
    assert report["flops_ratio"] == pytest.approx(0.3, abs=0.02)
    names = [f"blocks.{b}.conv{c}" for b in range(3) for c in (1, 2)]
    assert [row["name"] for row in report["layers"]] == names  # not the stem, shortcuts or head
    assert [row["shape"] for row in report["layers"]] == [[4, 36], [4, 36], [8, 36], [8, 72], [16, 72], [16, 144]]
    for row in report["layers"]:
        layer = model.get_submodule(row["name"])
        assert isinstance(layer, FrozenGBLRConv2d) and row["blocks"] == len(layer.supports) > 0
    # MACs per example: each layer's MACs per pixel times its output pixels (28x28, 14x14, 7x7)
    pixels = [784, 784, 196, 196, 49, 49]
    assert report["macs"] == sum(model.get_submodule(name).flops() * p for name, p in zip(names, pixels))
    assert report["dense_macs"] == sum(o * i * p for (o, i), p in zip([r["shape"] for r in report["layers"]], pixels))
    assert report["accuracy"] == report["accuracy_before_freeze"]
    assert report["config"]["model"] == "resnet" and report["config"]["width"] == 4
    assert report["dataset"]["train"] == 64
    for picture in ("masks.png", "budgets.png"):
        assert (tmp_path / picture).stat().st_size > 1000
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [int(row["epoch"]) for row in rows] == [1, 2]


@pytest.mark.parametrize("layer", ["dense", "lowrank", "blocksparse"])
def test_resnet_baselines_train_at_their_ratio(data_dir, tmp_path, layer):
    report = train(config(data_dir, tmp_path, layer=layer, pictures=False, stage_depth=2, **RESNET))
    assert len(report["layers"]) == 12  # 3 stages of 2 blocks of 2 convolutions
    if layer == "dense":
        assert report["flops_ratio"] == 1.0
    else:
        assert 0.15 <= report["flops_ratio"] <= 0.3
    assert 0.0 <= report["accuracy"] <= 1.0 and report["train_loss"] > 0


def test_cli_trains_the_resnet_and_refuses_a_monarch_one(data_dir, tmp_path, capsys):
    code = main(["train", "--data-dir", str(data_dir), "--out", str(tmp_path / "run"), "--model", "resnet",
                 "--width", "4", "--layer", "lowrank", "--epochs", "1", "--limit-train", "64", "--batch-size", "32",
                 "--threads", "1", "--no-progress", "--no-pictures"])
    assert code == 0
    out = capsys.readouterr().out
    assert "FLOPs ratio 0.2" in out
    assert json.loads((tmp_path / "run" / "report.json").read_text())["config"]["stage_depth"] == 1
    code = main(["train", "--data-dir", str(data_dir), "--out", str(tmp_path / "monarch"), "--model", "resnet",
                 "--layer", "monarch"])
    assert code == 2
    assert "there is no monarch convolution" in capsys.readouterr().err
    assert not (tmp_path / "monarch").exists()
    with pytest.raises(ValueError, match=r"width \(--width\) must be a positive int, got 0"):
        TrainConfig(model="resnet", width=0).validate()
    with pytest.raises(ValueError, match=r"stage_depth \(--stage-depth\)"):
        TrainConfig(model="resnet", stage_depth=-1).validate()
