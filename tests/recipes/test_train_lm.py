"""`gblr train --model gpt --dataset text`: the GPT, text split by file into token streams, random
training windows, bits per byte and perplexity on the held-out files, and the run as for images
(report, log, pictures, resume, refused options). Tiny: dim 32, depth 2, seq_len 32, a few
generated text files."""

import csv
import dataclasses
import json
import math

import pytest
import torch
from fixtures import tiny_bpe_tokenizer, write_corpus
from torch import nn

from gblr import FrozenGBLRLinear, GBLRLinear
from gblr.cli import main
from gblr.recipes.data import ByteTokenizer, HuggingFaceTokenizer, TextData, load_text
from gblr.recipes.models import GPT, LAYER_KINDS, build_model, replaced_flops
from gblr.recipes.train import TrainConfig, evaluate_text, fit, train

TINY = dict(dataset="text", model="gpt", dim=32, depth=2, heads=4, seq_len=32, batch_size=16, limit_train=256,
            limit_test=16, lr=3e-3, flops_target=0.3, progress=False, threads=1)
TINY_ARGS = ["--dataset", "text", "--model", "gpt", "--dim", "32", "--depth", "2", "--heads", "4", "--seq-len", "32",
             "--batch-size", "16", "--limit-train", "256", "--limit-test", "16", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread (restored after)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))  # 6 text files of about 3.5 KB, and one to skip


def config(corpus, out, **overrides):
    return TrainConfig(**(TINY | dict(data=[str(corpus)], out=str(out), epochs=2) | overrides))


# -- the model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_gpt_predicts_each_position_from_the_positions_before_it(kind):
    torch.manual_seed(0)
    model = build_model("gpt", (32,), 256, layer=kind, flops_ratio=0.3, dim=32, depth=2, heads=4).eval()
    assert isinstance(model, GPT)
    tokens = torch.randint(0, 256, (3, 32))
    logits = model(tokens)
    assert logits.shape == (3, 32, 256)
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    other = model(changed)
    torch.testing.assert_close(other[:, :20], logits[:, :20], rtol=0, atol=0)  # earlier positions see nothing of it
    assert (other[:, 20:] - logits[:, 20:]).abs().amax() > 1e-4
    assert model(tokens[:, :7]).shape == (3, 7, 256)  # shorter windows use the first positions
    # the factory made the block linears; the embeddings and the (tied) head are dense
    report = replaced_flops(model)
    names = [f"blocks.{b}.{n}" for b in range(2) for n in ("attention.query", "attention.key", "attention.value",
                                                           "attention.output", "mlp.fc1", "mlp.fc2")]
    assert [layer.name for layer in report] == names
    assert report.dense_macs == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert model.head.weight is model.embed.weight and isinstance(model.embed, nn.Embedding)
    assert isinstance(model.blocks[0].mlp.fc1, GBLRLinear) == (kind == "gblr")
    if kind == "dense":
        assert report.ratio == 1.0
    with pytest.raises(ValueError, match="at most seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


# -- text: split by file, windows, bits per byte --------------------------------------------------------


def test_text_is_split_by_file_and_never_evaluated_on_training_files(corpus):
    data = load_text([str(corpus)], seq_len=32, seed=0)
    files = sorted(path for path in corpus.rglob("*") if path.is_file() and path.name != "notes.bin")
    assert len(files) == 6 and len(data.test_files) == 1 and len(data.train_files) == 5
    assert set(data.train_files) | set(data.test_files) == set(files)
    assert not set(data.train_files) & set(data.test_files)
    # the streams are exactly the bytes of their own files, in order
    assert bytes(data.train_tokens.tolist()) == b"".join(path.read_bytes() for path in data.train_files)
    assert bytes(data.test_tokens.tolist()) == data.test_files[0].read_bytes()
    assert data.vocab_size == 256 and data.windows_per_epoch == len(data.train_tokens) // 33
    # seeded: the same split again; other seeds hold out other files
    assert load_text([str(corpus)], seq_len=32, seed=0).test_files == data.test_files
    assert len({load_text([str(corpus)], seq_len=32, seed=seed).test_files for seed in range(6)}) > 1


def test_training_windows_are_random_slices_split_across_ranks(corpus):
    data = dataclasses.replace(load_text([str(corpus)], seq_len=32), windows_per_epoch=100)
    batches = list(data.train_batches(16, torch.Generator().manual_seed(3)))
    assert len(batches) == 6  # 100 windows: 6 full batches of 16, the rest dropped
    slices = set(map(tuple, data.train_tokens.unfold(0, 33, 1).tolist()))  # every slice of 33 training tokens
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (16, 32) and inputs.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
        assert set(map(tuple, torch.cat([inputs, targets[:, -1:]], 1).tolist())) <= slices
    # the generator decides the epoch; two ranks together see exactly the single-process batches
    again = list(data.train_batches(16, torch.Generator().manual_seed(3)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    ranks = [list(data.train_batches(16, torch.Generator().manual_seed(3), rank, 2)) for rank in (0, 1)]
    for whole, first, second in zip(batches, *ranks):
        assert torch.equal(torch.cat([first[0], second[0]]), whole[0])


class Alternation(nn.Module):
    """After 'a' predicts 'b' and after 'b' predicts 'a' with probability 1/2; every other byte
    shares the other half."""

    def forward(self, tokens):
        other = torch.where(tokens == ord("a"), ord("b"), ord("a"))
        probabilities = torch.full((*tokens.shape, 256), 0.5 / 255)
        probabilities.scatter_(-1, other[..., None], 0.5)
        return probabilities.log()


class Uniform(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.vocab_size)


def test_bits_per_byte_and_perplexity_by_hand():
    stream = torch.tensor(list(b"ab" * 50), dtype=torch.long)  # 100 bytes: 3 windows of 32 predicted bytes
    data = TextData(stream, stream, seq_len=32, tokenizer=ByteTokenizer())
    inputs, targets = data.test_windows()
    assert inputs.shape == (3, 32) and torch.equal(targets.flatten(), stream[1:97])  # the targets tile the text
    assert data.test_bytes == 96
    # every byte predicted with probability 1/2: 1 bit per byte, perplexity 2, all predictions right
    metrics = evaluate_text(Alternation(), data, batch_size=2)
    assert metrics["bits_per_byte"] == pytest.approx(1.0)
    assert metrics["perplexity"] == pytest.approx(2.0)
    assert metrics["accuracy"] == 1.0
    # uniform over 256 bytes: 8 bits per byte, perplexity 256
    metrics = evaluate_text(Uniform(256), data, batch_size=3)
    assert metrics["bits_per_byte"] == pytest.approx(8.0) and metrics["perplexity"] == pytest.approx(256.0)


def test_a_test_limit_takes_windows_from_all_over_the_held_out_text():
    stream = torch.arange(10 * 8 + 1) % 256  # 10 windows of 8 predicted tokens
    data = TextData(stream, stream, seq_len=8, tokenizer=ByteTokenizer(), test_limit=4)
    inputs, targets = data.test_windows()
    assert inputs[:, 0].tolist() == [0, 24, 48, 72]  # windows 0, 3, 6, 9: first and last included
    assert torch.equal(targets, inputs + 1) and data.test_bytes == 4 * 8


def test_the_held_out_files_do_not_change_with_the_seed(corpus, tmp_path):
    reports = [train(config(corpus, tmp_path / f"seed{seed}", seed=seed, epochs=1)) for seed in (0, 1)]
    assert reports[0]["dataset"]["test_files"] == reports[1]["dataset"]["test_files"]
    assert reports[0]["bits_per_byte"] != reports[1]["bits_per_byte"]  # the seed still changes the model


def test_bits_per_byte_counts_the_bytes_a_tokenizer_decodes_to(tmp_path):
    tiny_bpe_tokenizer().save_pretrained(tmp_path / "tokenizer")
    tokenizer = HuggingFaceTokenizer(tmp_path / "tokenizer")
    text = "Grüße aus der Küche: the naïve café serves crème brûlée. " * 4
    stream = tokenizer.encode(text)
    assert stream[-1] == tokenizer.tokenizer.eos_token_id  # each text ends with the end-of-text token
    data = TextData(stream, stream, seq_len=len(stream) - 1, tokenizer=tokenizer)  # one window: every token
    first = len(tokenizer.tokenizer.decode(stream[:1].tolist()).encode("utf-8"))
    # the predicted tokens are all but the first; the end-of-text token decodes to no bytes
    assert data.test_bytes == len(text.encode("utf-8")) - first
    assert len(text.encode("utf-8")) > len(text)  # the umlauts and accents are two bytes each
    metrics = evaluate_text(Uniform(tokenizer.vocab_size), data, batch_size=1)
    assert metrics["bits_per_byte"] == pytest.approx((len(stream) - 1) * math.log2(len(tokenizer.tokenizer))
                                                     / data.test_bytes)
    assert metrics["perplexity"] == pytest.approx(len(tokenizer.tokenizer))


# -- gblr train on text -----------------------------------------------------------------------------------


def test_gblr_and_dense_runs_report_bits_per_byte(corpus, tmp_path):
    model, report = fit(config(corpus, tmp_path / "gblr"))
    saved = json.loads((tmp_path / "gblr" / "report.json").read_text())
    assert saved["bits_per_byte"] == report["bits_per_byte"]
    # byte tokens: bits per byte is the mean nats per token over ln 2, perplexity per token
    assert report["bits_per_byte"] == pytest.approx(math.log2(report["perplexity"]))
    assert 1.0 < report["bits_per_byte"] < 6.0  # learned something: uniform bytes are 8 bits
    assert report["bits_per_byte"] == pytest.approx(report["bits_per_byte_before_freeze"], rel=1e-5)
    assert report["accuracy"] == report["accuracy_before_freeze"] and 0.05 < report["accuracy"] < 1
    assert report["flops_ratio"] == pytest.approx(0.3, abs=0.02)
    assert [row["name"] for row in report["layers"]][:2] == ["blocks.0.attention.query", "blocks.0.attention.key"]
    assert len(report["layers"]) == 12 and isinstance(model.blocks[1].mlp.fc2, FrozenGBLRLinear)
    dataset = report["dataset"]
    assert dataset["tokenizer"] == "bytes" and dataset["vocab_size"] == 256 and dataset["windows_per_epoch"] == 256
    assert dataset["test_tokens"] == dataset["test_bytes"] == 16 * 32 and dataset["train_files"] == 5
    assert len(dataset["test_files"]) == 1 and str(corpus) in dataset["test_files"][0]
    rows = list(csv.DictReader((tmp_path / "gblr" / "log.csv").open()))
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert float(rows[-1]["bits_per_byte"]) == pytest.approx(report["bits_per_byte_before_freeze"])
    assert float(rows[-1]["perplexity"]) == pytest.approx(report["perplexity_before_freeze"])
    assert float(rows[-1]["train_loss"]) == report["train_loss"] < float(rows[0]["train_loss"])
    for picture in ("masks.png", "budgets.png"):
        assert (tmp_path / "gblr" / picture).stat().st_size > 1000

    dense = train(config(corpus, tmp_path / "dense", layer="dense"))
    assert dense["flops_ratio"] == 1.0 and dense["macs"] == dense["dense_macs"] == report["dense_macs"]
    assert 1.0 < dense["bits_per_byte"] < 6.0
    assert (tmp_path / "dense" / "budgets.png").exists() and not (tmp_path / "dense" / "masks.png").exists()


def test_resume_gives_the_same_result_as_an_uninterrupted_run(corpus, tmp_path):
    straight = train(config(corpus, tmp_path / "straight", epochs=3, pictures=False))
    assert train(config(corpus, tmp_path / "resumed", epochs=3, stop_after=1, pictures=False)) == {}
    resumed = train(config(corpus, tmp_path / "resumed", epochs=3, resume=True, pictures=False))
    assert resumed["bits_per_byte"] == straight["bits_per_byte"] and resumed["layers"] == straight["layers"]
    first = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    second = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    for key, value in first.items():  # tensors, and the plain data a GBLR layer keeps besides them
        assert torch.equal(value, second[key]) if isinstance(value, torch.Tensor) else value == second[key], key
    with pytest.raises(ValueError, match="seq_len=32 there, 16 here"):
        train(config(corpus, tmp_path / "resumed", epochs=3, resume=True, seq_len=16))


def test_cli_trains_on_text_with_a_tokenizer_and_says_what_it_measured(corpus, tmp_path, capsys):
    tokenizer = tiny_bpe_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "run"
    code = main(["train", *TINY_ARGS, "--data", str(corpus), "--tokenizer", str(tmp_path / "tokenizer"),
                 "--epochs", "1", "--layer", "lowrank", "--no-pictures", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert f"held-out text: {report['bits_per_byte']:.4f} bits per byte" in printed
    assert "next-token accuracy" in printed
    dataset = report["dataset"]
    assert dataset["tokenizer"] == str(tmp_path / "tokenizer") and dataset["vocab_size"] == len(tokenizer)
    # bits per byte: the same summed nats as the perplexity, over the bytes instead of the tokens
    nats = math.log(report["perplexity"]) * dataset["test_tokens"]
    assert report["bits_per_byte"] == pytest.approx(nats / math.log(2) / dataset["test_bytes"])
    assert dataset["test_bytes"] > dataset["test_tokens"]  # BPE tokens hold several bytes
    assert 0.15 <= report["flops_ratio"] <= 0.3


@pytest.mark.parametrize("arguments, message", [
    (["--model", "gpt"], "model (--model) gpt trains on text (dataset (--dataset)), got --dataset fashion-mnist"),
    (["--dataset", "text"], "model (--model) vit trains on an image dataset (dataset (--dataset)), got --dataset text"),
    (["--data", "x.txt"], "data (--data) is read by --dataset text only, not by --dataset fashion-mnist"),
    (["--dataset", "text", "--model", "gpt", "--data-dir", "d"], "data_dir (--data-dir) is read by image datasets"),
    (["--dataset", "text", "--model", "gpt", "--heads", "5"], "dim (--dim) must be divisible by heads (--heads)"),
    (["--dataset", "text", "--model", "gpt", "--seq-len", "0"], "seq_len (--seq-len) must be a positive int"),
])
def test_cli_refuses_options_of_the_other_kind_of_data(tmp_path, capsys, arguments, message):
    assert main(["train", *arguments, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_text_that_cannot_be_used_is_refused_naming_the_option(corpus, tmp_path, capsys):
    def run(*extra):
        code = main(["train", *TINY_ARGS, "--out", str(tmp_path / "run"), *extra])
        error = capsys.readouterr().err.strip()
        assert code == 2 and len(error.splitlines()) == 1 and "Traceback" not in error, error
        return error

    assert "tokenizer (--tokenizer): " in run("--data", str(corpus), "--tokenizer", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "cannot load a tokenizer" in run("--data", str(corpus), "--tokenizer", str(tmp_path / "empty"))
    assert run("--data", str(tmp_path / "missing.txt")).startswith("error: data (--data): text file not found")
    assert "data (--data): need at least 2 text files" in run("--data", str(corpus / "a.txt"))
    error = run("--data", str(corpus), "--seq-len", "5000")
    assert "fewer than one window of seq_len + 1 = 5001" in error and "--seq-len" in error
    assert "larger than the training set (256 windows per epoch" in run("--data", str(corpus), "--batch-size", "512")
