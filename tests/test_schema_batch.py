"""Schema validation, serialisation and selection; Batch row selection, device moves and length; Seq masks."""

from __future__ import annotations

import json

import pytest
import torch

from recsys_lab.data.batch import Batch, EvalTargets, PositionTargets, Seq
from recsys_lab.data.schema import Feature, Schema
from recsys_lab.utils.testing import random_batch, tiny_schema


def _base() -> list[Feature]:
    return [
        Feature("user_id", "sparse", "user", vocab_size=5),
        Feature("item_id", "sparse", "item", vocab_size=7),
    ]


# --- Schema validation --------------------------------------------------------------------------------------


def test_schema_rejects_duplicate_names():
    with pytest.raises(ValueError, match=r"unique.*\['item_id'\]"):
        Schema(_base() + [Feature("item_id", "sparse", "item", vocab_size=7)])


def test_schema_rejects_sparse_without_vocab():
    with pytest.raises(ValueError, match="'cat'.*vocab_size > 0"):
        Schema(_base() + [Feature("cat", "sparse", "item")])


@pytest.mark.parametrize(
    "extra",
    [
        # embed_as names no feature
        [Feature("hist_item_id", "seq", "user", vocab_size=7, max_len=3, embed_as="missing")],
        # embed_as names a sparse feature of another size
        [Feature("hist_item_id", "seq", "user", vocab_size=8, max_len=3, embed_as="item_id")],
        # embed_as names a feature that is not sparse
        [
            Feature("hist_a", "seq", "user", vocab_size=7, max_len=3),
            Feature("hist_b", "seq", "user", vocab_size=7, max_len=3, embed_as="hist_a"),
        ],
    ],
    ids=["missing", "size-mismatch", "not-sparse"],
)
def test_schema_rejects_bad_embed_as(extra):
    with pytest.raises(ValueError, match="embed_as="):
        Schema(_base() + extra)


@pytest.mark.parametrize("key", ["user_id", "item_id"])
def test_schema_requires_user_and_item_id(key):
    features = [f for f in _base() if f.name != key]
    with pytest.raises(ValueError, match=f"'{key}' must be a sparse feature"):
        Schema(features)
    # present but of the wrong kind is rejected too
    with pytest.raises(ValueError, match=f"'{key}' must be a sparse feature"):
        Schema(features + [Feature(key, "dense", "user")])


def test_schema_custom_id_names():
    schema = Schema(
        [Feature("uid", "sparse", "user", vocab_size=3), Feature("iid", "sparse", "item", vocab_size=4)],
        user_id="uid",
        item_id="iid",
    )
    assert (schema.num_users, schema.num_items) == (3, 4)
    with pytest.raises(ValueError, match="'user_id' must be a sparse feature"):
        Schema(schema.features)  # default key names no longer exist


# --- lookups, selection ------------------------------------------------------------------------------------


def test_schema_lookup_and_select():
    schema = tiny_schema(num_users=13, num_items=17, history_len=5)
    assert schema.num_users == 13 and schema.num_items == 17
    assert schema["hist_item_id"].embed_as == "item_id" and schema["hist_item_id"].max_len == 5
    assert "price" in schema and "nope" not in schema
    with pytest.raises(KeyError, match="no feature 'nope'"):
        schema["nope"]
    names = lambda feats: [f.name for f in feats]  # noqa: E731
    assert names(schema.select("sparse")) == ["user_id", "age", "item_id", "cat", "hour"]
    assert names(schema.select("dense")) == ["price", "image"]
    assert names(schema.select("seq")) == ["hist_item_id", "hist_cat"]
    assert names(schema.select("text")) == []
    assert names(schema.select(side="item")) == ["item_id", "cat", "price", "image"]
    assert names(schema.select("sparse", side="item")) == ["item_id", "cat"]
    assert names(schema.select("sparse", side=("user", "context"))) == ["user_id", "age", "hour"]
    assert names(schema.select()) == names(schema.features)


def test_item_log_prob():
    schema = tiny_schema(num_items=17)
    log_prob = schema.item_log_prob()
    counts = torch.arange(17, dtype=torch.float64) + 1.0  # add-one smoothing
    torch.testing.assert_close(log_prob, torch.log(counts / counts.sum()).float())
    assert torch.isfinite(log_prob).all()  # item 0 has no count but a finite log-probability
    schema.item_counts = None
    with pytest.raises(ValueError, match="item_counts is not set"):
        schema.item_log_prob()


# --- serialisation ----------------------------------------------------------------------------------------


def test_schema_round_trip_and_fingerprint():
    schema = tiny_schema()
    data = schema.to_dict()
    # plain Python only: JSON-serialisable, no tensors (safe for hparams and weights_only checkpoints)
    assert json.loads(json.dumps(data)) == data
    assert "item_counts" not in data
    back = Schema.from_dict(data, item_counts=schema.item_counts)
    assert back.features == schema.features
    assert (back.user_id, back.item_id, back.labels) == (schema.user_id, schema.item_id, schema.labels)
    assert torch.equal(back.item_counts, schema.item_counts)
    assert Schema.from_dict(data).item_counts is None

    fp = schema.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert back.fingerprint() == fp == tiny_schema().fingerprint()
    # statistics are not part of the layout
    assert Schema.from_dict(data, item_counts=torch.zeros(17)).fingerprint() == fp
    # any layout change is
    assert tiny_schema(num_items=18).fingerprint() != fp
    assert tiny_schema(history_len=6).fingerprint() != fp
    relabelled = Schema.from_dict({**data, "labels": ["click"]})
    assert relabelled.fingerprint() != fp


# --- Seq / Batch ------------------------------------------------------------------------------------------


def test_seq_mask():
    seq = Seq(ids=torch.tensor([[4, 5, 0], [0, 0, 0], [1, 2, 3]]), lengths=torch.tensor([2, 0, 3]))
    expected = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    assert torch.equal(seq.mask(), expected)
    assert seq.mask().dtype == torch.bool
    # width 0 gives an empty [B, 0] mask
    assert Seq(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, dtype=torch.long)).mask().shape == (2, 0)


def test_batch_len():
    assert len(Batch()) == 0
    assert len(random_batch(tiny_schema(), batch_size=6)) == 6
    only_seq = Batch(seq={"h": Seq(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))})
    assert len(only_seq) == 4
    assert len(Batch(labels={"click": torch.zeros(3)})) == 3
    assert len(Batch(text={"input_ids": torch.zeros(5, 8, dtype=torch.long)})) == 5


def _text_batch() -> Batch:
    batch = random_batch(tiny_schema(), batch_size=6, seed=1)
    batch.text = {
        "input_ids": torch.arange(6 * 4).reshape(6, 4),
        "attention_mask": torch.ones(6, 4, dtype=torch.long),
    }
    return batch


def test_batch_select_rows():
    batch = _text_batch()
    index = torch.tensor([4, 0, 4])
    sub = batch.select(index)
    assert len(sub) == 3
    assert sub.sparse.keys() == batch.sparse.keys() and sub.dense.keys() == batch.dense.keys()
    assert sub.seq.keys() == batch.seq.keys() and sub.labels.keys() == batch.labels.keys()
    for name, value in batch.sparse.items():
        assert torch.equal(sub.sparse[name], value[index])
    assert sub.dense["image"].shape == (3, 4)
    assert torch.equal(sub.dense["image"][1], batch.dense["image"][0])
    assert torch.equal(sub.seq["hist_item_id"].ids, batch.seq["hist_item_id"].ids[index])
    assert torch.equal(sub.seq["hist_item_id"].lengths, batch.seq["hist_item_id"].lengths[index])
    assert torch.equal(sub.labels["click"], batch.labels["click"][index])
    assert torch.equal(
        sub.text["input_ids"], torch.tensor([[16, 17, 18, 19], [0, 1, 2, 3], [16, 17, 18, 19]])
    )
    # a boolean mask works as well (clicked rows)
    clicked = batch.select(batch.labels["click"] > 0)
    assert len(clicked) == int(batch.labels["click"].sum())
    assert (clicked.labels["click"] == 1).all()
    # the source batch is untouched
    assert len(batch) == 6


def test_batch_to_copies_every_group():
    batch = _text_batch()
    moved = batch.to("meta")
    assert moved is not batch
    tensors = [
        *moved.sparse.values(),
        *moved.dense.values(),
        *moved.labels.values(),
        *moved.text.values(),
        *(s.ids for s in moved.seq.values()),
        *(s.lengths for s in moved.seq.values()),
    ]
    assert len(tensors) == 5 + 2 + 2 + 2 + 2 * 2
    assert all(t.device.type == "meta" for t in tensors)
    assert (
        moved.dense["image"].shape == (6, 4)
        and moved.seq["hist_cat"].ids.shape == batch.seq["hist_cat"].ids.shape
    )
    assert batch.sparse["user_id"].device.type == "cpu"  # original stays put
    back = batch.to("cpu")
    for name, value in batch.sparse.items():
        assert torch.equal(back.sparse[name], value)
    assert torch.equal(back.seq["hist_item_id"].lengths, batch.seq["hist_item_id"].lengths)


def _full_batch(rows: int, width: int, seed: int) -> Batch:
    """A batch using every group: features, position-wise targets and evaluation targets."""
    batch = random_batch(tiny_schema(), batch_size=rows, seed=seed)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, width + 1, (rows,), generator=g)
    ids = torch.randint(1, 9, (rows, width), generator=g)
    batch.targets = {"next_item": PositionTargets(ids, Seq(ids, lengths).mask())}
    batch.eval = EvalTargets(
        user=torch.arange(rows) + 10 * seed,
        targets=Seq(ids[:, :1], torch.ones(rows, dtype=torch.long)),
        seen=Seq(ids, lengths),
        candidates=None,
    )
    return batch


def test_every_group_is_selected_moved_and_concatenated():
    """select / to / concat walk every field generically: position-wise targets and evaluation targets go
    along with the features, and sequences of different widths are padded (masks padded with False)."""
    a, b = _full_batch(3, width=4, seed=1), _full_batch(2, width=6, seed=2)
    sub = a.select(torch.tensor([2, 0]))
    assert torch.equal(sub.targets["next_item"].ids, a.targets["next_item"].ids[[2, 0]])
    assert torch.equal(sub.eval.user, a.eval.user[[2, 0]]) and sub.eval.candidates is None
    assert torch.equal(sub.eval.seen.lengths, a.eval.seen.lengths[[2, 0]])

    moved = a.to("meta")
    assert moved.targets["next_item"].mask.device.type == "meta" and moved.eval.seen.ids.device.type == "meta"

    both = Batch.concat([a, b])
    assert len(both) == 5
    target = both.targets["next_item"]
    assert target.ids.shape == (5, 6) and target.mask.dtype == torch.bool
    assert torch.equal(target.ids[:3, :4], a.targets["next_item"].ids) and (target.ids[:3, 4:] == 0).all()
    assert not target.mask[:3, 4:].any()  # padding is never supervised
    assert torch.equal(target.mask[3:], b.targets["next_item"].mask)
    assert torch.equal(both.eval.user, torch.cat([a.eval.user, b.eval.user]))
    assert torch.equal(both.eval.seen.lengths, torch.cat([a.eval.seen.lengths, b.eval.seen.lengths]))
    assert torch.equal(both.sparse["item_id"], torch.cat([a.sparse["item_id"], b.sparse["item_id"]]))
