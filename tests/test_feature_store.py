"""FeatureStore on a small simulator, checked against a slow per-row reference built from the raw frames:
batch layout, training-only vocabularies, content features, strictly-earlier histories, the schema built next
to the features it names, and cross-encoder text pairs."""

from __future__ import annotations

import numpy as np
import torch

from recsys_lab.data.batch import Batch
from recsys_lab.data.text import TextSpec
from recsys_lab.utils.testing_text import build_tiny_bert
from tests.datamodule_fixtures import (  # noqa: F401  (fixtures)
    CONTEXT_COLS,
    ITEM_COLS,
    USER_COLS,
    L,
    assert_train_vocabulary,
    cache_root,
    dm,
    everything,
    make_dm,
    raw,
    ready,
    ref,
)


def test_batch_layout(dm, everything):
    batch = everything
    assert isinstance(batch, Batch) and len(batch) == len(dm.store.user)
    assert set(batch.sparse) == {"user_id", *USER_COLS, "item_id", *ITEM_COLS, *CONTEXT_COLS}
    assert set(batch.seq) == {"hist_item_id", "hist_cat2", "hist_brand"}
    assert set(batch.dense) == {"price", "image"} and set(batch.labels) == {"click", "purchase"}
    assert batch.text == {}
    assert batch.dense["image"].shape == (len(batch), 16) and batch.dense["price"].shape == (len(batch),)
    for name, f in ((n, dm.schema[n]) for n in batch.sparse):  # every code fits its embedding table
        assert 0 <= int(batch.sparse[name].min()) and int(batch.sparse[name].max()) < f.vocab_size, name
    for name, seq in batch.seq.items():
        assert seq.ids.shape == (len(batch), L) and int(seq.ids.max()) < dm.schema[name].vocab_size, name


def test_ids_are_train_vocabularies(dm, ref, everything):
    """Same raw user/item -> same code in every row; codes 1..V-1 exactly for those seen in training rows."""
    batch = everything
    users = assert_train_vocabulary(
        ref.user, batch.sparse["user_id"], ref.train_users, dm.schema.num_users, "user_id"
    )
    items = assert_train_vocabulary(
        ref.item, batch.sparse["item_id"], ref.train_items, dm.schema.num_items, "item_id"
    )
    # the entity tables hold the same codes; items never shown, or only after training, are unknown
    user_code = dm.store.users.sparse["user_id"].numpy()
    assert all(user_code[u] == c for u, c in users.items())
    assert all(ref.code[i] == c for i, c in items.items())
    assert [i for i in range(200) if ref.code[i] > 0] == sorted(ref.train_items)
    # code -> entity is the inverse for every known code
    known = np.flatnonzero(ref.code > 0)
    assert torch.equal(dm.store.item_entity[torch.as_tensor(ref.code[known])], torch.as_tensor(known))
    assert len(ref.train_users) == 300 - int((user_code == 0).sum())


def test_content_features_match_raw_tables(dm, raw, ref, everything):
    """User/item categorical codes, context codes, labels and standardised dense features of every row."""
    batch = everything
    users, items, inter = raw.users, raw.items, ref.inter
    train_items = sorted(ref.train_items)
    train_users = sorted(ref.train_users)
    for col in USER_COLS:
        values = users[col].to_numpy()
        assert_train_vocabulary(
            values[ref.user], batch.sparse[col], values[train_users], dm.schema[col].vocab_size, col
        )
    mappings = {}
    for col in ITEM_COLS:  # vocabularies of the items seen in training rows, applied to every item
        values = items[col].to_numpy()
        mappings[col] = assert_train_vocabulary(
            values[ref.item], batch.sparse[col], values[train_items], dm.schema[col].vocab_size, col
        )
    for col in CONTEXT_COLS:  # vocabularies of the training rows
        values = inter[col].to_numpy()[ref.raw_row]
        assert_train_vocabulary(
            values, batch.sparse[col], values[ref.is_train], dm.schema[col].vocab_size, col
        )
    for col in ("click", "purchase"):
        assert np.array_equal(
            batch.labels[col].numpy(), inter[col].to_numpy()[ref.raw_row].astype(np.float32)
        )

    # dense: log1p(price) and the image, standardised with the items of the training rows
    log_price = np.log1p(items["price"].to_numpy())
    price = (log_price - log_price[train_items].mean()) / (log_price[train_items].std() + 1e-6)
    image = items["image"].to_numpy().astype(np.float64)
    image = (image - image[train_items].mean(0)) / (image[train_items].std(0) + 1e-6)
    np.testing.assert_allclose(batch.dense["price"].numpy(), price[ref.item], atol=1e-4, rtol=0)
    np.testing.assert_allclose(batch.dense["image"].numpy(), image[ref.item], atol=1e-4, rtol=0)

    # cold-start rows: items released late, unknown to the id vocabulary, still described by their own content
    cold = np.flatnonzero(batch.sparse["item_id"].numpy() == 0)
    assert len(cold) >= 5 and not ref.is_train[cold].any()
    release = items["release_ts"].to_numpy()
    assert (release[ref.item[cold]] > 0).all()  # never shown in training because released late
    for col in ITEM_COLS:
        own = [mappings[col][v] for v in items[col].to_numpy()[ref.item[cold]]]
        assert batch.sparse[col][cold].tolist() == own
    assert (batch.sparse["cat1"][cold] > 0).all()  # top categories are all seen in training
    assert len(np.unique(batch.dense["price"][cold].numpy())) == len(np.unique(ref.item[cold]))


def test_every_row_history_is_strictly_before(dm, ref, everything):
    """n_prior and the history of every row: that user's clicks strictly before the row (as item codes, with
    their cat2/brand codes), the last L, oldest first."""
    hist = everything.seq["hist_item_id"]
    cat2, brand = everything.sparse["cat2"], everything.sparse["brand"]
    # the cat2/brand code of every raw item (each item occurs in some row, or is never clicked)
    item_cat = {"cat2": {}, "brand": {}}
    for r, i in enumerate(ref.item.tolist()):
        item_cat["cat2"][i], item_cat["brand"][i] = int(cat2[r]), int(brand[r])
    n_full = n_empty = n_own_click = 0
    ids, lengths = hist.ids.tolist(), hist.lengths.tolist()
    n_prior = dm.store.n_prior.tolist()
    h_cat2, h_brand = everything.seq["hist_cat2"], everything.seq["hist_brand"]
    assert torch.equal(h_cat2.lengths, hist.lengths) and torch.equal(h_brand.lengths, hist.lengths)
    for r, (u, t) in enumerate(zip(ref.user.tolist(), ref.ts.tolist(), strict=True)):
        past = ref.history(u, t)
        assert n_prior[r] == len(past), r
        expected = past[-L:]
        n = len(expected)
        assert lengths[r] == n, r
        assert ids[r][:n] == [int(ref.code[i]) for i in expected], r
        assert h_cat2.ids[r, :n].tolist() == [item_cat["cat2"][i] for i in expected], r
        assert h_brand.ids[r, :n].tolist() == [item_cat["brand"][i] for i in expected], r
        n_full += n == L
        n_empty += n == 0
        n_own_click += bool(ref.click[r])  # the row's own click is not in its history (checked above)
    assert n_full > 100 and n_empty > 100 and n_own_click > 100  # truncation, empty histories and clicks seen


def test_schema_from_datamodule(dm):
    schema = dm.schema
    assert [f.name for f in schema.select("sparse", side="user")] == ["user_id", *USER_COLS]
    assert [f.name for f in schema.select("sparse", side="item")] == ["item_id", *ITEM_COLS]
    assert [f.name for f in schema.select("sparse", side="context")] == CONTEXT_COLS
    assert schema["image"].dim == 16 and schema["price"].dim == 1
    assert schema["hist_item_id"].max_len == L and schema["hist_item_id"].embed_as == "item_id"
    assert (
        schema["hist_brand"].embed_as == "brand"
        and schema["hist_cat2"].vocab_size == schema["cat2"].vocab_size
    )
    assert schema.labels == ["click", "purchase"]
    assert schema.select("text") == []


def test_text_pairs(tmp_path, cache_root, dm, ref):
    spec = TextSpec(
        pretrained=build_tiny_bert(tmp_path / "bert"), max_length=32, max_item_tokens=8, max_history_items=2
    )
    tdm = make_dm(cache_root, text=spec)
    ready(tdm)
    tables = tdm.store.text
    assert tables.item_tokens.shape == (200, 8)  # every item entity's title, known to the vocabulary or not
    with_history = [r for r in dm.rows["test"].tolist() if len(ref.history(ref.user[r], ref.ts[r])) >= 2][:4]
    cold = (dm.store.items.sparse["item_id"][dm.store.item] == 0).nonzero().squeeze(1)[:2].tolist()
    rows = torch.tensor([0, 1, 2, *with_history, *cold])
    batch = tdm.store.impressions(rows)
    assert set(batch.text) == {"input_ids", "attention_mask", "token_type_ids"}
    for value in batch.text.values():
        assert value.shape == (len(rows), 32) and value.dtype == torch.long
    ids, mask = batch.text["input_ids"], batch.text["attention_mask"]
    assert (ids[:, 0] == tables.cls_id).all()
    for b, r in enumerate(rows.tolist()):
        valid = ids[b, mask[b].bool()].tolist()
        assert (ids[b, ~mask[b].bool()] == tables.pad_id).all()
        item = int(ref.item[r])  # entity: a cold item's text is its own although its id code is 0
        cand = tables.item_tokens[item, : tables.item_lengths[item]].tolist()
        assert len(cand) > 0
        assert valid[-len(cand) - 1 :] == [*cand, tables.sep_id]  # "... [SEP] candidate [SEP]"
        past = ref.history(int(ref.user[r]), int(ref.ts[r]))
        if not past:
            assert valid == [tables.cls_id, tables.sep_id, *cand, tables.sep_id]
        else:
            latest = past[-1]  # the most recent history item comes first
            latest_tokens = tables.item_tokens[latest, : tables.item_lengths[latest]].tolist()
            assert valid[1 : 1 + len(latest_tokens)] == latest_tokens
    assert len(ref.history(int(ref.user[0]), int(ref.ts[0]))) == 0 and len(with_history) == 4 and cold
    assert [(f.name, f.kind, f.max_len) for f in tdm.schema.select("text")] == [("pair_text", "text", 32)]
    # text changes nothing else
    assert torch.equal(tdm.store.n_prior, dm.store.n_prior)
    first = next(iter(tdm.val_dataloader()))
    assert (
        first.text["input_ids"].shape == (len(first), 32)
        and (first.text["input_ids"][:, 0] == tables.cls_id).all()
    )
