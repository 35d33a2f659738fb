"""RecDataModule on a small simulator: the parquet cache, leak-free impression batches against a slow per-row
reference, temporal splits and training-only statistics, the retrieval view, subsampling, text pairs, and errors."""

from __future__ import annotations

import bisect
import json
import shutil
from collections import defaultdict

import numpy as np
import polars as pl
import pytest
import torch

from recsys_lab.data.batch import Batch
from recsys_lab.data.datamodule import RecDataModule, TextSpec
from recsys_lab.data.sources.base import DataCacheError
from recsys_lab.data.sources.simulator import EcommerceSimulator
from recsys_lab.data.splits import TemporalSplit
from recsys_lab.utils.testing_text import build_tiny_bert

SMALL = {"n_users": 300, "n_items": 200, "impressions_per_user": 20}
L = 5  # short, so many users have more positives than the history carries
USER_COLS = ["age", "gender", "region", "pref_device"]
ITEM_COLS = ["cat1", "cat2", "brand"]
CONTEXT_COLS = ["hour", "weekday", "device"]


def make_dm(cache_dir, source=None, **kwargs) -> RecDataModule:
    defaults = {
        "history_len": L,
        "history_features": ["cat2", "brand"],
        "log_dense": ["price"],
        "batch_size": 64,
    }
    return RecDataModule(
        source=source or EcommerceSimulator(**SMALL, seed=0),
        split=TemporalSplit(val_fraction=0.1, test_fraction=0.1),
        cache_dir=str(cache_dir),
        **{**defaults, **kwargs},
    )


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def dm(cache_root) -> RecDataModule:
    dm = make_dm(cache_root, eval_batch_size=8)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def source():
    """The raw tables, straight from the simulator: the reference every check is computed from."""
    return EcommerceSimulator(**SMALL, seed=0).load()


@pytest.fixture(scope="module")
def clicks_by_user(source):
    """user -> [(timestamp, item)] of their clicks, in time order."""
    out = defaultdict(list)
    inter = source.interactions.filter(pl.col("click") == 1).sort("timestamp")
    for u, i, t in inter.select("user_id", "item_id", "timestamp").iter_rows():
        out[u].append((t, i))
    return out


# --- cache ------------------------------------------------------------------------------------------------


def _count_loads(sim: EcommerceSimulator) -> list:
    calls = []
    original = sim.load

    def load():
        calls.append(1)
        return original()

    sim.load = load
    return calls


def test_cache_written_once_and_reused(tmp_path):
    sim = EcommerceSimulator(**SMALL, seed=0)
    calls = _count_loads(sim)
    first = make_dm(tmp_path, source=sim)
    first.prepare_data()
    folder = tmp_path / f"ecommerce-{sim.fingerprint()}"
    assert first.cache_path == folder
    assert calls == [1]
    assert sorted(p.name for p in folder.iterdir()) == [
        "interactions.parquet",
        "items.parquet",
        "meta.json",
        "users.parquet",
    ]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["fingerprint"] == sim.fingerprint() and meta["format"] == 1
    assert meta["rows"]["users"] == 300 and meta["rows"]["items"] == 200
    first.prepare_data()
    first.setup()
    assert calls == [1]  # prepared once

    sim2 = EcommerceSimulator(**SMALL, seed=0)
    calls2 = _count_loads(sim2)
    second = make_dm(tmp_path, source=sim2)
    second.prepare_data()
    second.setup()
    assert calls2 == []  # read from the cache, not simulated again
    assert second.counts == first.counts
    assert torch.equal(second.store.item, first.store.item)
    assert second.fingerprint() == first.fingerprint()

    changed = EcommerceSimulator(**{**SMALL, "n_days": 21}, seed=0)
    calls3 = _count_loads(changed)
    third = make_dm(tmp_path, source=changed)
    third.prepare_data()
    assert calls3 == [1]
    assert third.cache_path != folder and (third.cache_path / "meta.json").exists()
    assert (folder / "meta.json").exists()  # the first cache is untouched
    third.setup()
    assert third.fingerprint() != first.fingerprint()


def test_setup_without_prepare_writes_cache(tmp_path):
    sim = EcommerceSimulator(**SMALL, seed=0)
    calls = _count_loads(sim)
    dm = make_dm(tmp_path, source=sim)
    dm.setup()
    assert calls == [1] and (dm.cache_path / "meta.json").exists()
    dm.setup()  # idempotent
    assert calls == [1]


@pytest.fixture
def cache_copy(tmp_path, dm):
    """A private copy of the module's cache folder, safe to damage."""
    folder = tmp_path / dm.cache_path.name
    shutil.copytree(dm.cache_path, folder)
    return folder


@pytest.mark.parametrize("name", ["interactions.parquet", "items.parquet", "users.parquet", "meta.json"])
def test_corrupt_cache_file_raises(tmp_path, cache_copy, name):
    path = cache_copy / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # a truncated write
    with pytest.raises(DataCacheError, match="corrupt") as info:
        make_dm(tmp_path).prepare_data()
    assert str(path) in str(info.value)
    assert f"delete the folder {cache_copy}" in str(info.value)


def test_missing_or_mismatched_parquet_raises(tmp_path, cache_copy, source):
    source.users.head(10).write_parquet(cache_copy / "users.parquet")
    with pytest.raises(DataCacheError, match="has 10 rows, meta.json says 300") as info:
        make_dm(tmp_path).prepare_data()
    assert str(cache_copy / "users.parquet") in str(info.value)
    source.users.write_parquet(cache_copy / "users.parquet")  # repaired; now another file goes missing
    (cache_copy / "items.parquet").unlink()
    with pytest.raises(DataCacheError, match="corrupt or missing") as info:
        make_dm(tmp_path).setup()
    assert str(cache_copy / "items.parquet") in str(info.value)


@pytest.mark.parametrize(("key", "value"), [("format", 0), ("fingerprint", "0123456789abcdef")])
def test_cache_from_another_version_raises(tmp_path, cache_copy, key, value):
    meta_path = cache_copy / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta[key] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataCacheError, match="another version") as info:
        make_dm(tmp_path).prepare_data()
    assert str(cache_copy) in str(info.value)


# --- impression batches against a slow per-row reference -----------------------------------------------------


def test_every_row_history_is_strictly_before(dm, source, clicks_by_user):
    """n_prior and hist_item_id of every row equal that user's clicks strictly before the row, last L."""
    inter = source.interactions
    rows = torch.arange(inter.height)
    batch = dm.store.impressions(rows)
    hist = batch.seq["hist_item_id"]
    assert hist.ids.shape == (inter.height, L)
    n_full = n_empty = 0
    for r, (u, t) in enumerate(inter.select("user_id", "timestamp").iter_rows()):
        past = clicks_by_user[u]
        n_before = bisect.bisect_left(past, (t, -1))  # timestamps are ints, items >= 0: strictly before t
        assert dm.store.n_prior[r] == n_before
        expected = [i for _, i in past[:n_before]][-L:]
        assert hist.lengths[r] == len(expected)
        assert hist.ids[r, : len(expected)].tolist() == expected
        n_full += len(expected) == L
        n_empty += len(expected) == 0
    assert n_full > 100 and n_empty > 100  # both truncation and empty histories were exercised


def _pick_rows(source, clicks_by_user) -> list[int]:
    inter = source.interactions
    rng = np.random.default_rng(0)
    rows = set(rng.choice(inter.height, 12, replace=False).tolist())
    clicked = np.flatnonzero(inter["click"].to_numpy() == 1)
    rows |= set(
        rng.choice(clicked, 6, replace=False).tolist()
    )  # the row's own click must not be in its history
    busiest = max(clicks_by_user, key=lambda u: len(clicks_by_user[u]))
    rows |= set(
        np.flatnonzero(inter["user_id"].to_numpy() == busiest)[-4:].tolist()
    )  # long histories, late rows
    rows |= {0, inter.height - 1}
    return sorted(rows)


def test_impressions_match_slow_reference(dm, source, clicks_by_user):
    inter, users, items = source.interactions, source.users, source.items
    rows = _pick_rows(source, clicks_by_user)
    batch = dm.store.impressions(torch.tensor(rows))
    assert isinstance(batch, Batch) and len(batch) == len(rows)
    assert set(batch.sparse) == {"user_id", *USER_COLS, "item_id", *ITEM_COLS, *CONTEXT_COLS}
    assert set(batch.seq) == {"hist_item_id", "hist_cat2", "hist_brand"}
    assert set(batch.dense) == {"price", "image"} and set(batch.labels) == {"click", "purchase"}
    assert batch.text == {}

    # dense standardisation statistics: items shown in the training period
    train_items = np.unique(inter.filter(pl.col("timestamp") < dm.cutoffs["val"])["item_id"].to_numpy())
    log_price = np.log1p(items["price"].to_numpy().astype(np.float32))
    price_mean, price_std = log_price[train_items].mean(), log_price[train_items].std() + 1e-6
    image = items["image"].to_numpy().astype(np.float32)
    image_mean, image_std = image[train_items].mean(0), image[train_items].std(0) + 1e-6

    n_with_full_history = 0
    for b, r in enumerate(rows):
        row = inter.row(r, named=True)
        u, i, t = row["user_id"], row["item_id"], row["timestamp"]
        assert batch.sparse["user_id"][b] == u and batch.sparse["item_id"][b] == i
        for col in USER_COLS:
            assert batch.sparse[col][b] == users[col][u], col
        for col in ITEM_COLS:
            assert batch.sparse[col][b] == items[col][i], col
        for col in CONTEXT_COLS:
            assert batch.sparse[col][b] == row[col], col
        assert batch.labels["click"][b] == row["click"] and batch.labels["purchase"][b] == row["purchase"]
        assert batch.dense["price"][b].item() == pytest.approx(
            (log_price[i] - price_mean) / price_std, abs=1e-4
        )
        torch.testing.assert_close(
            batch.dense["image"][b], torch.as_tensor((image[i] - image_mean) / image_std), atol=1e-4, rtol=0
        )

        # history: this user's clicks strictly before t, the last L, oldest first
        past = [item for ts, item in clicks_by_user[u] if ts < t][-L:]
        n = len(past)
        n_with_full_history += n == L
        assert batch.seq["hist_item_id"].lengths[b] == n
        assert batch.seq["hist_item_id"].ids[b, :n].tolist() == past
        assert batch.seq["hist_cat2"].ids[b, :n].tolist() == [items["cat2"][j] for j in past]
        assert batch.seq["hist_brand"].ids[b, :n].tolist() == [items["brand"][j] for j in past]
        assert torch.equal(batch.seq["hist_cat2"].lengths, batch.seq["hist_item_id"].lengths)
        n_prior = sum(ts < t for ts, _ in clicks_by_user[u])
        assert dm.store.n_prior[r] == n_prior
        if row["click"]:  # the row's own click is not counted among its priors
            assert sum(ts <= t for ts, _ in clicks_by_user[u]) == n_prior + 1
    assert n_with_full_history >= 2


# --- splits and training statistics ---------------------------------------------------------------------------


def test_temporal_split_boundaries(dm, source):
    ts = dm.store.timestamp
    t_val, t_test = dm.cutoffs["val"], dm.cutoffs["test"]
    assert ts[dm.rows["train"]].max() < t_val <= ts[dm.rows["val"]].min()
    assert ts[dm.rows["val"]].max() < t_test <= ts[dm.rows["test"]].min()
    every = torch.cat([dm.rows["train"], dm.rows["val"], dm.rows["test"]])
    assert torch.equal(every.sort().values, torch.arange(source.interactions.height))  # a partition
    n = source.interactions.height
    assert abs(len(dm.rows["val"]) - 0.1 * n) < 0.02 * n and abs(len(dm.rows["test"]) - 0.1 * n) < 0.02 * n
    assert dm.counts["train_rows"] == len(dm.rows["train"])


def test_item_counts_are_training_clicks_only(dm, source):
    inter = source.interactions
    clicks = inter.filter(pl.col("click") == 1)
    train = clicks.filter(pl.col("timestamp") < dm.cutoffs["val"])["item_id"].to_numpy()
    expected = np.bincount(train, minlength=200).astype(np.float32)
    assert torch.equal(dm.schema.item_counts, torch.as_tensor(expected))
    all_clicks = np.bincount(clicks["item_id"].to_numpy(), minlength=200)
    assert dm.schema.item_counts.sum() == len(train) < all_clicks.sum()  # later periods are not counted


def test_dense_standardised_with_training_statistics(dm, source):
    train_items = torch.unique(dm.store.item[dm.rows["train"]])
    for table in dm.store.item_dense.values():
        seen = table[train_items].double()
        torch.testing.assert_close(seen.mean(0), torch.zeros_like(seen.mean(0)), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            seen.std(0, unbiased=False), torch.ones_like(seen.mean(0)), atol=1e-3, rtol=0
        )
    assert dm.store.item_dense["image"].shape == (200, 16)
    # items first shown after the training period exist, and statistics over the whole catalogue would differ
    assert len(train_items) < 200
    log_price = np.log1p(source.items["price"].to_numpy())
    catalogue_z = (log_price - log_price.mean()) / log_price.std()
    assert np.abs(dm.store.item_dense["price"].numpy() - catalogue_z).max() > 1e-3


def test_schema_from_datamodule(dm):
    schema = dm.schema
    assert [f.name for f in schema.select("sparse", side="user")] == ["user_id", *USER_COLS]
    assert [f.name for f in schema.select("sparse", side="item")] == ["item_id", *ITEM_COLS]
    assert [f.name for f in schema.select("sparse", side="context")] == CONTEXT_COLS
    assert schema["image"].dim == 16 and schema["price"].dim == 1
    assert schema["hist_item_id"].max_len == L and schema["hist_brand"].embed_as == "brand"
    assert schema.num_items == 200 and schema.num_users == 300 and schema.labels == ["click", "purchase"]
    assert schema.select("text") == []


def test_reference_metrics(dm):
    ref = dm.reference_metrics("test")
    assert set(ref) == {"popularity_auc", "oracle_auc"}
    assert 0.5 < ref["popularity_auc"] < ref["oracle_auc"] < 1.0


# --- retrieval view ---------------------------------------------------------------------------------------


def test_retrieval_train_rows_are_training_clicks(dm, source):
    dm.set_view("retrieval")
    try:
        dataset = dm.dataset("train")
        train_clicks = source.interactions.filter(
            (pl.col("click") == 1) & (pl.col("timestamp") < dm.cutoffs["val"])
        )
        assert len(dataset) == train_clicks.height
        batch = dataset.__getitems__(list(range(len(dataset))))
        assert (batch.labels["click"] == 1).all()
        got = sorted(zip(batch.sparse["user_id"].tolist(), batch.sparse["item_id"].tolist(), strict=True))
        assert got == sorted(train_clicks.select("user_id", "item_id").iter_rows())
        batches = list(dm.train_dataloader())
        assert all(isinstance(b, Batch) for b in batches)
        assert [len(b) for b in batches] == [64] * (len(dataset) // 64) + (
            [len(dataset) % 64] if len(dataset) % 64 else []
        )
        assert "hist_item_id" in batches[0].seq
    finally:
        dm.set_view("ctr")


@pytest.mark.parametrize("stage", ["val", "test"])
def test_retrieval_queries_match_reference(dm, source, clicks_by_user, stage):
    cutoff = dm.cutoffs[stage]
    end = dm.cutoffs["test"] if stage == "val" else np.inf
    seen_ref, target_ref = {}, {}
    for u, clicks in clicks_by_user.items():
        seen = {i for t, i in clicks if t < cutoff}
        new = {i for t, i in clicks if cutoff <= t < end} - seen
        if new:
            seen_ref[u], target_ref[u] = seen, new

    dm.set_view("retrieval")
    try:
        loader = dm.val_dataloader() if stage == "val" else dm.test_dataloader()
        batches = list(loader)
    finally:
        dm.set_view("ctr")
    n = len(target_ref)
    assert n >= 10 and dm.counts[f"{stage}_queries"] == n
    assert [len(b) for b in batches] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    got_users = []
    for batch in batches:
        assert isinstance(batch, Batch)
        targets, seen, hist = batch.seq["eval.targets"], batch.seq["eval.seen"], batch.seq["hist_item_id"]
        for b, u in enumerate(batch.sparse["user_id"].tolist()):
            got_users.append(u)
            got_targets = targets.ids[b, : targets.lengths[b]].tolist()
            got_seen = seen.ids[b, : seen.lengths[b]].tolist()
            assert sorted(got_targets) == sorted(target_ref[u])  # distinct, new items of the period
            assert sorted(got_seen) == sorted(seen_ref[u])  # exactly the items clicked before the cutoff
            assert not set(got_targets) & set(got_seen)
            past = [i for t, i in clicks_by_user[u] if t < cutoff][-L:]
            assert hist.ids[b, : hist.lengths[b]].tolist() == past  # the user as of the cutoff
            assert batch.sparse["age"][b] == source.users["age"][u]
    assert got_users == sorted(target_ref)


def test_set_view_unknown_raises(dm):
    with pytest.raises(ValueError, match="data view 'ranking' is unknown"):
        dm.set_view("ranking")
    assert dm.view == "ctr"


def test_ctr_loaders(dm):
    assert dm.view == "ctr"
    val = list(dm.val_dataloader())
    assert sum(len(b) for b in val) == len(dm.rows["val"])
    first = next(iter(dm.train_dataloader()))
    assert len(first) == 64 and set(first.labels) == {"click", "purchase"}
    # shuffling is seeded: a fresh loader yields the same first batch
    again = next(iter(dm.train_dataloader()))
    assert torch.equal(first.sparse["item_id"], again.sparse["item_id"])
    catalogue = dm.catalogue()
    assert torch.equal(catalogue.sparse["item_id"], torch.arange(200)) and catalogue.dense["image"].shape == (
        200,
        16,
    )


# --- subsampling ------------------------------------------------------------------------------------------


def test_subsampling_is_seeded(cache_root, dm):
    def sub(seed):
        d = make_dm(cache_root, max_train_rows=500, max_eval_rows=10, seed=seed)
        d.setup()
        return d

    a, b, c = sub(0), sub(0), sub(1)
    for stage in ("train", "val", "test"):
        assert torch.equal(a.rows[stage], b.rows[stage])
        assert len(a.rows[stage]) == (500 if stage == "train" else 10)
        assert torch.equal(a.rows[stage], a.rows[stage].unique())  # sorted, no repeats
        assert torch.isin(a.rows[stage], dm.rows[stage]).all()  # drawn from the stage's own rows
        assert not torch.equal(a.rows[stage], c.rows[stage])
    for stage in ("val", "test"):
        assert len(a.queries[stage]["users"]) == 10
        assert torch.equal(a.queries[stage]["users"], b.queries[stage]["users"])
        assert torch.isin(a.queries[stage]["users"], dm.queries[stage]["users"]).all()
    assert a.counts["train_rows"] == 500 and a.counts["val_queries"] == 10
    # statistics are fitted on the whole training split, not the subsample
    assert torch.equal(a.schema.item_counts, dm.schema.item_counts)


# --- text -------------------------------------------------------------------------------------------------


def test_text_pairs(tmp_path, cache_root, dm, source):
    spec = TextSpec(
        pretrained=build_tiny_bert(tmp_path / "bert"), max_length=32, max_item_tokens=8, max_history_items=2
    )
    tdm = make_dm(cache_root, text=spec)
    tdm.setup()
    tables = tdm.text_tables
    assert tables.item_tokens.shape == (200, 8)
    rows = torch.tensor([0, 1, 2, *dm.rows["test"][:5].tolist()])
    batch = tdm.store.impressions(rows)
    assert set(batch.text) == {"input_ids", "attention_mask", "token_type_ids"}
    for value in batch.text.values():
        assert value.shape == (8, 32) and value.dtype == torch.long
    ids, mask = batch.text["input_ids"], batch.text["attention_mask"]
    assert (ids[:, 0] == tables.cls_id).all()
    hist = batch.seq["hist_item_id"]
    assert (hist.lengths[:3] == 0).all() and (hist.lengths[3:] > 0).any()
    for b in range(len(rows)):
        valid = ids[b, mask[b].bool()].tolist()
        assert (ids[b, ~mask[b].bool()] == tables.pad_id).all()
        item = int(batch.sparse["item_id"][b])
        cand = tables.item_tokens[item, : tables.item_lengths[item]].tolist()
        assert valid[-len(cand) - 1 :] == [*cand, tables.sep_id]  # "... [SEP] candidate [SEP]"
        if hist.lengths[b] == 0:
            assert valid == [tables.cls_id, tables.sep_id, *cand, tables.sep_id]
        else:
            latest = int(hist.ids[b, hist.lengths[b] - 1])  # most recent history item comes first
            latest_tokens = tables.item_tokens[latest, : tables.item_lengths[latest]].tolist()
            assert valid[1 : 1 + len(latest_tokens)] == latest_tokens
    text_features = tdm.schema.select("text")
    assert [(f.name, f.max_len) for f in text_features] == [("pair_text", 32)]
    # text does not change the data layout otherwise
    assert torch.equal(tdm.store.n_prior, dm.store.n_prior)


# --- configuration errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size", "history_len"])
def test_non_positive_sizes_raise(tmp_path, key):
    with pytest.raises(ValueError, match=f"data.{key}=0"):
        make_dm(tmp_path, **{key: 0})


@pytest.mark.parametrize("name", ["price", "title", "hour", "nope"])
def test_history_features_must_be_item_categoricals(cache_root, name):
    bad = make_dm(cache_root, history_features=["cat2", name])
    with pytest.raises(ValueError, match=f"data.history_features: '{name}' is not a categorical item column"):
        bad.setup()
