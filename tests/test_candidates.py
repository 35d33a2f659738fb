"""Sampled-ranking candidates through the DataModule: stored with the queries, never a positive, distinct,
reused from the cache, and checked by the leakage audit."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import torch

from recsys_lab.data.audit import LeakageError
from recsys_lab.data.datamodule import RecDataModule
from tests.datamodule_fixtures import (  # noqa: F401  (fixtures)
    SMALL,
    EcommerceSimulator,
    RetrievalView,
    cache_root,
    count_loads,
    dm,
    make_dm,
    raw,
    ready,
    ref,
)


@pytest.fixture(scope="module")
def sampled(cache_root) -> RecDataModule:
    d = make_dm(cache_root, eval_candidates="uniform_20", eval_batch_size=8)
    d.setup()
    return d


def test_sampled_candidates(sampled, dm, ref):
    assert sampled.cache_path != dm.cache_path
    assert sampled.audit_report["status"] == "passed"
    n_codes = sampled.schema.num_items
    for stage in ("val", "test"):
        q = sampled.queries[stage]
        assert torch.equal(q.users, dm.queries[stage].users)  # same queries as full ranking
        assert torch.equal(q.targets.values, dm.queries[stage].targets.values)
        cands = q.candidates
        for k, u in enumerate(q.users.tolist()):
            targets = q.targets.values[q.targets.offsets[k] : q.targets.offsets[k + 1]].tolist()
            row = cands.values[cands.offsets[k] : cands.offsets[k + 1]].tolist()
            assert len(row) == 21 * len(targets)
            assert row[: len(targets)] == targets  # targets first
            negatives = row[len(targets) :]
            positives = ref.clicked_codes(u, -np.inf, np.inf)  # the user's clicks in every split
            assert all(0 < c < n_codes for c in negatives)
            assert not set(negatives) & (positives | set(targets))
    # the loader carries them, with the right lengths
    sampled.use_view(RetrievalView)
    assert sampled.describe()["eval_candidates"] == "uniform_20"
    batch = next(iter(sampled.test_dataloader()))
    assert torch.equal(batch.eval.candidates.lengths, 21 * batch.eval.targets.lengths)
    t = batch.eval.targets
    c = batch.eval.candidates
    assert torch.equal(c.ids[:, : t.ids.shape[1]] * t.mask(), t.ids * t.mask())


def test_sampled_candidates_are_stored_in_the_cache(cache_root, sampled):
    stored = pl.read_parquet(sampled.cache_path / "queries_val.parquet")
    assert stored["candidates"].null_count() == 0 and stored.height == len(sampled.queries["val"].users)
    source = EcommerceSimulator(**SMALL, seed=0)
    calls = count_loads(source)
    again = make_dm(cache_root, source=source, eval_candidates="uniform_20", seed=0)
    again.setup()
    assert calls == []
    for stage in ("val", "test"):
        a, b = sampled.queries[stage].candidates, again.queries[stage].candidates
        assert torch.equal(a.values, b.values) and torch.equal(a.offsets, b.offsets)
    # another seed draws other candidates, in another folder
    other = make_dm(cache_root, eval_candidates="uniform_20", seed=1)
    assert other.cache_path != sampled.cache_path


def test_audit_catches_a_positive_among_candidates(tmp_path, sampled, ref):
    folder = tmp_path / sampled.cache_path.name
    shutil.copytree(sampled.cache_path, folder)
    queries = pl.read_parquet(folder / "queries_val.parquet")
    user = queries["user"][0]
    n_targets = len(queries["targets"][0])
    clicked_before = sorted(ref.clicked_codes(user, -np.inf, ref.t_val) - {0})
    assert clicked_before  # a training positive of this user
    cands = queries["candidates"].to_list()
    cands[0][n_targets] = clicked_before[0]  # the first negative becomes a positive
    queries.with_columns(pl.Series("candidates", cands, dtype=pl.List(pl.Int64))).write_parquet(
        folder / "queries_val.parquet"
    )
    with pytest.raises(LeakageError, match="sampled val candidate is one of the user's positives"):
        make_dm(tmp_path, eval_candidates="uniform_20").setup()


def test_candidates_are_distinct_within_a_query(sampled):
    """Drawn without replacement: no negative repeats within a query's candidates."""
    for stage in ("val", "test"):
        cands = sampled.queries[stage].candidates
        rows = torch.repeat_interleave(torch.arange(cands.n_rows), cands.offsets.diff())
        keys = rows * (int(cands.values.max()) + 1) + cands.values
        assert len(torch.unique(keys)) == len(keys), stage


def test_impossible_candidate_counts_stop_with_the_numbers(tmp_path, dm):
    n_codes = dm.schema.num_items - 1  # code 0 is never a candidate
    with pytest.raises(
        ValueError,
        match=rf"data\.eval_candidates=uniform_100000: 100000 negatives per target cannot be drawn without "
        rf"replacement from a catalogue of {n_codes} samplable items",
    ):
        make_dm(tmp_path, eval_candidates="uniform_100000").prepare_data()
    # below the catalogue size, but a query with several targets needs more than its user has left
    n = n_codes - 5
    with pytest.raises(ValueError, match=rf"queries need more distinct negatives .* \(\d+ targets x {n}\)"):
        make_dm(tmp_path, eval_candidates=f"uniform_{n}").prepare_data()
    assert not any(p.name.startswith("ecommerce-") for p in tmp_path.iterdir())  # nothing cached
