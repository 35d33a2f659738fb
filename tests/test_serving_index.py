"""The retrieval index: exact search equals q @ items.T + top-k with seen items masked; the approximate kinds
recall the exact neighbours; errors name what was expected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install -e '.[serve]')")

from recsys_lab.serving.index import ItemIndex  # noqa: E402


def data(n=500, dim=16, queries=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.normal(size=(queries, dim)).astype(np.float32)


def brute_force(items, queries, k, exclude, codes):
    """q @ items.T with each query's excluded codes at -inf, then top-k: what full ranking does."""
    scores = torch.as_tensor(queries) @ torch.as_tensor(items).T  # (B, N)
    for b, seen in enumerate(exclude):
        scores[b, torch.as_tensor(np.isin(codes, list(seen)))] = -torch.inf
    top = scores.topk(k, dim=1)
    return top.values.numpy(), codes[top.indices.numpy()]


def test_flat_search_equals_brute_force_with_seen_items_filtered():
    items, queries = data()
    codes = np.arange(100, 600)  # item codes need not be row numbers
    rng = np.random.default_rng(1)
    exclude = [set(rng.choice(codes, size=rng.integers(0, 30), replace=False).tolist()) for _ in queries]
    index = ItemIndex(items, codes, kind="flat")
    scores, found = index.search(queries, 10, exclude)
    want_scores, want_codes = brute_force(items, queries, 10, exclude, codes)
    np.testing.assert_array_equal(found, want_codes)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert not any(set(row) & seen for row, seen in zip(found.tolist(), exclude, strict=True))


def test_a_small_catalogue_pads_what_it_cannot_fill():
    items, queries = data(n=5, queries=2)
    scores, found = ItemIndex(items).search(queries, 4, [{0, 1}, set()])
    assert (found[0, :3] >= 0).all() and found[0, 3] == -1 and scores[0, 3] == -np.inf  # 3 left of 5
    assert (found[1] >= 0).all() and set(found[1]).isdisjoint({-1})


# HNSW keeps the vectors; IVF-PQ compresses each 32-float vector to 16 x 6 bits (12 bytes, 1/10 of the size);
# SQ8 to 32 bytes (1/4). Measured recall of the exact top-10 here: sq8 0.99, ivfpq 0.73.
@pytest.mark.parametrize("kind, floor", [("hnsw", 0.95), ("ivfpq", 0.65), ("sq8", 0.95)])
def test_approximate_kinds_recall_the_exact_neighbours(kind, floor):
    items, queries = data(n=4000, dim=32, queries=50)
    exact = ItemIndex(items).search(queries, 10)[1]
    approx = ItemIndex(items, kind=kind, nlist=64, nprobe=32, pq_m=16, pq_bits=6).search(queries, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= floor, recall


def test_bad_input_names_what_was_expected():
    items, queries = data(n=10)
    with pytest.raises(ValueError, match="kind='annoy'"):
        ItemIndex(items, kind="annoy")
    with pytest.raises(ValueError, match="pq_m=5 must divide the encoding width 16"):
        ItemIndex(items, kind="ivfpq", pq_m=5)
    with pytest.raises(ValueError, match=r"codes must be \(10,\)"):
        ItemIndex(items, codes=np.arange(3))
    index = ItemIndex(items)
    with pytest.raises(ValueError, match=r"queries must be \(B, 16\)"):
        index.search(queries[:, :4], 3)
    with pytest.raises(ValueError, match="2 exclusion lists for 20 queries"):
        index.search(queries, 3, [set(), set()])


def test_sq8_stores_one_byte_per_dimension_and_scores_close_to_exact():
    items, queries = data(n=1000, dim=32, queries=10)
    index = ItemIndex(items, kind="sq8")
    assert index.index.sa_code_size() == 32  # bytes per vector: int8 per dimension
    scores, codes = index.search(queries, 5)
    exact = np.einsum("bd,bkd->bk", queries, items[codes])  # (B, 5): the float score of each returned item
    # int8 vectors: each score within 1% of the float one (|score| ~ 15-25 here), yet not equal to it
    np.testing.assert_allclose(scores, exact, rtol=0.01)
    assert not np.allclose(scores, exact, rtol=1e-6)
    with pytest.raises(ValueError, match="kind='sq4'"):
        ItemIndex(items, kind="sq4")
