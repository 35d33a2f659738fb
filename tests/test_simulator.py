"""The e-commerce simulator: determinism, time order, cold-start releases, label sanity and its oracle signal."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from recsys_lab.data.sources.simulator import SECONDS_PER_DAY, EcommerceSimulator

SMALL = {"n_users": 300, "n_items": 200, "impressions_per_user": 20}


@pytest.fixture(scope="module")
def data():
    return EcommerceSimulator(**SMALL, seed=0).load()


def test_deterministic_for_a_seed(data):
    again = EcommerceSimulator(**SMALL, seed=0).load()
    for name in ("interactions", "users", "items"):
        assert getattr(again, name).equals(getattr(data, name)), name
    assert again.vocab_sizes == data.vocab_sizes
    assert (
        EcommerceSimulator(**SMALL, seed=0).fingerprint() == EcommerceSimulator(**SMALL, seed=0).fingerprint()
    )

    other = EcommerceSimulator(**SMALL, seed=1)
    assert other.fingerprint() != EcommerceSimulator(**SMALL, seed=0).fingerprint()
    other_data = other.load()
    assert not other_data.interactions.equals(data.interactions)
    assert not other_data.items.equals(data.items)


def test_tables_shapes_and_vocabularies(data):
    inter, users, items = data.interactions, data.users, data.items
    assert users["user_id"].to_list() == list(range(300))
    assert items["item_id"].to_list() == list(range(200))
    assert 300 * 3 <= inter.height <= 300 * 20 * 2  # every user has >= 3 impressions; mean about 20
    assert inter["user_id"].n_unique() == 300
    for frame in (inter, users, items):
        for col in frame.columns:
            if col in data.vocab_sizes:
                assert frame[col].min() >= 0 and frame[col].max() < data.vocab_sizes[col], col
    assert data.vocab_sizes["user_id"] == 300 and data.vocab_sizes["item_id"] == 200
    assert items["image"].to_numpy().shape == (200, 16)
    assert (items["price"] > 0).all()
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
