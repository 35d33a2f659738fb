"""Numeric features bucketised or linear per column (`data.numeric_buckets`), context columns of your own data
(`context_features`), and context computed from timestamps (`data.time_context`), checked against values
computed here by hand from the file."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest
import torch

from recsys_lab.data.datamodule import RecDataModule
from recsys_lab.data.prepare import _with_time_context
from recsys_lab.data.processing import Preprocess
from recsys_lab.data.sources.raw import SourceError
from recsys_lab.data.sources.tabular import Tabular
from recsys_lab.data.splits import TRAIN, TemporalSplit
from recsys_lab.data.vocab import bucketise
from recsys_lab.train import train
from tests.helpers import SMALL_DATA

N_USERS, N_ITEMS, PER_USER = 6, 12, 10
PRICES = [float(p) for p in (3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8)]  # item k's price


def write_clicks(path) -> pl.DataFrame:
    """Every user views PER_USER items at irregular times (a user's times strictly increase); the device and
    the basket value describe each interaction."""
    rng = np.random.default_rng(7)
    rows = []
    for u in range(N_USERS):
        t = 1_700_000_000 + int(rng.integers(0, 86_400))
        for _ in range(PER_USER):
            t += int(rng.integers(60, 200_000))
            k = int(rng.integers(0, N_ITEMS))
            rows.append((f"u{u}", f"i{k}", t, int(rng.random() < 0.5), rng.choice(["web", "app"]), PRICES[k]))
    frame = pl.DataFrame(rows, schema=["user", "item", "ts", "clicked", "device", "price"], orient="row")
    frame = frame.with_columns(pl.Series("basket", np.round(rng.gamma(2.0, 20.0, frame.height), 2)))
    frame.write_csv(path)
    return frame


def make_dm(tmp_path, **kwargs) -> RecDataModule:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "clicks.csv"
    frame = write_clicks(path)
    source = Tabular(
        str(path),
        columns={"user": "user", "item": "item", "timestamp": "ts", "label": "clicked"},
        item_features={"price": "numeric"},
        context_features={"device": "categorical", "basket": "numeric"},
    )
    dm = RecDataModule(
        source=source,
        split=TemporalSplit(val_fraction=0.2, test_fraction=0.2),
        cache_dir=str(tmp_path / "cache"),
        preprocess=Preprocess(deduplicate="none"),
        history_len=4,
        **kwargs,
    )
    dm.prepare_data()
    dm.setup()
    dm.frame = frame  # the file as written, for the hand computations
    return dm


def by_row(dm) -> pl.DataFrame:
    """The prepared rows with the file's values as `<column>_raw` (matched on user and timestamp, unique here)."""
    p = dm.prepared()
    ids = p.users["user_id"].to_list()
    rows = p.rows.with_columns(pl.Series("user_raw", [ids[u] for u in p.rows["user"].to_list()]))
    raw = dm.frame.rename({c: f"{c}_raw" for c in dm.frame.columns}).rename({"ts_raw": "timestamp"})
    return rows.join(raw, on=["user_raw", "timestamp"], how="left")


def test_bucketise_by_hand():
    values = np.array([1.0, 2, 3, 4, 5, 6, 7, 8, np.nan, 100, -5])
    codes, stats = bucketise(values, np.arange(8), 4)  # fitted on 1..8: quartiles 2.75, 4.5, 6.25
    assert stats == {"boundaries": [2.75, 4.5, 6.25], "buckets": 4}
    # 1 + boundaries <= v; the null is code 0; values outside the training range fall in the end buckets
    assert codes.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 0, 4, 1]
    # a value that fills several quantiles merges them: fewer buckets, reported
    codes, stats = bucketise(np.array([0.0, 0, 0, 0, 1, 2]), np.arange(6), 4)
    assert stats["boundaries"] == [0.0, 0.75] and stats["buckets"] == 3
    assert codes.tolist() == [2, 2, 2, 2, 3, 3]
    with pytest.raises(ValueError, match=r"data.numeric_buckets.price: expected an integer >= 2"):
        bucketise(values, np.arange(8), 1, name="price")


def test_numeric_column_is_linear_by_default_and_bucketised_when_named(tmp_path):
    linear = make_dm(tmp_path / "linear", log_dense=["price"])
    assert linear.schema["price"].kind == "dense" and linear.schema["basket"].kind == "dense"

    dm = make_dm(tmp_path / "buckets", numeric_buckets={"price": 4, "basket": 3}, log_dense=["price"])
    price, basket = dm.schema["price"], dm.schema["basket"]
    assert (price.kind, price.side) == ("sparse", "item") and (basket.kind, basket.side) == (
        "sparse",
        "context",
    )
    # price buckets: quartiles of the prices of the items seen in training (log1p does not move them)
    rows = by_row(dm)
    p = dm.prepared()
    item_names = p.items["item_id"].to_list()
    seen = sorted(set(rows.filter(pl.col("split") == TRAIN)["item"].to_list()))
    train_prices = np.array([PRICES[int(item_names[e][1:])] for e in seen])
    expected = np.unique(np.quantile(train_prices, [0.25, 0.5, 0.75]))
    assert p.meta.normalisers["price"]["boundaries"] == pytest.approx(expected.tolist())
    assert price.vocab_size == len(expected) + 2
    # every item's code, by hand, reaches the batches
    codes = dm.store.items.sparse["price"]
    for e, name in enumerate(item_names):
        assert codes[e] == 1 + np.searchsorted(expected, PRICES[int(name[1:])], side="right")
    # basket buckets: terciles of the training rows' values (context is fitted on rows, not entities)
    terciles = np.unique(
        np.quantile(rows.filter(pl.col("split") == TRAIN)["basket_raw"].to_numpy(), [1 / 3, 2 / 3])
    )
    assert p.meta.normalisers["basket"]["boundaries"] == pytest.approx(terciles.tolist())
    batch = dm.store.impressions(torch.arange(len(rows)))
    assert (
        batch.sparse["basket"].tolist()
        == (1 + np.searchsorted(terciles, rows["basket_raw"].to_numpy(), side="right")).tolist()
    )


def test_context_columns_of_your_own_file_reach_every_batch(tmp_path):
    dm = make_dm(tmp_path)
    rows = by_row(dm)
    assert dm.describe()["context_features"] == ["device", "basket"]
    assert dm.schema["basket"].kind == "dense" and dm.schema["basket"].side == "context"
    assert dm.schema["device"].kind == "sparse" and dm.schema["device"].vocab_size == 3
    # numeric context: standardised with the training rows' mean and standard deviation
    train = rows.filter(pl.col("split") == TRAIN)["basket_raw"].to_numpy()
    expected = (rows["basket_raw"].to_numpy() - train.mean()) / (train.std() + 1e-6)
    batch = dm.store.impressions(torch.arange(len(rows)))
    assert batch.dense["basket"].numpy() == pytest.approx(expected, abs=1e-5)
    assert batch.dense["basket"][rows["split"].to_numpy() == TRAIN].mean().abs() < 1e-5
    # the categorical one: two codes, the same value always the same code
    pairs = set(zip(rows["device_raw"].to_list(), batch.sparse["device"].tolist(), strict=True))
    assert len(pairs) == 2 and {c for _, c in pairs} == {1, 2}
    # a ranking query has no interaction yet: unknown context (code 0, the training mean 0)
    query = dm.store.query_batch(dm.queries["test"].eval_targets(torch.arange(2)), level=2)
    assert query.dense["basket"].tolist() == [0.0, 0.0] and query.sparse["device"].tolist() == [0, 0]
    # the ablation switch removes both kinds
    without = make_dm(tmp_path / "without", context=False)
    assert "basket" not in without.schema and "device" not in without.schema
    batch = without.store.impressions(torch.arange(4))
    assert "basket" not in batch.dense and "device" not in batch.sparse


def test_time_context_by_hand(tmp_path):
    dm = make_dm(tmp_path, time_context=["hour", "weekday", "gap"])
    rows = by_row(dm)
    stamps = rows["timestamp"].to_list()
    when = [datetime.fromtimestamp(t, tz=timezone.utc) for t in stamps]
    batch = dm.store.impressions(torch.arange(len(rows)))
    # categorical: codes of a vocabulary fitted on training rows, so compare the partitions they induce
    for name, truth in (("time_hour", [w.hour for w in when]), ("time_weekday", [w.weekday() for w in when])):
        assert dm.schema[name].side == "context"
        codes = batch.sparse[name].tolist()
        seen_in_train = {v for v, s in zip(truth, rows["split"].to_list(), strict=True) if s == TRAIN}
        mapping = {}
        for value, code in zip(truth, codes, strict=True):
            assert mapping.setdefault(value, code) == code  # one value, one code
            assert (code == 0) == (value not in seen_in_train)  # unseen in training: unknown
        assert len({mapping[v] for v in seen_in_train}) == len(seen_in_train)  # distinct values, codes
    # gap: log1p(seconds since the user's previous interaction), standardised on training rows, 0 on the first
    previous: dict[str, int] = {}
    raw = []
    for user, t in sorted(zip(rows["user_raw"].to_list(), stamps, strict=True), key=lambda r: (r[0], r[1])):
        raw.append(((user, t), math.log1p(t - previous[user]) if user in previous else math.nan))
        previous[user] = t
    gap = dict(raw)
    values = np.array([gap[(u, t)] for u, t in zip(rows["user_raw"].to_list(), stamps, strict=True)])
    train = values[(rows["split"].to_numpy() == TRAIN) & ~np.isnan(values)]
    expected = np.nan_to_num((values - train.mean()) / (train.std() + 1e-6), nan=0.0)
    assert batch.dense["time_gap"].numpy() == pytest.approx(expected, abs=1e-5)
    assert dm.describe()["time_context"] == ["hour", "weekday", "gap"]


def test_time_context_values_on_known_dates():
    monday = int(datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp())  # 2024-01-01 was a Monday
    stamps = [monday + 13 * 3600 + 59, monday + 6 * 86400 + 23 * 3600, monday + 2 * 86400, monday - 1]
    inter = pl.DataFrame({"user_id": ["a", "a", "b", "b"], "timestamp": stamps})
    out, kinds = _with_time_context(inter, {}, ["hour", "weekday", "gap"])
    assert out["time_hour"].to_list() == [13, 23, 0, 23]
    assert out["time_weekday"].to_list() == [0, 6, 2, 6]  # Monday, Sunday, Wednesday, the Sunday before
    gap = out["time_gap"].to_list()
    assert gap[0] is None and gap[3] is None  # null on each user's first interaction
    assert gap[1] == pytest.approx(math.log1p(stamps[1] - stamps[0]))
    assert gap[2] == pytest.approx(math.log1p(stamps[2] - stamps[3]))
    assert kinds == {"time_hour": "categorical", "time_weekday": "categorical", "time_gap": "numeric"}


def test_bad_numeric_and_context_settings_name_the_key(tmp_path):
    with pytest.raises(SourceError, match=r"data.numeric_buckets: \['device'\] are not numeric columns"):
        make_dm(tmp_path / "a", numeric_buckets={"device": 4})
    with pytest.raises(SourceError, match=r"data.log_dense: \['nope'\] are not numeric columns"):
        make_dm(tmp_path / "b", log_dense=["nope"])
    with pytest.raises(SourceError, match=r"data.time_context: unknown \['month'\]"):
        make_dm(tmp_path / "c", time_context=["month"])
    columns = {"user": "user", "item": "item"}
    with pytest.raises(SourceError, match=r"context_features: 'basket' has kind 'text'"):
        Tabular(str(tmp_path / "x.csv"), columns=columns, context_features={"basket": "text"})
    with pytest.raises(SourceError, match=r"context_features: \['timestamp'\] are names of the interaction"):
        Tabular(str(tmp_path / "x.csv"), columns=columns, context_features={"timestamp": "numeric"})
    with pytest.raises(SourceError, match=r"features \['price'\] are declared on more than one side"):
        Tabular(
            str(tmp_path / "x.csv"),
            columns=columns,
            item_features={"price": "numeric"},
            context_features={"price": "numeric"},
        )


@pytest.mark.parametrize("model", ["din", "deepfm"])
def test_models_train_on_bucketised_and_time_context_features(model, make_cfg):
    cfg = make_cfg(
        [
            f"model={model}",
            "data=ecommerce",
            *SMALL_DATA,
            "logger=none",
            "data.numeric_buckets={price: 8}",
            "data.time_context=[gap]",
            "debug=fast_dev_run",
        ]
    )
    results = train(cfg)
    assert results["protocol"]["numeric_buckets"] == {"price": 8}
    assert "time_gap" in results["protocol"]["context_features"]
    assert math.isfinite(results["metrics"]["test/auc"])


@pytest.mark.parametrize("model", ["din", "deepfm"])
def test_context_ablation_runs_end_to_end(model, make_cfg):
    # the same model with and without the simulator's context (hour, weekday, device) on a small simulator
    runs = {}
    for context in ("true", "false"):
        cfg = make_cfg(
            [
                f"model={model}",
                "data=ecommerce",
                *SMALL_DATA,
                "logger=none",
                f"data.context={context}",
                "debug=fast_dev_run",
            ]
        )
        runs[context] = train(cfg)
    assert runs["true"]["protocol"]["context_features"] == ["hour", "weekday", "device"]
    assert runs["false"]["protocol"]["context_features"] == []
    # the same rows are scored; only the features differ
    assert runs["true"]["protocol"]["test_rows_used"] == runs["false"]["protocol"]["test_rows_used"]
    assert runs["true"]["metrics"]["test/auc"] != runs["false"]["metrics"]["test/auc"]
