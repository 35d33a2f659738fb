"""RankingEvaluation against hand-computed cases: code 0 (unknown items) and the user's seen items are masked,
sampled candidates are ranked among themselves with their padding masked, and the encoder path (q @ items.T),
the pair path (forward on built (query, candidate) rows) and a model's own `score_items` agree."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from recsys_lab.data.batch import Batch, EvalTargets, Seq
from recsys_lab.data.views import EvalContext
from recsys_lab.tasks.ranking import RankingEvaluation

# Scores of 2 users (rows) over item codes 0..5 (columns). Code 0 is "unknown" and scores highest of all.
SCORES = torch.tensor(
    [
        [10.0, 1.0, 5.0, 9.0, 4.0, 2.0],  # user 0: seen code 3 scores 9, target code 2 scores 5
        [10.0, 3.0, 0.5, 1.0, 8.0, 6.0],  # user 1: seen code 4 scores 8, targets 5 (6) and 2 (0.5)
    ]
)
V = SCORES.shape[1]


class EncoderScores(nn.Module):
    """encode_query(user) = one-hot of the user; encode_item(codes) = that item's column of SCORES."""

    def encode_query(self, batch: Batch) -> torch.Tensor:
        return nn.functional.one_hot(batch.sparse["user_id"], SCORES.shape[0]).float()  # (B, U)

    def encode_item(self, batch: Batch) -> torch.Tensor:
        return SCORES.T[batch.sparse["item_id"]]  # (N, U)


class PairScores(nn.Module):
    """forward on (user, item) rows: SCORES[user, item]."""

    def forward(self, batch: Batch) -> torch.Tensor:
        return SCORES[batch.sparse["user_id"], batch.sparse["item_id"]]


class ItemScores(nn.Module):
    """score_items(query batch, item codes (B, C)) = SCORES[user, codes]; no forward, so the pair path would fail."""

    def score_items(self, batch: Batch, items: torch.Tensor) -> torch.Tensor:
        return SCORES[batch.sparse["user_id"]].gather(1, items)


def pairs(users: torch.Tensor, codes: torch.Tensor, stage: str) -> Batch:
    B, C = codes.shape
    return Batch(sparse={"user_id": users.repeat_interleave(C), "item_id": codes.reshape(-1)})


def catalogue() -> Batch:
    return Batch(sparse={"item_id": torch.arange(V)})


def seq(rows: list[list[int]]) -> Seq:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # padding holds code 0 on purpose
    return Seq(ids, torch.tensor([len(r) for r in rows]))


def query_batch(candidates: Seq | None = None) -> Batch:
    users = torch.tensor([0, 1])
    targets = seq([[2], [5, 2]])
    seen = seq([[3], [4]])
    return Batch(sparse={"user_id": users}, eval=EvalTargets(users, targets, seen, candidates))


def evaluate(net: nn.Module, batch: Batch, ks=(1, 3)) -> dict[str, float]:
    evaluation = RankingEvaluation(ks)
    context = EvalContext("ranking", V, catalogue=catalogue, pairs=pairs)
    evaluation.start(net, context, torch.device("cpu"))
    evaluation.step(net, batch, "test", context.pairs, V)
    return {k: float(v) for k, v in evaluation.end("test").items()}


def dcg(positions: list[int]) -> float:
    return sum(1 / math.log2(p + 1) for p in positions)


# Full ranking, masks applied (code 0 and seen items at -inf):
#   user 0: 2 (5), 4 (4), 5 (2), 1 (1)           -> target 2 at rank 1
#   user 1: 5 (6), 1 (3), 3 (1), 2 (0.5)          -> targets 5 at rank 1 and 2 at rank 4
FULL = {
    "recall@1": (1 + 1 / 2) / 2,
    "hit@1": 1.0,
    "ndcg@1": 1.0,
    "recall@3": (1 + 1 / 2) / 2,
    "ndcg@3": (1 + dcg([1]) / dcg([1, 2])) / 2,
    "hit@3": 1.0,
    "precision@1": 1.0,
    "precision@3": 1 / 3,  # one relevant item in each top 3
    "mrr@1": 1.0,
    "mrr@3": 1.0,
    "mrr": 1.0,
}


@pytest.mark.parametrize(
    "net", [EncoderScores(), PairScores(), ItemScores()], ids=["encoders", "pairs", "score_items"]
)
def test_full_ranking_masks_code_zero_and_seen_items(net):
    got = evaluate(net, query_batch())
    assert got == pytest.approx(FULL, abs=1e-6)


# Sampled protocol: candidates are the targets first, then the stored negatives; rows padded with code 0.
#   user 0: candidates 2 (5), 1 (1), 4 (4)                -> target 2 at rank 1
#   user 1: candidates 5 (6), 2 (0.5), 3 (1), 1 (3), 4 (8) -> 4 at rank 1, 5 at rank 2, 2 at rank 5
SAMPLED = {
    "recall@1": (1 + 0) / 2,
    "hit@1": (1 + 0) / 2,
    "ndcg@1": (1 + 0) / 2,
    "recall@3": (1 + 1 / 2) / 2,
    "hit@3": 1.0,
    "ndcg@3": (1 + dcg([2]) / dcg([1, 2])) / 2,
    "precision@1": (1 + 0) / 2,
    "precision@3": (1 / 3 + 1 / 3) / 2,
    "mrr@1": (1 + 0) / 2,
    "mrr@3": (1 + 1 / 2) / 2,
    "mrr": (1 + 1 / 2) / 2,
}


@pytest.mark.parametrize(
    "net", [EncoderScores(), PairScores(), ItemScores()], ids=["encoders", "pairs", "score_items"]
)
def test_sampled_candidates_rank_among_themselves_with_padding_masked(net):
    candidates = seq([[2, 1, 4], [5, 2, 3, 1, 4]])  # user 0's row is padded with two code-0 slots (score 10)
    got = evaluate(net, query_batch(candidates))
    assert got == pytest.approx(SAMPLED, abs=1e-6)


def test_ties_in_the_catalogue_take_their_expected_rank():
    """Popularity-like integer scores: user 0's target ties with two other items at the top, so its rank is
    uniform on 1..3 (recall@1 = 1/3, mrr = (1 + 1/2 + 1/3) / 3), not 1."""
    tied = torch.tensor([[0.0, 7.0, 7.0, 7.0, 1.0, 1.0]])

    class Tied(nn.Module):
        def forward(self, batch: Batch) -> torch.Tensor:
            return tied[batch.sparse["user_id"], batch.sparse["item_id"]]

    users = torch.tensor([0])
    batch = Batch(
        sparse={"user_id": users},
        eval=EvalTargets(
            users, seq([[2]]), Seq(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        ),
    )
    got = evaluate(Tied(), batch)
    assert got["recall@1"] == pytest.approx(1 / 3, abs=1e-6)
    assert got["recall@3"] == pytest.approx(1.0, abs=1e-6)
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3, abs=1e-6)
    assert got["ndcg@3"] == pytest.approx(dcg([1, 2, 3]) / 3, abs=1e-6)


# Cold-start slice (`data.cold_items`): codes >= first_cold_item are items without a training interaction.
COLD_SCORES = torch.tensor(
    [
        [10.0, 9.0, 1.0, 5.0, 7.0, 3.0],  # user 0: warm target 1 (9) above cold target 4 (7)
        [10.0, 1.0, 8.0, 2.0, 3.0, 4.0],  # user 1: warm target 2 only: not in the slice
    ]
)


class ColdScores(nn.Module):
    def encode_query(self, batch: Batch) -> torch.Tensor:
        return nn.functional.one_hot(batch.sparse["user_id"], 2).float()

    def encode_item(self, batch: Batch) -> torch.Tensor:
        return COLD_SCORES.T[batch.sparse["item_id"]]


def cold_evaluate(first_cold_item: int, candidates: Seq | None = None) -> dict[str, float]:
    users = torch.tensor([0, 1])
    batch = Batch(
        sparse={"user_id": users},
        eval=EvalTargets(
            users, seq([[1, 4], [2]]), Seq(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2)), candidates
        ),
    )
    evaluation = RankingEvaluation((1, 3), first_cold_item=first_cold_item)
    context = EvalContext("ranking", V, catalogue=catalogue, pairs=pairs)
    evaluation.start(ColdScores(), context, torch.device("cpu"))
    evaluation.step(ColdScores(), batch, "test", context.pairs, V)
    return {k: float(v) for k, v in evaluation.end("test").items()}


def test_cold_slice_ranks_cold_targets_without_the_warm_ones():
    got = cold_evaluate(first_cold_item=4)
    # overall: user 0 ranks 1 (9) then 4 (7): recall@1 = 1/2; user 1 ranks 2 (8) first: recall@1 = 1
    assert got["recall@1"] == pytest.approx((1 / 2 + 1) / 2)
    # slice: only user 0, only target 4, warm target 1 out of the ranking -> 4 (7), 3 (5), 5 (3): rank 1
    assert got["cold/recall@1"] == pytest.approx(1.0) and got["cold/mrr"] == pytest.approx(1.0)
    assert got["cold/ndcg@3"] == pytest.approx(1.0)
    # every logged name is declared (the monitor check reads them)
    assert set(RankingEvaluation((1, 3), first_cold_item=4).metric_names()) == set(got)


def test_cold_slice_under_sampled_candidates():
    # user 0's candidates: targets 1, 4 then negatives 3, 5; user 1: target 2 then negatives 1, 3
    got = cold_evaluate(4, candidates=seq([[1, 4, 3, 5], [2, 1, 3]]))
    assert got["cold/recall@1"] == pytest.approx(1.0)  # 4 (7) over 3 (5) and 5 (3); 1 taken out
    got = cold_evaluate(5, candidates=seq([[1, 4, 3, 5], [2, 1, 3]]))  # no target is cold now
    assert math.isnan(got["cold/recall@1"]) and not math.isnan(got["recall@1"])


def test_without_cold_items_there_is_no_slice():
    evaluation = RankingEvaluation((1, 3))
    assert not any(name.startswith("cold/") for name in evaluation.metric_names())
