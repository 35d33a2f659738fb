"""RecDataModule on a small simulator: the prepared parquet cache, impression batches against a slow per-row
reference built from the raw frames, temporal splits and training-only vocabularies and statistics, the
retrieval view and its ranking queries, sampled candidates, subsampling, text pairs, and configuration errors.

Entities and codes: a row references user/item *entities* (rows of the source's tables, so for the simulator the
raw id itself); the `user_id` / `item_id` features are *codes* of vocabularies fitted on training rows (0 =
unknown). The reference below is computed from `EcommerceSimulator.load()` with plain Python and polars.
"""

from __future__ import annotations

import bisect
import json
import shutil
from collections import defaultdict

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import roc_auc_score

from recsys_lab.data.audit import LeakageError
from recsys_lab.data.batch import Batch
from recsys_lab.data.datamodule import RecDataModule, TextSpec
from recsys_lab.data.prepare import PREPARE_VERSION, DataCacheError, Prepared
from recsys_lab.data.processing import Preprocess
from recsys_lab.data.sources.raw import RawData
from recsys_lab.data.sources.simulator import EcommerceSimulator
from recsys_lab.data.splits import TEST, TRAIN, VAL, TemporalSplit
from recsys_lab.utils.testing_text import build_tiny_bert

SMALL = {"n_users": 300, "n_items": 200, "impressions_per_user": 20}
L = 5  # short, so many users have more positives than the history carries
USER_COLS = ["age", "gender", "region", "pref_device"]
ITEM_COLS = ["cat1", "cat2", "brand"]
CONTEXT_COLS = ["hour", "weekday", "device"]
CACHE_FILES = [
    "items.parquet",
    "meta.json",
    "queries_test.parquet",
    "queries_val.parquet",
    "rows.parquet",
    "users.parquet",
]
STAGE_CODES = {"train": TRAIN, "val": VAL, "test": TEST}


def make_dm(cache_dir, source=None, **kwargs) -> RecDataModule:
    """The simulator's protocol (conf/data/ecommerce.yaml): an impression log, nothing deduplicated."""
    defaults = {
        "split": TemporalSplit(val_fraction=0.1, test_fraction=0.1),
        "preprocess": Preprocess(deduplicate="none"),
        "history_len": L,
        "history_features": ["cat2", "brand"],
        "log_dense": ["price"],
        "batch_size": 64,
    }
    return RecDataModule(
        source=source or EcommerceSimulator(**SMALL, seed=0),
        cache_dir=str(cache_dir),
        **{**defaults, **kwargs},
    )


def _count_loads(source) -> list:
    """Record every call of `source.load()`."""
    calls = []
    original = source.load

    def load():
        calls.append(1)
        return original()

    source.load = load
    return calls


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
def raw() -> RawData:
    """The raw tables, straight from the simulator: the reference every check is computed from."""
    return EcommerceSimulator(**SMALL, seed=0).load()


class Reference:
    """Slow, plain-Python facts about the raw frames, aligned with the datamodule's rows."""

    def __init__(self, dm: RecDataModule, raw: RawData) -> None:
        prepared = Prepared.load(dm.cache_path, dm.protocol_fingerprint())
        # entities are the rows of the source's tables; the simulator's ids are 0..n-1, so entity == raw id
        assert prepared.users["user_id"].to_list() == raw.users["user_id"].to_list() == list(range(300))
        assert prepared.items["item_id"].to_list() == raw.items["item_id"].to_list() == list(range(200))
        inter = raw.interactions
        self.inter = inter
        # datamodule row -> raw row, matched on (user, timestamp): unique, since a user's timestamps are strict
        raw_row = {(u, t): k for k, (u, t) in enumerate(inter.select("user_id", "timestamp").iter_rows())}
        rows = prepared.rows
        self.raw_row = np.array([raw_row[(u, t)] for u, t in rows.select("user", "timestamp").iter_rows()])
        assert sorted(self.raw_row.tolist()) == list(
            range(inter.height)
        )  # a bijection: nothing lost or doubled
        self.user = inter["user_id"].to_numpy()[self.raw_row]  # per datamodule row, raw ids
        self.item = inter["item_id"].to_numpy()[self.raw_row]
        self.ts = inter["timestamp"].to_numpy()[self.raw_row]
        self.click = inter["click"].to_numpy()[self.raw_row]
        assert np.array_equal(self.user, dm.store.user.numpy()) and np.array_equal(
            self.item, dm.store.item.numpy()
        )
        self.t_val, self.t_test = dm.split.cutoffs_
        self.is_train = self.ts < self.t_val
        self.train_users = set(self.user[self.is_train].tolist())
        self.train_items = set(self.item[self.is_train].tolist())
        # user -> [(timestamp, item)] of their clicks, in time order
        self.clicks = defaultdict(list)
        for u, i, t in (
            inter.filter(pl.col("click") == 1)
            .sort("timestamp")
            .select("user_id", "item_id", "timestamp")
            .iter_rows()
        ):
            self.clicks[u].append((t, i))
        # item codes, read from the entity table and checked against the rows by `test_ids_are_train_vocabularies`
        self.code = dm.store.items.sparse["item_id"].numpy()

    def history(self, user: int, t: int) -> list[int]:
        """Raw items the user clicked strictly before t, oldest first."""
        past = self.clicks[user]
        return [i for _, i in past[: bisect.bisect_left(past, (t, -1))]]  # items >= 0: strictly before t

    def clicked_codes(self, user: int, start: float, end: float) -> set[int]:
        return {int(self.code[i]) for t, i in self.clicks[user] if start <= t < end}


@pytest.fixture(scope="module")
def ref(dm, raw) -> Reference:
    return Reference(dm, raw)


@pytest.fixture(scope="module")
def everything(dm) -> Batch:
    """Impression batch of every row (the order of the prepared rows)."""
    return dm.store.impressions(torch.arange(len(dm.store.user)))


def assert_train_vocabulary(raw_values, codes, train_values, vocab_size: int, name: str) -> dict:
    """Codes of a categorical column: one code per raw value in every row, distinct codes 1..V-1 for the values
    seen in training, 0 for the others. Returns the raw value -> code mapping."""
    pairs = pl.DataFrame({"value": np.asarray(raw_values), "code": np.asarray(codes)}).unique()
    assert pairs["value"].is_unique().all(), f"{name}: a raw value has several codes"
    mapping = dict(pairs.iter_rows())
    train_values = set(np.asarray(list(train_values)).tolist())
    known = sorted(mapping[v] for v in mapping if v in train_values)
    assert known == list(range(1, vocab_size)), f"{name}: training values are not coded 1..{vocab_size - 1}"
    assert all(mapping[v] == 0 for v in mapping if v not in train_values), (
        f"{name}: an unseen value has a code"
    )
    return mapping


# --- cache ------------------------------------------------------------------------------------------------


def test_cache_written_once_and_reused(tmp_path):
    sim = EcommerceSimulator(**SMALL, seed=0)
    calls = _count_loads(sim)
    first = make_dm(tmp_path, source=sim)
    first.prepare_data()
    assert calls == [1]
    folder = first.cache_path
    assert folder == tmp_path / f"ecommerce-{first.protocol_fingerprint()}"
    assert sorted(p.name for p in folder.iterdir()) == CACHE_FILES
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["fingerprint"] == first.protocol_fingerprint() and meta["format"] == PREPARE_VERSION
    assert meta["row_counts"]["users"] == 300 and meta["row_counts"]["items"] == 200
    assert meta["row_counts"]["rows"] == EcommerceSimulator(**SMALL, seed=0).load().interactions.height
    first.prepare_data()
    first.setup()
    assert calls == [1]  # prepared once
    assert first.audit_report["status"] == "passed"

    sim2 = EcommerceSimulator(**SMALL, seed=0)
    calls2 = _count_loads(sim2)
    second = make_dm(tmp_path, source=sim2)
    assert second.cache_path == folder
    second.prepare_data()
    second.setup()
    assert calls2 == []  # read from the cache, not simulated again
    assert second.counts == first.counts
    assert torch.equal(second.store.item, first.store.item) and torch.equal(
        second.store.n_prior, first.store.n_prior
    )
    assert torch.equal(second.schema.item_counts, first.schema.item_counts)
    assert second.split.cutoffs_ == first.split.cutoffs_ is not None  # restored from the cache
    assert second.fingerprint() == first.fingerprint()


def test_changed_source_or_protocol_uses_another_folder(tmp_path, dm):
    sim = EcommerceSimulator(**SMALL, seed=0)
    base = make_dm(tmp_path, source=sim)
    # choices that do not change the prepared tables share the folder
    for same in (
        {"batch_size": 7},
        {"history_len": 3},
        {"ctr_eval": "ranking"},
        {"max_train_rows": 100},
        {"train_negatives": "uniform_2"},
    ):
        assert make_dm(tmp_path, **same).cache_path == base.cache_path, same
    # the source's parameters, the preprocessing, the split, the candidates and the normalisers do not
    changed = {
        "n_days": make_dm(tmp_path, source=EcommerceSimulator(**{**SMALL, "n_days": 21}, seed=0)),
        "seed": make_dm(tmp_path, source=EcommerceSimulator(**SMALL, seed=1)),
        "preprocess": make_dm(tmp_path, preprocess=Preprocess(deduplicate="last")),
        "split": make_dm(tmp_path, split=TemporalSplit(val_fraction=0.2, test_fraction=0.1)),
        "eval_candidates": make_dm(tmp_path, eval_candidates="uniform_20"),
        "log_dense": make_dm(tmp_path, log_dense=[]),
    }
    folders = {name: d.cache_path for name, d in changed.items()}
    assert len({*folders.values(), base.cache_path}) == len(folders) + 1, folders
    assert all(f.parent == tmp_path and f.name.startswith("ecommerce-") for f in folders.values())

    # a changed source and a changed protocol are really rebuilt, next to the first cache
    base.prepare_data()
    for name in ("n_days", "split"):
        d = changed[name]
        calls = _count_loads(d.source)
        d.prepare_data()
        assert calls == [1], name
        assert (d.cache_path / "meta.json").exists()
        d.setup()
        assert d.fingerprint() != dm.fingerprint()
    assert (base.cache_path / "meta.json").exists()  # the first cache is untouched
    wider = changed["split"]
    assert wider.counts["val_rows"] > 1.5 * dm.counts["val_rows"]
    assert wider.split.cutoffs_[0] < dm.split.cutoffs_[0]


def test_setup_without_prepare_writes_cache(tmp_path):
    sim = EcommerceSimulator(**SMALL, seed=0)
    calls = _count_loads(sim)
    d = make_dm(tmp_path, source=sim)
    d.setup()
    assert calls == [1] and (d.cache_path / "meta.json").exists()
    d.setup()  # idempotent
    d.prepare_data()
    assert calls == [1]


@pytest.fixture
def cache_copy(tmp_path, dm):
    """A private copy of the module's cache folder, safe to damage (make_dm(tmp_path) reads it)."""
    folder = tmp_path / dm.cache_path.name
    shutil.copytree(dm.cache_path, folder)
    assert make_dm(tmp_path).cache_path == folder
    return folder


@pytest.mark.parametrize("name", CACHE_FILES)
def test_corrupt_cache_file_raises(tmp_path, cache_copy, name):
    path = cache_copy / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated write
    with pytest.raises(DataCacheError, match="corrupt") as info:
        make_dm(tmp_path).prepare_data()
    assert str(path) in str(info.value)
    assert f"delete the folder {cache_copy}" in str(info.value)


def test_mismatched_or_missing_parquet_raises(tmp_path, cache_copy):
    users = pl.read_parquet(cache_copy / "users.parquet")
    users.head(10).write_parquet(cache_copy / "users.parquet")
    with pytest.raises(DataCacheError, match="has 10 rows, meta.json says 300") as info:
        make_dm(tmp_path).prepare_data()
    assert str(cache_copy / "users.parquet") in str(info.value)
    users.write_parquet(cache_copy / "users.parquet")  # repaired; now another file goes missing
    make_dm(tmp_path).prepare_data()
    (cache_copy / "rows.parquet").unlink()
    with pytest.raises(DataCacheError, match="corrupt or missing") as info:
        make_dm(tmp_path).setup()
    assert str(cache_copy / "rows.parquet") in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"), [("format", PREPARE_VERSION + 1), ("fingerprint", "0123456789abcdef")]
)
def test_cache_from_another_version_raises(tmp_path, cache_copy, key, value):
    meta_path = cache_copy / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta[key] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataCacheError, match="another version") as info:
        make_dm(tmp_path).prepare_data()
    assert str(cache_copy) in str(info.value)


# --- impression batches against a slow per-row reference -----------------------------------------------------


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


# --- splits and training statistics ---------------------------------------------------------------------------


def test_temporal_split_boundaries(dm, ref):
    t_val, t_test = dm.split.cutoffs_
    assert dm.meta["cutoffs"] == [t_val, t_test]
    ts = torch.as_tensor(ref.ts)
    assert ts[dm.rows["train"]].max() < t_val <= ts[dm.rows["val"]].min()
    assert ts[dm.rows["val"]].max() < t_test <= ts[dm.rows["test"]].min()
    every = torch.cat([dm.rows["train"], dm.rows["val"], dm.rows["test"]])
    n = len(ref.ts)
    assert torch.equal(every.sort().values, torch.arange(n))  # a partition
    for stage, code in STAGE_CODES.items():
        assert (dm.store.split[dm.rows[stage]] == code).all()
        assert dm.counts[f"{stage}_rows"] == dm.counts[f"{stage}_rows_used"] == len(dm.rows[stage])
    assert abs(len(dm.rows["val"]) - 0.1 * n) < 0.02 * n and abs(len(dm.rows["test"]) - 0.1 * n) < 0.02 * n
    # every period has real negatives (an impression log)
    assert dm.meta["has_negatives"] == {"train": True, "val": True, "test": True}


def test_item_counts_are_training_clicks_only(dm, ref):
    train_clicks = ref.item[ref.is_train & (ref.click == 1)]
    expected = np.bincount(ref.code[train_clicks], minlength=dm.schema.num_items).astype(np.float32)
    assert expected[0] == 0  # every clicked training item has a code
    assert torch.equal(dm.schema.item_counts, torch.as_tensor(expected))
    assert torch.equal(dm.item_counts, dm.schema.item_counts)
    assert dm.schema.item_counts.sum() == len(train_clicks) < ref.click.sum()  # later periods are not counted


def test_vocabularies_hold_only_training_entities(dm, ref):
    user_code = dm.store.users.sparse["user_id"].numpy()
    assert {u for u in range(300) if user_code[u] > 0} == ref.train_users
    assert {i for i in range(200) if ref.code[i] > 0} == ref.train_items
    assert dm.schema.num_users == len(ref.train_users) + 1 and dm.schema.num_items == len(ref.train_items) + 1
    # items shown only after training exist (late releases), and are unknown
    later = set(ref.item[~ref.is_train].tolist()) - ref.train_items
    assert len(later) >= 5 and all(ref.code[i] == 0 for i in later)
    assert dm.schema.num_items < 200


def test_dense_standardised_with_training_statistics(dm, raw, ref):
    train_items = torch.as_tensor(sorted(ref.train_items))
    assert torch.equal(train_items, torch.unique(dm.store.item[dm.rows["train"]]))
    for name, table in dm.store.items.dense.items():
        seen = table[train_items].double()
        torch.testing.assert_close(seen.mean(0), torch.zeros_like(seen.mean(0)), atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(
            seen.std(0, unbiased=False), torch.ones_like(seen.mean(0)), atol=1e-3, rtol=0
        )
    assert dm.store.items.dense["image"].shape == (200, 16)
    # the catalogue-wide statistics would differ (items outside training exist)
    log_price = np.log1p(raw.items["price"].to_numpy())
    catalogue_z = (log_price - log_price.mean()) / log_price.std()
    assert np.abs(dm.store.items.dense["price"].numpy() - catalogue_z).max() > 1e-3
    assert dm.meta["normalisers"]["price"]["log1p"] is True
    assert dm.meta["normalisers"]["image"]["log1p"] is False


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


def test_reference_metrics_and_describe(dm, ref):
    ref_metrics = dm.reference_metrics("test")
    assert set(ref_metrics) == {"popularity_auc", "oracle_auc"}
    assert 0.5 < ref_metrics["popularity_auc"] < ref_metrics["oracle_auc"] < 1.0
    test_rows = dm.rows["test"].numpy()
    oracle = ref.inter["true_click_prob"].to_numpy()[ref.raw_row[test_rows]]
    assert ref_metrics["oracle_auc"] == pytest.approx(roc_auc_score(ref.click[test_rows], oracle), abs=1e-6)

    info = dm.describe()
    assert info["source"] == "ecommerce" and info["split"] == "temporal" and info["val_fraction"] == 0.1
    assert info["preprocess"]["deduplicate"] == "none"
    assert info["evaluation"] == "impressions" and info["eval_candidates"] == "logged impressions"
    assert info["leakage_audit"]["status"] == "passed" and len(info["leakage_audit"]["checks"]) == 4
    assert info["test_rows_used"] == len(dm.rows["test"]) and info["users"] == 300 and info["items"] == 200


def test_ctr_loaders(dm):
    assert dm.view == "ctr" and dm.evaluation == "impressions"
    val = list(dm.val_dataloader())
    assert all(isinstance(b, Batch) for b in val)
    assert sum(len(b) for b in val) == len(dm.rows["val"]) and len(val[0]) == 8
    assert "eval.targets" not in val[0].seq
    train = list(dm.train_dataloader())
    assert len(train[0]) == 64 and set(train[0].labels) == {"click", "purchase"}
    assert sum(len(b) for b in train) == len(dm.rows["train"])
    clicks = torch.cat([b.labels["click"] for b in train])
    assert 0 < clicks.mean() < 0.5  # the logged negatives are trained on
    catalogue = dm.catalogue()
    assert torch.equal(catalogue.sparse["item_id"][1:], torch.arange(1, dm.schema.num_items))
    assert catalogue.dense["image"].shape == (dm.schema.num_items, 16)


# --- retrieval view ---------------------------------------------------------------------------------------


def test_retrieval_train_rows_are_training_clicks(dm, ref):
    dm.set_view("retrieval")
    try:
        assert dm.evaluation == "ranking"
        dataset = dm.dataset("train")
        clicked = np.flatnonzero(ref.is_train & (ref.click == 1))
        assert len(dataset) == len(clicked)
        batch = dataset.__getitems__(list(range(len(dataset))))
        assert (batch.labels["click"] == 1).all()
        user_code = dm.store.users.sparse["user_id"].numpy()
        got = sorted(zip(batch.sparse["user_id"].tolist(), batch.sparse["item_id"].tolist(), strict=True))
        expected = sorted((int(user_code[ref.user[r]]), int(ref.code[ref.item[r]])) for r in clicked)
        assert got == expected
        batches = list(dm.train_dataloader())
        assert all(isinstance(b, Batch) for b in batches)
        n = len(dataset)
        assert [len(b) for b in batches] == [64] * (n // 64) + ([n % 64] if n % 64 else [])
        assert "hist_item_id" in batches[0].seq
    finally:
        dm.set_view("ctr")


def _query_reference(ref: Reference, stage: str):
    """user -> (targets, seen): codes first clicked in the period (never code 0), codes clicked before it."""
    start, end = (ref.t_val, ref.t_test) if stage == "val" else (ref.t_test, np.inf)
    out, unknown, active = {}, 0, 0
    for u in sorted(ref.clicks):
        seen = ref.clicked_codes(u, -np.inf, start)
        period = [int(ref.code[i]) for t, i in ref.clicks[u] if start <= t < end]
        unknown += period.count(0)
        active += bool(period)
        new = set(period) - seen - {0}
        if new:
            out[u] = (new, seen)
    return out, unknown, active


@pytest.mark.parametrize("stage", ["val", "test"])
def test_retrieval_queries_match_reference(dm, ref, stage):
    expected, unknown, active = _query_reference(ref, stage)
    cutoff = ref.t_val if stage == "val" else ref.t_test
    dm.set_view("retrieval")
    try:
        loader = dm.val_dataloader() if stage == "val" else dm.test_dataloader()
        batches = list(loader)
    finally:
        dm.set_view("ctr")
    n = len(expected)
    assert n >= 10 and dm.counts[f"{stage}_queries"] == n
    assert dm.counts[f"{stage}_targets_unknown_item"] == unknown
    assert dm.counts[f"{stage}_users_without_new_targets"] == active - n
    assert [len(b) for b in batches] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    user_code = dm.store.users.sparse["user_id"].numpy()
    got_users = []
    for batch in batches:
        assert isinstance(batch, Batch)
        targets, seen, hist = batch.seq["eval.targets"], batch.seq["eval.seen"], batch.seq["hist_item_id"]
        assert "eval.candidates" not in batch.seq  # full ranking
        # the loader's Seqs are as wide as the longest row of the batch, each with its own length
        for b, u in enumerate(batch.sparse["eval.user"].tolist()):
            got_users.append(u)
            want_targets, want_seen = expected[u]
            assert targets.lengths[b] == len(want_targets) and seen.lengths[b] == len(want_seen)
            got_targets = targets.ids[b, : targets.lengths[b]].tolist()
            got_seen = seen.ids[b, : seen.lengths[b]].tolist()
            assert sorted(got_targets) == sorted(want_targets)  # distinct, new, known items of the period
            assert sorted(got_seen) == sorted(want_seen)  # exactly the codes clicked before the period
            assert batch.sparse["user_id"][b] == user_code[u]
            # the user as of the period's start: every click of the earlier splits
            past = [int(ref.code[i]) for i in ref.history(u, cutoff)][-L:]
            assert hist.lengths[b] == len(past) and hist.ids[b, : len(past)].tolist() == past
            for col in CONTEXT_COLS:  # no context for a query
                assert batch.sparse[col][b] == 0
        assert targets.ids.shape[1] == int(targets.lengths.max())
    assert got_users == sorted(expected)
    assert any(len(t) > 1 for t, _ in expected.values()) and any(len(s) == 0 for _, s in expected.values())


def test_ctr_eval_ranking_gives_query_batches(cache_root, dm):
    calls = _count_loads(source := EcommerceSimulator(**SMALL, seed=0))
    ranked = make_dm(cache_root, source=source, ctr_eval="ranking", eval_batch_size=8)
    ranked.setup()
    assert calls == []  # same prepared data
    assert ranked.view == "ctr" and ranked.evaluation == "ranking"
    for stage, loader in (("val", ranked.val_dataloader()), ("test", ranked.test_dataloader())):
        batches = list(loader)
        assert sum(len(b) for b in batches) == len(dm.queries[stage]["users"])
        assert all({"eval.targets", "eval.seen", "hist_item_id"} <= set(b.seq) for b in batches)
        users = torch.cat([b.sparse["eval.user"] for b in batches])
        assert torch.equal(users, dm.queries[stage]["users"])
    assert ranked.reference_metrics("test") == {}
    assert ranked.describe()["eval_candidates"] == "full"
    first = next(iter(ranked.train_dataloader()))  # training still reads the logged impressions
    assert "eval.targets" not in first.seq and len(first) == 64


# --- sampled candidates -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled(cache_root) -> RecDataModule:
    d = make_dm(cache_root, eval_candidates="uniform_20", eval_batch_size=8)
    d.setup()
    return d


def test_sampled_candidates(sampled, dm, ref):
    assert sampled.cache_path != dm.cache_path
    assert sampled.audit_report["status"] == "passed"
    n_codes = sampled.schema.num_items
    for stage in ("val", "test"):
        q = sampled.queries[stage]
        assert torch.equal(q["users"], dm.queries[stage]["users"])  # same queries as full ranking
        assert torch.equal(q["targets"].values, dm.queries[stage]["targets"].values)
        cands = q["candidates"]
        for k, u in enumerate(q["users"].tolist()):
            targets = q["targets"].values[q["targets"].offsets[k] : q["targets"].offsets[k + 1]].tolist()
            row = cands.values[cands.offsets[k] : cands.offsets[k + 1]].tolist()
            assert len(row) == 21 * len(targets)
            assert row[: len(targets)] == targets  # targets first
            negatives = row[len(targets) :]
            positives = ref.clicked_codes(u, -np.inf, np.inf)  # the user's clicks in every split
            assert all(0 < c < n_codes for c in negatives)
            assert not set(negatives) & (positives | set(targets))
    # the loader carries them, with the right lengths
    sampled.set_view("retrieval")
    try:
        assert sampled.describe()["eval_candidates"] == "uniform_20"
        batch = next(iter(sampled.test_dataloader()))
    finally:
        sampled.set_view("ctr")
    assert torch.equal(batch.seq["eval.candidates"].lengths, 21 * batch.seq["eval.targets"].lengths)
    t = batch.seq["eval.targets"]
    c = batch.seq["eval.candidates"]
    assert torch.equal(c.ids[:, : t.ids.shape[1]] * t.mask(), t.ids * t.mask())


def test_sampled_candidates_are_stored_in_the_cache(cache_root, sampled):
    stored = pl.read_parquet(sampled.cache_path / "queries_val.parquet")
    assert stored["candidates"].null_count() == 0 and stored.height == len(sampled.queries["val"]["users"])
    source = EcommerceSimulator(**SMALL, seed=0)
    calls = _count_loads(source)
    again = make_dm(cache_root, source=source, eval_candidates="uniform_20", seed=0)
    again.setup()
    assert calls == []
    for stage in ("val", "test"):
        a, b = sampled.queries[stage]["candidates"], again.queries[stage]["candidates"]
        assert torch.equal(a.values, b.values) and torch.equal(a.offsets, b.offsets)
    # another seed draws other candidates, in another folder
    other = make_dm(cache_root, eval_candidates="uniform_20", seed=1)
    assert other.cache_path != sampled.cache_path


def test_audit_catches_a_positive_among_candidates(tmp_path, sampled, ref):
    folder = tmp_path / sampled.cache_path.name
    shutil.copytree(sampled.cache_path, folder)
    queries = pl.read_parquet(folder / "queries_val.parquet")
    user = queries["user"][0]
    n_targets = len(queries["targets"][0])
    clicked_before = sorted(ref.clicked_codes(user, -np.inf, ref.t_val) - {0})
    assert clicked_before  # a training positive of this user
    cands = queries["candidates"].to_list()
    cands[0][n_targets] = clicked_before[0]  # the first negative becomes a positive
    queries.with_columns(pl.Series("candidates", cands, dtype=pl.List(pl.Int64))).write_parquet(
        folder / "queries_val.parquet"
    )
    with pytest.raises(LeakageError, match="sampled val candidate is one of the user's positives"):
        make_dm(tmp_path, eval_candidates="uniform_20").setup()


# --- subsampling ------------------------------------------------------------------------------------------


def test_subsampling_is_seeded(cache_root, dm):
    def sub(seed):
        d = make_dm(cache_root, max_train_rows=500, max_eval_rows=10, seed=seed)
        d.setup()
        return d

    a, b, c = sub(0), sub(0), sub(1)
    assert a.cache_path == dm.cache_path  # the prepared data are shared; only the rows used differ
    for stage in ("train", "val", "test"):
        assert torch.equal(a.rows[stage], b.rows[stage])
        assert len(a.rows[stage]) == (500 if stage == "train" else 10)
        assert torch.equal(a.rows[stage], a.rows[stage].unique())  # sorted, no repeats
        assert torch.isin(a.rows[stage], dm.rows[stage]).all()  # drawn from the stage's own rows
        assert not torch.equal(a.rows[stage], c.rows[stage])
    for stage in ("val", "test"):
        qa, qb = a.queries[stage], b.queries[stage]
        assert len(qa["users"]) == 10 and torch.equal(qa["users"], qb["users"])
        assert torch.equal(qa["users"], qa["users"].unique())
        full = dm.queries[stage]
        assert torch.isin(qa["users"], full["users"]).all()
        # each kept query keeps its own targets and seen items
        for k, u in enumerate(qa["users"].tolist()):
            j = int((full["users"] == u).nonzero())
            for key in ("targets", "seen"):
                mine = qa[key].values[qa[key].offsets[k] : qa[key].offsets[k + 1]]
                theirs = full[key].values[full[key].offsets[j] : full[key].offsets[j + 1]]
                assert torch.equal(mine, theirs)
    assert a.counts["train_rows_used"] == 500 and a.counts["val_queries_used"] == 10
    assert a.counts["train_rows"] == dm.counts["train_rows"]  # the split itself is unchanged
    assert sum(len(x) for x in a.train_dataloader()) == 500
    # statistics are fitted on the whole training split, not the subsample
    assert torch.equal(a.schema.item_counts, dm.schema.item_counts)
    assert torch.equal(a.store.n_prior, dm.store.n_prior)


# --- text -------------------------------------------------------------------------------------------------


def test_text_pairs(tmp_path, cache_root, dm, ref):
    spec = TextSpec(
        pretrained=build_tiny_bert(tmp_path / "bert"), max_length=32, max_item_tokens=8, max_history_items=2
    )
    tdm = make_dm(cache_root, text=spec)
    tdm.setup()
    tables = tdm.text_tables
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


# --- implicit data ----------------------------------------------------------------------------------------


class ClicksOnly:
    """The simulator's clicks as implicit data (positives only, no label columns), like a purchase log."""

    name = "clicks"

    def __init__(self) -> None:
        self.sim = EcommerceSimulator(**SMALL, seed=0)

    def fingerprint(self) -> str:
        return "clicks-" + self.sim.fingerprint()

    def describe(self) -> dict:
        return {"source": self.name}

    def load(self) -> RawData:
        raw = self.sim.load()
        inter = raw.interactions.filter(pl.col("click") == 1).drop("click", "purchase", "true_click_prob")
        return RawData(inter, raw.users, raw.items, raw.features, labels=[], item_text=raw.item_text)


def test_implicit_data_needs_train_negatives_in_the_ctr_view(cache_root):
    d = make_dm(cache_root, source=ClicksOnly())
    d.setup()
    assert d.schema.labels == ["label"] and d.meta["has_negatives"] == {
        "train": False,
        "val": False,
        "test": False,
    }
    with pytest.raises(ValueError, match=r"data\.train_negatives is required"):
        d.train_dataloader()
    with pytest.raises(
        ValueError, match=r"data\.ctr_eval=impressions needs negative labels in the val split"
    ):
        d.val_dataloader()
    d.set_view("retrieval")  # retrieval trains on the positives alone
    assert len(d.dataset("train")) == d.counts["train_rows"]


def test_implicit_data_with_sampled_train_negatives(cache_root):
    d = make_dm(cache_root, source=ClicksOnly(), train_negatives="uniform_4", ctr_eval="ranking")
    d.setup()
    batch = next(iter(d.train_dataloader()))
    assert len(batch) == 5 * 64
    assert (batch.labels["label"][:64] == 1).all() and (batch.labels["label"][64:] == 0).all()
    users = batch.sparse["user_id"][:64].repeat_interleave(4)
    assert torch.equal(batch.sparse["user_id"][64:], users)  # each positive's user, then its 4 negatives
    negatives = batch.sparse["item_id"][64:]
    assert (negatives > 0).all()
    # never one of the user's training positives
    store = d.store
    train = d.rows["train"]
    code = store.items.sparse["item_id"]
    user_code = store.users.sparse["user_id"]
    positives = set(zip(user_code[store.user[train]].tolist(), code[store.item[train]].tolist(), strict=True))
    assert not positives & set(zip(users.tolist(), negatives.tolist(), strict=True))
    assert "eval.targets" in next(iter(d.val_dataloader())).seq


# --- configuration errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size", "history_len"])
def test_non_positive_sizes_raise(tmp_path, key):
    with pytest.raises(ValueError, match=f"data.{key}=0"):
        make_dm(tmp_path, **{key: 0})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("eval_candidates", "bogus_5", r"data\.eval_candidates='bogus_5'"),
        ("eval_candidates", "uniform_0", r"data\.eval_candidates='uniform_0'"),
        ("train_negatives", "many_4", r"data\.train_negatives='many_4'"),
        ("ctr_eval", "nope", r"data\.ctr_eval='nope'"),
    ],
)
def test_bad_protocol_values_raise(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        make_dm(tmp_path, **{key: value})


def test_set_view_unknown_raises(dm):
    with pytest.raises(ValueError, match="data view 'ranking' is unknown"):
        dm.set_view("ranking")
    assert dm.view == "ctr"


@pytest.mark.parametrize("name", ["price", "title", "hour", "age", "nope"])
def test_history_features_must_be_item_categoricals(cache_root, name):
    bad = make_dm(cache_root, history_features=["cat2", name])
    with pytest.raises(ValueError, match=f"data.history_features: '{name}' is not a categorical item column"):
        bad.setup()
