"""A tiny random BERT with its tokenizer, saved as a local Hugging Face folder, for tests (no downloads)."""

from __future__ import annotations

import inspect
import os
import string

import torch
from transformers import BertConfig, BertModel, BertTokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Whole words common in test titles, plus every lowercase letter and digit as a word start and as a "##"
# continuation, so WordPiece can spell any lowercase ASCII word without falling back to [UNK].
WORDS = [
    "red",
    "blue",
    "green",
    "black",
    "shoe",
    "shirt",
    "phone",
    "case",
    "book",
    "lamp",
    "game",
    "size",
    "pack",
]
CHARACTERS = list(string.ascii_lowercase + string.digits)
PUNCTUATION = list(string.punctuation)


def tiny_vocab() -> list[str]:
    return SPECIAL_TOKENS + WORDS + CHARACTERS + PUNCTUATION + [f"##{c}" for c in CHARACTERS]


def _fast_bert_tokenizer(vocab_file: str):
    # transformers v5's BertTokenizer is the fast one and takes the vocabulary as `vocab` (a `vocab_file=` keyword
    # is silently ignored, leaving only special tokens); v4 spells it BertTokenizerFast(vocab_file=...).
    if "vocab" in inspect.signature(BertTokenizer.__init__).parameters:
        return BertTokenizer(vocab=vocab_file, do_lower_case=True)
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True)


def _save_tokenizer(folder: str, vocab: list[str]) -> list[str]:
    """Write `vocab` and a fast WordPiece tokenizer over it into `folder` (created); returns the vocabulary."""
    os.makedirs(folder, exist_ok=True)
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as handle:
        handle.write("\n".join(vocab) + "\n")
    _fast_bert_tokenizer(vocab_file).save_pretrained(folder)
    return vocab


def build_tiny_bert(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a random 2-layer BERT (hidden 32) and a matching fast WordPiece tokenizer into `folder`.

    The folder has config.json, model.safetensors and the tokenizer files, like a real model folder, so it loads
    with `AutoModel.from_pretrained` / `AutoTokenizer.from_pretrained` and through `BERTCrossEncoder`. The weights
    depend only on `seed` (the global RNG state is left untouched). Returns the folder as a string.
    """
    folder = str(folder)
    vocab = _save_tokenizer(folder, tiny_vocab())
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    return _save_seeded(BertModel, config, folder, seed)


def _save_seeded(model_class, config, folder: str, seed: int) -> str:
    """A `model_class(config)` whose random weights depend only on `seed` (the global RNG state is left
    untouched), saved into `folder`; returns the folder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.save_pretrained(folder)
    return folder


def tiny_item_tokens(schema, seed: int = 0, max_tokens: int = 6):
    """`schema` with random item texts of the tiny vocabulary (`schema.item_text`): 1..max_tokens word ids per
    item code, code 0 empty, the special ids of `build_tiny_bert`'s tokenizer."""
    import dataclasses

    from recsys_lab.data.text import ItemTokens

    vocab = tiny_vocab()
    ids = {token: i for i, token in enumerate(vocab)}
    g = torch.Generator().manual_seed(seed)
    V = schema.num_items
    lengths = torch.randint(1, max_tokens + 1, (V,), generator=g)
    lengths[0] = 0
    words = torch.randint(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(WORDS), (V, max_tokens), generator=g)
    tokens = torch.where(torch.arange(max_tokens) < lengths.unsqueeze(1), words, ids["[PAD]"])
    text = ItemTokens(tokens, lengths, ids["[CLS]"], ids["[SEP]"], ids["[PAD]"], ids[";"])
    return dataclasses.replace(schema, item_text=text)


def build_tiny_causal_lm(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a random 2-layer Llama (hidden 32) with a WordPiece tokenizer that has "yes" and "no" as words into
    `folder` (no chat template): the LLM ranker's tests run on it. Returns the folder as a string."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = str(folder)
    vocab = _save_tokenizer(folder, tiny_vocab() + ["yes", "no"])
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
    )
    return _save_seeded(LlamaForCausalLM, config, folder, seed)
