"""Negative sampling and sampled-ranking candidates: membership, exclusion, distribution, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_lab.data import sampling
from recsys_lab.data.ragged import Ragged
from recsys_lab.data.sampling import (
    FullRanking,
    PopularityNegatives,
    PositiveSet,
    SampledRanking,
    UniformNegatives,
)


def _dense_interactions(n_users: int = 40, n_items: int = 30, density: float = 0.7, seed: int = 0):
    """Each user interacted with ~density of the catalogue (and never with all of it)."""
    g = torch.Generator().manual_seed(seed)
    hit = torch.rand(n_users, n_items, generator=g) < density
    hit[:, -1] = False  # item n-1 stays free for everyone
    users, items = hit.nonzero(as_tuple=True)
    return users, items, hit


def _chi2_ok(observed: torch.Tensor, probs: torch.Tensor) -> None:
    """Items with probability 0 never drawn; a chi-square statistic within ~6 sd of its degrees of freedom."""
    assert observed[probs == 0].sum() == 0
    keep = probs > 0
    expected = probs[keep] * observed.sum()
    stat = float(((observed[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    assert stat < df + 6 * (2 * df) ** 0.5, (stat, df)


# ---- PositiveSet -------------------------------------------------------------------------------------------
def test_positive_set_matches_python_sets():
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 80
    users = rng.integers(0, n_users, 1000)
    items = rng.integers(0, n_items, 1000)  # with duplicates
    pos = PositiveSet(torch.as_tensor(users), torch.as_tensor(items), n_items)
    truth = set(zip(users.tolist(), items.tolist(), strict=True))
    assert len(pos) == len(truth)

    q_users = rng.integers(0, n_users, 64)
    q_items = rng.integers(0, n_items, (64, 7))
    got = pos.contains(torch.as_tensor(q_users), torch.as_tensor(q_items))  # users [B] over items [B, K]
    assert got.shape == (64, 7) and got.dtype == torch.bool
    want = [[(u, i) in truth for i in row] for u, row in zip(q_users.tolist(), q_items.tolist(), strict=True)]
    assert got.tolist() == want
    assert got.any() and not got.all()

    flat = pos.contains(torch.as_tensor(users[:100]), torch.as_tensor(items[:100]))  # same shapes
    assert flat.all()
    # Keys at both ends of the sorted array and beyond them.
    edge = pos.contains(torch.tensor([0, n_users - 1, n_users]), torch.tensor([0, n_items - 1, 0]))
    assert edge.tolist() == [(0, 0) in truth, (n_users - 1, n_items - 1) in truth, False]


def test_positive_set_empty():
    pos = PositiveSet(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 10)
    assert not pos.contains(torch.tensor([0, 1]), torch.tensor([[1, 2], [3, 4]])).any()


# ---- training negatives ------------------------------------------------------------------------------------
SAMPLERS = [UniformNegatives(n=5), PopularityNegatives(n=5, alpha=0.75)]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
@pytest.mark.parametrize("max_rounds", [sampling.MAX_ROUNDS, 0], ids=["rejection", "fallback"])
def test_negatives_never_hit_positives(sampler, max_rounds, monkeypatch):
    monkeypatch.setattr(sampling, "MAX_ROUNDS", max_rounds)
    n_users, n_items = 40, 30
    users, items, hit = _dense_interactions(n_users, n_items)
    exclude = PositiveSet(users, items, n_items)
    counts = torch.bincount(items, minlength=n_items).float() + 1  # the free item keeps a positive weight
    batch_users = torch.arange(n_users).repeat(25)  # (1000,)
    g = torch.Generator().manual_seed(0)
    neg = sampler.sample(batch_users, exclude, n_items, counts, g)
    assert neg.shape == (1000, 5) and neg.dtype == torch.long
    assert neg.min() >= 0 and neg.max() < n_items
    assert not hit[batch_users.unsqueeze(1), neg].any()
    assert not exclude.contains(batch_users, neg).any()


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
def test_negatives_respect_allowed(sampler):
    n_users, n_items = 40, 30
    users, items, _ = _dense_interactions(n_users, n_items, density=0.3)
    exclude = PositiveSet(users, items, n_items)
    allowed = torch.zeros(n_items, dtype=torch.bool)
    allowed[::2] = True
    allowed[-1] = True
    counts = torch.ones(n_items)
    batch_users = torch.arange(n_users).repeat(10)
    neg = sampler.sample(
        batch_users, exclude, n_items, counts, torch.Generator().manual_seed(1), allowed=allowed
    )
    assert allowed[neg].all()
    assert not exclude.contains(batch_users, neg).any()


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
def test_negatives_reproducible(sampler):
    n_users, n_items = 40, 30
    users, items, _ = _dense_interactions(n_users, n_items)
    exclude = PositiveSet(users, items, n_items)
    counts = torch.arange(n_items).float() + 1
    batch_users = torch.arange(n_users)

    def draw(seed: int) -> torch.Tensor:
        return sampler.sample(batch_users, exclude, n_items, counts, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


@pytest.mark.parametrize("max_rounds", [sampling.MAX_ROUNDS, 0], ids=["rejection", "fallback"])
def test_popularity_frequencies(max_rounds, monkeypatch):
    monkeypatch.setattr(sampling, "MAX_ROUNDS", max_rounds)
    n_items, alpha = 25, 0.75
    counts = torch.tensor(
        [0.0]
        + [
            float(c)
            for c in torch.randint(1, 500, (n_items - 1,), generator=torch.Generator().manual_seed(0))
        ]
    )
    # User 0 interacted with items 1..4, so its negatives follow the smoothed counts over the rest.
    exclude = PositiveSet(torch.zeros(4, dtype=torch.long), torch.arange(1, 5), n_items)
    neg = PopularityNegatives(n=100, alpha=alpha).sample(
        torch.zeros(2000, dtype=torch.long), exclude, n_items, counts, torch.Generator().manual_seed(0)
    )
    probs = counts**alpha
    probs[1:5] = 0  # the positives; item 0 (count 0) is never drawn either
    _chi2_ok(torch.bincount(neg.reshape(-1), minlength=n_items).double(), probs / probs.sum())


def test_uniform_frequencies_with_dense_user():
    """A user holding all but 3 items: rejection mostly fails, the exact fallback keeps them uniform."""
    n_items = 200
    exclude = PositiveSet(torch.zeros(n_items - 3, dtype=torch.long), torch.arange(3, n_items), n_items)
    neg = UniformNegatives(n=50).sample(
        torch.zeros(600, dtype=torch.long),
        exclude,
        n_items,
        torch.ones(n_items),
        torch.Generator().manual_seed(0),
    )
    assert neg.max() < 3
    probs = torch.zeros(n_items, dtype=torch.float64)
    probs[:3] = 1 / 3
    _chi2_ok(torch.bincount(neg.reshape(-1), minlength=n_items).double(), probs)


def test_user_with_everything_raises():
    n_items = 10
    # User 1 interacted with every item, user 2 with every allowed item; user 0 with one.
    users = torch.cat([torch.zeros(1), torch.ones(n_items), torch.full((5,), 2)]).long()
    items = torch.cat([torch.zeros(1), torch.arange(n_items), torch.arange(5)]).long()
    exclude = PositiveSet(users, items, n_items)
    allowed = torch.arange(n_items) < 5
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"uniform_4: 1 user\(s\) \(e.g. user 1\).*n=4"):
        UniformNegatives(n=4).sample(torch.tensor([0, 1, 0]), exclude, n_items, torch.ones(n_items), g)
    with pytest.raises(ValueError, match=r"popularity_3: 2 user\(s\).*n=3"):
        PopularityNegatives(n=3).sample(
            torch.tensor([0, 1, 2]), exclude, n_items, torch.ones(n_items), g, allowed=allowed
        )
    ok = UniformNegatives(n=4).sample(torch.tensor([0, 0]), exclude, n_items, torch.ones(n_items), g)
    assert not (ok == 0).any()


def test_no_sampleable_item_raises():
    exclude = PositiveSet(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="no item has positive sampling weight"):
        PopularityNegatives(n=2).sample(torch.tensor([0]), exclude, 5, torch.zeros(5), torch.Generator())


def test_training_names_and_describe():
    assert UniformNegatives(n=4).name == "uniform_4"
    assert PopularityNegatives(n=4).name == "popularity_4"
    assert PopularityNegatives(n=2, alpha=0.5).describe() == {
        "negatives": "popularity_2",
        "negatives_n": 2,
        "negatives_alpha": 0.5,
    }
    assert UniformNegatives(n=3).describe() == {"negatives": "uniform_3", "negatives_n": 3}


# ---- evaluation candidates ---------------------------------------------------------------------------------
def _eval_setup(n_users: int = 30, n_items: int = 60, seed: int = 0):
    users, items, hit = _dense_interactions(n_users, n_items, density=0.6, seed=seed)
    exclude = PositiveSet(users, items, n_items)
    rng = np.random.default_rng(seed)
    # Targets: up to 3 of the user's own positives per query (some queries have none).
    groups, values = [], []
    for u in range(n_users):
        own = hit[u].nonzero().squeeze(1).numpy()
        chosen = rng.choice(own, size=min(len(own), u % 4), replace=False)
        groups += [u] * len(chosen)
        values += chosen.tolist()
    targets = Ragged.from_groups(np.array(groups, dtype=np.int64), np.array(values, dtype=np.int64), n_users)
    counts = torch.bincount(items, minlength=n_items).float() + 1
    return torch.arange(n_users), targets, exclude, hit, counts, n_items


@pytest.mark.parametrize("kind", ["uniform", "popularity"])
def test_sampled_ranking_layout_and_exclusion(kind):
    query_users, targets, exclude, hit, counts, n_items = _eval_setup()
    n = 7
    cand = SampledRanking(kind=kind, n=n, seed=0).candidates(query_users, targets, exclude, n_items, counts)
    lengths = targets.offsets.diff()
    assert torch.equal(cand.offsets.diff(), lengths * (1 + n))
    assert (lengths == 0).any()  # the empty rows stay empty
    for q in range(len(query_users)):
        row = cand.values[cand.offsets[q] : cand.offsets[q + 1]]
        own = targets.values[targets.offsets[q] : targets.offsets[q + 1]]
        assert torch.equal(row[: len(own)], own)  # targets first, in their order
        negs = row[len(own) :]
        assert len(negs) == n * len(own)
        assert not hit[q, negs].any()
        assert not torch.isin(negs, own).any()
        assert len(negs.unique()) == len(negs)  # drawn without replacement


def test_sampled_ranking_reproducible():
    query_users, targets, exclude, _, counts, n_items = _eval_setup()

    def draw(seed: int, kind: str = "uniform") -> Ragged:
        return SampledRanking(kind=kind, n=5, seed=seed).candidates(
            query_users, targets, exclude, n_items, counts
        )

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a.values, b.values) and torch.equal(a.offsets, b.offsets)
    assert torch.equal(a.offsets, c.offsets) and not torch.equal(a.values, c.values)
    assert not torch.equal(draw(0, "popularity").values, a.values)


def test_sampled_ranking_tiny_case():
    """1 user, 5 items, positives {1, 3}, target 3, n=3: the negatives come from {0, 2, 4}."""
    exclude = PositiveSet(torch.tensor([0, 0]), torch.tensor([1, 3]), 5)
    targets = Ragged(torch.tensor([3]), torch.tensor([0, 1]))
    cand = SampledRanking(n=3, seed=0).candidates(torch.tensor([0]), targets, exclude, 5, torch.ones(5))
    assert cand.offsets.tolist() == [0, 4]
    assert cand.values[0] == 3
    assert sorted(cand.values[1:].tolist()) == [0, 2, 4]  # distinct: exactly the three remaining items
    # a fourth distinct negative does not exist: one clear error with the numbers, never a repeat
    with pytest.raises(ValueError, match=r"user entity 0 needs 4 \(1 targets x 4\) but only 3 of the 5"):
        SampledRanking(n=4, seed=0).candidates(torch.tensor([0]), targets, exclude, 5, torch.ones(5))
    with pytest.raises(ValueError, match=r"100000 negatives per target cannot be drawn without replacement"):
        SampledRanking(n=100000).candidates(torch.tensor([0]), targets, exclude, 5, torch.ones(5))


def test_sampled_ranking_excludes_targets_outside_exclude():
    """Targets need not be in `exclude`; they are still never drawn as their row's negatives."""
    exclude = PositiveSet(torch.tensor([0]), torch.tensor([0]), 5)
    targets = Ragged(torch.tensor([1, 2]), torch.tensor([0, 2]))
    cand = SampledRanking(n=1, seed=0).candidates(torch.tensor([0]), targets, exclude, 5, torch.ones(5))
    assert cand.values[:2].tolist() == [1, 2]
    assert sorted(cand.values[2:].tolist()) == [3, 4]
    with pytest.raises(ValueError, match="only 2 of the 5 samplable items"):  # the targets count as taken
        SampledRanking(n=2, seed=0).candidates(torch.tensor([0]), targets, exclude, 5, torch.ones(5))


def test_sampled_ranking_allowed_and_popularity_zero_counts():
    query_users, targets, exclude, hit, _, n_items = _eval_setup()
    allowed = torch.ones(n_items, dtype=torch.bool)
    allowed[:10] = False
    counts = torch.ones(n_items)
    counts[-5:-1] = 0  # never drawn by popularity
    cand = SampledRanking(kind="popularity", n=4, seed=0).candidates(
        query_users, targets, exclude, n_items, counts, allowed=allowed
    )
    lengths = targets.offsets.diff()
    is_neg = torch.arange(len(cand.values)) - cand.offsets[:-1].repeat_interleave(cand.offsets.diff()) >= (
        lengths.repeat_interleave(cand.offsets.diff())
    )
    negs = cand.values[is_neg]
    assert allowed[negs].all() and (counts[negs] > 0).all()


def test_sampled_ranking_validation_and_describe():
    with pytest.raises(ValueError, match="kind"):
        SampledRanking(kind="pop")
    s = SampledRanking(kind="popularity", n=100, seed=3)
    assert s.name == "popularity_100"
    assert s.describe() == {
        "eval_candidates": "popularity_100",
        "eval_candidates_kind": "popularity",
        "eval_candidates_n": 100,
        "eval_candidates_seed": 3,
        "eval_candidates_replacement": False,
    }
    full = FullRanking()
    assert full.name == "full" and full.describe() == {"eval_candidates": "full"}
    query_users, targets, exclude, _, counts, n_items = _eval_setup()
    assert full.candidates(query_users, targets, exclude, n_items, counts) is None


@pytest.mark.parametrize("kind", ["uniform", "popularity"])
def test_sampled_ranking_takes_every_eligible_item_when_asked_for_all(kind):
    """Each user has 4 positives among 12 items and one target: n=8 must return exactly the 8 other items,
    which rejection alone rarely finds (the exact Gumbel top-k fallback completes them)."""
    g = torch.Generator().manual_seed(0)
    positives = torch.stack([torch.randperm(12, generator=g)[:4] for _ in range(6)])  # (6, 4)
    users = torch.arange(6).repeat_interleave(4)
    exclude = PositiveSet(users, positives.reshape(-1), 12)
    targets = Ragged(positives[:, 0].clone(), torch.arange(7))
    counts = torch.arange(1.0, 13.0)
    cand = SampledRanking(kind=kind, n=8, seed=0).candidates(torch.arange(6), targets, exclude, 12, counts)
    for q in range(6):
        negs = cand.values[cand.offsets[q] + 1 : cand.offsets[q + 1]]
        assert sorted(negs.tolist()) == sorted(set(range(12)) - set(positives[q].tolist()))


def test_sampled_ranking_no_queries():
    exclude = PositiveSet(torch.tensor([0]), torch.tensor([0]), 5)
    empty = Ragged(torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    cand = SampledRanking(n=3).candidates(torch.zeros(0, dtype=torch.long), empty, exclude, 5, torch.ones(5))
    assert cand.values.numel() == 0 and cand.offsets.tolist() == [0]
