"""Metric values against hand-computed cases, sklearn and slow reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch import Tensor

from recsys_lab.metrics import CTRMetrics, FullRankingMetrics, GroupAUC

NEG_INF = float("-inf")


def _disc(position: int) -> float:
    """DCG discount at a 1-based position."""
    return 1.0 / math.log2(position + 1)


# ---------------------------------------------------------------------------------------------------------
# FullRankingMetrics
# ---------------------------------------------------------------------------------------------------------


def test_full_ranking_hand_computed() -> None:
    F, T = False, True
    scores = torch.tensor(
        [
            # q0: items 1 and 2 tie (both relevant, so their order cannot matter); item 4 is relevant but masked.
            [0.9, 0.8, 0.8, 0.4, NEG_INF, 0.1],
            # q1: a relevant item on top, another one last.
            [0.1, 0.2, 0.95, 0.3, 0.4, 0.5],
            # q2: one finite item only, so topk(3) must return two -inf items, and every -inf item is relevant.
            [0.5, NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF],
        ]
    )
    target = torch.tensor(
        [
            [F, T, T, F, T, F],
            [T, F, T, F, F, F],
            [F, T, T, T, T, T],
        ]
    )
    metric = FullRankingMetrics(ks=(3, 1))
    metric.update(scores, target)
    out = metric.compute()

    # q0: ranking 0 | {1, 2} | 3 | 5 | 4(-inf). #rel = 3 (the masked item counts: it is a miss).
    #   @1: top {0}: 0 hits -> recall 0, hit 0, ndcg 0.
    #   @3: top {0, 1, 2}: hits at positions 2, 3 -> recall 2/3, hit 1,
    #       ndcg = (1/log2 3 + 1/log2 4) / (1 + 1/log2 3 + 1/log2 4) = 1.1309 / 2.1309 = 0.5307.
    #   mrr: best relevant score 0.8, one item strictly above -> rank 2 -> 1/2.
    q0_ndcg3 = (_disc(2) + _disc(3)) / (_disc(1) + _disc(2) + _disc(3))
    # q1: ranking 2 | 5 | 4 | 3 | 1 | 0. #rel = 2.
    #   @1: top {2}: 1 hit -> recall 1/2, hit 1, ndcg = 1/1 = 1.
    #   @3: top {2, 5, 4}: 1 hit at position 1 -> recall 1/2, hit 1, ndcg = 1 / (1 + 1/log2 3) = 0.6131.
    #   mrr: rank 1 -> 1.
    q1_ndcg3 = _disc(1) / (_disc(1) + _disc(2))
    # q2: #rel = 5, every relevant item is -inf: 0 everywhere (the two -inf items topk returns are not hits),
    #   mrr 0.
    expected = {
        "recall@1": (0 + 1 / 2 + 0) / 3,  # 1/6
        "recall@3": (2 / 3 + 1 / 2 + 0) / 3,  # 7/18
        "hit@1": (0 + 1 + 0) / 3,  # 1/3
        "hit@3": (1 + 1 + 0) / 3,  # 2/3
        "ndcg@1": (0 + 1 + 0) / 3,  # 1/3
        "ndcg@3": (q0_ndcg3 + q1_ndcg3 + 0) / 3,  # (0.5307 + 0.6131) / 3 = 0.3813
        "mrr": (1 / 2 + 1 + 0) / 3,  # 1/2
    }
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, abs=1e-6), key
    assert out["ndcg@3"].item() == pytest.approx(0.381289, abs=1e-6)


def test_full_ranking_mrr_ties_are_optimistic_and_untruncated() -> None:
    # Relevant item 2 ties with item 1 behind item 0: one item strictly higher -> rank 2 -> mrr 1/2, not 1/3.
    # Its rank (2) is past k = 1, yet MRR still counts it: MRR is over the full catalogue.
    metric = FullRankingMetrics(ks=(1,))
    metric.update(torch.tensor([[0.9, 0.5, 0.5, 0.1]]), torch.tensor([[False, False, True, False]]))
    out = metric.compute()
    assert out["mrr"].item() == pytest.approx(0.5)
    assert out["recall@1"].item() == 0.0
    assert set(out) == {"recall@1", "ndcg@1", "hit@1", "mrr"}


def _reference_ranking(scores: Tensor, target: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Slow per-row reference: full argsort, -inf items are never hits. Assumes no ties among finite scores."""
    sums: dict[str, float] = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg", "hit")}
    sums["mrr"] = 0.0
    for row_scores, row_target in zip(scores.tolist(), target.tolist(), strict=True):
        order = sorted(range(len(row_scores)), key=lambda i: -row_scores[i])
        ranked_hits = [row_target[i] and row_scores[i] > NEG_INF for i in order]
        n_rel = sum(row_target)
        for k in ks:
            top = ranked_hits[:k]
            sums[f"recall@{k}"] += sum(top) / n_rel
            sums[f"hit@{k}"] += float(any(top))
            dcg = sum(_disc(p + 1) for p, hit in enumerate(top) if hit)
            idcg = sum(_disc(p + 1) for p in range(min(n_rel, k)))
            sums[f"ndcg@{k}"] += dcg / idcg
        first = next((p for p, hit in enumerate(ranked_hits) if hit), None)
        sums["mrr"] += 0.0 if first is None else 1.0 / (first + 1)
    return {key: value / scores.shape[0] for key, value in sums.items()}


def _random_ranking_batch(num_queries: int, num_items: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    # A random permutation per row: distinct finite scores, so the reference's order is the only order.
    scores = torch.argsort(torch.rand(num_queries, num_items, generator=g), dim=1).float()  # (B, N)
    scores[torch.rand(num_queries, num_items, generator=g) < 0.3] = NEG_INF
    target = torch.rand(num_queries, num_items, generator=g) < 0.1  # (B, N)
    target[torch.arange(num_queries), torch.randint(0, num_items, (num_queries,), generator=g)] = True
    return scores, target


def test_full_ranking_matches_reference() -> None:
    ks = (1, 5, 10, 20, 100)  # 100 > N: clamped to the catalogue
    scores, target = _random_ranking_batch(num_queries=40, num_items=50, seed=0)
    metric = FullRankingMetrics(ks=ks)
    metric.update(scores, target)
    out = metric.compute()
    expected = _reference_ranking(scores, target, ks)
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, abs=1e-5), key
    assert out["recall@100"].item() < 1.0  # masked relevant items are misses even when k covers everything


def test_full_ranking_split_batches_equal_one_batch() -> None:
    scores, target = _random_ranking_batch(num_queries=30, num_items=40, seed=1)
    whole, split = FullRankingMetrics(ks=(5, 10)), FullRankingMetrics(ks=(5, 10))
    whole.update(scores, target)
    split.update(scores[:11], target[:11])
    split.update(scores[11:], target[11:])
    out_whole, out_split = whole.compute(), split.compute()
    for key in out_whole:
        torch.testing.assert_close(out_split[key], out_whole[key])


def test_full_ranking_errors() -> None:
    metric = FullRankingMetrics(ks=(2,))
    with pytest.raises(RuntimeError, match="before any query"), pytest.warns(UserWarning):
        metric.compute()
    target = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="no relevant item"):
        metric.update(torch.rand(2, 3), target)
    with pytest.raises(ValueError, match="bool"):
        metric.update(torch.rand(2, 3), target.long())
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        metric.update(torch.rand(2, 3), target[:, :2])
    for bad_ks in [(), (0,), (5, -1), (2.5,), (True,), 10, "10"]:
        with pytest.raises(ValueError, match="ks"):
            FullRankingMetrics(ks=bad_ks)  # type: ignore[arg-type]
    assert FullRankingMetrics(ks=[20, 10, 20]).ks == (10, 20)


# ---------------------------------------------------------------------------------------------------------
# GroupAUC and CTRMetrics
# ---------------------------------------------------------------------------------------------------------


def _random_ctr(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Logits rounded to 1 decimal (many ties), labels, and sparse non-contiguous group ids."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.round(torch.randn(n, generator=g) * 10) / 10  # (n,)
    target = (torch.rand(n, generator=g) < torch.sigmoid(logits)).long()  # (n,): informative labels
    user_ids = torch.tensor([-7, 3, 10**12, 42, 5, 99, 1000, 8])  # negative and huge ids
    groups = user_ids[torch.randint(0, len(user_ids), (n,), generator=g)]  # (n,)
    # Single-class groups, which GAUC must skip: an all-positive user and a one-impression user.
    groups[:6], target[:6] = 123, 1
    groups[6] = 456
    return logits, target, groups


def _reference_gauc(preds: Tensor, target: Tensor, groups: Tensor) -> float:
    """Per-user sklearn AUC weighted by impressions, skipping users with one class only."""
    num, den = 0.0, 0.0
    for user in np.unique(groups.numpy()):
        mask = groups.numpy() == user
        y = target.numpy()[mask]
        if y.min() == y.max():
            continue
        num += mask.sum() * roc_auc_score(y, preds.numpy()[mask])
        den += mask.sum()
    return num / den


def test_group_auc_one_group_equals_sklearn_auc() -> None:
    logits, target, _ = _random_ctr(300, seed=0)
    metric = GroupAUC()
    metric.update(logits, target, torch.zeros_like(target))
    assert metric.compute().item() == pytest.approx(roc_auc_score(target.numpy(), logits.numpy()), abs=1e-6)


def test_group_auc_matches_reference_with_ties_and_split_updates() -> None:
    logits, target, groups = _random_ctr(500, seed=1)
    expected = _reference_gauc(logits, target, groups)
    one = GroupAUC()
    one.update(logits, target, groups)
    assert one.compute().item() == pytest.approx(expected, abs=1e-6)
    split = GroupAUC()
    for chunk in torch.arange(500).split(77):
        split.update(logits[chunk], target[chunk], groups[chunk])
    assert split.compute().item() == pytest.approx(expected, abs=1e-6)


def test_group_auc_without_two_class_group_is_nan() -> None:
    metric = GroupAUC()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute().item())  # nothing seen
    metric.update(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]))
    assert math.isnan(metric.compute().item())
    with pytest.raises(ValueError, match="0 and 1"):
        metric.update(torch.tensor([0.1]), torch.tensor([2]), torch.tensor([0]))


def test_ctr_metrics_match_sklearn() -> None:
    logits, target, groups = _random_ctr(400, seed=2)
    probs = torch.sigmoid(logits).double().numpy()
    metrics = CTRMetrics()
    for chunk in torch.arange(400).split(128):  # several updates, float labels as datasets give them
        metrics.update(logits[chunk], target[chunk].float(), groups[chunk])
    out = metrics.compute()
    assert set(out) == {"auc", "gauc", "logloss"}
    assert out["auc"].item() == pytest.approx(roc_auc_score(target.numpy(), probs), abs=1e-6)
    assert out["gauc"].item() == pytest.approx(_reference_gauc(logits, target, groups), abs=1e-6)
    assert out["logloss"].item() == pytest.approx(log_loss(target.numpy(), probs), abs=1e-5)

    metrics.reset()
    metrics.update(logits[:50], target[:50], groups[:50])
    assert metrics.compute()["logloss"].item() == pytest.approx(
        log_loss(target[:50].numpy(), probs[:50]), abs=1e-5
    )
