"""Split protocols on hand-computed toys: temporal cutoffs, leave-one-out with ties and negatives, RecBole's
per-user ratio counts and reproducibility, pre-split validation; plus leave-one-out against a slow reference."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys_lab.data.sources.raw import SourceError
from recsys_lab.data.splits import (
    HISTORY,
    TEST,
    TRAIN,
    VAL,
    LastSamplesSplit,
    LeaveOneOutSplit,
    PreSplit,
    RandomRatioSplit,
    TemporalSplit,
    recbole_split_counts,
)

T, V, S = TRAIN, VAL, TEST  # short names for the literal expectations


# --- temporal ---------------------------------------------------------------------------------------------------
def test_temporal_cutoffs_and_row_order():
    ts = np.array([10, 3, 1, 9, 5, 2, 8, 4, 7, 6])  # 1..10 shuffled
    inter = pl.DataFrame({"user_id": np.zeros(10, int), "timestamp": ts})
    split = TemporalSplit(val_fraction=0.2, test_fraction=0.2)
    codes = split.assign(inter)
    # np.quantile (linear) of 1..10 at 0.6: 1 + 9 * 0.6 = 6.4 -> ceil 7; at 0.8: 1 + 9 * 0.8 = 8.2 -> ceil 9
    assert split.cutoffs_ == (7, 9)
    # t < 7 train, 7 <= t < 9 val, t >= 9 test, in the input's row order
    assert codes.tolist() == [S, T, T, S, T, T, V, T, V, T]
    assert codes.dtype == np.int8


def test_temporal_ties_share_a_period():
    inter = pl.DataFrame({"timestamp": [1, 2, 3, 4, 5, 6, 6, 6, 9, 10]})
    split = TemporalSplit(val_fraction=0.2, test_fraction=0.2)
    codes = split.assign(inter)
    # quantile 0.6: position 5.4 between 6 and 6 -> 6.0, cutoff 6; quantile 0.8: position 7.2 between 6 and 9
    # -> 6.6, cutoff 7. All three rows at t=6 validate (3 rows, not the nominal 2).
    assert split.cutoffs_ == (6, 7)
    assert codes.tolist() == [T, T, T, T, T, V, V, V, S, S]
    assert split.describe() == {"split": "temporal", "val_fraction": 0.2, "test_fraction": 0.2}


def test_temporal_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to less than 1"):
        TemporalSplit(val_fraction=0.5, test_fraction=0.5)


# --- leave-one-out ----------------------------------------------------------------------------------------------
def test_leave_one_out_with_ties_negatives_and_short_users():
    # row user ts positive
    rows = [
        (
            0,
            "A",
            5,
            True,
        ),  # A's positives in (time, row) order: row 3 (t1), row 1 (t3), row 0 (t5), row 2 (t5)
        (
            1,
            "A",
            3,
            True,
        ),  # -> n_pos = 4: rows 3 and 1 train, row 0 val, row 2 test (tie at t5: row 2 is later)
        (2, "A", 5, True),
        (3, "A", 1, True),
        (4, "A", 4, False),  # after A's last train positive (row 1, t3), before the val positive: val
        (5, "B", 2, True),  # B has 2 positives: everything stays in train
        (6, "B", 1, True),
        (7, "C", 1, True),  # C in time order: + - + + - + -  (n_pos = 4)
        (8, "C", 2, False),  # before C's last train positive (row 9, t3): train
        (9, "C", 3, True),  # train
        (10, "C", 4, True),  # second-to-last positive: val
        (11, "C", 5, False),  # after the val positive: test
        (12, "C", 6, True),  # last positive: test
        (13, "C", 7, False),  # after the test positive: test
        (14, "B", 3, False),  # B is short: train
    ]
    inter = pl.DataFrame(
        {"user_id": [r[1] for r in rows], "timestamp": [r[2] for r in rows], "positive": [r[3] for r in rows]}
    )
    codes = LeaveOneOutSplit().assign(inter)
    assert codes.tolist() == [V, T, S, T, V, T, T, T, T, T, V, S, S, S, T]
    assert codes.dtype == np.int8


def reference_loo(users, ts, positive) -> list[int]:
    """Slow per-user loop: sort by (time, row), then walk the rows counting positives."""
    out = [TRAIN] * len(users)
    for u in set(users):
        rows = sorted((r for r in range(len(users)) if users[r] == u), key=lambda r: (ts[r], r))
        n_pos = sum(positive[r] for r in rows)
        if n_pos < 3:
            continue
        seen = 0
        for r in rows:
            if positive[r]:
                out[r] = TEST if seen == n_pos - 1 else VAL if seen == n_pos - 2 else TRAIN
            else:  # negatives: train before the last train positive, val up to the val positive, test after
                out[r] = TEST if seen >= n_pos - 1 else VAL if seen == n_pos - 2 else TRAIN
            seen += positive[r]
    return out


@pytest.mark.parametrize("seed", range(3))
def test_leave_one_out_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    n = 400
    users, ts, positive = rng.integers(0, 50, n), rng.integers(0, 30, n), rng.random(n) < 0.6  # many ties
    inter = pl.DataFrame({"user_id": users, "timestamp": ts, "positive": positive})
    expected = reference_loo(users.tolist(), ts.tolist(), positive.tolist())
    assert LeaveOneOutSplit().assign(inter).tolist() == expected


def test_leave_one_out_rows_holds_out_the_last_rows_whatever_their_label():
    # row user ts positive
    rows = [
        (0, "A", 5, False),  # A in (time, row) order: row 3 (t1 +), row 1 (t3 -), row 0 (t5 -), row 2 (t5 +)
        (1, "A", 3, False),  # -> the last row (row 2) tests, the second-to-last (row 0, a negative) validates
        (2, "A", 5, True),
        (3, "A", 1, True),
        (4, "B", 2, False),  # B has 2 rows: with min_train_rows=1 its last row (row 4, a negative) tests
        (5, "B", 1, True),
        (6, "C", 9, True),  # C has 1 row: it trains
        (7, "D", 1, True),  # D has 3 rows: 1 train + val + test (min_train_rows=1) or 2 train + test (=2)
        (8, "D", 2, True),
        (9, "D", 3, False),
    ]
    inter = pl.DataFrame(
        {"user_id": [r[1] for r in rows], "timestamp": [r[2] for r in rows], "positive": [r[3] for r in rows]}
    )
    general = LeaveOneOutSplit(hold_out="rows").assign(inter)
    assert general.tolist() == [V, T, S, T, S, T, T, T, V, S]
    # RecBole's sequential datasets: the first row of a user is history only, so it never counts as held out
    sequential = LeaveOneOutSplit(hold_out="rows", min_train_rows=2).assign(inter)
    assert sequential.tolist() == [V, T, S, T, T, T, T, T, T, S]
    # the positives rule on the same table: A's last positives are rows 3 and 2 only -> A stays in train
    assert LeaveOneOutSplit().assign(inter).tolist() == [T] * 10


def reference_loo_rows(users, ts, min_train_rows: int) -> list[int]:
    """Slow per-user loop: sort by (time, row); the last rows are held out, test first."""
    out = [TRAIN] * len(users)
    for u in set(users):
        rows = sorted((r for r in range(len(users)) if users[r] == u), key=lambda r: (ts[r], r))
        held = max(0, min(2, len(rows) - min_train_rows))
        if held >= 1:
            out[rows[-1]] = TEST
        if held == 2:
            out[rows[-2]] = VAL
    return out


@pytest.mark.parametrize("min_train_rows", [1, 2, 3])
def test_leave_one_out_rows_matches_slow_reference(min_train_rows):
    rng = np.random.default_rng(min_train_rows)
    n = 300
    users, ts = rng.integers(0, 60, n), rng.integers(0, 20, n)  # short users and many ties
    inter = pl.DataFrame({"user_id": users, "timestamp": ts, "positive": rng.random(n) < 0.5})
    expected = reference_loo_rows(users.tolist(), ts.tolist(), min_train_rows)
    split = LeaveOneOutSplit(hold_out="rows", min_train_rows=min_train_rows)
    assert split.assign(inter).tolist() == expected


def test_leave_one_out_describes_only_non_default_options():
    # the default describes itself exactly as before, so existing caches keep their fingerprint
    assert LeaveOneOutSplit().describe() == {"split": "leave_one_out"}
    assert LeaveOneOutSplit(hold_out="rows", min_train_rows=2).describe() == {
        "split": "leave_one_out",
        "hold_out": "rows",
        "min_train_rows": 2,
    }
    # hold_out=rows needs no `positive` column
    codes = LeaveOneOutSplit(hold_out="rows").assign(pl.DataFrame({"user_id": [1, 1], "timestamp": [2, 1]}))
    assert codes.tolist() == [S, T]


def test_leave_one_out_rejects_bad_options():
    with pytest.raises(ValueError, match="data.split.hold_out='last'"):
        LeaveOneOutSplit(hold_out="last")
    with pytest.raises(ValueError, match="data.split.min_train_rows=0"):
        LeaveOneOutSplit(hold_out="rows", min_train_rows=0)
    with pytest.raises(ValueError, match="applies to hold_out=rows only"):
        LeaveOneOutSplit(min_train_rows=2)


# --- random ratio -----------------------------------------------------------------------------------------------
def random_toy(sizes: dict[str, int]) -> pl.DataFrame:
    users = [u for u, n in sizes.items() for _ in range(n)]
    rng = np.random.default_rng(123)
    return pl.DataFrame({"user_id": rng.permutation(users)})  # users interleaved


def per_user_counts(inter: pl.DataFrame, codes: np.ndarray) -> dict[str, list[int]]:
    out = (
        inter.with_columns(pl.Series("code", codes))
        .group_by("user_id")
        .agg(*(pl.col("code").eq(c).sum().alias(str(c)) for c in (TRAIN, VAL, TEST)))
    )
    return {u: [t, v, s] for u, t, v, s in out.sort("user_id").iter_rows()}


def test_random_ratio_counts_follow_recbole():
    # RecBole's _calcu_split_ids for 8:1:1 and n rows: val = floor(0.1 n), test = floor(0.1 n), train = rest;
    # then test, then val, take one row from train if 0 < 0.1 n < 1 and train still has more than one row.
    #   n=10: 1, 1 -> 8/1/1      n=20: 2, 2 -> 16/2/2     n=15: floor(1.5) = 1 -> 13/1/1
    #   n=7:  0, 0 -> test +1 (train 6), val +1 (train 5) -> 5/1/1      n=3: 0, 0 -> 1/1/1
    #   n=2:  0, 0 -> test +1 (train 1), val: train is 1, no more -> 1/0/1      n=1: train is 1 -> 1/0/0
    sizes = {"a": 10, "b": 20, "c": 15, "d": 7, "e": 3, "f": 2, "g": 1}
    inter = random_toy(sizes)
    codes = RandomRatioSplit(ratios=(0.8, 0.1, 0.1), seed=0).assign(inter)
    assert per_user_counts(inter, codes) == {
        "a": [8, 1, 1],
        "b": [16, 2, 2],
        "c": [13, 1, 1],
        "d": [5, 1, 1],
        "e": [1, 1, 1],
        "f": [1, 0, 1],
        "g": [1, 0, 0],
    }
    # weights are normalised: 3:1:1 is 0.6/0.2/0.2 -> n=10: 6/2/2, n=20: 12/4/4
    codes = RandomRatioSplit(ratios=(3, 1, 1), seed=0).assign(inter)
    assert per_user_counts(inter, codes)["a"] == [6, 2, 2]
    assert per_user_counts(inter, codes)["b"] == [12, 4, 4]


def test_random_ratio_is_seeded_and_random():
    inter = pl.DataFrame({"user_id": np.zeros(10, int), "item_id": np.arange(10)})  # one user, 10 rows
    first = RandomRatioSplit(seed=7).assign(inter)
    assert np.array_equal(first, RandomRatioSplit(seed=7).assign(inter))
    assert sorted(first.tolist()) == [T] * 8 + [V, S]  # 8/1/1
    # other seeds pick other held-out rows: over 20 seeds the (val, test) rows are not all the same
    held = {tuple(np.flatnonzero(RandomRatioSplit(seed=s).assign(inter) != TRAIN)) for s in range(20)}
    assert len(held) > 5
    assert RandomRatioSplit(seed=3).describe() == {
        "split": "random_ratio",
        "ratios": [0.8, 0.1, 0.1],
        "split_seed": 3,
    }


def test_random_ratio_rejects_bad_ratios():
    with pytest.raises(ValueError, match="three non-negative weights"):
        RandomRatioSplit(ratios=(0.9, 0.1))
    with pytest.raises(ValueError, match="positive train weight"):
        RandomRatioSplit(ratios=(0, 0.5, 0.5))
    with pytest.raises(ValueError, match="data.split.group_by='item'"):
        RandomRatioSplit(group_by="item")


def test_recbole_split_counts_by_hand():
    # int(0.1 n) for val and test, train the rest; test then val take a row when 0 < 0.1 n < 1 and train > 1
    assert recbole_split_counts(10, (0.8, 0.1, 0.1)) == (8, 1, 1)
    assert recbole_split_counts(23, (0.8, 0.1, 0.1)) == (19, 2, 2)  # int(2.3) = 2
    assert recbole_split_counts(7, (0.8, 0.1, 0.1)) == (5, 1, 1)
    assert recbole_split_counts(2, (0.8, 0.1, 0.1)) == (1, 0, 1)
    assert recbole_split_counts(1, (0.8, 0.1, 0.1)) == (1, 0, 0)
    # ml-100k cut at once (group_by none)
    assert recbole_split_counts(100_000, (0.8, 0.1, 0.1)) == (80_000, 10_000, 10_000)
    assert recbole_split_counts(10, (1, 0, 1)) == (5, 0, 5)  # weights normalised: 0.5 * 10


@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.1), (0.7, 0.2, 0.1), (3, 1, 1), (0.6, 0.3, 0.1), (1, 0, 1)])
def test_random_ratio_per_user_counts_equal_the_scalar_rule(ratios):
    # every user size 1..60 once: the vectorised per-user counts are the scalar RecBole rule's
    sizes = {f"u{n}": n for n in range(1, 61)}
    inter = random_toy(sizes)
    got = per_user_counts(inter, RandomRatioSplit(ratios=ratios, seed=1).assign(inter))
    assert got == {u: list(recbole_split_counts(n, ratios)) for u, n in sizes.items()}


def test_random_ratio_over_all_rows():
    # 23 rows of 3 users cut once: 19 / 2 / 2 whatever the users (a user may have no training row)
    users = ["a"] * 20 + ["b"] * 2 + ["c"]
    inter = pl.DataFrame({"user_id": users, "item_id": np.arange(23)})
    split = RandomRatioSplit(seed=5, group_by="none")
    codes = split.assign(inter)
    assert np.bincount(codes, minlength=3).tolist() == [19, 2, 2]
    assert codes.dtype == np.int8
    # the rows of the first 19 positions of numpy's permutation train, the next 2 validate, the last 2 test
    key = np.random.default_rng(5).permutation(23)
    assert codes.tolist() == [T if k < 19 else V if k < 21 else S for k in key]
    assert np.array_equal(codes, RandomRatioSplit(seed=5, group_by="none").assign(inter))
    assert not np.array_equal(codes, RandomRatioSplit(seed=6, group_by="none").assign(inter))
    # no user column needed, and the option is described (it changes the split)
    assert RandomRatioSplit(group_by="none").assign(pl.DataFrame({"x": np.arange(10)})).tolist().count(T) == 8
    assert split.describe() == {
        "split": "random_ratio",
        "ratios": [0.8, 0.1, 0.1],
        "split_seed": 5,
        "group_by": "none",
    }


# --- pre-split --------------------------------------------------------------------------------------------------
def test_pre_split_codes():
    inter = pl.DataFrame({"split": ["train", "test", "val", "train"]})
    assert PreSplit().assign(inter).tolist() == [T, S, V, T]
    categorical = pl.DataFrame({"fold": pl.Series(["val", "train"], dtype=pl.Categorical)})
    assert PreSplit(column="fold").assign(categorical).tolist() == [V, T]
    assert PreSplit().describe() == {"split": "pre_split", "split_column": "split"}


def test_pre_split_errors_name_value_and_count():
    inter = pl.DataFrame({"split": ["train", "valid", "valid", None, "test"]})
    with pytest.raises(
        SourceError, match=r"column 'split' has values other than .*'valid' in 2 rows, null in 1 row"
    ):
        PreSplit().assign(inter)
    with pytest.raises(SourceError, match=r"lack column\(s\) \['fold'\]"):
        PreSplit(column="fold").assign(inter)
    with pytest.raises(SourceError, match="has dtype Int64"):
        PreSplit().assign(pl.DataFrame({"split": [0, 1, 2]}))


def test_every_protocol_rejects_empty_input():
    empty = pl.DataFrame(
        schema={"user_id": pl.Int64, "timestamp": pl.Int64, "positive": pl.Boolean, "split": pl.String}
    )
    splits = (
        TemporalSplit(),
        LeaveOneOutSplit(),
        LeaveOneOutSplit(hold_out="rows"),
        RandomRatioSplit(),
        RandomRatioSplit(group_by="none"),
        PreSplit(),
    )
    for split in splits:
        with pytest.raises(SourceError, match="no interactions to split"):
            split.assign(empty)


# --- last samples (TALLRec) ---------------------------------------------------------------------------------------
def test_last_samples_by_hand():
    """User 7 appears first in the file, then user 3; a sample needs 2 earlier rows of its user. Samples in
    list order: user 7's rows at times 3, 4, 4 (tie: file order), then user 3's at times 12, 13; the last 4 are
    kept and cut int(4 * 0.5) = 2 / int(4 * 0.75) = 3: train, train, val, test."""
    inter = pl.DataFrame(
        {
            #          0  1  2  3   4  5  6   7   8   9
            "user_id": [7, 3, 7, 3, 7, 7, 3, 3, 7, 3],
            "timestamp": [1, 10, 2, 11, 4, 3, 12, 13, 4, 9],
        }
    )
    # user 7 in time order: rows 0 (1), 2 (2), 5 (3), 4 (4), 8 (4) -> samples 5, 4, 8
    # user 3 in time order: rows 9 (9), 1 (10), 3 (11), 6 (12), 7 (13) -> samples 3, 6, 7
    # list: 5, 4, 8, 3, 6, 7; the last 4: 8, 3, 6, 7
    codes = LastSamplesSplit(samples=4, min_history=2, ratios=[0.5, 0.25, 0.25]).assign(inter)
    H = HISTORY
    assert codes.tolist() == [H, H, H, T, H, H, V, S, T, H]


def test_last_samples_rejects_bad_options_and_too_few_samples():
    with pytest.raises(ValueError, match="data.split.samples"):
        LastSamplesSplit(samples=2)
    with pytest.raises(ValueError, match="data.split.ratios"):
        LastSamplesSplit(ratios=[0.5, 0.5])
    with pytest.raises(ValueError, match="data.split.min_history"):
        LastSamplesSplit(min_history=-1)
    inter = pl.DataFrame({"user_id": [1, 1, 2], "timestamp": [1, 2, 3]})
    with pytest.raises(SourceError, match="only 0 rows have 10 earlier rows"):
        LastSamplesSplit().assign(inter)
