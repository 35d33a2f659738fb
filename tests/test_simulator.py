"""The e-commerce simulator: its `RawData` declarations, determinism, time order, cold-start releases, label
sanity, its oracle signal, and its click model (hand-computed logits, and the logged oracle column)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from recsys_lab.data.sources.raw import FEATURE_KINDS, RawData
from recsys_lab.data.sources.simulator import (
    CATEGORY_TREE,
    SECONDS_PER_DAY,
    ClickInputs,
    ClickModel,
    EcommerceSimulator,
)

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
        ("latent_dim", 1),  # titles name the two strongest factors: one would crash load()
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


def test_fingerprint_and_describe_are_pinned():
    """Cached data and published results are keyed by these: they change only with SIMULATOR_VERSION."""
    assert EcommerceSimulator().fingerprint() == "0ea2b6fde8614911"
    assert EcommerceSimulator(**SMALL, seed=0).fingerprint() == "4a4638b30a079b76"
    assert EcommerceSimulator().describe() == {
        "source": "ecommerce",
        "simulator_version": 2,
        "n_users": 5000,
        "n_items": 2000,
        "n_days": 28,
        "impressions_per_user": 50.0,
        "latent_dim": 8,
        "zipf_exponent": 1.0,
        "cold_item_fraction": 0.1,
        "n_brands": 80,
        "image_dim": 16,
        "recent_window": 5,
        "base_logit": -4.3,
        "simulator_seed": 0,
    }


def test_small_log_is_pinned(data):
    """The same parameters give the same log as when SIMULATOR_VERSION 2 was published: any change to a draw,
    its order or the click model shows here (and then needs a version bump, which changes the fingerprint)."""
    inter = data.interactions
    assert inter.height == 5136
    assert (inter["click"].sum(), inter["purchase"].sum(), inter["item_id"].sum()) == (365, 163, 554574)
    assert inter["true_click_prob"].sum() == pytest.approx(386.89077474917417, rel=1e-12)


# ---- the click model ----------------------------------------------------------------------------------------
def _inputs(m: int = 1, **fields) -> ClickInputs:
    """m impressions on which every term of the click logit is zero (K=2, R=3), with `fields` overridden."""
    neutral = {
        "item_factors": np.zeros((m, 2)),
        "item_appeal": np.zeros(m),
        "item_top": np.zeros(m, dtype=np.int64),
        "item_leaf": np.zeros(m, dtype=np.int64),
        "item_price_z": np.zeros(m),
        "user_taste": np.zeros((m, 2)),
        "price_sensitivity": np.zeros(m),
        "hour": np.zeros(m, dtype=np.int64),
        "weekday": np.zeros(m, dtype=np.int64),  # a Monday
        "device": np.zeros(m, dtype=np.int64),
        "recent_factors": np.zeros((m, 3, 2)),
        "recent_leaves": np.ones((m, 3), dtype=np.int64),
        "recent_valid": np.zeros((m, 3), dtype=bool),
    }
    return ClickInputs(**(neutral | {name: np.asarray(value) for name, value in fields.items()}))


def _model(base_logit: float = 0.0, hour_effect=None, weekend_effect=None) -> ClickModel:
    """The click model with its default weights and (unless given) no context effects."""
    n_top = len(CATEGORY_TREE)
    return ClickModel(
        hour_effect=np.zeros((n_top, 4)) if hour_effect is None else hour_effect,
        weekend_effect=np.zeros(n_top) if weekend_effect is None else weekend_effect,
        base_logit=base_logit,
    )


def test_click_logit_by_hand_with_default_weights():
    hour_effect = np.zeros((len(CATEGORY_TREE), 4))
    hour_effect[1, 2] = 0.3  # top category 1, 12:00-17:59
    weekend_effect = np.zeros(len(CATEGORY_TREE))
    weekend_effect[1] = -0.2
    model = _model(-4.3, hour_effect, weekend_effect)
    x = _inputs(
        item_factors=[[0.4, -0.2]],
        item_appeal=[0.2],
        item_top=[1],
        item_leaf=[9],
        item_price_z=[1.5],
        user_taste=[[1.0, 0.5]],
        price_sensitivity=[0.5],
        hour=[13],
        weekday=[6],  # Sunday
        device=[0],  # mobile
        recent_factors=[[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]],
        recent_leaves=[[3, 9, 1]],
        recent_valid=[[True, True, False]],
    )
    expected = (
        -4.3  # base
        + 0.2  # appeal
        + 0.8 * 0.3  # taste: u . v = 0.4 - 0.1
        + 1.0 * 0.1  # short term: mean recent factor (0.5, 0.5) . v = 0.2 - 0.1
        + 0.5  # leaf 9 was clicked recently
        + 0.3  # hour effect of top 1 in the afternoon
        - 0.2  # weekend effect of top 1
        - 0.7 * (0.5 + 0.4) * 1.5  # price sensitivity plus the mobile surcharge, times price_z
    )
    assert model.click_logit(x) == pytest.approx([expected], abs=1e-12)
    assert expected == pytest.approx(-4.105)


def test_recent_leaf_bonus_adds_exactly_its_weight():
    model = _model()
    history = {
        "item_factors": [[0.3, -0.1]],
        "user_taste": [[0.5, 0.2]],
        "recent_factors": [[[0.2, 0.1], [-0.3, 0.4], [1.0, 1.0]]],
        "recent_leaves": [[3, 9, 4]],
        "recent_valid": [[True, True, False]],  # slot 2 holds no click yet
    }
    no_hit = model.click_logit(_inputs(item_leaf=[5], **history))
    hit = model.click_logit(_inputs(item_leaf=[9], **history))
    stale = model.click_logit(_inputs(item_leaf=[4], **history))
    assert hit - no_hit == pytest.approx([0.5], abs=1e-12)
    assert stale == pytest.approx(no_hit, abs=1e-12)  # an empty slot's leading item id is no click


def test_short_term_interest_is_the_mean_of_the_recent_clicks():
    model = _model()
    v = [[1.0, 2.0]]
    clicks = [[[1.0, 0.0], [0.0, 1.0], [50.0, 50.0]]]
    two = model.click_logit(
        _inputs(item_factors=v, recent_factors=clicks, recent_valid=[[True, True, False]])
    )
    assert two == pytest.approx([1.0 * (0.5 * 1.0 + 0.5 * 2.0)], abs=1e-12)
    none = model.click_logit(_inputs(item_factors=v, recent_factors=clicks))
    assert none == pytest.approx([0.0], abs=1e-12)  # no click yet: no short-term term, and no 0/0


@pytest.mark.parametrize(
    ("sensitivity", "device", "drop"),
    [
        (0.5, 0, 0.7 * (0.5 + 0.4) * 2.0),  # mobile shoppers shy away from expensive items ...
        (0.5, 1, 0.7 * (0.5 - 0.1) * 2.0),  # ... desktop shoppers less so
        (0.5, 2, 0.7 * (0.5 + 0.1) * 2.0),
        (0.2, 0, 0.7 * (0.2 + 0.4) * 2.0),
    ],
)
def test_price_lowers_the_logit_by_sensitivity(sensitivity, device, drop):
    model = _model()
    user = {"price_sensitivity": [sensitivity], "device": [device], "item_factors": [[0.3, 0.4]]}
    cheap = model.click_logit(_inputs(item_price_z=[-0.5], **user))
    dear = model.click_logit(_inputs(item_price_z=[1.5], **user))
    assert cheap - dear == pytest.approx([drop], abs=1e-12)


def test_context_effects_follow_top_category_day_part_and_weekend():
    hour_effect = np.arange(32.0).reshape(8, 4) / 10  # (n_top, 4)
    weekend_effect = np.arange(8.0) / 100 + 1.0  # (n_top,)
    model = _model(0.0, hour_effect, weekend_effect)
    hours = np.arange(24)
    by_hour = model.click_logit(_inputs(24, item_top=np.full(24, 5), item_leaf=np.full(24, 2), hour=hours))
    assert by_hour == pytest.approx(hour_effect[5, hours // 6], abs=1e-12)  # six-hour day parts
    days = np.arange(7)  # Monday .. Sunday
    by_day = model.click_logit(_inputs(7, item_top=np.full(7, 5), item_leaf=np.full(7, 2), weekday=days))
    assert by_day == pytest.approx([2.0] * 5 + [2.0 + 1.05] * 2, abs=1e-12)  # hour 0 of top 5 is 2.0


def test_probabilities_are_the_sigmoid_of_the_logits():
    assert _model(np.log(3.0)).click_prob(_inputs()) == pytest.approx([0.75], abs=1e-12)
    assert _model(-np.log(3.0)).click_prob(_inputs()) == pytest.approx([0.25], abs=1e-12)
    model = _model(-2.0)
    x = _inputs(
        3, item_appeal=[-3.0, 0.0, 4.0], item_price_z=[1.0, 0.0, -2.0], price_sensitivity=[0.5, 0.2, 1]
    )
    assert model.click_prob(x) == pytest.approx(1 / (1 + np.exp(-model.click_logit(x))), abs=1e-15)
    assert model.purchase_prob(x) == pytest.approx(1 / (1 + np.exp(-model.purchase_logit(x))), abs=1e-15)


def test_purchase_logit_by_hand_with_default_weights():
    x = _inputs(
        item_factors=[[0.4, -0.2]],
        item_appeal=[0.5],
        item_price_z=[1.0],
        user_taste=[[1.0, 0.5]],
        price_sensitivity=[0.5],
        hour=[13],
        weekday=[6],
        device=[0],  # neither context nor history enters the purchase
        recent_factors=[[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]],
        recent_valid=[[True, True, False]],
    )
    expected = -1.8 + 0.8 * 0.5 - 0.8 * 0.5 * 1.0 + 1.0 * (0.4 - 0.1)
    assert _model(-4.3).purchase_logit(x) == pytest.approx([expected], abs=1e-12)
    assert expected == pytest.approx(-1.5)


def _recent_clicks(inter: pl.DataFrame, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, window) each row's user's last `window` clicked items strictly before it, and which slots hold one.

    `inter` must be in time order (the simulator's log is)."""
    recent = np.zeros((inter.height, window), dtype=np.int64)
    valid = np.zeros((inter.height, window), dtype=bool)
    history: dict[int, list[int]] = defaultdict(list)
    for row, (user, item, click) in enumerate(inter.select("user_id", "item_id", "click").iter_rows()):
        last = history[user][-window:]
        recent[row, : len(last)] = last
        valid[row, : len(last)] = True
        if click:
            history[user].append(item)
    return recent, valid


def test_oracle_column_is_the_click_model_on_the_logged_rows(data):
    """Rebuild every logged impression's click-model inputs from the log and the latent tables: the logged
    oracle must be the click model's probability of exactly that impression."""
    sim = EcommerceSimulator(**SMALL, seed=0).simulate()
    items, users, inter = sim.items, sim.users, data.interactions
    recent, valid = _recent_clicks(inter, window=5)
    assert valid.any(1).mean() > 0.25 and valid.all(1).sum() > 100  # the history terms are exercised
    item, user = inter["item_id"].to_numpy(), inter["user_id"].to_numpy()
    x = ClickInputs(
        item_factors=items.factors[item],
        item_appeal=items.appeal[item],
        item_top=items.top[item],
        item_leaf=items.leaf[item],
        item_price_z=items.price_z[item],
        user_taste=users.taste[user],
        price_sensitivity=users.price_sensitivity[user],
        hour=inter["hour"].to_numpy(),
        weekday=inter["weekday"].to_numpy(),
        device=inter["device"].to_numpy(),
        recent_factors=items.factors[recent],
        recent_leaves=items.leaf[recent],
        recent_valid=valid,
    )
    # the simulator keeps the recent clicks in a ring buffer, so the mean may round differently
    np.testing.assert_allclose(sim.click_model.click_prob(x), inter["true_click_prob"].to_numpy(), rtol=1e-12)
    # the latent tables are the ones behind the published frames
    assert np.array_equal(items.leaf, data.items["cat2"].to_numpy())
    assert np.array_equal(users.age, data.users["age"].to_numpy())
