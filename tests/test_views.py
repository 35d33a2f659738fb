"""Views: the CTR view (logged impressions, sampled negatives on implicit data, ranking evaluation on demand)
and the retrieval view (training clicks, ranking queries), their evaluation contexts and reference scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from recsys_lab.data.batch import Batch
from recsys_lab.data.views import CTRView, EvalContext, PairwiseView, RetrievalView
from recsys_lab.metrics.reference import reference_aucs
from tests.datamodule_fixtures import (  # noqa: F401  (fixtures)
    CONTEXT_COLS,
    SMALL,
    ClicksOnly,
    EcommerceSimulator,
    L,
    Reference,
    cache_root,
    count_loads,
    dm,
    make_dm,
    raw,
    ready,
    ref,
)


def test_reference_metrics_and_describe(dm, ref):
    labels, scores = dm.view.reference_scores("test")
    assert torch.equal(labels, dm.store.labels["click"][dm.rows["test"]])
    ref_metrics = reference_aucs(labels, scores)
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
    assert isinstance(dm.view, CTRView) and dm.view.evaluation == "impressions"
    context = dm.view.eval_context()
    assert context == EvalContext(
        "impressions", dm.schema.num_items
    )  # nothing to rank: no catalogue, no pairs
    val = list(dm.val_dataloader())
    assert all(isinstance(b, Batch) for b in val)
    assert sum(len(b) for b in val) == len(dm.rows["val"]) and len(val[0]) == 8
    assert val[0].eval is None
    train = list(dm.train_dataloader())
    assert len(train[0]) == 64 and set(train[0].labels) == {"click", "purchase"}
    assert sum(len(b) for b in train) == len(dm.rows["train"])
    clicks = torch.cat([b.labels["click"] for b in train])
    assert 0 < clicks.mean() < 0.5  # the logged negatives are trained on


@pytest.fixture
def retrieval(dm):
    """The module's DataModule serving the retrieval view for one test (then the CTR view again)."""
    view = dm.use_view(RetrievalView)
    yield view
    dm.use_view(CTRView)


def test_ranking_context_catalogue_and_pairs(dm, retrieval):
    context = retrieval.eval_context()
    assert context.kind == "ranking" and context.num_items == dm.schema.num_items
    catalogue = context.catalogue()
    assert torch.equal(catalogue.sparse["item_id"][1:], torch.arange(1, dm.schema.num_items))
    assert catalogue.dense["image"].shape == (dm.schema.num_items, 16)
    # the pair builder: each query user as of the stage's start, with every candidate's own features
    users, codes = dm.queries["test"].users[:3], torch.tensor([[1, 2], [3, 4], [5, 1]])
    pairs = context.pairs(users, codes, "test")
    assert len(pairs) == 6 and pairs.eval is None
    assert torch.equal(pairs.sparse["item_id"], codes.reshape(-1))
    assert torch.equal(pairs.sparse["user_id"], dm.store.users.sparse["user_id"][users].repeat_interleave(2))
    query = dm.store.query_batch(dm.queries["test"].eval_targets(torch.arange(3)), level=1)
    assert torch.equal(pairs.seq["hist_item_id"].ids[::2], query.seq["hist_item_id"].ids)
    assert torch.equal(
        pairs.dense["price"], dm.store.items.dense["price"][dm.store.item_entity[codes.reshape(-1)]]
    )


def test_a_model_reading_ids_only_gets_batches_without_histories(dm):
    # (MF-BPR, LightGCN, EASE, NCF declare reads_history = False): the same rows and ids, no hist_* features
    full = dm.use_view(PairwiseView)
    try:
        bare = dm.use_view(PairwiseView, reads_history=False)
        assert full.describe()["history_gathered"] and not bare.describe()["history_gathered"]
        index = list(range(20))
        with_hist, without = (
            full.train_dataset().__getitems__(index),
            bare.train_dataset().__getitems__(index),
        )
        assert "hist_item_id" in with_hist.seq and without.seq == {}
        assert with_hist.sparse.keys() == without.sparse.keys()
        for name, ids in with_hist.sparse.items():
            assert torch.equal(ids, without.sparse[name]), name
        targets = dm.queries["test"].eval_targets(torch.arange(3))
        assert bare.store.query_batch(targets, level=1).seq == {}
        pairs = bare.eval_context().pairs(
            dm.queries["test"].users[:2], torch.tensor([[1, 2], [3, 4]]), "test"
        )
        assert pairs.seq == {} and len(pairs) == 4
        assert dm.store.gather_history  # the DataModule's own store is untouched
    finally:
        dm.use_view(CTRView)


def test_a_model_reading_ids_only_gets_batches_of_ids(dm):
    # (MF-BPR, LightGCN, EASE, NCF, popularity declare reads_features = False): the same rows, the same ids and
    # targets, and nothing else: no user, item or context features, no history
    full = dm.use_view(PairwiseView)
    try:
        bare = dm.use_view(PairwiseView, reads_features=False)
        assert (full.describe()["features_gathered"], bare.describe()["features_gathered"]) == ("all", "ids")
        assert not bare.describe()["history_gathered"]
        index = list(range(20))
        rich, ids = full.train_dataset().__getitems__(index), bare.train_dataset().__getitems__(index)
        assert {"age", "hour", "cat2"} <= set(rich.sparse) and "price" in rich.dense
        assert set(ids.sparse) == {"user_id", "item_id"} and ids.seq == {} and ids.dense == {}
        for name in ("user_id", "item_id"):
            assert torch.equal(ids.sparse[name], rich.sparse[name])
        assert ids.labels.keys() == rich.labels.keys()
        assert ids.targets.keys() == rich.targets.keys() == {"negative_item"}
        targets = dm.queries["test"].eval_targets(torch.arange(3))
        query = bare.store.query_batch(targets, level=1)
        assert set(query.sparse) == {"user_id"} and query.seq == {} and query.dense == {}
        assert set(bare.store.items_batch(torch.tensor([1, 2])).sparse) == {"item_id"}
        assert (
            "age" in dm.store.users.sparse and dm.store.row_sparse
        )  # the DataModule's own store is untouched
    finally:
        dm.use_view(CTRView)


def test_retrieval_train_rows_are_training_clicks(dm, ref, retrieval):
    assert retrieval.evaluation == "ranking"
    dataset = retrieval.train_dataset()
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
def test_retrieval_queries_match_reference(dm, ref, retrieval, stage):
    expected, unknown, active = _query_reference(ref, stage)
    cutoff = ref.t_val if stage == "val" else ref.t_test
    loader = dm.val_dataloader() if stage == "val" else dm.test_dataloader()
    batches = list(loader)
    n = len(expected)
    assert n >= 10 and dm.counts[f"{stage}_queries"] == n
    assert dm.counts[f"{stage}_targets_unknown_item"] == unknown
    assert dm.counts[f"{stage}_users_without_new_targets"] == active - n
    assert [len(b) for b in batches] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    user_code = dm.store.users.sparse["user_id"].numpy()
    got_users = []
    for batch in batches:
        assert isinstance(batch, Batch)
        targets, seen, hist = batch.eval.targets, batch.eval.seen, batch.seq["hist_item_id"]
        assert batch.eval.candidates is None  # full ranking
        assert not any(k.startswith("eval") for k in batch.seq) and "eval.user" not in batch.sparse
        # the loader's Seqs are as wide as the longest row of the batch, each with its own length
        for b, u in enumerate(batch.eval.user.tolist()):
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
    calls = count_loads(source := EcommerceSimulator(**SMALL, seed=0))
    ranked = ready(make_dm(cache_root, source=source, ctr_eval="ranking", eval_batch_size=8), CTRView)
    assert calls == []  # same prepared data
    assert isinstance(ranked.view, CTRView) and ranked.view.evaluation == "ranking"
    for stage, loader in (("val", ranked.val_dataloader()), ("test", ranked.test_dataloader())):
        batches = list(loader)
        assert sum(len(b) for b in batches) == len(dm.queries[stage].users)
        assert all(b.eval is not None and "hist_item_id" in b.seq for b in batches)
        users = torch.cat([b.eval.user for b in batches])
        assert torch.equal(users, dm.queries[stage].users)
    assert ranked.view.reference_scores("test") is None
    assert ranked.describe()["eval_candidates"] == "full"
    first = next(iter(ranked.train_dataloader()))  # training still reads the logged impressions
    assert first.eval is None and len(first) == 64


def test_implicit_data_needs_train_negatives_in_the_ctr_view(cache_root):
    d = make_dm(cache_root, source=ClicksOnly())
    d.setup()
    assert d.schema.labels == ["label"] and d.prepared().meta.has_negatives == {
        "train": False,
        "val": False,
        "test": False,
    }
    # both stop when the task's view is built, before any training
    with pytest.raises(
        ValueError, match=r"data\.ctr_eval=impressions needs negative labels in the val split"
    ):
        d.use_view(CTRView)
    ranked = make_dm(cache_root, source=ClicksOnly(), ctr_eval="ranking")
    with pytest.raises(ValueError, match=r"data\.train_negatives is required"):
        ranked.use_view(CTRView)
    view = d.use_view(RetrievalView)  # retrieval trains on the positives alone
    assert len(view.train_dataset()) == d.counts["train_rows"]


def test_implicit_data_with_sampled_train_negatives(cache_root):
    d = ready(make_dm(cache_root, source=ClicksOnly(), train_negatives="uniform_4", ctr_eval="ranking"))
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
    assert next(iter(d.val_dataloader())).eval is not None


def test_a_split_without_rankable_queries_stops_with_the_counts(cache_root):
    """Every held-out user only re-clicks items seen before (or unknown ones): nothing to rank. The view stops
    when it is built, naming the counts, instead of training and dying in early stopping."""
    d = ready(make_dm(cache_root, eval_batch_size=8))
    empty = d.queries["val"].subset(torch.zeros(0, dtype=torch.long))
    d.queries = {**d.queries, "val": empty}
    with pytest.raises(
        ValueError, match=r"the val split has no rankable query: \d+ val rows, \d+ positives on items"
    ):
        d.use_view(RetrievalView)
