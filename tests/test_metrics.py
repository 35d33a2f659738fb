"""Metric values against hand-computed cases, sklearn and slow reference implementations."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from itertools import permutations
from math import comb

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch import Tensor

from recsys_lab.metrics import CTRMetrics, ExactAUC, FullRankingMetrics, GroupAUC, reference_aucs
from recsys_lab.metrics import ranking as ranking_module

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
    # precision@k = hits in the top k / k: q0 has 0 and 2 hits, q1 1 and 1, q2 none.
    # mrr@k: q0's best relevant item is at rank 2 (past k = 1, within k = 3), q1's at rank 1.
    expected = {
        "recall@1": (0 + 1 / 2 + 0) / 3,  # 1/6
        "recall@3": (2 / 3 + 1 / 2 + 0) / 3,  # 7/18
        "hit@1": (0 + 1 + 0) / 3,  # 1/3
        "hit@3": (1 + 1 + 0) / 3,  # 2/3
        "ndcg@1": (0 + 1 + 0) / 3,  # 1/3
        "ndcg@3": (q0_ndcg3 + q1_ndcg3 + 0) / 3,  # (0.5307 + 0.6131) / 3 = 0.3813
        "precision@1": (0 + 1 + 0) / 3,  # 1/3
        "precision@3": (2 / 3 + 1 / 3 + 0) / 3,  # 1/3
        "mrr@1": (0 + 1 + 0) / 3,  # 1/3
        "mrr@3": (1 / 2 + 1 + 0) / 3,  # 1/2
        "mrr": (1 / 2 + 1 + 0) / 3,  # 1/2
    }
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, abs=1e-6), key
    assert out["ndcg@3"].item() == pytest.approx(0.381289, abs=1e-6)


def test_full_ranking_mrr_ties_are_random_and_untruncated() -> None:
    # Relevant item 2 ties with item 1 behind item 0: its rank is 2 or 3 with equal odds -> mrr (1/2 + 1/3) / 2.
    # Both ranks are past k = 1, yet MRR still counts them: MRR is over the full catalogue.
    metric = FullRankingMetrics(ks=(1, 2))
    metric.update(torch.tensor([[0.9, 0.5, 0.5, 0.1]]), torch.tensor([[False, False, True, False]]))
    out = metric.compute()
    assert out["mrr"].item() == pytest.approx(5 / 12, abs=1e-7)
    assert out["recall@1"].item() == 0.0
    # @2: the item is at position 2 half of the time.
    assert out["recall@2"].item() == pytest.approx(1 / 2, abs=1e-7)
    assert out["hit@2"].item() == pytest.approx(1 / 2, abs=1e-7)
    assert out["ndcg@2"].item() == pytest.approx(_disc(2) / 2, abs=1e-7)
    # Truncated at k: rank 2 counts 1/2 for mrr@2 (half of the time), rank 3 never does.
    assert out["mrr@1"].item() == 0.0
    assert out["mrr@2"].item() == pytest.approx(1 / 4, abs=1e-7)
    assert out["precision@2"].item() == pytest.approx(1 / 4, abs=1e-7)  # 1/2 expected hits over 2 slots
    families = ("recall", "ndcg", "hit", "precision", "mrr")
    assert set(out) == {f"{m}@{k}" for m in families for k in (1, 2)} | {"mrr"}


def test_full_ranking_tie_group_hand_computed() -> None:
    # Item 0 leads; items 1..4 tie, two of them relevant (r = 2, t = 4, a = 1); k = 2 leaves m = 1 slot to them.
    metric = FullRankingMetrics(ks=(2,))
    metric.update(
        torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]]), torch.tensor([[False, False, True, True, False]])
    )
    out = metric.compute()
    # hit@2 = 1 - C(t - r, m) / C(t, m) = 1 - 2/4; recall@2 = 2 * (1/4) / 2.
    assert out["hit@2"].item() == pytest.approx(1 / 2, abs=1e-7)
    assert out["recall@2"].item() == pytest.approx(1 / 4, abs=1e-7)
    # Each relevant item is at position 2 with probability 1/4: DCG = 2 * (1/4) / log2(3), IDCG = 1 + 1/log2(3).
    assert out["ndcg@2"].item() == pytest.approx((2 * _disc(2) / 4) / (_disc(1) + _disc(2)), abs=1e-7)
    # Best rank 1 + X, X = min of 2 positions out of 4: P(X = 1, 2, 3) = 3/6, 2/6, 1/6 -> 1/4 + 1/9 + 1/24.
    assert out["mrr"].item() == pytest.approx(29 / 72, abs=1e-7)
    # mrr@2 keeps only rank 2 (X = 1): 3/6 * 1/2; precision@2 = 2 * (1/4) expected hits / 2.
    assert out["mrr@2"].item() == pytest.approx(1 / 4, abs=1e-7)
    assert out["precision@2"].item() == pytest.approx(1 / 4, abs=1e-7)


def test_truncated_mrr_and_precision_by_hand() -> None:
    F, T = False, True
    scores = torch.tensor(
        [
            # q0: relevant items at ranks 3 and 5 (no ties): mrr@2 = 0, mrr@3 = mrr@5 = 1/3.
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
            # q1: items 0..2 tie at the top, one of them relevant (a = 0, t = 3, r = 1): rank uniform on 1..3.
            [0.5, 0.5, 0.5, 0.1, 0.0, -1.0],
            # q2: two relevant items among 4 tied behind one item (a = 1, t = 4, r = 2): best rank 1 + X with
            #     P(X = 1, 2, 3) = 1/2, 1/3, 1/6.
            [1.0, 0.0, 0.0, 0.0, 0.0, -1.0],
        ]
    )
    target = torch.tensor(
        [
            [F, F, T, F, T, F],
            [F, T, F, F, F, F],
            [F, T, F, F, T, F],
        ]
    )
    metric = FullRankingMetrics(ks=(2, 3, 5))
    metric.update(scores, target)
    out = {key: value.item() for key, value in metric.compute().items()}
    q1 = {2: (1 + 1 / 2) / 3, 3: (1 + 1 / 2 + 1 / 3) / 3, 5: (1 + 1 / 2 + 1 / 3) / 3}
    q2 = {2: (1 / 2) / 2, 3: (1 / 2) / 2 + (1 / 3) / 3, 5: (1 / 2) / 2 + (1 / 3) / 3 + (1 / 6) / 4}
    q0 = {2: 0.0, 3: 1 / 3, 5: 1 / 3}
    for k in (2, 3, 5):
        assert out[f"mrr@{k}"] == pytest.approx((q0[k] + q1[k] + q2[k]) / 3, abs=1e-7), k
    # precision@k = E[#relevant in the top k] / k.
    #   q0: 0, 1, 2 hits at k = 2, 3, 5; q1: 2/3, 1, 1; q2: 1/4, 2/4, 2 (the group is 4 wide from rank 2).
    hits = {2: 0 + 2 / 3 + 2 * (1 / 4), 3: 1 + 1 + 2 * (2 / 4), 5: 2 + 1 + 2}
    for k in (2, 3, 5):
        assert out[f"precision@{k}"] == pytest.approx(hits[k] / k / 3, abs=1e-7), k
    # Without truncation the means agree with the untruncated MRR once k reaches every best rank (here 5).
    assert out["mrr@5"] == pytest.approx(out["mrr"], abs=1e-7)


def _metrics_of_order(ranked_hits: list[bool], n_rel: int, ks: tuple[int, ...]) -> dict[str, float]:
    """Per-query metrics of one complete ranking, given as a hit flag per position."""
    out: dict[str, float] = {}
    first = next((p for p, hit in enumerate(ranked_hits) if hit), None)
    for k in ks:
        top = ranked_hits[:k]
        out[f"recall@{k}"] = sum(top) / n_rel
        out[f"hit@{k}"] = float(any(top))
        dcg = sum(_disc(p + 1) for p, hit in enumerate(top) if hit)
        idcg = sum(_disc(p + 1) for p in range(min(n_rel, k)))
        out[f"ndcg@{k}"] = dcg / idcg
        out[f"precision@{k}"] = sum(top) / min(k, len(ranked_hits))  # k past the catalogue is clamped
        out[f"mrr@{k}"] = 0.0 if first is None or first >= k else 1.0 / (first + 1)
    out["mrr"] = 0.0 if first is None else 1.0 / (first + 1)
    return out


def _reference_ranking(scores: Tensor, target: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Brute force: every metric averaged over all orders that sort the scores (ties permuted every way, each
    order equally likely), then over queries. -inf items are never hits. Untied rows have one order only."""
    sums: dict[str, float] = {
        f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg", "hit", "precision", "mrr")
    }
    sums["mrr"] = 0.0
    for row_scores, row_target in zip(scores.tolist(), target.tolist(), strict=True):
        # -inf items are never hits, so the order inside the masked block changes nothing: keep it fixed.
        values = sorted(set(row_scores) - {NEG_INF}, reverse=True)
        groups = [[i for i, s in enumerate(row_scores) if s == v] for v in values]
        masked = tuple(i for i, s in enumerate(row_scores) if s == NEG_INF)
        orders = [sum(parts, ()) + masked for parts in itertools.product(*(permutations(g) for g in groups))]
        assert len(orders) <= 10_000, "brute force is for small tie groups only"
        n_rel = sum(row_target)
        for order in orders:
            ranked_hits = [row_target[i] and row_scores[i] > NEG_INF for i in order]
            for key, value in _metrics_of_order(ranked_hits, n_rel, ks).items():
                sums[key] += value / len(orders)
    return {key: value / scores.shape[0] for key, value in sums.items()}


def _random_ranking_batch(num_queries: int, num_items: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    # A random permutation per row: distinct finite scores, so the reference's order is the only order.
    scores = torch.argsort(torch.rand(num_queries, num_items, generator=g), dim=1).float()  # (B, N)
    scores[torch.rand(num_queries, num_items, generator=g) < 0.3] = NEG_INF
    target = torch.rand(num_queries, num_items, generator=g) < 0.1  # (B, N)
    target[torch.arange(num_queries), torch.randint(0, num_items, (num_queries,), generator=g)] = True
    return scores, target


def _tied_ranking_batch(num_queries: int, num_items: int, levels: int, seed: int) -> tuple[Tensor, Tensor]:
    """Integer scores in 0..levels-1 (many ties), some -inf, several relevant items per row."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (num_queries, num_items), generator=g).float()  # (B, N)
    scores[torch.rand(num_queries, num_items, generator=g) < 0.15] = NEG_INF
    target = torch.rand(num_queries, num_items, generator=g) < 0.3  # (B, N)
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
        assert out[key].item() == pytest.approx(value, abs=1e-6), key
    # Masked relevant items are misses even when k covers the catalogue: recall@100 is the finite share.
    finite_share = ((target & (scores > NEG_INF)).sum(1) / target.sum(1)).mean().item()
    assert out["recall@100"].item() == pytest.approx(finite_share, abs=1e-6)
    assert finite_share < 0.95


def test_full_ranking_ties_match_brute_force() -> None:
    ks = (1, 2, 3, 5, 20)  # 20 > N
    scores, target = _tied_ranking_batch(num_queries=60, num_items=7, levels=3, seed=3)
    # Hand-made rows: everything tied; a tie group straddling k = 2, 3 and 5; a relevant item among masked ones;
    # relevant items mostly masked; +inf scores, tied among themselves.
    F, T = False, True
    extra_scores = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            [5.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0],
            [5.0, NEG_INF, NEG_INF, 2.0, 2.0, 1.0, NEG_INF],
            [NEG_INF, NEG_INF, 3.0, NEG_INF, 2.0, NEG_INF, NEG_INF],
            [math.inf, 1.0, math.inf, 1.0, NEG_INF, 1.0, math.inf],
        ]
    )
    extra_target = torch.tensor(
        [
            [T, F, T, F, F, T, F],
            [F, F, F, T, F, F, T],
            [F, T, T, F, F, F, F],
            [T, F, F, T, T, T, F],
            [F, T, T, F, T, T, F],
        ]
    )
    scores, target = torch.cat([scores, extra_scores]), torch.cat([target, extra_target])
    metric = FullRankingMetrics(ks=ks)
    metric.update(scores, target)
    out = metric.compute()
    expected = _reference_ranking(scores, target, ks)
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("levels", [2, 4, 50])
def test_full_ranking_invariant_to_item_order(levels: int) -> None:
    scores, target = _tied_ranking_batch(num_queries=50, num_items=60, levels=levels, seed=levels)
    original, permuted = FullRankingMetrics(ks=(1, 5, 10, 30)), FullRankingMetrics(ks=(1, 5, 10, 30))
    original.update(scores, target)
    for seed in range(3):
        perm = torch.randperm(60, generator=torch.Generator().manual_seed(seed))  # (N,)
        permuted.reset()
        permuted.update(scores[:, perm], target[:, perm])
        for key, value in original.compute().items():
            assert permuted.compute()[key].item() == pytest.approx(value.item(), abs=1e-6), (key, seed)


def test_full_ranking_large_tie_groups_match_exact_formulas(monkeypatch: pytest.MonkeyPatch) -> None:
    # One row per (a, t, r): a items above a block of t tied items holding r relevant items, then 7 items below.
    cases = [(0, 40, 1), (5, 40, 3), (9, 300, 7), (3, 13, 13), (2, 25, 24), (12, 30, 2)]
    k = 10
    rows, targets = [], []
    for a, t, r in cases:
        rows.append(torch.cat([torch.full((a,), 2.0), torch.ones(t), torch.zeros(7)]))
        row_target = torch.zeros(a + t + 7, dtype=torch.bool)
        row_target[a : a + r] = True
        targets.append(row_target)
    n = max(len(row) for row in rows)
    scores = torch.stack([torch.cat([row, torch.full((n - len(row),), NEG_INF)]) for row in rows])  # (Q, n)
    target = torch.stack([torch.cat([tg, torch.zeros(n - len(tg), dtype=torch.bool)]) for tg in targets])

    def exact(a: int, t: int, r: int) -> tuple[Fraction, Fraction, Fraction, Fraction]:
        """mrr, hit@k, recall@k and mrr@k as exact fractions."""
        # Best rank a + X, P(X = x) = C(t - x, r - 1) / C(t, r).
        law = {x: Fraction(comb(t - x, r - 1), comb(t, r)) for x in range(1, t - r + 2)}
        mrr = sum(p / (a + x) for x, p in law.items())
        mrr_at_k = sum(p / (a + x) for x, p in law.items() if a + x <= k)
        m = max(0, min(k - a, t))  # top-k slots left to the block
        hit = 1 - Fraction(comb(t - r, m), comb(t, m))
        return mrr, hit, Fraction(m, t), mrr_at_k

    for chunk in (1 << 20, 7):  # the MRR sum over positions, in one chunk and in many
        monkeypatch.setattr(ranking_module, "_RAGGED_CHUNK", chunk)
        for case, row_scores, row_target in zip(cases, scores, target, strict=True):
            metric = FullRankingMetrics(ks=(k,))
            metric.update(row_scores.unsqueeze(0), row_target.unsqueeze(0))
            out = metric.compute()
            mrr, hit, recall, mrr_at_k = exact(*case)
            assert out["mrr"].item() == pytest.approx(float(mrr), rel=1e-6), case
            assert out[f"hit@{k}"].item() == pytest.approx(float(hit), rel=1e-6), case
            assert out[f"recall@{k}"].item() == pytest.approx(float(recall), rel=1e-6), case
            assert out[f"mrr@{k}"].item() == pytest.approx(float(mrr_at_k), rel=1e-6, abs=1e-12), case
            # r relevant items share the block: recall@k = (m / t) r / r, precision@k = (m / t) r / k
            assert out[f"precision@{k}"].item() == pytest.approx(float(recall * case[2] / k), rel=1e-6), case
        whole = FullRankingMetrics(ks=(k,))
        whole.update(scores, target)
        expected_mrr = sum(float(exact(*case)[0]) for case in cases) / len(cases)
        assert whole.compute()["mrr"].item() == pytest.approx(expected_mrr, rel=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_full_ranking_split_batches_equal_one_batch(tied: bool) -> None:
    if tied:
        scores, target = _tied_ranking_batch(num_queries=30, num_items=40, levels=3, seed=1)
    else:
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


def test_ctr_auc_ranks_confident_logits_exactly() -> None:
    # float32 sigmoid(17) == sigmoid(18) == 1.0: an AUC on probabilities would see a tie and report 0.5.
    assert torch.sigmoid(torch.tensor(17.0)) == torch.sigmoid(torch.tensor(18.0))
    metrics = CTRMetrics()
    metrics.update(torch.tensor([17.0, 18.0]), torch.tensor([0, 1]), torch.tensor([0, 0]))
    out = metrics.compute()
    assert out["auc"].item() == 1.0
    assert out["gauc"].item() == 1.0
    # Even float64 sigmoids saturate (sigmoid(40) == 1.0), and float32 cannot tell 1e8 from 1e8 + 1.
    for low, high in [(40.0, 41.0), (1e8, 1e8 + 1)]:
        metrics.reset()
        logits = torch.tensor([high, low, low, high], dtype=torch.float64)
        metrics.update(logits, torch.tensor([1, 0, 0, 1]), torch.tensor([3, 3, 3, 3]))
        out = metrics.compute()
        assert out["auc"].item() == 1.0, (low, high)
        assert out["gauc"].item() == 1.0, (low, high)


def test_exact_auc_matches_sklearn_on_saturating_logits_with_ties() -> None:
    g = torch.Generator().manual_seed(5)
    # Logits up to about +-60 on a 0.5 grid: many exact ties, and many that float32 sigmoids would add.
    logits = torch.round(torch.randn(3000, generator=g, dtype=torch.float64) * 40) / 2  # (M,)
    logits = logits.clamp(-60, 60)
    target = (torch.rand(3000, generator=g, dtype=torch.float64) < torch.sigmoid(logits / 10)).long()  # (M,)
    # The float32 sigmoid would merge dozens of distinct logits (all those beyond about +-17) into ties.
    assert len(torch.unique(torch.sigmoid(logits.float()))) < len(torch.unique(logits)) - 50
    expected = roc_auc_score(target.numpy(), logits.numpy())
    for dtype in (torch.float64, torch.float32):
        metric = ExactAUC()
        for chunk in torch.arange(3000).split(700):
            metric.update(logits[chunk].to(dtype), target[chunk])
        assert metric.compute().item() == pytest.approx(expected, abs=1e-6), dtype
    # The same logits through CTRMetrics, as float labels.
    metrics = CTRMetrics()
    metrics.update(logits.float(), target.float(), torch.zeros_like(target))
    assert metrics.compute()["auc"].item() == pytest.approx(expected, abs=1e-6)


def test_group_auc_keeps_float64_and_promotes_half_precision() -> None:
    # 1 and 1 + 1e-12 are distinct in float64 but equal in float32.
    preds = torch.tensor([1.0, 1.0 + 1e-12, 0.5, 0.5 + 1e-12], dtype=torch.float64)
    target, groups = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 1, 2, 2])
    metric = GroupAUC()
    metric.update(preds, target, groups)
    assert metric.compute().item() == 1.0
    # bf16 scores are stored exactly in float32 and ranked like their float32 values.
    bf16 = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.7], dtype=torch.bfloat16)
    labels = torch.tensor([0, 1, 0, 1, 1])
    metric = GroupAUC()
    metric.update(bf16, labels, torch.zeros_like(labels))
    expected = roc_auc_score(labels.numpy(), bf16.float().numpy())  # (3 + 1.5 + 2) / 6 pairs
    assert metric.compute().item() == pytest.approx(expected, abs=1e-7)
    assert expected == pytest.approx(5.5 / 6)


def test_exact_auc_single_class_is_nan_and_validates() -> None:
    metric = ExactAUC()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute().item())
    metric.update(torch.tensor([0.3, 0.9]), torch.tensor([1, 1]))
    assert math.isnan(metric.compute().item())
    metric.update(torch.tensor([0.5]), torch.tensor([0]))
    assert metric.compute().item() == 0.5  # the negative 0.5 beats the positive 0.3, not the positive 0.9
    with pytest.raises(ValueError, match="0 and 1"):
        metric.update(torch.tensor([0.1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.tensor([float("nan")]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\[B\]"):
        metric.update(torch.tensor([0.1, 0.2]), torch.tensor([1]))


# ---------------------------------------------------------------------------------------------------------
# reference_aucs
# ---------------------------------------------------------------------------------------------------------


def test_reference_aucs_match_sklearn_on_counts_and_probabilities() -> None:
    g = torch.Generator().manual_seed(11)
    labels = (torch.rand(2000, generator=g) < 0.3).long()  # (M,)
    # Popularity counts: integers well above 20 (where float32 sigmoids are all 1.0), with many ties.
    counts = torch.randint(20, 60, (2000,), generator=g) + 4 * labels  # (M,)
    probabilities = torch.rand(2000, generator=g, dtype=torch.float64) * 0.5 + 0.2 * labels  # (M,)
    negated = -counts.double()  # below 0: order must be kept, not squashed
    out = reference_aucs(labels.float(), {"popularity": counts, "oracle": probabilities, "negated": negated})
    assert list(out) == ["popularity", "oracle", "negated"]
    expected = {
        "popularity": roc_auc_score(labels.numpy(), counts.numpy()),
        "oracle": roc_auc_score(labels.numpy(), probabilities.numpy()),
        "negated": roc_auc_score(labels.numpy(), negated.numpy()),
    }
    for name, value in expected.items():
        assert isinstance(out[name], float)
        assert out[name] == pytest.approx(value, abs=1e-6), name
    # Reversing the order mirrors the AUC (ties count one half either way); the counts are informative.
    assert out["negated"] == pytest.approx(1 - out["popularity"], abs=1e-6)
    assert out["popularity"] > 0.55


def test_reference_aucs_two_counts_and_single_class() -> None:
    # 50 and 51 both become 1.0 under a float32 sigmoid; the order must survive.
    assert reference_aucs(torch.tensor([0, 1]), {"popularity": torch.tensor([50, 51])}) == {"popularity": 1.0}
    assert reference_aucs(torch.tensor([1, 0, 0]), {"p": torch.tensor([7.0, 7.0, 7.0])}) == {"p": 0.5}
    # Distinctions float32 cannot hold: counts 1 apart near 5e7, probabilities 1e-12 apart.
    fine = {
        "popularity": torch.tensor([50_000_001, 50_000_000, 50_000_004]),
        "oracle": torch.tensor([0.3 + 1e-12, 0.3, 0.3 + 2e-12], dtype=torch.float64),
    }
    assert reference_aucs(torch.tensor([1, 0, 1]), fine) == {"popularity": 1.0, "oracle": 1.0}
    assert reference_aucs(torch.tensor([1, 1, 1]), {"p": torch.tensor([0.1, 0.2, 0.3])}) == {}
    assert reference_aucs(torch.tensor([], dtype=torch.long), {"p": torch.tensor([])}) == {}
    with pytest.raises(ValueError, match="must be"):
        reference_aucs(torch.tensor([0, 1]), {"p": torch.tensor([0.1, 0.2, 0.3])})
    with pytest.raises(ValueError, match="0 and 1"):
        reference_aucs(torch.tensor([0, 2]), {"p": torch.tensor([0.1, 0.2])})
