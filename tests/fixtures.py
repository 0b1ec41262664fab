"""Shared test helpers: small synthetic datasets written to disk in the real formats (recipe and
CLI tests), frozen layers built from block lists and a strategy for random block lists (the
inference-path tests), structure setters for trainable layers, and a tiny offline BERT with its
tokenizer (text, distillation and compression tests)."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import torch
from hypothesis import strategies as st

from gblr.flops import Support
from gblr.frozen import FrozenGBLRLinear
from gblr.recipes.sentences import generated_sentences


def write_idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + b"".join(struct.pack(">i", size) for size in array.shape)
    data = header + array.to(torch.uint8).contiguous().numpy().tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(data)


def write_fashion_mnist(directory: Path, train: int = 256, test: int = 128, seed: int = 0) -> Path:
    """Fashion-MNIST-shaped IDX files whose classes are learnable: class k lights up band k."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = torch.randint(0, 10, (count,), generator=generator)
        images = torch.randint(0, 60, (count, 28, 28), generator=generator)
        for index, label in enumerate(labels.tolist()):
            row = 2 + 2 * label
            images[index, row : row + 3, 4:24] += 180
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images.clamp(0, 255))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


def frozen_layer(m: int, n: int, spec, seed: int = 0, dtype=torch.float64, bias: bool = True, **kwargs) -> FrozenGBLRLinear:
    """A FrozenGBLRLinear from ``(out_start, out_width, in_start, in_width, rank)`` tuples, with
    random factors (and bias)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for out_start, out_width, in_start, in_width, rank in spec:
        support = Support(in_start, in_width, out_start, out_width)
        left = torch.randn(out_width, rank, generator=generator, dtype=dtype)
        right = torch.randn(rank, in_width, generator=generator, dtype=dtype)
        blocks.append((support, left, right))
    b = torch.randn(m, generator=generator, dtype=dtype) if bias else None
    return FrozenGBLRLinear(n, m, blocks, b, dtype=dtype, **kwargs)


def block_specs(max_side: int, max_blocks: int):
    """``(m, n, spec)`` with sides 5..max_side and up to ``max_blocks`` blocks for
    :func:`frozen_layer`: wrap-around, overlapping, one-element and full blocks, rank 1-3 (dense
    blocks where the rank reaches a width)."""
    return st.integers(5, max_side).flatmap(
        lambda m: st.integers(5, max_side).flatmap(
            lambda n: st.tuples(
                st.just(m),
                st.just(n),
                st.lists(
                    st.tuples(st.integers(0, m - 1), st.integers(1, m), st.integers(0, n - 1), st.integers(1, n),
                              st.integers(1, 3)),
                    min_size=0, max_size=max_blocks,
                ),
            )
        )
    )


def set_structure(layer, in_widths, in_locations, out_widths, out_locations):
    """Set supports given in elements."""
    n, m = layer.in_features, layer.out_features
    with torch.no_grad():
        layer.in_width.copy_(torch.tensor(in_widths, dtype=layer.in_width.dtype) / n)
        layer.in_location.copy_(torch.tensor(in_locations, dtype=layer.in_width.dtype) / n)
        layer.out_width.copy_(torch.tensor(out_widths, dtype=layer.in_width.dtype) / m)
        layer.out_location.copy_(torch.tensor(out_locations, dtype=layer.in_width.dtype) / m)


def random_structure(layer, generator, zero_fraction=0.2):
    with torch.no_grad():
        for width, size in ((layer.in_width, layer.in_features), (layer.out_width, layer.out_features)):
            elements = torch.randint(0, size + 1, width.shape, generator=generator)
            elements[torch.rand(width.shape, generator=generator) < zero_fraction] = 0
            elements[torch.rand(width.shape, generator=generator) < 0.15] = 1
            width.copy_(elements / size)
        for location in (layer.in_location, layer.out_location):
            location.uniform_(0, 1, generator=generator)


def tiny_tokenizer(directory: Path):
    """A BertTokenizerFast over every word of the generated corpus (plus the special tokens)."""
    import transformers

    words = sorted({w for s in generated_sentences(3000) for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    # positional: the vocabulary file (``vocab_file=`` in transformers 4, ``vocab=`` in 5)
    tokenizer = transformers.BertTokenizerFast(str(vocab))
    assert tokenizer.vocab_size == len(words) + 5
    return tokenizer


def tiny_bert(tokenizer, seed: int = 0, initializer_range: float = 0.3):
    """A random 2-layer BERT (hidden 32). The large init makes the linear layers matter: with
    BERT's default 0.02 the embeddings pass through almost unchanged and any compression keeps a
    cosine of 0.99999."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def save_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """A Hugging Face model folder (config.json, weights, tokenizer files) of a tiny BERT."""
    tokenizer = tiny_tokenizer(directory / "vocab")
    model = tiny_bert(tokenizer, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# -- tiny causal language models (gblr compress on causal LMs) -------------------------------------------

# Per family: the config class, its keyword arguments (2 layers, hidden 32, grouped-query attention
# where the family has it; tied and untied output embeddings both occur) and the compressible
# linears of one decoder layer, in model order.
CAUSAL_FAMILIES = {
    "llama": ("LlamaConfig", {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "tie_word_embeddings": True},
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]),
    "qwen2": ("Qwen2Config", {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "tie_word_embeddings": False},
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]),
    "mistral": ("MistralConfig", {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                                  "num_key_value_heads": 1, "tie_word_embeddings": False},
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_head": 4, "n_positions": 128},
             ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
}


def causal_targets(family: str, layers: int = 2) -> list[str]:
    """The names `gblr compress` targets by default in a tiny model of ``family``."""
    prefix = "transformer.h" if family == "gpt2" else "model.layers"
    return [f"{prefix}.{i}.{name}" for i in range(layers) for name in CAUSAL_FAMILIES[family][2]]


def tiny_bpe_tokenizer(vocab_size: int = 300):
    """A GPT-2 style byte-level BPE tokenizer trained offline on generated sentences, with one
    special token (id 0) as beginning, end and padding."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(generated_sentences(300), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_causal_lm(family: str, vocab_size: int = 300, seed: int = 0, initializer_range: float = 0.2):
    """A random 2-layer causal LM of ``family`` (see CAUSAL_FAMILIES), in eval mode. The large init
    makes the linear layers matter (with the default 0.02 every model is nearly the identity)."""
    import transformers

    config_class, options, _ = CAUSAL_FAMILIES[family]
    layers = {"n_layer": 2} if family == "gpt2" else {"num_hidden_layers": 2, "max_position_embeddings": 128}
    config = getattr(transformers, config_class)(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0,
                                                 pad_token_id=0, initializer_range=initializer_range,
                                                 **layers, **options)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def save_tiny_causal_lm(directory: Path, family: str, seed: int = 0) -> Path:
    """A Hugging Face folder (config.json, weights, tokenizer files) of a tiny causal LM."""
    tokenizer = tiny_bpe_tokenizer()
    tiny_causal_lm(family, len(tokenizer), seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_corpus(directory: Path, files: int = 6, sentences: int = 40) -> Path:
    """A folder of text files in the suffixes `--text` searches for (one in a subfolder), each of
    generated sentences from its own seed, plus a file it must skip (``notes.bin``)."""
    names = ["a.txt", "b.rst", "c.md", "d.rst.txt", "sub/e.txt", "f.TXT", "g.txt", "h.md"]
    for index in range(files):
        path = directory / names[index % len(names)].replace(".", f"{index // len(names) or ''}.", 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(" ".join(generated_sentences(sentences, seed=100 + index)) + "\n")
    (directory / "notes.bin").write_bytes(b"\x00\xff not text")
    return directory


def write_tiny_llama_gguf(path: Path, seed: int = 0):
    """A tiny Llama (2 layers, hidden 32, 4 query / 2 key-value heads, tied embeddings) written as
    a float32 GGUF file with its BPE tokenizer, as llama.cpp's converter lays it out (query and
    key rows permuted); returns the Hugging Face model it was made from (transformers loads the
    file back to the same logits)."""
    import json

    import gguf

    tokenizer = tiny_bpe_tokenizer()
    model = tiny_causal_lm("llama", len(tokenizer), seed)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(tokenizer))
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token == "<|endoftext|>" else 1 for token in tokens])  # 3: control token
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in bpe["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(0)

    def permute(weight, heads):  # llama.cpp's row order of query and key projections
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{layer}.{theirs}.weight", state[f"{prefix}{ours}.weight"])
        writer.add_tensor(f"blk.{layer}.attn_q.weight",
                          permute(state[prefix + "self_attn.q_proj.weight"], config.num_attention_heads))
        writer.add_tensor(f"blk.{layer}.attn_k.weight",
                          permute(state[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
