"""Bad command lines for `gblr train`, `gblr compress` and `gblr demo`, one table.

Each row is a command line that must be refused before any work: bad numbers (zero, negative,
out of range, NaN, infinity, not a number), unknown choices and options, contradicting options,
missing paths, files where folders are wanted, a text file that is not UTF-8, folders that
cannot be created (a name too long, a place below /proc), a folder that holds another run, a
checkpoint that is not one, data that cannot serve the settings, and (when not run as root, who
reads and writes regardless of permissions) folders that cannot be read or written. For each
the test asserts:

- exit code 2;
- no traceback, and one error line on stderr that names the option (or, for `compress`, the
  positional `model_dir`): argparse's usage block then ``gblr COMMAND: error: ...`` for an
  argument error, ``error: ...`` alone for what the recipe finds (the one exception: missing
  data, whose message goes on to list the three ways to get it);
- that nothing ran: training, loading the model to compress and the tour are replaced by stubs
  that fail the test, and a run already in the output folder is left as it was.

Everything runs in-process on tiny files made here, in a temporary working folder (the default
``--out`` is relative), so the whole table takes seconds.
"""

import os

import pytest
from fixtures import write_fashion_mnist

import gblr.recipes.compress
import gblr.recipes.compress_lm
import gblr.recipes.demo
import gblr.recipes.train
from gblr.cli import main

NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the permissions")
LINUX = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where no folder can be made")

# (command line with {placeholders} for the paths made by the `paths` fixture, what the error line names)
CASES = [
    # -- gblr train: numbers
    ("train --epochs 0", "--epochs"),
    ("train --epochs abc", "--epochs"),
    ("train --batch-size 0", "--batch-size"),
    ("train --lr -1", "--lr"),
    ("train --lr nan", "--lr"),
    ("train --weight-decay -0.1", "--weight-decay"),
    ("train --flops-target 2", "--flops-target"),
    ("train --init-flops-ratio 1.5", "--init-flops-ratio"),
    ("train --init-full-width-share -0.5", "--init-full-width-share"),
    ("train --structure-fraction 1.2", "--structure-fraction"),
    ("train --sigma-end inf", "--sigma-end"),
    ("train --dim 30 --heads 4", "--heads"),
    ("train --limit-train 0", "--limit-train"),
    ("train --limit-test -5", "--limit-test"),
    ("train --stop-after 0", "--stop-after"),
    ("train --threads 0", "--threads"),
    ("train --seed -1", "--seed"),
    # -- gblr train: choices, options, combinations
    ("train --layer sparse", "--layer"),
    ("train --dataset mnist", "--dataset"),
    ("train --bogus 1", "--bogus"),
    ("train --dataset imagefolder --image-size 16", "--data-dir"),
    ("train --dataset imagefolder --data-dir {tmp}", "--image-size"),
    ("train --resume --overwrite", "--overwrite"),
    # -- gblr train: paths and what is in them
    ("train --data-dir {missing}", "--data-dir"),
    ("train --data-dir {file}", "--data-dir"),
    ("train --data-dir {data} --out {file}", "--out"),
    ("train --data-dir {data} --out {file}/run", "--out"),
    ("train --data-dir {data} --out {tmp}/" + "x" * 300, "--out"),
    ("train --data-dir {data} --out {run}", "--overwrite"),
    ("train --data-dir {data} --out {broken_run} --resume", "--resume"),
    ("train --data-dir {data} --patch-size 5", "--patch-size"),
    ("train --data-dir {data} --batch-size 4096", "--batch-size"),
    pytest.param("train --data-dir {data} --out /proc/gblr-test/run", "--out", marks=LINUX),  # even for root
    pytest.param("train --data-dir {unreadable}", "--data-dir", marks=NOT_ROOT),
    pytest.param("train --data-dir {data} --out {read_only}/run", "--out", marks=NOT_ROOT),
    # -- gblr train on text: the model and the data must agree, and the text must serve the settings
    ("train --model gpt", "--model"),
    ("train --dataset text", "--model"),
    ("train --data {text}", "--data"),
    ("train --dataset text --model gpt --data-dir {data}", "--data-dir"),
    ("train --dataset text --model gpt --seq-len 0", "--seq-len"),
    ("train --dataset text --model gpt --data {missing}", "--data"),
    ("train --dataset text --model gpt --data {text}/a.txt", "--data"),
    ("train --dataset text --model gpt --data {text} {binary}", "--data"),
    ("train --dataset text --model gpt --data {text} --tokenizer {missing}", "--tokenizer"),
    ("train --dataset text --model gpt --data {text} --seq-len 512", "--seq-len"),
    ("train --dataset text --model gpt --data {text} --seq-len 8 --batch-size 4096", "--batch-size"),
    # -- gblr compress
    ("compress", "model_dir"),
    ("compress {model} --flops 0", "--flops"),
    ("compress {model} --flops half", "--flops"),
    ("compress {model} --method tucker", "--method"),
    ("compress {model} --distill-minutes -1", "--distill-minutes"),
    ("compress {model} --max-length 1", "--max-length"),
    ("compress {model} --target encoder.(", "--target"),
    ("compress {missing}", "model_dir"),
    ("compress {file}", "model_dir"),
    ("compress {model} --text {missing}", "--text"),
    ("compress {model} --text {binary}", "--text"),
    ("compress {model} --out {file}", "--out"),
    ("compress {model} --out {compressed}", "--overwrite"),
    # -- gblr compress on a causal LM: its options, its text
    ("compress {lm} --seq-len 1", "--seq-len"),
    ("compress {lm} --calibration greedy", "--calibration"),
    ("compress {lm} --eval-fraction 1", "--eval-fraction"),
    ("compress {lm} --eval-fraction 0", "--eval-fraction"),
    ("compress {lm} --calibration-tokens 100", "--calibration-tokens"),
    ("compress {lm} --eval-tokens 0", "--eval-tokens"),
    ("compress {lm} --generate-tokens 0", "--generate-tokens"),
    ("compress {lm} --decode-repeats -1", "--decode-repeats"),
    ("compress {lm} --batch-size 0", "--batch-size"),
    ("compress {lm} --text {missing}", "--text"),
    ("compress {lm} --text {file}", "--text"),
    ("compress {lm} --text {tmp}/*.pdf", "--text"),
    ("compress {lm} --text {tmp}/read_only", "--text"),
    ("compress {tmp}/missing.gguf", "model_dir"),
    # -- gblr demo
    ("demo --seed abc", "--seed"),
    ("demo --seed -1", "--seed"),
    ("demo --verbose", "--verbose"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=64, test=32)


@pytest.fixture
def paths(tmp_path, data, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out (runs/...) lands here
    made = {"tmp": tmp_path, "data": data, "missing": tmp_path / "missing", "file": tmp_path / "file.txt",
            "run": tmp_path / "run", "broken_run": tmp_path / "broken_run", "model": tmp_path / "model",
            "binary": tmp_path / "latin1.txt", "unreadable": tmp_path / "unreadable",
            "read_only": tmp_path / "read_only", "lm": tmp_path / "lm", "compressed": tmp_path / "compressed",
            "text": tmp_path / "text"}
    made["file"].write_text("a file, not a folder\n")
    made["run"].mkdir()
    (made["run"] / "checkpoint.pt").write_bytes(b"another run's checkpoint")
    made["broken_run"].mkdir()
    (made["broken_run"] / "checkpoint.pt").write_text("not a checkpoint\n")
    made["model"].mkdir()
    (made["model"] / "config.json").write_text("{}")
    (made["compressed"] / "model").mkdir(parents=True)
    (made["compressed"] / "report.json").write_text("{}\n")  # an earlier gblr compress run's
    made["lm"].mkdir()
    (made["lm"] / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    made["binary"].write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    made["text"].mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):  # 3 files of 120 bytes: too little for long windows
        (made["text"] / name).write_text(f"{name} " * 20)
    made["unreadable"].mkdir(mode=0o000)
    made["read_only"].mkdir(mode=0o555)
    yield made
    made["unreadable"].chmod(0o755)
    made["read_only"].chmod(0o755)


@pytest.fixture
def no_work(monkeypatch):
    """Make any training, model loading or tour fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command started working instead of refusing its input")

    monkeypatch.setattr(gblr.recipes.train, "batches", refuse)
    monkeypatch.setattr(gblr.recipes.train.TextData, "train_batches", refuse)
    monkeypatch.setattr(gblr.recipes.compress.text, "load_sentence_encoder", refuse)
    monkeypatch.setattr(gblr.recipes.compress_lm, "load_causal_lm", refuse)
    monkeypatch.setattr(gblr.recipes.demo, "demo", refuse)


@pytest.mark.parametrize("command, option", CASES)
def test_bad_command_line_is_refused_before_any_work(command, option, paths, no_work, capsys):
    argv = [word.format(**paths) for word in command.split()]
    checkpoint = (paths["run"] / "checkpoint.pt").read_bytes()

    assert main(argv) == 2

    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    if lines[0].startswith("usage:"):  # argparse: the usage block, then the error line
        assert all(line.startswith(" ") for line in lines[1:-1]), err
        message = lines[-1]
        # (an unknown option is reported by the top-level parser, "gblr: error: ...")
        assert message.startswith((f"gblr {argv[0]}: error: ", "gblr: error: ")), err
    else:  # found by the recipe: one line (missing data: then how to get it, naming --data-dir)
        assert lines[0].startswith("error: "), err
        missing_data = "Get it with one of:" in lines[0]
        assert len(lines) == 1 or missing_data, err
        message = err if missing_data else lines[0]
    assert option in message, err
    assert (paths["run"] / "checkpoint.pt").read_bytes() == checkpoint
    assert not (paths["tmp"] / "runs" / "gblr" / "checkpoint.pt").exists()
