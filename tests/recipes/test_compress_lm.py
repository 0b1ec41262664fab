"""`gblr compress` on causal language models: tiny random Llama (grouped-query attention), Qwen2,
Mistral and GPT-2 (Conv1D) folders and a tiny Llama GGUF file, made offline. Which layers are
targets, whole runs through `compress()` and the command line (perplexity, generations, decode
speed, FLOPs), and the saved layers reproducing the compressed model exactly in a fresh base model."""

import json

import pytest
import torch

import gblr
from fixtures import (
    CAUSAL_FAMILIES,
    causal_targets,
    save_tiny_causal_lm,
    tiny_causal_lm,
    write_corpus,
    write_tiny_llama_gguf,
)
from gblr.cli import main
from gblr.recipes import compress_lm
from gblr.recipes import corpus as corpus_module
from gblr.recipes.causal_lm import (
    CAUSAL_LM,
    ENCODER,
    PROMPTS,
    greedy_continuation,
    load_causal_lm,
    model_kind,
    perplexity,
    resolve_model,
    token_windows,
    window_batches,
)
from gblr.recipes.compress import CompressConfig, compress, linear_targets

pytest.importorskip("transformers")

FAMILIES = list(CAUSAL_FAMILIES)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread (and compress(threads=1) sets it; restored after)."""


def small_config(model, tmp_path, corpus, **changes) -> CompressConfig:
    options = {"flops": 0.5, "method": "svd", "text": [str(corpus)], "seq_len": 16, "calibration_tokens": 128,
               "distill_tokens": 256,
               "eval_tokens": 64, "eval_fraction": 0.3, "generate_tokens": 4, "decode_repeats": 1,
               "out": str(tmp_path / "out"), "threads": 1, "progress": False, "pictures": False}
    return CompressConfig(str(model), **(options | changes))


# -- which model, which layers ------------------------------------------------------------------------------


def test_model_kind_from_the_config_alone(tmp_path):
    def folder(name, config):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        return path

    assert model_kind(folder("llama", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})) == CAUSAL_LM
    assert model_kind(folder("gpt2", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})) == CAUSAL_LM
    assert model_kind(folder("bare", {"model_type": "qwen2"})) == CAUSAL_LM  # no architecture named: the type
    assert model_kind(folder("base", {"architectures": ["LlamaModel"], "model_type": "llama"})) == ENCODER
    assert model_kind(folder("bert", {"architectures": ["BertModel"], "model_type": "bert"})) == ENCODER
    assert model_kind(folder("empty", {})) == ENCODER

    # A .gguf file is a causal LM: its folder is the from_pretrained folder, its name the gguf_file.
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "m.Q4_1.gguf").write_bytes(b"GGUF")
    assert resolve_model(holder / "m.Q4_1.gguf") == (holder, "m.Q4_1.gguf")
    assert resolve_model(holder) == (holder, "m.Q4_1.gguf")  # a folder holding one .gguf and no config.json
    assert model_kind(holder / "m.Q4_1.gguf") == CAUSAL_LM
    (holder / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="2 .gguf files"):
        resolve_model(holder)
    with pytest.raises(FileNotFoundError, match="not a .gguf file"):
        resolve_model(tmp_path / "llama" / "config.json")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        resolve_model(tmp_path / "nowhere")


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_the_decoder_linears(family):
    model = tiny_causal_lm(family)
    targets = linear_targets(model)
    assert targets == causal_targets(family)
    # Never the output embeddings, tied (llama, gpt2) or not (qwen2, mistral), nor the input embeddings.
    assert model.get_output_embeddings() is not None
    assert not any("lm_head" in name or "embed" in name or "wte" in name for name in targets)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (family in ("llama", "gpt2"))


# -- token windows ------------------------------------------------------------------------------------------


class CountingTokenizer:
    """Text ``"i"`` is 100 tokens of value i; 0 ends a text. Records which texts were tokenised."""

    eos_token_id = 0

    def __init__(self):
        self.seen = []

    def __call__(self, text, add_special_tokens=True, verbose=True):
        self.seen.append(int(text))
        return {"input_ids": [int(text)] * 100}


def test_token_windows_come_from_many_texts_and_stop_at_the_budget():
    tokenizer = CountingTokenizer()
    texts = (str(i) for i in range(1, 41))  # read lazily
    windows = token_windows(tokenizer, texts, seq_len=8, count=32)
    assert windows.shape == (32, 8) and windows.dtype == torch.long
    # First pass: ceil(32 / 16) = 2 windows' worth of tokens from the start of each text, so that
    # 16 texts contribute, and no text after those is read.
    assert sorted(set(windows.flatten().tolist())) == list(range(1, 17)) and tokenizer.seen == list(range(1, 17))
    # Few texts: a second pass takes the rest of each text (ended by token 0) in the same order.
    few = token_windows(CountingTokenizer(), ["1", "2"], seq_len=8, count=4)  # one window per text per pass
    assert few.flatten().tolist() == [1] * 8 + [2] * 8 + [1] * 16
    # Not enough text: as many whole windows as there are.
    assert token_windows(CountingTokenizer(), ["1", "2"], seq_len=8, count=1000).shape == (2 * 101 // 8, 8)
    assert token_windows(tokenizer, [], seq_len=8, count=4).shape == (0, 8)
    assert [batch["input_ids"].shape[0] for batch in window_batches(windows, 10)] == [10, 10, 10, 2]
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        token_windows(tokenizer, ["1"], seq_len=1, count=4)


# -- whole runs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, method", [("llama", "gblr"), ("qwen2", "svd"), ("mistral", "svd"), ("gpt2", "gblr")])
def test_compress_a_tiny_causal_lm_folder(tmp_path, capsys, family, method):
    folder = save_tiny_causal_lm(tmp_path / family, family)
    corpus = write_corpus(tmp_path / "corpus")
    returned = compress(small_config(folder, tmp_path, corpus, method=method, flops=0.6))
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(returned, default=str))
    assert report["kind"] == CAUSAL_LM and report["method"] == method

    # The targets: every attention and MLP linear, no embeddings, no lm_head; within the budget.
    assert [layer["name"] for layer in report["layers"]] == causal_targets(family)
    assert report["macs"] == sum(layer["gblr_macs"] for layer in report["layers"])
    assert report["flops_ratio"] == pytest.approx(report["macs"] / report["dense_macs"])
    assert report["flops_ratio"] <= 0.6 + 1e-9 and report["conversion"]["converted"] >= 1

    # Perplexity of the original and of the converted model on held-out files, never calibration ones.
    ppl = report["perplexity"]
    assert set(ppl) == {"dense", "converted"} and all(1.0 < value < 1e4 for value in ppl.values())
    assert report["perplexity_final"] == ppl["converted"] and f"{ppl['converted']:.3f}" in printed
    text = report["text"]
    assert len(text["calibration_files"]) == 4 and len(text["evaluation_files"]) == 2  # 6 files, 0.3 held out
    assert not set(text["calibration_files"]) & set(text["evaluation_files"])
    assert (text["calibration_windows"], text["evaluation_windows"], text["batch_size"]) == (8, 4, 4)

    # Generations side by side, and decode speed of the original against the frozen compressed model.
    assert [entry["prompt"] for entry in report["generations"]] == list(PROMPTS)
    assert all(isinstance(entry["dense"], str) and isinstance(entry["compressed"], str)
               for entry in report["generations"])
    decode = report["decode"]
    assert decode["new_tokens"] == 4 and decode["dense_tokens_per_s"] > 0 and decode["frozen_tokens_per_s"] > 0
    assert report["peak_rss_mb"] > 10 and report["timings"]["convert_seconds"] > 0

    # The saved layers, put into a freshly loaded base model, give the same perplexity and generations.
    loaded = gblr.load_pretrained(load_causal_lm(folder, progress=False)[0], out / "model")
    _, tokenizer = load_causal_lm(folder, progress=False)
    assert sum(isinstance(m, gblr.GBLRLinear) for m in loaded.modules()) == report["conversion"]["converted"]
    windows = token_windows(tokenizer, corpus_module.read_texts(text["evaluation_files"]), 16, 4)
    assert perplexity(loaded, window_batches(windows, 4)) == pytest.approx(ppl["converted"], rel=1e-6)
    assert [greedy_continuation(loaded, tokenizer, prompt, 4) for prompt in PROMPTS] == [
        entry["compressed"] for entry in report["generations"]]


def test_convert_save_load_reproduce_logits_and_generate(tmp_path):
    """The Python API on a causal LM: convert_ with token-id dict batches, save, load into a fresh
    base model: the same logits bit for bit, and the same greedy generation."""
    folder = save_tiny_causal_lm(tmp_path / "llama", "llama")
    model, tokenizer = load_causal_lm(folder, progress=False)
    calibration = [{"input_ids": torch.randint(1, 300, (2, 16), generator=torch.Generator().manual_seed(i))}
                   for i in range(4)]
    report = gblr.convert_(model, gblr.GBLRConfig(flops_ratio=0.5), calibration=calibration, progress=False,
                           verbose=False)
    assert report.calibrated and [layer.name for layer in report.layers] == causal_targets("llama")
    assert len(report.converted) >= 7  # the allocation may keep a few small layers dense
    gblr.save_pretrained(model, tmp_path / "saved")
    loaded = gblr.load_pretrained(load_causal_lm(folder, progress=False)[0], tmp_path / "saved")
    ids = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    prompt = tokenizer("The chef", return_tensors="pt")["input_ids"]
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(loaded.generate(prompt, **options), model.generate(prompt, **options))
    # A frozen copy generates the same tokens (up to float rounding of its faster paths).
    frozen = gblr.freeze_(loaded)
    with torch.inference_mode():
        assert frozen.generate(prompt, **options).shape == (1, prompt.shape[1] + 6)


def test_compress_a_gguf_file_from_the_command_line(tmp_path, capsys):
    pytest.importorskip("gguf")
    path = tmp_path / "gguf" / "tiny.Q4_1.gguf"
    path.parent.mkdir()
    original = write_tiny_llama_gguf(path)
    loaded, _ = load_causal_lm(path, progress=False)  # the folder and gguf_file= its name
    ids = torch.randint(1, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, original(input_ids=ids).logits)

    corpus = write_corpus(tmp_path / "corpus", files=5)
    out = tmp_path / "out"
    code = main(["compress", str(path), "--flops", "0.5", "--method", "svd", "--text", str(corpus / "*.txt"),
                 str(corpus / "b.rst"), str(corpus / "c.md"), "--seq-len", "16", "--calibration-tokens", "64",
                 "--eval-tokens", "32", "--eval-fraction", "0.2", "--generate-tokens", "3", "--decode-repeats", "0",
                 "--out", str(out), "--threads", "1", "--no-progress", "--no-pictures"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads((out / "report.json").read_text())
    assert report["model_dir"] == str(path) and report["decode"] is None
    assert [layer["name"] for layer in report["layers"]] == causal_targets("llama")
    assert len(report["text"]["calibration_files"]) + len(report["text"]["evaluation_files"]) == 4
    assert "held-out perplexity: dense" in printed and "load_causal_lm" in printed
    restored = gblr.load_pretrained(load_causal_lm(path, progress=False)[0], out / "model")
    assert sum(isinstance(m, gblr.GBLRLinear) for m in restored.modules()) == report["conversion"]["converted"]


def test_distillation_on_the_logits_and_the_default_text(tmp_path, monkeypatch):
    folder = save_tiny_causal_lm(tmp_path / "qwen2", "qwen2")
    corpus = write_corpus(tmp_path / "corpus")
    # Without --text a causal LM reads the Python documentation's sources; here a stand-in folder.
    monkeypatch.setattr(corpus_module, "PYTHON_DOCS", corpus)
    report = compress(small_config(folder, tmp_path, corpus, text=None, distill_steps=3, lr=1e-3,
                                   decode_repeats=0, pictures=True))
    assert report["text"]["source"] == [str(corpus)]
    assert set(report["perplexity"]) == {"dense", "converted", "distilled"}
    assert report["perplexity_final"] == report["perplexity"]["distilled"]
    assert report["distillation"]["steps"] == 3 and report["distillation"]["output"] == "logits"
    assert report["distillation"]["loss"] == "kl"  # a causal LM's default: its next-token distributions
    assert report["conversion"]["allocation"] == "fisher"  # a causal LM's default: weighed by the predictions
    # Distillation reads more windows of the calibration files than calibration does.
    assert report["distillation"]["windows"] == 256 // 16 > report["text"]["calibration_windows"] == 128 // 16
    assert (tmp_path / "out" / "masks.png").is_file()

    with pytest.raises(FileExistsError, match=r"already holds a compressed model.*--overwrite"):
        compress(small_config(folder, tmp_path, corpus, text=None))  # nothing is replaced unasked
    monkeypatch.setattr(corpus_module, "PYTHON_DOCS", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match=r"text \(--text\).*python3.11-doc"):
        compress(small_config(folder, tmp_path, corpus, text=None, overwrite=True))


def test_bad_text_and_lengths_are_refused_before_loading(tmp_path, monkeypatch):
    folder = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    corpus = write_corpus(tmp_path / "corpus")

    def refuse(*args, **kwargs):
        raise AssertionError("loaded the model before checking its input")

    monkeypatch.setattr(compress_lm, "load_causal_lm", refuse)
    with pytest.raises(ValueError, match=r"text \(--text\).*at least 2 text files"):
        compress(small_config(folder, tmp_path, corpus, text=[str(corpus / "a.txt")]))
    with pytest.raises(FileNotFoundError, match=r"text \(--text\).*matches nothing"):
        compress(small_config(folder, tmp_path, corpus, text=[str(corpus / "*.pdf")]))
    with pytest.raises(ValueError, match=r"calibration_tokens \(--calibration-tokens\)"):
        compress(small_config(folder, tmp_path, corpus, calibration_tokens=8))
    with pytest.raises(ValueError, match=r"eval_fraction \(--eval-fraction\)"):
        compress(small_config(folder, tmp_path, corpus, eval_fraction=1.0))
    monkeypatch.undo()
    # Known only once the model is loaded: GPT-2 here has 128 positions.
    with pytest.raises(ValueError, match=r"seq_len \(--seq-len\) = 256 is longer than the model's 128"):
        compress(small_config(folder, tmp_path, corpus, seq_len=256, calibration_tokens=256, eval_tokens=256))

