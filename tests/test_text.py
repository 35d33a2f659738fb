"""Text utilities: per-item tokenization and vectorized cross-encoder pair assembly against a slow reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from recsys_lab.data.batch import Seq
from recsys_lab.data.text import build_pair_inputs, tokenize_texts
from recsys_lab.utils.testing_text import build_tiny_bert

CLS, SEP, PAD = 2, 3, 0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))


# --- tokenize_texts -----------------------------------------------------------------------------------------


def test_tokenize_texts_shapes_lengths_truncation(tokenizer):
    texts = ["red shoe", "", "blue phone case size 42 pack of 3 green lamps", "book"]
    ids, lengths = tokenize_texts(tokenizer, texts, max_tokens=6)
    assert ids.shape == (4, 6) and ids.dtype == torch.int64
    assert lengths.dtype == torch.int64
    for row, text in enumerate(texts):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"][:6]
        assert lengths[row] == len(expected)
        assert ids[row, : len(expected)].tolist() == expected
        assert (ids[row, len(expected) :] == tokenizer.pad_token_id).all()
    assert lengths.tolist() == [2, 0, 6, 1]  # the long title is cut to max_tokens
    assert tokenizer.cls_token_id not in ids[:, 0].tolist()  # no special tokens added


def test_tokenize_texts_empty_list(tokenizer):
    ids, lengths = tokenize_texts(tokenizer, [], max_tokens=5)
    assert ids.shape == (0, 5) and lengths.shape == (0,)


# --- build_pair_inputs ------------------------------------------------------------------------------------


def reference_pair(
    item_tokens, item_lengths, history, candidates, max_length, max_history_items, history_sep_id
):
    """One row at a time, in plain Python: the specification build_pair_inputs must match."""
    budget = max_length - 3
    rows = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
    for b in range(len(candidates)):
        tokens = lambda item: item_tokens[item, : item_lengths[item]].tolist()  # noqa: E731
        past = history.ids[b, : history.lengths[b]].tolist()
        recent_first = past[::-1][:max_history_items]
        segment_a = []
        for item in recent_first:
            segment_a += tokens(item) + ([history_sep_id] if history_sep_id is not None else [])
        segment_b = tokens(int(candidates[b]))[:budget]
        segment_a = segment_a[: budget - len(segment_b)]  # keeps the most recent (first) tokens
        ids = [CLS] + segment_a + [SEP] + segment_b + [SEP]
        types = [0] * (len(segment_a) + 2) + [1] * (len(segment_b) + 1)
        pad = max_length - len(ids)
        rows["input_ids"].append(ids + [PAD] * pad)
        rows["attention_mask"].append([1] * len(ids) + [0] * pad)
        rows["token_type_ids"].append(types + [0] * pad)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in rows.items()}


def random_case(seed: int, num_items: int = 30, width: int = 6, batch_size: int = 40, history_len: int = 7):
    g = torch.Generator().manual_seed(seed)
    item_lengths = torch.randint(0, width + 1, (num_items,), generator=g)
    item_lengths[:3] = width  # long titles, used below as candidates that need truncation
    item_lengths[3] = 0  # an item with no text
    item_tokens = torch.randint(10, 100, (num_items, width), generator=g)
    item_tokens[torch.arange(width) >= item_lengths.unsqueeze(1)] = PAD
    lengths = torch.randint(0, history_len + 1, (batch_size,), generator=g)
    lengths[0], lengths[1], lengths[-1] = 0, 0, history_len  # empty histories and a full one
    ids = torch.randint(0, num_items, (batch_size, history_len), generator=g)
    candidates = torch.randint(0, num_items, (batch_size,), generator=g)
    candidates[:4] = torch.tensor([0, 1, 2, 3])
    return item_tokens, item_lengths, Seq(ids=ids, lengths=lengths), candidates


@pytest.mark.parametrize("max_length", [3, 5, 12, 24, 80])
@pytest.mark.parametrize("max_history_items", [0, 1, 3, 10])
@pytest.mark.parametrize("history_sep_id", [None, 7])
def test_build_pair_inputs_matches_reference(max_length, max_history_items, history_sep_id):
    item_tokens, item_lengths, history, candidates = random_case(seed=max_length + max_history_items)
    kwargs = dict(
        cls_id=CLS, sep_id=SEP, pad_id=PAD, max_length=max_length, max_history_items=max_history_items
    )
    out = build_pair_inputs(
        item_tokens, item_lengths, history, candidates, history_sep_id=history_sep_id, **kwargs
    )
    expected = reference_pair(
        item_tokens, item_lengths, history, candidates, max_length, max_history_items, history_sep_id
    )
    assert set(out) == set(expected)
    for key in expected:
        assert out[key].dtype == torch.int64 and out[key].shape == (len(candidates), max_length)
        torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0, msg=key)


def test_build_pair_inputs_hand_case():
    # item 1 = [11, 12], item 2 = [21], item 3 = [31, 32, 33]; user history 1 then 2 (2 is the most recent).
    item_tokens = torch.tensor([[0, 0, 0], [11, 12, 0], [21, 0, 0], [31, 32, 33]])
    item_lengths = torch.tensor([0, 2, 1, 3])
    history = Seq(ids=torch.tensor([[1, 2, 0], [0, 0, 0]]), lengths=torch.tensor([2, 0]))
    candidates = torch.tensor([3, 1])
    kwargs = dict(cls_id=CLS, sep_id=SEP, pad_id=PAD, max_history_items=5)
    out = build_pair_inputs(item_tokens, item_lengths, history, candidates, max_length=10, **kwargs)
    assert out["input_ids"].tolist() == [
        [CLS, 21, 11, 12, SEP, 31, 32, 33, SEP, PAD],
        [CLS, SEP, 11, 12, SEP, PAD, PAD, PAD, PAD, PAD],
    ]
    assert out["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]]
    # Budget 8 - 3 = 5: the candidate (3 tokens) stays whole; the oldest history tokens (item 1's "12") go first.
    out = build_pair_inputs(item_tokens, item_lengths, history, candidates, max_length=8, **kwargs)
    assert out["input_ids"][0].tolist() == [CLS, 21, 11, SEP, 31, 32, 33, SEP]
    # Budget 2: the candidate alone is too long and is cut; no history fits.
    out = build_pair_inputs(item_tokens, item_lengths, history, candidates, max_length=5, **kwargs)
    assert out["input_ids"][0].tolist() == [CLS, SEP, 31, 32, SEP]
    assert out["token_type_ids"][0].tolist() == [0, 0, 1, 1, 1]


def test_build_pair_inputs_padding_invariance():
    item_tokens, item_lengths, history, candidates = random_case(seed=3)
    kwargs = dict(cls_id=CLS, sep_id=SEP, pad_id=PAD, max_length=40, max_history_items=4)
    base = build_pair_inputs(item_tokens, item_lengths, history, candidates, **kwargs)
    padding = ~history.mask()
    # Other ids in the padding slots, even out of the item table's range, and a wider history tensor.
    scrambled = history.ids.masked_fill(padding, 10**6)
    wider = torch.cat([scrambled, torch.randint(0, 30, (len(candidates), 5))], dim=1)
    for ids in (scrambled, wider):
        out = build_pair_inputs(item_tokens, item_lengths, Seq(ids, history.lengths), candidates, **kwargs)
        for key in base:
            assert torch.equal(out[key], base[key]), key


def test_build_pair_inputs_rejects_bad_sizes():
    item_tokens, item_lengths, history, candidates = random_case(seed=0)
    kwargs = dict(cls_id=CLS, sep_id=SEP, pad_id=PAD)
    with pytest.raises(ValueError, match="max_length"):
        build_pair_inputs(
            item_tokens, item_lengths, history, candidates, max_length=2, max_history_items=1, **kwargs
        )
    with pytest.raises(ValueError, match="max_history_items"):
        build_pair_inputs(
            item_tokens, item_lengths, history, candidates, max_length=9, max_history_items=-1, **kwargs
        )
