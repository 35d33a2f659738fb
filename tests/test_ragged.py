"""Ragged (CSR id lists): grouping, history gathering and strictly-before counting, against literal tensors and a
slow pure-Python reference on random data with ties in time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_lab.data.ragged import Ragged

LONG = torch.long

# Rows of the hand example (values listed in arrival order; times aligned with the stored order below):
#   row 0: 11 @ t5, 14 @ t9
#   row 1: 13 @ t3
#   row 2: 10 @ t1, 12 @ t4, 15 @ t4   (a tie in time)
#   row 3: (empty)
GROUPS = np.array([2, 0, 2, 1, 0, 2])
VALUES = np.array([10, 11, 12, 13, 14, 15])
STORED_TIMES = torch.tensor([5, 9, 3, 1, 4, 4])


@pytest.fixture
def ragged() -> Ragged:
    return Ragged.from_groups(GROUPS, VALUES, n_groups=4)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=LONG)


# --- from_groups ------------------------------------------------------------------------------------------


def test_from_groups_literal(ragged):
    assert torch.equal(ragged.values, t([11, 14, 13, 10, 12, 15]))  # grouped, arrival order kept within a row
    assert torch.equal(ragged.offsets, t([0, 2, 3, 6, 6]))  # trailing empty row 3
    assert ragged.values.dtype == LONG and ragged.offsets.dtype == LONG
    assert torch.equal(ragged.lengths(t([0, 1, 2, 3])), t([2, 1, 3, 0]))


def test_from_groups_leading_empty_rows_and_no_values():
    r = Ragged.from_groups(np.array([3, 1, 3]), np.array([7, 8, 9]), n_groups=5)
    assert torch.equal(r.offsets, t([0, 0, 1, 1, 3, 3]))
    assert torch.equal(r.values, t([8, 7, 9]))
    empty = Ragged.from_groups(np.array([], dtype=np.int64), np.array([], dtype=np.int64), n_groups=3)
    assert torch.equal(empty.offsets, t([0, 0, 0, 0])) and empty.values.shape == (0,)


# --- gather -----------------------------------------------------------------------------------------------


def test_gather_whole_rows(ragged):
    seq = ragged.gather(t([2, 3, 0, 1]))
    assert torch.equal(seq.ids, t([[10, 12, 15], [0, 0, 0], [11, 14, 0], [13, 0, 0]]))  # oldest first
    assert torch.equal(seq.lengths, t([3, 0, 2, 1]))


def test_gather_max_len_keeps_most_recent_last(ragged):
    seq = ragged.gather(t([2, 0, 3, 1]), max_len=2)
    assert torch.equal(seq.ids, t([[12, 15], [11, 14], [0, 0], [13, 0]]))
    assert torch.equal(seq.lengths, t([2, 2, 0, 1]))
    wide = ragged.gather(t([1, 2]), max_len=4)  # wider than any row: right-padded to max_len
    assert torch.equal(wide.ids, t([[13, 0, 0, 0], [10, 12, 15, 0]]))
    assert torch.equal(wide.lengths, t([1, 3]))


def test_gather_with_ends(ragged):
    # prefix of each row up to `ends`, then its last max_len entries
    seq = ragged.gather(t([2, 2, 0, 1, 3]), ends=t([1, 3, 0, 1, 0]), max_len=2)
    assert torch.equal(seq.ids, t([[10, 0], [12, 15], [0, 0], [13, 0], [0, 0]]))
    assert torch.equal(seq.lengths, t([1, 2, 0, 1, 0]))
    # without max_len the width is the longest prefix
    seq = ragged.gather(t([2, 0]), ends=t([2, 1]))
    assert torch.equal(seq.ids, t([[10, 12], [11, 0]]))
    assert torch.equal(seq.lengths, t([2, 1]))


def test_gather_carries_times_from_the_same_positions(ragged):
    # row 2 up to its 3rd entry, last 2: 12 @ t4, 15 @ t4; row 0 whole: 11 @ t5, 14 @ t9; padding -> 0
    seq = ragged.gather(t([2, 0, 3]), ends=t([3, 2, 0]), max_len=2, times=STORED_TIMES)
    assert torch.equal(seq.ids, t([[12, 15], [11, 14], [0, 0]]))
    assert torch.equal(seq.times, t([[4, 4], [5, 9], [0, 0]]))
    assert ragged.gather(t([0])).times is None


def test_gather_empty_cases(ragged):
    none = ragged.gather(t([]))
    assert none.ids.shape == (0, 0) and none.lengths.shape == (0,)
    assert ragged.gather(t([]), max_len=3).ids.shape == (0, 3)
    only_empty = ragged.gather(t([3, 3]))
    assert only_empty.ids.shape == (2, 0) and torch.equal(only_empty.lengths, t([0, 0]))
    empty = Ragged.from_groups(np.array([], dtype=np.int64), np.array([], dtype=np.int64), n_groups=3)
    seq = empty.gather(t([0, 2]), max_len=2)
    assert torch.equal(seq.ids, t([[0, 0], [0, 0]])) and torch.equal(seq.lengths, t([0, 0]))


# --- count_before -----------------------------------------------------------------------------------------


def test_count_before_literal_strict(ragged):
    rows = t([2, 2, 2, 2, 0, 0, 0, 1, 1, 3, 2])
    when = t([0, 1, 4, 5, 5, 6, 10, 3, 4, 100, -50])
    # row 2 has times [1, 4, 4]: at t=4 only the entry at t=1 is strictly before (ties excluded)
    expected = t([0, 0, 1, 3, 0, 1, 2, 0, 1, 0, 0])
    assert torch.equal(ragged.count_before(STORED_TIMES, rows, when), expected)


def test_count_before_empty_inputs(ragged):
    assert ragged.count_before(STORED_TIMES, t([]), t([])).shape == (0,)
    empty = Ragged.from_groups(np.array([], dtype=np.int64), np.array([], dtype=np.int64), n_groups=3)
    assert torch.equal(empty.count_before(t([]), t([0, 2]), t([5, 5])), t([0, 0]))


# --- random data against a slow reference -----------------------------------------------------------------


def _random_log(seed: int, n_groups: int = 9, n: int = 120, t_max: int = 15):
    """Events (group, value, time) with many ties in time, stored sorted by (group, time) as the DataModule does."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, n)
    groups[groups == n_groups - 1] = 0  # the last group stays empty
    values = rng.integers(0, 1000, n)
    times = rng.integers(0, t_max, n)
    order = np.lexsort((times, groups))
    ragged = Ragged.from_groups(groups[order], values[order], n_groups)
    events = list(zip(groups[order].tolist(), values[order].tolist(), times[order].tolist(), strict=True))
    return ragged, torch.as_tensor(times[order]), events, rng


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_before_and_gather_match_reference(seed):
    n_groups, t_max, max_len = 9, 15, 4
    ragged, times, events, rng = _random_log(seed, n_groups=n_groups, t_max=t_max)
    rows = torch.as_tensor(rng.integers(0, n_groups, 200))
    when = torch.as_tensor(rng.integers(-2, t_max + 2, 200))  # also before the first and after the last event

    counts = ragged.count_before(times, rows, when)
    hist = ragged.gather(rows, ends=counts, max_len=max_len)
    full = ragged.gather(rows)
    assert hist.ids.shape == (200, max_len)
    for b in range(200):
        row, tb = int(rows[b]), int(when[b])
        row_events = [(v, tt) for g, v, tt in events if g == row]  # time order, arrival order within ties
        before = [v for v, tt in row_events if tt < tb]  # STRICTLY before
        assert counts[b] == len(before)
        expected = before[-max_len:]
        assert hist.lengths[b] == len(expected)
        assert hist.ids[b, : len(expected)].tolist() == expected
        assert (hist.ids[b, len(expected) :] == 0).all()
        assert full.ids[b, : full.lengths[b]].tolist() == [v for v, _ in row_events]
    assert (counts[when >= t_max] == ragged.lengths(rows)[when >= t_max]).all()
    assert (counts[when <= 0] == 0).all()
    # ties exist in the data, so strictness is actually exercised
    assert any(
        events[i][0] == events[i + 1][0] and events[i][2] == events[i + 1][2] for i in range(len(events) - 1)
    )


def test_from_groups_matches_reference_random():
    rng = np.random.default_rng(7)
    groups = rng.integers(0, 6, 50)
    values = rng.integers(0, 100, 50)
    ragged = Ragged.from_groups(groups, values, n_groups=8)
    for g in range(8):
        lo, hi = int(ragged.offsets[g]), int(ragged.offsets[g + 1])
        assert ragged.values[lo:hi].tolist() == values[groups == g].tolist()
