"""The e-commerce simulator: its `RawData` declarations, determinism, time order, cold-start releases, label sanity and its oracle signal."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from recsys_lab.data.sources.raw import FEATURE_KINDS, RawData
from recsys_lab.data.sources.simulator import CATEGORY_TREE, SECONDS_PER_DAY, EcommerceSimulator

SMALL = {"n_users": 300, "n_items": 200, "impressions_per_user": 20}
USER_COLS = ["age", "gender", "region", "pref_device"]
ITEM_CATS = ["cat1", "cat2", "brand"]
CONTEXT_COLS = ["hour", "weekday", "device"]


@pytest.fixture(scope="module")
def data():
    return EcommerceSimulator(**SMALL, seed=0).load()


def test_deterministic_for_a_seed(data):
    again = EcommerceSimulator(**SMALL, seed=0).load()
    for name in ("interactions", "users", "items"):
        assert getattr(again, name).equals(getattr(data, name)), name
    for name in ("features", "labels", "item_text", "oracle", "files"):
        assert getattr(again, name) == getattr(data, name), name
    assert (
        EcommerceSimulator(**SMALL, seed=0).fingerprint() == EcommerceSimulator(**SMALL, seed=0).fingerprint()
    )

    other = EcommerceSimulator(**SMALL, seed=1)
    assert other.fingerprint() != EcommerceSimulator(**SMALL, seed=0).fingerprint()
    other_data = other.load()
    assert not other_data.interactions.equals(data.interactions)
    assert not other_data.items.equals(data.items)


def test_raw_data_declarations(data):
    """The simulator declares what every column is; protocol choices (vocabularies, splits) happen downstream."""
    assert isinstance(data, RawData)
    assert data.features == {
        **dict.fromkeys(USER_COLS + ITEM_CATS + CONTEXT_COLS, "categorical"),
        "price": "numeric",
        "image": "dense_vector",
        "title": "text",
    }
    assert set(data.features.values()) <= set(FEATURE_KINDS)
    assert data.labels == ["click", "purchase"]
    assert data.oracle == "true_click_prob" and data.oracle in data.interactions.columns
    assert data.item_text == "title" and data.items[data.item_text].dtype == pl.String
    assert not hasattr(data, "vocab_sizes")  # vocabularies are fitted on training rows by `prepare`
    # every declared feature is a column of exactly one table; ids, labels, the oracle and the release time are not
    tables = {"interactions": data.interactions, "users": data.users, "items": data.items}
    for col in data.features:
        assert sum(col in t.columns for t in tables.values()) == 1, col
    assert set(data.users.columns) == {"user_id", *USER_COLS}
    assert set(data.items.columns) == {"item_id", *ITEM_CATS, "price", "image", "title", "release_ts"}
    assert set(data.interactions.columns) == {
        "user_id",
        "item_id",
        "timestamp",
        *CONTEXT_COLS,
        *data.labels,
        data.oracle,
    }
    for col in ("release_ts", "user_id", "item_id", "timestamp", *data.labels, data.oracle):
        assert col not in data.features, col


def test_tables_shapes_and_value_ranges(data):
    inter, users, items = data.interactions, data.users, data.items
    assert users["user_id"].to_list() == list(range(300))
    assert items["item_id"].to_list() == list(range(200))
    assert 300 * 3 <= inter.height <= 300 * 20 * 2  # every user has >= 3 impressions; mean about 20
    assert inter["user_id"].n_unique() == 300
    assert inter["user_id"].min() >= 0 and inter["user_id"].max() < 300
    assert inter["item_id"].min() >= 0 and inter["item_id"].max() < 200
    # categorical columns are small non-negative integers within their generator's ranges
    ranges = {"age": 6, "gender": 3, "region": 8, "pref_device": 3, "cat1": 8, "cat2": 40, "brand": 80}
    ranges |= {"hour": 24, "weekday": 7, "device": 3}
    frames = {**dict.fromkeys(USER_COLS, users), **dict.fromkeys(ITEM_CATS, items)}
    frames |= dict.fromkeys(CONTEXT_COLS, inter)
    for col, n in ranges.items():
        values = frames[col][col]
        assert values.dtype.is_integer() and values.null_count() == 0, col
        assert values.min() >= 0 and values.max() < n, col
    assert (
        users["gender"].n_unique() == 3
        and inter["hour"].n_unique() == 24
        and inter["weekday"].n_unique() == 7
    )
    # the category tree: a leaf (cat2) belongs to one top category (cat1); a brand to one top category
    assert items.group_by("cat2").agg(pl.col("cat1").n_unique())["cat1"].max() == 1
    assert items.group_by("brand").agg(pl.col("cat1").n_unique())["cat1"].max() == 1
    assert items["image"].to_numpy().shape == (200, 16)
    assert items["image"].dtype == pl.Array(pl.Float32, 16) or items["image"].dtype == pl.List(pl.Float32)
    assert (items["price"] > 0).all()
    # item text: brand, two factor words, then the leaf and its top category, which match cat2/cat1
    leaves = [(top, leaf) for top, ls in CATEGORY_TREE.items() for leaf in ls]
    for title, cat1, cat2 in items.select("title", "cat1", "cat2").iter_rows():
        top, leaf = leaves[cat2]
        assert title.endswith(f" {leaf} ({top})"), title
        assert list(CATEGORY_TREE).index(top) == cat1
    # hour/weekday are the timestamp's (day 0 is a Thursday)
    ts = inter["timestamp"].to_numpy()
    assert np.array_equal(inter["hour"].to_numpy(), (ts % SECONDS_PER_DAY) // 3600)
    assert np.array_equal(inter["weekday"].to_numpy(), (ts // SECONDS_PER_DAY + 3) % 7)
    assert (ts >= 0).all() and ts.max() < 28 * SECONDS_PER_DAY * 1.01


def test_timestamps_strictly_increasing_within_user(data):
    inter = data.interactions
    assert inter["timestamp"].is_sorted()  # the log is sorted by time
    per_user = inter.group_by("user_id", maintain_order=True).agg(pl.col("timestamp"))
    for times in per_user["timestamp"].to_list():
        assert len(times) >= 3
        assert np.all(np.diff(times) > 0)  # no ties: "strictly before" is never ambiguous
    assert inter.select(["user_id", "timestamp"]).is_duplicated().sum() == 0


def test_cold_items_never_shown_before_release(data):
    items, inter = data.items, data.interactions
    horizon = 28 * SECONDS_PER_DAY
    release = items["release_ts"].to_numpy()
    cold = release > 0
    assert 0.03 * 200 < cold.sum() < 0.25 * 200  # cold_item_fraction=0.1
    assert (release[cold] >= 0.75 * horizon).all() and (release[cold] <= 0.95 * horizon).all()
    shown = inter.join(items.select("item_id", "release_ts"), on="item_id")
    assert shown.height == inter.height
    assert (shown["timestamp"] >= shown["release_ts"]).all()
    late = shown.filter(pl.col("release_ts") > 0)
    assert late["item_id"].n_unique() >= 5  # cold items do get shown, after their release
    assert late["timestamp"].min() >= 0.75 * horizon
    assert late["click"].sum() > 0


def test_labels_and_oracle(data):
    inter = data.interactions
    click = inter["click"].to_numpy()
    purchase = inter["purchase"].to_numpy()
    assert set(np.unique(click)) == {0, 1} and set(np.unique(purchase)) == {0, 1}
    assert 0.02 < click.mean() < 0.3
    assert (purchase <= click).all()  # a purchase implies a click
    assert 0 < purchase.sum() < click.sum()
    prob = inter["true_click_prob"].to_numpy()
    assert ((prob > 0) & (prob < 1)).all()
    # the oracle is calibrated in aggregate: the mean probability is close to the click rate
    assert abs(prob.mean() - click.mean()) < 0.02


def test_oracle_beats_training_popularity_on_last_period(data):
    inter = data.interactions
    cutoff = np.quantile(inter["timestamp"].to_numpy(), 0.9)
    train = inter.filter(pl.col("timestamp") < cutoff)
    test = inter.filter(pl.col("timestamp") >= cutoff)
    popularity = np.bincount(train.filter(pl.col("click") == 1)["item_id"].to_numpy(), minlength=200)
    label = test["click"].to_numpy()
    assert label.sum() >= 20
    oracle_auc = roc_auc_score(label, test["true_click_prob"].to_numpy())
    popularity_auc = roc_auc_score(label, popularity[test["item_id"].to_numpy()])
    assert popularity_auc > 0.55  # popularity is a real signal ...
    assert oracle_auc > popularity_auc + 0.05  # ... but the click model has much more


@pytest.mark.parametrize("seed", [3, 4])
def test_small_catalogue_with_empty_leaves(seed):
    # 200 items over 40 leaves leaves some leaves empty; seed 4 empties the last leaf, which used to crash
    data = EcommerceSimulator(**SMALL, seed=seed).load()
    assert data.items["cat2"].n_unique() < 40
    assert data.interactions.height > 300 * 3
    # no single item takes the place of an empty favourite leaf: top item share stays near its Zipf exposure
    top_share = data.interactions["item_id"].value_counts()["count"].max() / data.interactions.height
    assert top_share < 0.25


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("n_users", 1),
        ("n_items", 15),
        ("n_days", 2),
        ("impressions_per_user", 0.5),
        ("latent_dim", 0),
        ("latent_dim", 9),
        ("zipf_exponent", -0.1),
        ("cold_item_fraction", 1.0),
        ("cold_item_fraction", -0.1),
        ("n_brands", 7),
        ("image_dim", 0),
        ("recent_window", 0),
    ],
)
def test_invalid_parameters_raise(param, value):
    with pytest.raises(ValueError, match=rf"invalid simulator parameter\(s\) \['{param}'\]"):
        EcommerceSimulator(**{param: value})


def test_invalid_parameters_all_listed():
    with pytest.raises(ValueError, match=r"\['n_users', 'n_days'\]"):
        EcommerceSimulator(n_users=0, n_days=1)


def test_describe_and_fingerprint_follow_parameters():
    sim = EcommerceSimulator(**SMALL, seed=5)
    info = sim.describe()
    assert info["source"] == "ecommerce" and info["simulator_seed"] == 5 and "seed" not in info
    assert info["n_users"] == 300 and info["impressions_per_user"] == 20.0
    assert len(sim.fingerprint()) == 16
    assert EcommerceSimulator(**{**SMALL, "n_days": 29}, seed=5).fingerprint() != sim.fingerprint()
    assert EcommerceSimulator(**{**SMALL, "base_logit": -4.0}, seed=5).fingerprint() != sim.fingerprint()
