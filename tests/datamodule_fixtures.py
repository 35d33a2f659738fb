"""Shared data-layer fixtures: a small simulator behind a RecDataModule, and a slow, plain-Python reference of
the raw frames that the prepared tables are checked against.

Entities and codes: a row references user/item *entities* (rows of the source's tables, so for the simulator the
raw id itself); the `user_id` / `item_id` features are *codes* of vocabularies fitted on training rows (0 =
unknown). The reference below is computed from `EcommerceSimulator.load()` with plain Python and polars.

Test modules import the fixtures they use (`from tests.datamodule_fixtures import dm, ref  # noqa: F401`);
pytest collects fixtures from a module's namespace.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

import numpy as np
import polars as pl
import pytest
import torch

from recsys_lab.data.batch import Batch
from recsys_lab.data.datamodule import RecDataModule
from recsys_lab.data.prepare import Prepared
from recsys_lab.data.processing import Preprocess
from recsys_lab.data.sources.raw import RawData
from recsys_lab.data.sources.simulator import EcommerceSimulator
from recsys_lab.data.splits import TEST, TRAIN, VAL, TemporalSplit
from recsys_lab.data.views import CTRView, RetrievalView, View

SMALL = {"n_users": 300, "n_items": 200, "impressions_per_user": 20}
L = 5  # short, so many users have more positives than the history carries
USER_COLS = ["age", "gender", "region", "pref_device"]
ITEM_COLS = ["cat1", "cat2", "brand"]
CONTEXT_COLS = ["hour", "weekday", "device"]
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


def count_loads(source) -> list:
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
    return ready(make_dm(cache_root, eval_batch_size=8))


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


def ready(d: RecDataModule, view: type[View] = CTRView) -> RecDataModule:
    """Prepared, set up and serving `view` (what `train.build` does for a task)."""
    d.prepare_data()
    d.setup()
    d.use_view(view)
    return d


__all__ = ["CTRView", "RetrievalView", "ready"]
