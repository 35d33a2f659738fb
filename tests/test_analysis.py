"""The test analysis: beyond-accuracy metrics against hand-computed values, per-query values against the
streamed means, slices that add up to the whole, the run's files and plots, and exact re-execution."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import roc_auc_score

from recsys_lab.analysis.evaluation import (
    AnalysisData,
    EvaluationSpec,
    Grouping,
    Records,
    TestAnalysis,
    _history_grouping,
    _popularity_grouping,
)
from recsys_lab.analysis.plots import expected_calibration_error
from recsys_lab.data.batch import Batch, EvalTargets, Seq
from recsys_lab.metrics import FullRankingMetrics
from recsys_lab.metrics.beyond import BeyondAccuracy, gini
from recsys_lab.train import train
from tests.helpers import REPO, model_overrides

PNG = b"\x89PNG\r\n\x1a\n"


# ---- beyond accuracy, by hand -----------------------------------------------------------------------------
def test_gini_matches_the_mean_absolute_difference_form():
    x = torch.tensor([0.0, 1.0, 1.0, 3.0, 7.0])
    # G = sum_i sum_j |x_i - x_j| / (2 n^2 mean): an independent definition of the same coefficient
    mad = sum(abs(a - b) for a, b in itertools.product(x.tolist(), repeat=2))
    assert float(gini(x)) == pytest.approx(mad / (2 * len(x) ** 2 * x.mean().item()))
    assert float(gini(torch.ones(4))) == 0.0  # equal exposure
    assert float(gini(torch.tensor([0.0, 0.0, 0.0, 5.0]))) == pytest.approx(0.75)  # (n - 1) / n: one item


def test_beyond_accuracy_on_a_hand_example():
    # catalogue: codes 1..5 (0 is the unknown item); training positives per code
    counts = torch.tensor([0.0, 8.0, 4.0, 2.0, 1.0, 0.0])
    category = torch.tensor([[0], [1], [1], [2], [3], [2]])
    vectors = torch.tensor([[0, 0], [1, 0], [1, 0], [0, 1], [1, 1], [-1, 0]], dtype=torch.float)
    metric = BeyondAccuracy([1, 2], counts, category, vectors)
    top = torch.tensor([[1, 2], [1, 3], [4, -1]])  # the third list holds one item only
    metric.update(top)
    out = {k: float(v) for k, v in metric.compute().items()}

    assert out["coverage@1"] == pytest.approx(2 / 5)  # items 1 and 4
    assert out["coverage@2"] == pytest.approx(4 / 5)  # 1, 2, 3, 4
    # exposure at k=2 over codes 1..5: [2, 1, 1, 1, 0]
    assert out["gini@2"] == pytest.approx(float(gini(torch.tensor([2.0, 1, 1, 1, 0]))))
    assert out["popularity@1"] == pytest.approx((8 + 8 + 1) / 3)
    assert out["popularity@2"] == pytest.approx(((8 + 4) / 2 + (8 + 2) / 2 + 1) / 3)
    total = 15.0
    info = {c: -math.log2(max(n, 1.0) / total) for c, n in enumerate(counts.tolist())}
    assert out["novelty@2"] == pytest.approx(
        ((info[1] + info[2]) / 2 + (info[1] + info[3]) / 2 + info[4]) / 3
    )
    # pairs: (1, 2) same category, (1, 3) different; the one-item list has no pair and counts 0
    assert out["ild_category@2"] == pytest.approx((0 + 1 + 0) / 3)
    # cosine distance: (1, 2) identical -> 0; (1, 3) orthogonal -> 1
    assert out["ild_embedding@2"] == pytest.approx((0 + 1 + 0) / 3, abs=1e-6)
    assert out["ild_category@1"] == 0.0  # a single item has no pair


def test_multi_category_distance_is_one_minus_jaccard():
    counts = torch.ones(4)
    genres = torch.tensor([[0, 0, 0], [1, 2, 0], [2, 3, 4], [5, 0, 0]])  # padded sets per code
    metric = BeyondAccuracy([3], counts, genres)
    values = metric.per_list(torch.tensor([[1, 2, 3]]))
    # {1,2} vs {2,3,4}: 1 - 1/4; {1,2} vs {5}: 1; {2,3,4} vs {5}: 1
    assert values[0, metric.names.index("ild_category@3")].item() == pytest.approx((0.75 + 1 + 1) / 3)


def test_both_jaccard_paths_agree(monkeypatch):
    """Multi-hot set products (few codes) and slot-by-slot comparison (many codes) give the same distances."""
    from recsys_lab.metrics import beyond

    g = torch.Generator().manual_seed(0)
    V, G = 40, 4
    sets = [
        torch.randperm(12, generator=g)[: int(torch.randint(0, G + 1, (1,), generator=g))] + 1
        for _ in range(V)
    ]
    table = torch.nn.utils.rnn.pad_sequence(
        [torch.cat([s, torch.zeros(G - len(s), dtype=torch.long)]) for s in sets], batch_first=True
    )
    metric = BeyondAccuracy([5], torch.ones(V), table)
    top = torch.randint(1, V, (6, 5), generator=g)
    fast = metric._category_distance(top)
    monkeypatch.setattr(beyond, "_MULTI_HOT_CODES", 0)
    assert torch.equal(metric._category_distance(top), fast)
    a, b = set(sets[int(top[0, 0])].tolist()), set(sets[int(top[0, 1])].tolist())
    expected = 1 - len(a & b) / len(a | b) if a | b else 0.0
    assert float(fast[0, 0, 1]) == pytest.approx(expected)


# ---- ranking analysis on synthetic query batches ----------------------------------------------------------
def _query_batch(users, targets, seen_lengths):
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in targets], batch_first=True)
    lengths = torch.tensor([len(t) for t in targets])
    seen = Seq(torch.zeros(len(users), 1, dtype=torch.long), torch.as_tensor(seen_lengths))
    return Batch(eval=EvalTargets(user=torch.tensor(users), targets=Seq(ids, lengths), seen=seen))


def _ranking_analysis(num_items=30, num_users=12, single_target=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 20, (num_items,), generator=g).double()
    counts[0] = 0
    user_codes = torch.randint(0, 3, (num_users,), generator=g)
    spec = EvaluationSpec(curves_max_k=0, history_bins=(2, 5), slice_columns=(), min_group_size=1)
    groupings = [
        Grouping("user_history", "history", torch.tensor([0, 0, 0, 1, 1, 1, 2]), ["0-2", "3-5", "6+"]),
        Grouping("item_popularity", "item", torch.arange(num_items) % 3, ["head", "torso", "tail"]),
        Grouping("user:gender", "user", user_codes, ["?", "F", "M"]),
    ]
    history = torch.randint(0, 9, (num_users,), generator=g)  # positives before the test period
    data = AnalysisData(
        users_raw=[f"u{i}" for i in range(num_users)],
        item_counts=counts,
        groupings=groupings,
        user_history=history,
    )
    metric = FullRankingMetrics([3, 5])
    analysis = TestAnalysis(spec, data, "ranking", metric.ks, metric.names)
    users = torch.arange(num_users)
    targets = []
    for _ in range(num_users):
        n = 1 if single_target else 1 + int(torch.randint(0, 3, (1,), generator=g))
        targets.append(torch.randperm(num_items - 1, generator=g)[:n] + 1)
    scores = torch.randn(num_users, num_items, generator=g)
    scores[:, 0] = float("-inf")
    relevant = torch.zeros(num_users, num_items, dtype=torch.bool)
    for u, t in enumerate(targets):
        relevant[u, t] = True
    batch = _query_batch(
        users.tolist(), [t.tolist() for t in targets], torch.randint(0, 9, (num_users,), generator=g)
    )
    for rows in (slice(0, 5), slice(5, None)):  # two batches, as evaluation streams them
        sub = batch.select(torch.arange(num_users)[rows])
        values = metric.per_query(scores[rows], relevant[rows])
        metric.update(scores[rows], relevant[rows], values)
        analysis.ranking_step(
            metric.per_query, sub, scores[rows], relevant[rows], torch.arange(num_items), values
        )
    overall = {k: float(v) for k, v in metric.compute().items()}
    return analysis, overall, scores, relevant, batch, metric


def _weighted_mean(out, grouping, labels, metric, unit="queries"):
    sizes = [out.get(f"slice/{grouping}/{g}/{unit}", 0.0) for g in labels]
    values = [out.get(f"slice/{grouping}/{g}/{metric}", 0.0) for g in labels]
    return sum(n * v for n, v in zip(sizes, values, strict=True)) / sum(sizes)


def test_history_bins_and_popularity_bands():
    grouping = _history_grouping([5, 20])
    assert grouping.labels == ["0-5", "6-20", "21+"]
    lengths = torch.tensor([0, 5, 6, 20, 21, 1000])
    codes = grouping.codes[lengths.clamp(max=len(grouping.codes) - 1)]
    assert codes.tolist() == [0, 0, 1, 1, 2, 2]
    # 10 catalogue items (codes 1..10) by popularity; head = the top 20% (2 items), torso up to 80% (8 items)
    counts = torch.tensor([0.0, 5, 50, 1, 7, 30, 0, 2, 9, 3, 4])
    bands = _popularity_grouping(counts, [0.2, 0.8])
    by_code = {c: bands.labels[int(bands.codes[c])] for c in range(1, 11)}
    assert {c for c, b in by_code.items() if b == "head"} == {2, 5}
    assert {c for c, b in by_code.items() if b == "tail"} == {3, 6}  # the two least popular, unseen included


def test_records_start_with_well_formed_empty_parts():
    """A process that saw no row still has a [0, M] part of the right dtype for the all-gather."""
    records = Records({"values": ((3,), torch.float64), "user": ((), torch.long)})
    out = records.compute()
    assert out["values"].shape == (0, 3) and out["values"].dtype == torch.float64
    assert out["user"].shape == (0,) and out["user"].dtype == torch.long
    records.update(values=torch.ones(2, 3), user=torch.tensor([4, 5]))
    records.reset()
    assert records.compute()["values"].shape == (0, 3)


def test_repeated_queries_count_once():
    """A distributed sampler pads the last batch with repeated queries: the per-query file keeps one each."""
    analysis, overall, scores, relevant, batch, metric = _ranking_analysis(single_target=True)
    again = slice(0, 3)
    repeat = batch.select(torch.arange(3))
    values = metric.per_query(scores[again], relevant[again])
    analysis.ranking_step(metric.per_query, repeat, scores[again], relevant[again], torch.arange(30), values)
    analysis.end()
    frame = analysis.results["per_query"]
    assert frame.height == 12 and frame["query_key"].n_unique() == 12
    assert frame["ndcg@3"].mean() == pytest.approx(overall["ndcg@3"])


def test_per_query_values_average_to_the_streamed_metrics():
    analysis, overall, *_ = _ranking_analysis()
    analysis.end()
    frame = analysis.results["per_query"]
    assert frame["query_key"].n_unique() == frame.height == 12
    for name, value in overall.items():
        assert frame[name].mean() == pytest.approx(value, abs=1e-6), name


@pytest.mark.parametrize("single_target", [True, False])
def test_slices_add_up_to_the_whole(single_target):
    analysis, overall, *_ = _ranking_analysis(single_target=single_target)
    out = {k: float(v) for k, v in analysis.end().items()}
    for metric in ("recall@3", "ndcg@3", "hit@3", "mrr"):
        # user groupings partition the queries, whatever their targets
        assert _weighted_mean(out, "user_history", ["0-2", "3-5", "6+"], metric) == pytest.approx(
            overall[metric]
        )
        assert _weighted_mean(out, "user:gender", ["?", "F", "M"], metric) == pytest.approx(overall[metric])
        items = _weighted_mean(out, "item_popularity", ["head", "torso", "tail"], metric)
        if single_target:  # one target per query: the item groupings partition the queries too
            assert items == pytest.approx(overall[metric])
    # the fairness gap: the largest minus the smallest group value (every group counts: min_group_size=1)
    groups = [
        out[f"slice/user:gender/{g}/recall@3"]
        for g in ("?", "F", "M")
        if f"slice/user:gender/{g}/queries" in out
    ]
    assert len(groups) >= 2
    assert out["gap/user:gender/recall@3"] == pytest.approx(max(groups) - min(groups))
    # the history slice reads each user's positives before the test period
    frame = analysis.results["per_query"]
    assert frame["history_length"].to_list() == analysis.data.user_history.tolist()
    assert frame["slice:user_history"].to_list() == [
        ["0-2", "0-2", "0-2", "3-5", "3-5", "3-5", "6+"][min(h, 6)]
        for h in analysis.data.user_history.tolist()
    ]


def test_item_slices_restrict_a_query_to_the_group_targets():
    analysis, _, scores, relevant, batch, metric = _ranking_analysis(single_target=False, seed=3)
    out = {k: float(v) for k, v in analysis.end().items()}
    # by hand: every (query, group) with a target in the group, the query's other targets out of the ranking
    group_of = torch.arange(scores.shape[1]) % 3
    entries = {g: [] for g in range(3)}
    for q in range(scores.shape[0]):
        for g in range(3):
            in_group = relevant[q] & (group_of == g)
            if in_group.any():
                ranked = scores[q].masked_fill(relevant[q] & ~in_group, float("-inf"))
                entries[g].append(metric.per_query(ranked.unsqueeze(0), in_group.unsqueeze(0))[0])
    for g, label in enumerate(["head", "torso", "tail"]):
        expected = torch.stack(entries[g]).mean(0)
        assert out[f"slice/item_popularity/{label}/queries"] == len(entries[g])
        assert out[f"slice/item_popularity/{label}/ndcg@3"] == pytest.approx(
            float(expected[metric.names.index("ndcg@3")])
        )
        assert out[f"slice/item_popularity/{label}/mrr"] == pytest.approx(float(expected[-1]))


def test_impression_analysis_slices_calibration_and_per_user_auc():
    g = torch.Generator().manual_seed(1)
    M, users = 400, 20
    row_user = torch.randint(0, users, (M,), generator=g)
    row_item = torch.randint(1, 10, (M,), generator=g)
    labels = (torch.rand(M, generator=g) < 0.3).float()
    logits = torch.randn(M, generator=g).double() + labels.double()
    spec = EvaluationSpec(slice_columns=())
    data = AnalysisData(
        users_raw=[str(u) for u in range(users)],
        item_counts=torch.arange(10).double(),
        groupings=[
            Grouping("item_popularity", "item", torch.arange(10) % 3, ["head", "torso", "tail"]),
            Grouping("user_history", "history", torch.tensor([0, 1]), ["0", "1+"]),
        ],
        row_user=row_user,
        row_item_code=row_item,
        row_history=torch.randint(0, 3, (M,), generator=g),
    )
    analysis = TestAnalysis(spec, data, "impressions", (10,), [])
    for part in (slice(0, 150), slice(150, None)):
        analysis.impression_step(torch.arange(M)[part], logits[part], labels[part])
    out = {k: float(v) for k, v in analysis.end().items()}
    probs = torch.sigmoid(logits).numpy()
    assert out["ece"] == pytest.approx(expected_calibration_error(probs, labels.numpy(), 15), abs=1e-6)
    losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.double(), reduction="none")
    for grouping, groups in (("item_popularity", ["head", "torso", "tail"]), ("user_history", ["0", "1+"])):
        assert _weighted_mean(out, grouping, groups, "logloss", "impressions") == pytest.approx(
            float(losses.mean())
        )
    head = (row_item % 3 == 0).numpy()
    assert out["slice/item_popularity/head/auc"] == pytest.approx(
        roc_auc_score(labels.numpy()[head], logits.numpy()[head])
    )
    frame = analysis.results["per_query"]
    for row in frame.iter_rows(named=True):
        mask = (row_user == int(row["user"])).numpy()
        if len(set(labels.numpy()[mask])) == 2:
            assert row["gauc"] == pytest.approx(roc_auc_score(labels.numpy()[mask], logits.numpy()[mask]))
        else:
            assert math.isnan(row["gauc"])
        assert row["logloss"] == pytest.approx(float(losses[torch.as_tensor(mask)].mean()))


def test_bad_evaluation_config_names_the_key():
    with pytest.raises(ValueError, match="evaluation.metric_sets"):
        EvaluationSpec.from_config({"metric_sets": ["accuracy_plus"]})
    with pytest.raises(ValueError, match="evaluation.popularity_band"):
        EvaluationSpec.from_config({"popularity_band": [0.1, 0.5]})
    for bins in ([20, 5], [], 5, [True, 3]):
        with pytest.raises(ValueError, match="evaluation.history_bins"):
            EvaluationSpec.from_config({"history_bins": bins})
    # a metric name the evaluation does not compute stops when the task is configured, not after the fit
    data = AnalysisData(users_raw=["a"], item_counts=torch.zeros(3))
    with pytest.raises(ValueError, match="evaluation.slice_metrics: 'recall@7'"):
        TestAnalysis(EvaluationSpec(slice_metrics=("recall@7",)), data, "ranking", (10,), ["recall@10"])
    with pytest.raises(ValueError, match="evaluation.slice_metrics: 'ndcg@10'"):
        TestAnalysis(EvaluationSpec(slice_metrics="ndcg@10"), data, "impressions", (10,), [])


# ---- the run's files -------------------------------------------------------------------------------------
def test_a_ranking_run_writes_per_query_values_curves_and_plots(make_cfg, tmp_path):
    cfg = make_cfg([*model_overrides("two_tower", tmp_path), "trainer.max_epochs=1", "evaluation.plots=true"])
    results = train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = results["metrics"]
    frame = pl.read_parquet(out / "per_query.parquet")
    assert frame.height == results["protocol"]["test_queries_used"]
    for name in ("recall@10", "ndcg@20", "mrr", "novelty@10"):
        assert frame[name].mean() == pytest.approx(metrics[f"test/{name}"], abs=1e-5)
    curves = json.loads((out / "curves.json").read_text())
    assert curves["k"][:3] == [1, 2, 3] and len(curves["k"]) == 100
    assert curves["recall"][9] == pytest.approx(metrics["test/recall@10"], abs=1e-6)
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(curves["recall"]))  # recall@K grows with K
    for name in ("metric_at_k", "popularity_bias", "training_curves"):
        png = (out / "plots" / f"{name}.png").read_bytes()
        assert png[:8] == PNG and len(png) > 5000, name
    assert 0 < metrics["test/coverage@10"] <= metrics["test/coverage@50"] <= 1
    # what `auto` resolved to is recorded with the results: the simulator's first category and vector columns
    evaluation = results["evaluation"]
    assert evaluation["category"] == "auto" and evaluation["category_column"] == "cat1"
    assert evaluation["vector_column"] == "image" and "item_popularity" in evaluation["groupings"]
    # the training curves' record: each epoch's mean training loss and validation metrics
    assert [e["epoch"] for e in results["history"]] == [0]
    assert 0 < results["history"][0]["train/loss_mean"] < 100 and "val/ndcg@10" in results["history"][0]
    # where it ran and with what
    env = results["environment"]
    assert env["packages"]["torch"] == torch.__version__ and env["cpu_count"] == os.cpu_count()
    assert results["git_dirty"] == results["git_commit"].endswith("+dirty")
    saved = (out / "resolved_config.yaml").read_text()
    assert "_target_: recsys_lab.models.two_tower.TwoTower" in saved and "${" not in saved


def test_a_ctr_run_draws_calibration_and_score_distributions(make_cfg, tmp_path):
    cfg = make_cfg([*model_overrides("din", tmp_path), "trainer.max_epochs=1", "evaluation.plots=true"])
    results = train(cfg)
    out = Path(cfg.paths.output_dir)
    for name in ("calibration", "score_distributions", "training_curves"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == PNG
    frame = pl.read_parquet(out / "per_query.parquet")
    assert frame["impressions"].sum() == results["protocol"]["test_rows_used"]
    assert 0 <= results["metrics"]["test/ece"] < 0.5


def test_evaluation_accuracy_turns_the_analysis_off(make_cfg, tmp_path):
    results = train(
        make_cfg([*model_overrides("two_tower", tmp_path), "debug=fast_dev_run", "evaluation=accuracy"])
    )
    assert not any(k.startswith(("test/slice/", "test/gap/", "test/coverage")) for k in results["metrics"])
    assert not (Path(results["output_dir"]) / "per_query.parquet").exists()


@pytest.mark.slow
def test_a_run_re_executes_exactly_from_its_output_dir(tmp_path, data_dir):
    """`python train.py --config-path <run>/.hydra --config-name config` repeats a deterministic CPU run."""
    env = {**os.environ, "RECSYS_LAB_DATA": str(data_dir), "WANDB_MODE": "disabled"}
    first = tmp_path / "first"
    args = [*model_overrides("din", tmp_path), "trainer.max_epochs=2", "trainer.deterministic=true"]
    run = [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={first}"]
    subprocess.run(run, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    again = tmp_path / "again"
    rerun = [
        sys.executable,
        str(REPO / "train.py"),
        "--config-path",
        str(first / ".hydra"),
        "--config-name",
        "config",
        f"hydra.run.dir={again}",
    ]
    proc = subprocess.run(rerun, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((first / "results.json").read_text())["metrics"]
    b = json.loads((again / "results.json").read_text())["metrics"]
    assert set(a) == set(b)
    for key, value in a.items():
        assert b[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    assert np.isfinite(a["test/auc"])
