"""Protocols end to end: hand-checked queries and histories, the leakage audit catching leaks, and every
real-data source training through train.py on fixtures written here in that source's own format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys_lab.data.audit import LeakageError, audit
from recsys_lab.data.datamodule import RecDataModule
from recsys_lab.data.processing import Preprocess
from recsys_lab.data.sources.raw import RawData
from recsys_lab.data.splits import LeaveOneOutSplit, PreSplit, RandomRatioSplit
from recsys_lab.data.views import RetrievalView
from recsys_lab.train import train
from tests.source_fixtures import random_amazon_2023, random_atomic, random_ml100k

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


class FrameSource:
    """A source over given frames (for hand-computed cases)."""

    name = "frames"

    def __init__(self, interactions: pl.DataFrame, items: pl.DataFrame | None = None, tag: str = "") -> None:
        self.interactions, self.items, self.tag = interactions, items, tag

    def fingerprint(self) -> str:
        return f"frames-{self.tag}-{self.interactions.height}"

    def describe(self) -> dict:
        return {"source": self.name}

    def load(self) -> RawData:
        features = {"genre": "categorical"} if self.items is not None else {}
        return RawData(interactions=self.interactions, items=self.items, features=features)


def toy() -> pl.DataFrame:
    # user a: items 1, 2, 3, 4 at t = 1..4; user b: items 2, 3, 5 at t = 1..3; user c: 1, 2, 4 at t = 5..7
    return pl.DataFrame(
        {
            "user_id": ["a", "a", "a", "a", "b", "b", "b", "c", "c", "c"],
            "item_id": [1, 2, 3, 4, 2, 3, 5, 1, 2, 4],
            "timestamp": [1, 2, 3, 4, 1, 2, 3, 5, 6, 7],
        }
    )


def toy_module(tmp_path, split=None, interactions=None, preprocess=None, **kwargs) -> RecDataModule:
    dm = RecDataModule(
        FrameSource(toy() if interactions is None else interactions, tag=str(split)),
        split or LeaveOneOutSplit(),
        cache_dir=str(tmp_path),
        preprocess=preprocess or Preprocess(),
        train_negatives="uniform_1",
        ctr_eval="ranking",
        history_len=5,
        **kwargs,
    )
    dm.prepare_data()
    dm.setup()
    return dm


def decode(dm: RecDataModule, codes) -> list[int]:
    """Raw item ids of item codes."""
    raw = dm_items(dm)
    return [raw[int(c)] for c in codes]


def dm_items(dm: RecDataModule) -> dict[int, int]:
    prepared = dm.prepared()
    return dict(
        zip(prepared.items["item_id_code"].to_list(), prepared.items["item_id"].to_list(), strict=True)
    )


def test_leave_one_out_queries_and_histories_by_hand(tmp_path):
    dm = toy_module(tmp_path)
    # leave-one-out: a -> train 1, 2 / val 3 / test 4; b -> train 2 / val 3 / test 5; c -> train 1 / val 2 / test 4.
    # Training items {1, 2} get codes 1, 2; items 3, 4, 5 never occur in training: code 0 (unknown).
    raw = dm_items(dm)
    assert sorted(v for k, v in raw.items() if k > 0) == [1, 2]
    # held-out items unknown to training cannot be ranked by an id model: counted, not silently dropped.
    # val: a->3 and b->3 are unknown, c->2 is known (one query); test: 4, 5, 4 are all unknown (no query)
    assert dm.counts["val_targets_unknown_item"] == 2 and dm.counts["val_queries"] == 1
    assert dm.counts["test_targets_unknown_item"] == 3 and dm.counts["test_queries"] == 0
    (only,) = dm.queries["val"].users.tolist()
    assert dm.prepared().users["user_id"][only] == "c"
    assert decode(dm, dm.queries["val"].targets.values) == [2]
    assert decode(dm, dm.queries["val"].seen.values) == [1]
    # histories: a's test row (item 4, t=4) sees 1, 2, 3 (train + val, strictly before); its val row sees 1, 2
    rows = dm.prepared().rows
    a_test = int(np.flatnonzero((rows["timestamp"] == 4).to_numpy() & (rows["split"] == 2).to_numpy())[0])
    a_val = int(np.flatnonzero((rows["timestamp"] == 3).to_numpy() & (rows["split"] == 1).to_numpy())[0])
    batch = dm.store.impressions(torch.tensor([a_test, a_val]))
    hist = batch.seq["hist_item_id"]
    assert hist.lengths.tolist() == [3, 2]
    assert decode(dm, hist.ids[0, :2]) == [1, 2] and int(hist.ids[0, 2]) == 0  # item 3: unknown code
    assert decode(dm, hist.ids[1, :2]) == [1, 2]


def test_leave_one_out_ranking_targets_by_hand(tmp_path):
    # more training data so that held-out items are known: d and e click 1..5 in training (then 6, 7 held out)
    extra = pl.DataFrame(
        {
            "user_id": ["d"] * 7 + ["e"] * 7,
            "item_id": [1, 2, 3, 4, 5, 6, 7] * 2,
            "timestamp": list(range(10, 24)),
        }
    )
    dm = toy_module(tmp_path, interactions=pl.concat([toy(), extra]))
    q = dm.queries["test"]
    # d and e hold out 6 (val) and 7 (test), unknown to training: they get no test query
    users = dm.prepared().users["user_id"].to_list()
    by_user = {users[int(u)]: i for i, u in enumerate(q.users)}
    assert sorted(by_user) == ["a", "b", "c"]
    assert dm.counts["test_targets_unknown_item"] == 2
    i = by_user["a"]
    assert decode(dm, q.targets.gather(torch.tensor([i])).ids[0]) == [4]
    assert sorted(decode(dm, q.seen.gather(torch.tensor([i])).ids[0])) == [1, 2, 3]
    i = by_user["b"]
    assert decode(dm, q.targets.gather(torch.tensor([i])).ids[0]) == [5]
    assert sorted(decode(dm, q.seen.gather(torch.tensor([i])).ids[0])) == [2, 3]
    # query histories hold all positives of the earlier splits (train + val for test)
    batch = dm.use_view(RetrievalView).eval_dataset("test").__getitems__([by_user["a"]])
    assert decode(dm, batch.seq["hist_item_id"].ids[0, :3]) == [1, 2, 3]
    assert dm.audit_report["status"] == "passed"


def test_audit_catches_a_leaky_pre_split(tmp_path):
    # the same interaction (a, 4, t=4) is listed in the training file and in the test file
    inter = toy().with_columns(
        pl.Series("split", ["train", "train", "val", "test", "train", "val", "test", "train", "val", "test"])
    )
    leaky = pl.concat(
        [inter, inter.filter(pl.col("split") == "test").with_columns(pl.lit("train").alias("split"))]
    )
    with pytest.raises(LeakageError, match="training rows are also validation/test interactions"):
        toy_module(tmp_path, split=PreSplit(), interactions=leaky, preprocess=Preprocess(deduplicate="none"))
    # without the duplicate the same files pass
    ok = toy_module(
        tmp_path / "ok", split=PreSplit(), interactions=inter, preprocess=Preprocess(deduplicate="none")
    )
    assert ok.audit_report["status"] == "passed"


def test_audit_catches_training_histories_built_from_the_future(tmp_path):
    # a random split puts validation/test clicks before later training clicks of the same user
    rng = np.random.default_rng(0)
    inter = pl.DataFrame(
        {
            "user_id": np.repeat(np.arange(20), 10),
            "item_id": rng.integers(0, 15, 200),
            "timestamp": np.tile(np.arange(10), 20),
        }
    )
    dm = toy_module(
        tmp_path,
        split=RandomRatioSplit(seed=0),
        interactions=inter,
        preprocess=Preprocess(deduplicate="none"),
    )
    assert dm.audit_report["status"] == "passed"
    # a buggy pipeline that builds training histories from every earlier click, held-out ones included
    rows = dm.prepared().rows
    user, ts = rows["user"].to_numpy(), rows["timestamp"].to_numpy()
    train = rows["split"].to_numpy() == 0
    leaked = dm.store.n_prior.clone()
    for r in np.flatnonzero(train):
        leaked[r] = int(((user == user[r]) & (ts < ts[r])).sum())
    assert (leaked != dm.store.n_prior).any()  # the leak is real on this split
    dm.store.n_prior = leaked
    with pytest.raises(LeakageError, match="split-0 row's history has"):
        audit(dm.prepared(), dm.store, dm.queries)


SMALL_PROTOCOL = [
    "logger=none",
    "data.preprocess.user_core=0",
    "data.preprocess.item_core=0",
    "trainer.max_epochs=1",
]


@pytest.mark.parametrize("model", ["din", "two_tower"])
@pytest.mark.parametrize("candidates", ["full", "uniform_5"])
def test_movielens_fixture_trains_under_each_protocol(model, candidates, make_cfg, tmp_path):
    folder = random_ml100k(tmp_path / "ml", np.random.default_rng(0))
    cfg = make_cfg(
        [
            f"model={model}",
            "data=movielens",
            f"data.path={folder}",
            f"data.eval_candidates={candidates}",
            *SMALL_PROTOCOL,
        ]
    )
    results = train(cfg)
    p, m = results["protocol"], results["metrics"]
    assert (
        p["split"] == "leave_one_out" and p["eval_candidates"] == candidates and p["evaluation"] == "ranking"
    )
    assert p["leakage_audit"]["status"] == "passed"
    assert p["rows_in"] == 30 * 12 and p["test_queries"] + p["test_users_without_new_targets"] <= 30
    for k in (10, 20, 50):  # leave-one-out: one target per query, so recall and hit rate coincide
        assert m[f"test/recall@{k}"] == pytest.approx(m[f"test/hit@{k}"])
        assert m[f"test/ndcg@{k}"] <= m[f"test/hit@{k}"] + 1e-6
    if candidates == "uniform_5":
        # 1 target among 1 + 5 candidates: everything is in the top 10
        assert m["test/hit@10"] == pytest.approx(1.0)
    assert m["test/hit@50"] >= m["test/hit@10"]


def test_atomic_and_tabular_sources_train(make_cfg, tmp_path):
    atomic = random_atomic(tmp_path / "atomic", np.random.default_rng(1))
    r1 = train(
        make_cfg(
            [
                "model=two_tower",
                "data=atomic",
                "data.source.name=toy",
                f"data.path={atomic}",
                *SMALL_PROTOCOL,
            ],
            run_dir=tmp_path / "r1",
        )
    )
    assert r1["protocol"]["source"] == "atomic-toy" and r1["protocol"]["leakage_audit"]["status"] == "passed"
    assert "test/ndcg@10" in r1["metrics"]

    frame = pl.read_csv(atomic / "toy.inter", separator="\t").rename(
        {"user_id:token": "uid", "item_id:token": "sku", "rating:float": "stars", "timestamp:float": "when"}
    )
    frame.write_csv(tmp_path / "clicks.csv")
    r2 = train(
        make_cfg(
            [
                "model=din",
                "data=tabular",
                f"data.path={tmp_path / 'clicks.csv'}",
                "data.source.columns.user=uid",
                "data.source.columns.item=sku",
                "data.source.columns.timestamp=when",
                *SMALL_PROTOCOL,
            ],
            run_dir=tmp_path / "r2",
        )
    )
    assert r2["protocol"]["rows_in"] == 25 * 8
    m2 = r2["metrics"]  # one held-out item per user: recall = hit rate, and ndcg never exceeds it
    assert (
        m2["test/recall@10"] == pytest.approx(m2["test/hit@10"])
        and m2["test/ndcg@10"] <= m2["test/hit@10"] + 1e-6
    )


def test_amazon_2023_source_trains(make_cfg, tmp_path):
    folder = random_amazon_2023(tmp_path / "amazon", np.random.default_rng(2))
    results = train(
        make_cfg(
            ["model=din", "data=amazon", "data.source.year=2023", f"data.path={folder}", *SMALL_PROTOCOL]
        )
    )
    assert results["protocol"]["rows_in"] == 140
    m = results["metrics"]
    assert m["test/recall@10"] == pytest.approx(m["test/hit@10"])
    # a query ranked beyond 50 adds less than 1/51 to MRR, one within the top 50 at most 1
    assert m["test/mrr"] <= m["test/hit@50"] + (1 - m["test/hit@50"]) / 51 + 1e-6


@pytest.mark.skipif(not ML100K.exists(), reason="shared MovieLens-100K copy not present")
def test_real_movielens_100k_prepares_leak_free(make_cfg):
    results = train(
        make_cfg(
            ["model=two_tower", "data=movielens", f"data.path={ML100K}", "logger=none", "debug=fast_dev_run"]
        )
    )
    p = results["protocol"]
    assert p["rows_in"] == 100_000 and p["users_out"] == 943
    assert p["removed_core"] + p["rows_out"] == 100_000  # nothing dropped without a count
    assert p["test_queries"] == 943 and p["leakage_audit"]["status"] == "passed"


def test_cold_items_get_codes_after_the_training_vocabulary(tmp_path):
    """`data.cold_items`: items without a training interaction (the simulator's late releases among them) are
    ranked with codes of their own; the warm vocabulary is unchanged, and their held-out interactions become
    targets instead of "unknown" counts."""
    from tests.datamodule_fixtures import make_dm, ready

    plain = ready(make_dm(tmp_path / "a"), RetrievalView)
    cold = ready(make_dm(tmp_path / "b", cold_items=True), RetrievalView)
    first = cold.schema.first_cold_item
    assert plain.schema.first_cold_item is None and first == plain.schema.num_items
    plain_codes, codes = plain.store.items.sparse["item_id"], cold.store.items.sparse["item_id"]
    warm = plain_codes > 0
    assert torch.equal(codes[warm], plain_codes[warm])  # the training vocabulary is the same
    assert (codes[~warm] >= first).all() and len(set(codes[~warm].tolist())) == int((~warm).sum())
    assert cold.schema.num_items == first + int((~warm).sum()) and (codes > 0).all()
    trained = torch.zeros(len(codes), dtype=torch.bool)
    trained[cold.store.item[cold.store.split == 0]] = True
    assert torch.equal(trained, warm)  # cold = no training interaction at all
    assert (cold.schema.item_counts[first:] == 0).all()
    for stage in ("val", "test"):
        targets = cold.queries[stage].targets.values
        n_cold = int((targets >= first).sum())
        assert cold.counts[f"{stage}_targets_cold_item"] == n_cold
        assert cold.counts[f"{stage}_targets_unknown_item"] == 0
        assert plain.counts[f"{stage}_targets_unknown_item"] >= n_cold  # counted there, ranked here
    assert cold.counts["test_targets_cold_item"] > 0  # the simulator releases items late
    assert cold.audit_report["status"] == "passed"
    assert cold.describe()["cold_items"] is True and cold.describe()["cold_item_codes"] == int((~warm).sum())
