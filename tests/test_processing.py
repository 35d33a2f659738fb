"""Preprocess on hand-computed toys: threshold and deduplication counts, label and implicit positives, iterative
versus one-pass k-core, min_history, the empty-result errors; and the k-core against a slow reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_lab.data.processing import Preprocess
from recsys_lab.data.sources.raw import SourceError


def ratings() -> pl.DataFrame:
    # row: user item rating timestamp
    #  0:  u1   i1   5.0    1
    #  1:  u1   i1   2.0    3    re-rating of (u1, i1), later
    #  2:  u1   i2   4.0    2
    #  3:  u2   i1   3.0    1
    #  4:  u2   i2   5.0    4
    #  5:  u2   i2   4.0    4    duplicate of (u2, i2) at the same time: row order breaks the tie
    #  6:  u2   i3   4.5    5
    return pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u2", "u2", "u2", "u2"],
            "item_id": ["i1", "i1", "i2", "i1", "i2", "i2", "i3"],
            "rating": [5.0, 2.0, 4.0, 3.0, 5.0, 4.0, 4.5],
            "timestamp": [1, 3, 2, 1, 4, 4, 5],
            "extra": [0, 1, 2, 3, 4, 5, 6],  # passed through: tells which input rows survive
        }
    )


def test_threshold_after_dedup_last():
    # dedup "last": (u1, i1) keeps row 1 (t=3 > t=1); (u2, i2) ties at t=4, keeps the later row 5
    #   -> removed_duplicates = 2, rows 1 2 3 5 6 left
    # threshold 4: row 1 (2.0) and row 3 (3.0) are below -> removed_below_threshold = 2, rows 2 5 6 left
    out, stats = Preprocess(rating_threshold=4)(ratings(), labels=[])
    assert out["extra"].to_list() == [2, 5, 6]
    assert out["positive"].to_list() == [True, True, True]
    assert out.columns == ["user_id", "item_id", "rating", "timestamp", "extra", "positive"]
    assert stats == {
        "rows_in": 7,
        "removed_duplicates": 2,
        "removed_below_threshold": 2,
        "core_iterations": 0,
        "removed_core": 0,
        "removed_min_history": 0,
        "rows_out": 3,
        "positives_out": 3,
        "users_out": 2,
        "items_out": 2,
    }


def test_threshold_after_dedup_first():
    # dedup "first": (u1, i1) keeps row 0 (t=1); (u2, i2) tie at t=4 keeps the earlier row 4 -> rows 0 2 3 4 6
    # threshold 4 drops row 3 (3.0) -> rows 0 2 4 6
    out, stats = Preprocess(rating_threshold=4, deduplicate="first")(ratings(), labels=[])
    assert out["extra"].to_list() == [0, 2, 4, 6]
    assert (stats["removed_duplicates"], stats["removed_below_threshold"], stats["rows_out"]) == (2, 1, 4)


def test_keep_negatives_and_no_dedup():
    # keep_negatives: dedup "last" leaves rows 1 2 3 5 6; rows 1 and 3 stay as negatives
    out, stats = Preprocess(rating_threshold=4, keep_negatives=True)(ratings(), labels=[])
    assert out["extra"].to_list() == [1, 2, 3, 5, 6]
    assert out["positive"].to_list() == [False, True, False, True, True]
    assert (stats["removed_duplicates"], stats["removed_below_threshold"], stats["positives_out"]) == (
        2,
        0,
        3,
    )
    # "none" keeps both copies; the threshold then drops rows 1 and 3 only
    out, stats = Preprocess(rating_threshold=4, deduplicate="none")(ratings(), labels=[])
    assert out["extra"].to_list() == [0, 2, 4, 5, 6]
    assert (stats["removed_duplicates"], stats["removed_below_threshold"]) == (0, 2)


def test_labels_and_implicit_positives():
    clicks = pl.DataFrame(
        {
            "user_id": [1, 1, 2, 2],
            "item_id": [10, 11, 10, 12],
            "timestamp": [1, 2, 3, 4],
            "click": [1, 0, 0, 1],
            "purchase": [1, 0, 0, 0],
        }
    )
    # the first label defines positives; the non-clicks are real impressions and stay
    out, stats = Preprocess()(clicks, labels=["click", "purchase"])
    assert out["positive"].to_list() == [True, False, False, True]
    assert (stats["removed_below_threshold"], stats["rows_out"], stats["positives_out"]) == (0, 4, 2)
    # no rating threshold and no labels: implicit data, every row is positive
    out, _ = Preprocess()(clicks.drop("click", "purchase"), labels=[])
    assert out["positive"].to_list() == [True] * 4


def core_toy() -> pl.DataFrame:
    # row: user item       positives per user: A 2, B 2, C 2; per item: a 2, b 3, c 1
    #  0:  A    a
    #  1:  A    b
    #  2:  B    a
    #  3:  B    b
    #  4:  C    b
    #  5:  C    c
    return pl.DataFrame(
        {
            "user_id": ["A", "A", "B", "B", "C", "C"],
            "item_id": ["a", "b", "a", "b", "b", "c"],
            "timestamp": [1, 2, 3, 4, 5, 6],
        }
    )


def test_iterative_two_core_needs_more_than_one_pass():
    # pass 1: item c has 1 positive < 2 -> row 5 goes; every user still had 2 in this pass
    # pass 2: user C now has 1 positive (row 4) -> row 4 goes; items a 2, b 3 were fine
    # pass 3: A 2, B 2, a 2, b 2: nothing removed -> stable after 3 passes, rows 0-3 left
    out, stats = Preprocess(user_core=2, item_core=2)(core_toy(), labels=[])
    assert out["user_id"].to_list() == ["A", "A", "B", "B"]
    assert out["item_id"].to_list() == ["a", "b", "a", "b"]
    assert (stats["removed_core"], stats["core_iterations"], stats["rows_out"]) == (2, 3, 4)


def test_one_pass_core_leaves_a_user_below_the_core():
    # one pass removes row 5 only (item c); user C keeps one positive although user_core = 2
    out, stats = Preprocess(user_core=2, item_core=2, iterative_core=False)(core_toy(), labels=[])
    assert out["user_id"].to_list() == ["A", "A", "B", "B", "C"]
    assert (stats["removed_core"], stats["core_iterations"]) == (1, 1)


def test_core_counts_positives_and_drops_negatives_with_their_user():
    # row: user item rating    positives per user: A 2, B 1 (the 2.0 is a kept negative)
    #  0:  A    a    5
    #  1:  A    b    5
    #  2:  B    a    5
    #  3:  B    b    2        negative: does not count towards B's core, goes with B
    inter = pl.DataFrame(
        {
            "user_id": ["A", "A", "B", "B"],
            "item_id": ["a", "b", "a", "b"],
            "rating": [5.0, 5, 5, 2],
            "timestamp": [1, 2, 3, 4],
        }
    )
    out, stats = Preprocess(rating_threshold=4, keep_negatives=True, user_core=2)(inter, labels=[])
    assert out["user_id"].to_list() == ["A", "A"]
    assert (stats["removed_core"], stats["core_iterations"]) == (2, 2)  # pass 2 finds it stable


def test_min_history_after_core():
    # user_core=1 keeps everyone (each user has >= 1 positive); min_history=2 then drops C (1 positive, row 6)
    # row: user item        A 3 positives, B 2, C 1
    inter = pl.DataFrame(
        {
            "user_id": ["A", "A", "A", "B", "B", "C"],
            "item_id": ["a", "b", "c", "a", "b", "a"],
            "timestamp": [1, 2, 3, 4, 5, 6],
        }
    )
    out, stats = Preprocess(user_core=1, min_history=2)(inter, labels=[])
    assert out["user_id"].to_list() == ["A", "A", "A", "B", "B"]
    assert (stats["removed_core"], stats["removed_min_history"], stats["rows_out"]) == (0, 1, 5)


def test_empty_results_name_the_step():
    with pytest.raises(
        SourceError, match=r"after the implicit conversion \(positive: rating >= 6.0\).*rating_threshold=6.0"
    ):
        Preprocess(rating_threshold=6)(ratings(), labels=[])
    # a 3-core on the toy: every user has 2 positives < 3, so pass 1 removes every row
    with pytest.raises(SourceError, match=r"after the k-core filter; parameters: .*user_core=3, item_core=3"):
        Preprocess(user_core=3, item_core=3)(core_toy(), labels=[])
    with pytest.raises(SourceError, match="after the min_history filter.*min_history=5"):
        Preprocess(min_history=5)(core_toy(), labels=[])
    with pytest.raises(SourceError, match="input has no rows"):
        Preprocess()(core_toy().clear(), labels=[])


def test_bad_input_and_parameters():
    with pytest.raises(SourceError, match=r"lack column\(s\) \['rating'\] \(rating_threshold is set\)"):
        Preprocess(rating_threshold=4)(core_toy(), labels=[])
    with pytest.raises(SourceError, match=r"\['click'\]"):
        Preprocess()(core_toy(), labels=["click"])
    with pytest.raises(ValueError, match="deduplicate='latest'"):
        Preprocess(deduplicate="latest")
    with pytest.raises(ValueError, match="user_core=-1"):
        Preprocess(user_core=-1)
    with pytest.raises(ValueError, match="keep_negatives=true needs rating_threshold"):
        Preprocess(keep_negatives=True)


def test_describe():
    assert Preprocess(rating_threshold=4, user_core=5, item_core=5).describe() == {
        "rating_threshold": 4.0,
        "keep_negatives": False,
        "deduplicate": "last",
        "user_core": 5,
        "item_core": 5,
        "iterative_core": True,
        "min_history": 0,
    }


def reference_core(pairs: list[tuple[int, int, bool]], k_user: int, k_item: int) -> list[int]:
    """Rows kept by removing one user or item below its core at a time until none is left (slow, obvious)."""
    alive = set(range(len(pairs)))
    while True:
        pos = [pairs[r] for r in alive if pairs[r][2]]
        n_user = {u: sum(1 for p in pos if p[0] == u) for u, _, _ in pairs}
        n_item = {i: sum(1 for p in pos if p[1] == i) for _, i, _ in pairs}
        bad = [r for r in sorted(alive) if n_user[pairs[r][0]] < k_user or n_item[pairs[r][1]] < k_item]
        if not bad:
            return sorted(alive)
        # remove a single row's user (or item) only: the fixed point must not depend on the order
        u, i, _ = pairs[bad[0]]
        if n_user[u] < k_user:
            alive -= {r for r in alive if pairs[r][0] == u}
        else:
            alive -= {r for r in alive if pairs[r][1] == i}


@pytest.mark.parametrize("seed", range(5))
def test_core_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    n = 300
    users, items = rng.integers(0, 40, n), rng.zipf(1.6, n) % 30
    positive = rng.random(n) < 0.7
    inter = pl.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "timestamp": np.arange(n),
            "rating": np.where(positive, 5.0, 1.0),
        }
    )
    out, stats = Preprocess(
        rating_threshold=4, keep_negatives=True, deduplicate="none", user_core=4, item_core=3
    )(inter.with_columns(pl.Series("row", np.arange(n))), labels=[])
    expected = reference_core(list(zip(users.tolist(), items.tolist(), positive.tolist(), strict=True)), 4, 3)
    assert out["row"].to_list() == expected
    assert stats["removed_core"] == n - len(expected)


def reference_dedup(users, items, ts, keep: str) -> list[int]:
    """Rows kept per (user, item): the latest (earliest) timestamp, the later (earlier) row on ties."""
    best: dict[tuple, int] = {}
    for r in range(len(users)):
        pair, old = (users[r], items[r]), best.get((users[r], items[r]))
        if old is None or (ts[r] >= ts[old] if keep == "last" else ts[r] < ts[old]):
            best[pair] = r
    return sorted(best.values())


@pytest.mark.parametrize("keep", ["last", "first"])
@pytest.mark.parametrize("ids", ["int", "wide_int", "str"])
def test_dedup_matches_slow_reference(keep, ids):
    rng = np.random.default_rng(0)
    n = 500
    users, items, ts = (
        rng.integers(0, 20, n),
        rng.integers(0, 15, n),
        rng.integers(0, 5, n),
    )  # many repeats, ties
    cast = {"int": lambda a: a, "wide_int": lambda a: a * 2**40 - 7, "str": lambda a: [f"id{x}" for x in a]}[
        ids
    ]
    inter = pl.DataFrame(
        {"user_id": cast(users), "item_id": cast(items), "timestamp": ts, "row": np.arange(n)}
    )
    out, stats = Preprocess(deduplicate=keep)(inter, labels=[])
    expected = reference_dedup(users.tolist(), items.tolist(), ts.tolist(), keep)
    assert out["row"].to_list() == expected
    assert stats["removed_duplicates"] == n - len(expected)


def test_missing_ids_are_an_error():
    inter = pl.DataFrame({"user_id": [1, None, None], "item_id": [1, 2, 3], "timestamp": [1, 2, 3]})
    with pytest.raises(SourceError, match=r"missing values \(column: rows\) \{'user_id': 2\}"):
        Preprocess()(inter, labels=[])


@pytest.mark.slow  # a subprocess that writes and prepares a 1M-row file: ~10 s
def test_benchmark_prep_script_runs_small(tmp_path):
    """scripts/benchmark_prep.py end to end on 20k rows: generation, Preprocess, the three splits and the
    whole preparation pipeline."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_prep.py"
    out = tmp_path / "prep.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--rows", "20000", "--out", str(tmp_path), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    blob = json.loads(out.read_text())
    assert blob["preprocess"]["rows_in"] == 20000
    assert [s["step"] for s in blob["steps"]] == [
        "read parquet",
        "Preprocess",
        "LeaveOneOutSplit",
        "TemporalSplit",
        "RandomRatioSplit",
        "RecDataModule prepare + setup",
    ]
    users = blob["preprocess"]["users_out"]
    assert (
        blob["splits"]["LeaveOneOutSplit"]["test"] == users
    )  # every user keeps >= 5 positives: one test row each
