"""Every model config's evaluation path, end to end on prepared data: a scorer that puts the true item first
scores exactly 1.0, a constant scorer scores exactly the analytic expectation of a random ranking (ties take
their expected rank), and a random scorer lands near it.

Each model config is built as `train.py` builds it (its task, view and evaluation context on a small
MovieLens file, leave-one-out, 20 uniform negatives per test item); its net is then replaced by a scorer of
the same kind — encoders (`q @ items.T`) where the model has them, (user, candidate) pairs otherwise — so the
path every model is evaluated by is the one under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from recsys_lab.data.batch import Batch
from recsys_lab.tasks.ranking import has_encoders
from recsys_lab.train import build
from tests.helpers import REPO, model_overrides
from tests.source_fixtures import random_ml100k

MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
NEGATIVES = 20  # each test query ranks its target among 21 candidates


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> Path:
    # 200 users x 12 ratings over 60 items: 200 test queries, each user with 48 items left to sample from
    return random_ml100k(tmp_path_factory.mktemp("sanity") / "ml-100k", np.random.default_rng(5), 200, 60)


def built(model: str, ml100k: Path, make_cfg, tmp_path: Path):
    # language models: tiny random ones written here (tests/helpers.py), never the bundled weights
    extra = [o for o in model_overrides(model, tmp_path) if o.startswith("model.net.")]
    cfg = make_cfg(
        [
            f"model={model}",
            "data=movielens",
            f"data.path={ml100k}",
            "data.preprocess.user_core=0",
            "data.preprocess.item_core=0",
            f"data.eval_candidates=uniform_{NEGATIVES}",
            "logger=none",
            *extra,
        ]
    )
    datamodule, task = build(cfg)
    datamodule.setup("test")
    return datamodule, task


def item_key(task) -> str:
    return task.schema.item_id


class Encoders(nn.Module):
    """encode_query / encode_item with scores given by `score(batch users, candidate items)`: queries are
    one-hot rows of their batch position over a table filled per batch, items their one-hot codes."""

    def __init__(self, item_key: str, num_items: int, mode: str, seed: int = 0) -> None:
        super().__init__()
        self.item_key, self.num_items, self.mode = item_key, num_items, mode
        self.generator = torch.Generator().manual_seed(seed)

    def encode_query(self, batch: Batch) -> torch.Tensor:
        B, V = len(batch.eval.user), self.num_items
        if self.mode == "oracle":  # 1 on the query's targets (read from the evaluation group on purpose)
            scores = torch.zeros(B, V)
            targets = batch.eval.targets
            real = torch.arange(targets.ids.shape[1]) < targets.lengths.unsqueeze(1)
            rows = torch.arange(B).unsqueeze(1).expand_as(targets.ids)
            scores[rows[real], targets.ids[real]] = 1.0
            return scores
        if self.mode == "constant":
            return torch.ones(B, V)
        return torch.randn(B, V, generator=self.generator)  # random: iid scores per (query, item)

    def encode_item(self, batch: Batch) -> torch.Tensor:
        return nn.functional.one_hot(batch.sparse[self.item_key], self.num_items).float()  # (N, V)

    def forward(self, batch: Batch) -> torch.Tensor:
        raise AssertionError("ranking with encoders never calls forward")


class Pairs(nn.Module):
    """forward on built (user, candidate) rows: 1 for a held-out (user, item) pair (oracle), 0 (constant), or
    iid normal (random)."""

    def __init__(self, user_key: str, item_key: str, held_out: set[tuple[int, int]], mode: str) -> None:
        super().__init__()
        self.user_key, self.item_key, self.held_out, self.mode = user_key, item_key, held_out, mode
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, batch: Batch) -> torch.Tensor:
        users, items = batch.sparse[self.user_key].tolist(), batch.sparse[self.item_key].tolist()
        if self.mode == "oracle":
            return torch.tensor([float((u, i) in self.held_out) for u, i in zip(users, items, strict=True)])
        if self.mode == "constant":
            return torch.zeros(len(users))
        return torch.randn(len(users), generator=self.generator)


def held_out_pairs(task, loader, user_key: str, item_key: str) -> set[tuple[int, int]]:
    """(user code, item code) of every test target, as the view's PairBuilder writes them into pair rows."""
    pairs = set()
    for batch in loader:
        targets = batch.eval.targets
        rows = task.context.pairs(batch.eval.user, targets.ids, "test")  # (B * T) rows, padding included
        real = targets.mask().reshape(-1)
        users, items = rows.sparse[user_key][real].tolist(), rows.sparse[item_key][real].tolist()
        pairs |= set(zip(users, items, strict=True))
    return pairs


def evaluate(model: str, mode: str, ml100k: Path, make_cfg, tmp_path: Path) -> tuple[dict[str, float], int]:
    datamodule, task = built(model, ml100k, make_cfg, tmp_path)
    assert task.evaluation == "ranking", model
    loader = datamodule.test_dataloader()
    if has_encoders(task.net):
        task.net = Encoders(item_key(task), task.schema.num_items, mode)
    else:
        user_key = task.schema.user_id
        held_out = held_out_pairs(task, loader, user_key, item_key(task))
        task.net = Pairs(user_key, item_key(task), held_out, mode)
    task.eval()
    queries = 0
    with torch.no_grad():
        task.begin_evaluation("test")
        for batch in loader:
            task.evaluate_batch(batch, "test")
            queries += len(batch.eval.user)
        values = task.end_evaluation("test")
    # the accuracy metrics; the test analysis's extras (beyond accuracy, slices) ran too and are tested elsewhere
    metrics = {k: float(v) for k, v in values.items() if k in task.ranking.metric_names()}
    assert "mrr" in metrics
    return metrics, queries


def random_ranking_expectation(n: int, ks: set[int]) -> dict[str, float]:
    """Exact metrics of a target whose rank is uniform on 1..n (one target per query), at cut-offs `ks`."""
    out = {"mrr": sum(1 / r for r in range(1, n + 1)) / n}
    for k in sorted(ks):
        hit = min(k, n) / n
        out |= {
            f"hit@{k}": hit,
            f"recall@{k}": hit,
            f"precision@{k}": hit / min(k, n),  # k beyond the list divides by its length
            f"ndcg@{k}": sum(1 / math.log2(r + 1) for r in range(1, min(k, n) + 1)) / n,
            f"mrr@{k}": sum(1 / r for r in range(1, min(k, n) + 1)) / n,
        }
    return out


@pytest.mark.parametrize("model", MODELS)
def test_a_perfect_scorer_gets_exactly_one(model, ml100k, make_cfg, tmp_path):
    metrics, queries = evaluate(model, "oracle", ml100k, make_cfg, tmp_path)
    assert queries == 200
    for name, value in metrics.items():
        # one target each; precision divides by the list length when k is longer (21 candidates)
        k = int(name.split("@")[1]) if "@" in name else 0
        expected = 1.0 / min(k, NEGATIVES + 1) if name.startswith("precision@") else 1.0
        assert value == pytest.approx(expected, abs=1e-6), (model, name, value)


@pytest.mark.parametrize("model", MODELS)
def test_a_constant_scorer_gets_the_expectation_of_a_random_ranking(model, ml100k, make_cfg, tmp_path):
    metrics, _ = evaluate(model, "constant", ml100k, make_cfg, tmp_path)
    ks = {int(name.split("@")[1]) for name in metrics if "@" in name}
    assert ks and min(ks) < NEGATIVES + 1 < max(ks), ks  # cut-offs inside and beyond the candidate list
    assert metrics == pytest.approx(random_ranking_expectation(NEGATIVES + 1, ks), abs=1e-6), model


@pytest.mark.parametrize("model", ["sasrec", "neumf"])  # one encoder model, one pair-scored model
def test_a_random_scorer_lands_near_the_expectation(model, ml100k, make_cfg, tmp_path):
    metrics, queries = evaluate(model, "random", ml100k, make_cfg, tmp_path)
    expected = random_ranking_expectation(NEGATIVES + 1, {10})
    for name in ("hit@10", "ndcg@10", "mrr"):
        # per-query values are bounded in [0, 1]: 5 standard errors of a Bernoulli(p) mean is generous
        p = expected[name]
        tolerance = 5 * math.sqrt(max(p * (1 - p), 0.05) / queries)
        assert abs(metrics[name] - p) < tolerance, (model, name, metrics[name], p)
