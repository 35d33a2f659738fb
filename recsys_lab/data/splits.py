"""Splitting protocols. Each is a config object (`_target_`) and describes itself for the results table.

Every protocol has `name`, `describe()` and `assign(inter) -> np.ndarray`: one int8 code (TRAIN / VAL / TEST,
or HISTORY for a row that only feeds histories, UNUSED for one after the test period) per row of `inter`, in
the same order. `inter` is the preprocessed table (`recsys_lab.data.processing`) with columns `user_id`,
`item_id`, `timestamp`, `positive` and, for pre-split data, `split`. After `assign`, every protocol exposes
`cutoffs_`: the global (start of validation, start of test) timestamps for `TemporalSplit` and `WindowSplit`,
None for the per-user protocols, which have no global period boundary. All are vectorised (polars window
expressions and numpy), with no per-user Python loops. `describe()` feeds the prepared-data fingerprint, so
an option is only described when it differs from its default: configs that do not use it keep their caches.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys_lab.data.sources.raw import SourceError

TRAIN, VAL, TEST = 0, 1, 2
# A row that only feeds histories (`LastSamplesSplit`): it precedes every period (code < TRAIN, so timelines of
# every level include it) but is never a training, validation or test row.
HISTORY = -1
# A row after the test period (`WindowSplit`: windows after w + 1): `prepare` drops it before anything reads it,
# so it is neither trained on, evaluated, nor part of any history.
UNUSED = 3
SPLIT_NAMES = {"train": TRAIN, "val": VAL, "test": TEST}
_ROW = "__row"


def _require(inter: pl.DataFrame, columns: tuple[str, ...], protocol: str) -> None:
    missing = [c for c in columns if c not in inter.columns]
    if missing:
        raise SourceError(
            f"data.split ({protocol}): interactions lack column(s) {missing}; they have {inter.columns}"
        )
    if inter.height == 0:
        raise SourceError(f"data.split ({protocol}): there are no interactions to split")


def _scatter(rows: pl.Series, codes: pl.Series) -> np.ndarray:
    """Codes computed in some other row order, put back in the input's order (`rows` = input row index)."""
    out = np.empty(len(rows), dtype=np.int8)
    out[rows.to_numpy()] = codes.to_numpy().astype(np.int8)
    return out


class TemporalSplit:
    """Global temporal split by timestamp quantiles: the leak-free default for non-sequential models.

    Every interaction before the `1 - val_fraction - test_fraction` quantile of time trains, the next
    `val_fraction` validates, the last `test_fraction` tests: rows at or after the validation cutoff are
    validation, rows at or after the test cutoff are test. The quantiles are taken over all rows (negatives
    included) and rounded up to whole timestamps. Features of a row only ever use interactions that happened
    strictly before it, so later periods may use earlier periods' interactions as history. `assign` stores
    the two cutoffs in `cutoffs_`; `cutoffs(timestamps)` computes them without assigning.

    Args:
        val_fraction: share of interactions (by time) in the validation period.
        test_fraction: share of interactions (by time) in the test period.
    """

    name = "temporal"

    def __init__(self, val_fraction: float = 0.1, test_fraction: float = 0.1) -> None:
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"data.split: val_fraction={val_fraction} and test_fraction={test_fraction} must each lie in "
                "(0, 1) and sum to less than 1"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.cutoffs_: tuple[int, int] | None = None

    def cutoffs(self, timestamps: np.ndarray) -> tuple[int, int]:
        """(start of validation, start of test) as timestamps."""
        q = np.quantile(timestamps, [1 - self.val_fraction - self.test_fraction, 1 - self.test_fraction])
        return int(np.ceil(q[0])), int(np.ceil(q[1]))

    def assign(self, inter: pl.DataFrame) -> np.ndarray:
        """int8 split code per row (TRAIN / VAL / TEST); sets `cutoffs_`."""
        _require(inter, ("timestamp",), self.name)
        timestamps = inter.get_column("timestamp").to_numpy()
        t_val, t_test = self.cutoffs(timestamps)
        split = np.full(len(timestamps), TRAIN, dtype=np.int8)
        split[timestamps >= t_val] = VAL
        split[timestamps >= t_test] = TEST
        self.cutoffs_ = (t_val, t_test)
        return split

    def describe(self) -> dict:
        return {"split": self.name, "val_fraction": self.val_fraction, "test_fraction": self.test_fraction}


WINDOW_TRAIN = ("window", "all")


class WindowSplit:
    """Time windows: train on window w (or windows 0..w), test on window w + 1. The protocol of a model that is
    updated as new data arrive (incremental / online training, `scripts/incremental.py`).

    The log's time span, from its first to its last timestamp, is cut into `windows` windows of equal length
    (integer seconds; window k covers [start_k, start_{k+1}) with start_k = t_min + ceil(k * span / windows),
    span = t_max - t_min + 1). On the simulator (28 days) with windows=4 each window is one week. Codes:

    - window w + 1: TEST;
    - window w: TRAIN, except its last `val_fraction` of rows by time (rounded up to a whole timestamp, as
      `TemporalSplit` cuts its periods), which are VAL. The validation tail is the same for both `train`
      options, so that their validation metrics (and checkpoint choice) are comparable;
    - windows before w: TRAIN with `train="all"` (retraining from scratch on everything so far); HISTORY with
      `train="window"` (the incremental update): never trained on, yet still in every timeline, so the
      behaviour sequences (DIN, SASRec) and the masked `seen` items of a ranking query read the user's whole
      past, as a deployed model would, while the loss, the vocabularies and the popularity counts see window w
      only (with `data.vocab_from`, the previous run's vocabularies are kept and extended);
    - windows after w + 1: UNUSED (dropped before preparation reads them).

    `cutoffs_` = (start of validation, start of test); `edges_` the window starts and the end of the last
    window. Preprocessing (duplicates, k-core) runs on the whole log before the split, as for every protocol.

    Args:
        windows: number of equal-length windows (>= 2).
        window: w, the training window (0 .. windows - 2; its successor is the test window).
        train: "window" (window w only, earlier rows are history) or "all" (windows 0..w).
        val_fraction: share of window w's rows (the latest) that validate.
    """

    name = "window"

    def __init__(
        self, windows: int = 4, window: int = 0, train: str = "window", val_fraction: float = 0.1
    ) -> None:
        if isinstance(windows, bool) or not isinstance(windows, int) or windows < 2:
            raise ValueError(f"data.split.windows={windows!r}: expected an integer >= 2")
        if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= windows - 2:
            raise ValueError(
                f"data.window (data.split.window)={window!r}: expected an integer in 0..{windows - 2} (window w "
                f"trains, window w + 1 tests, and there are {windows} windows)"
            )
        if train not in WINDOW_TRAIN:
            raise ValueError(f"data.split.train='{train}' is unknown; expected one of {WINDOW_TRAIN}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.split.val_fraction={val_fraction}: expected a share in (0, 1)")
        self.windows, self.window, self.train, self.val_fraction = windows, window, train, val_fraction
        self.cutoffs_: tuple[int, int] | None = None
        self.edges_: list[int] | None = None

    def edges(self, timestamps: np.ndarray) -> list[int]:
        """The start of every window and the end (exclusive) of the last: windows + 1 integer timestamps."""
        t_min, t_max = int(timestamps.min()), int(timestamps.max())
        span = t_max - t_min + 1
        return [t_min + -(-k * span // self.windows) for k in range(self.windows + 1)]  # exact integer ceil

    def assign(self, inter: pl.DataFrame) -> np.ndarray:
        """int8 code per row (HISTORY / TRAIN / VAL / TEST / UNUSED); sets `cutoffs_` and `edges_`."""
        _require(inter, ("timestamp",), self.name)
        ts = inter.get_column("timestamp").to_numpy()
        edges = self.edges(ts)
        start, t_test, t_end = edges[self.window], edges[self.window + 1], edges[self.window + 2]
        in_window = (ts >= start) & (ts < t_test)
        if not in_window.any():
            raise SourceError(f"data.split ({self.describe()}): window {self.window} holds no interaction")
        t_val = int(np.ceil(np.quantile(ts[in_window], 1 - self.val_fraction)))
        codes = np.full(len(ts), HISTORY if self.train == "window" else TRAIN, dtype=np.int8)
        codes[in_window] = TRAIN
        codes[in_window & (ts >= t_val)] = VAL
        codes[(ts >= t_test) & (ts < t_end)] = TEST
        codes[ts >= t_end] = UNUSED
        self.cutoffs_, self.edges_ = (t_val, t_test), edges
        return codes

    def describe(self) -> dict:
        return {
            "split": self.name,
            "windows": self.windows,
            "window": self.window,
            "train": self.train,
            "val_fraction": self.val_fraction,
        }


HOLD_OUT = ("positives", "rows")


class LeaveOneOutSplit:
    """Per-user leave-one-out by time: the last positive (or row) tests, the second-to-last validates.

    Each user's rows are ordered by timestamp, ties by row order (a stable sort, as RecBole's).

    `hold_out="positives"` (the default): the user's last positive is TEST, the second-to-last positive VAL,
    all earlier positives TRAIN. Negatives (impressions without a click, or below-threshold ratings kept by
    `Preprocess(keep_negatives=True)`) go with the period they fall in, each period starting just after the
    previous period's last positive: a negative before the last TRAIN positive is TRAIN; one after it (up to
    the VAL positive) is VAL; one after the VAL positive, before or after the TEST positive, is TEST. In one
    rule, for every row: code = clip(positives strictly before the row in the user's order - (n_pos - 3),
    0, 2), where n_pos is the user's number of positives. Users with fewer than 3 positives keep every row in
    TRAIN (they have nothing to hold out for both val and test); `Preprocess(min_history=3)` removes them
    instead.

    `hold_out="rows"`: RecBole's "LS" split (`Dataset.leave_one_out`, `_split_index_by_leave_one_out`): the
    user's last row is TEST and the second-to-last row VAL whatever their labels, so a held-out row may be a
    negative (CTR protocols score it by its label). A user with n rows holds out
    clip(n - min_train_rows, 0, 2) rows, test first: with RecBole's general datasets min_train_rows = 1
    (n = 2 gives 1 train + 1 test row); its sequential datasets first turn each row but the user's first into
    a (history, next item) example and then split the examples, which is min_train_rows = 2 here (n = 3 gives
    2 train rows + 1 test row, the first row serving as history only).

    There are no global cutoffs (`cutoffs_` stays None).

    Args:
        hold_out: "positives" (hold out the last positives; negatives follow the period they fall in) or
            "rows" (hold out the last rows, whatever their labels).
        min_train_rows: with hold_out="rows", the rows a user always keeps in training (1 or more).
    """

    name = "leave_one_out"

    def __init__(self, hold_out: str = "positives", min_train_rows: int = 1) -> None:
        if hold_out not in HOLD_OUT:
            raise ValueError(f"data.split.hold_out='{hold_out}' is unknown; expected one of {HOLD_OUT}")
        if isinstance(min_train_rows, bool) or not isinstance(min_train_rows, int) or min_train_rows < 1:
            raise ValueError(f"data.split.min_train_rows={min_train_rows!r} must be an integer >= 1")
        if hold_out == "positives" and min_train_rows != 1:
            raise ValueError(
                f"data.split.min_train_rows={min_train_rows} applies to hold_out=rows only; with "
                "hold_out=positives a user needs 3 positives (data.preprocess.min_history drops the others)"
            )
        self.hold_out, self.min_train_rows = hold_out, min_train_rows
        self.cutoffs_: tuple[int, int] | None = None

    def assign(self, inter: pl.DataFrame) -> np.ndarray:
        """int8 split code per row (TRAIN / VAL / TEST)."""
        if self.hold_out == "rows":
            _require(inter, ("user_id", "timestamp"), self.name)
            n = pl.len().over("user_id").cast(pl.Int64)
            from_end = n - 1 - pl.int_range(pl.len()).over("user_id")  # 0 for the user's last row in time
            held = (n - self.min_train_rows).clip(0, 2)  # rows held out, test first
            code = pl.when(from_end < held).then(2 - from_end).otherwise(TRAIN)
            columns: tuple[str, ...] = ("user_id", "timestamp")
        else:
            _require(inter, ("user_id", "timestamp", "positive"), self.name)
            pos = pl.col("positive").cast(pl.Int32)
            n_pos = pos.sum().over("user_id")
            before = pos.cum_sum().over("user_id") - pos  # positives strictly before the row, in time order
            code = pl.when(n_pos >= 3).then((before - (n_pos - 3)).clip(0, 2)).otherwise(0)
            columns = ("user_id", "timestamp", "positive")
        ranked = (
            inter.select(*columns)
            .with_row_index(_ROW)
            .sort("timestamp", maintain_order=True)  # stable: equal timestamps keep row order
            .select(_ROW, code.alias("code"))
        )
        return _scatter(ranked.get_column(_ROW), ranked.get_column("code"))

    def describe(self) -> dict:
        out: dict = {"split": self.name}
        if self.hold_out != "positives":  # the default is not described: its caches keep their fingerprint
            out.update(hold_out=self.hold_out, min_train_rows=self.min_train_rows)
        return out


def recbole_split_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) sizes of a part of n rows, as RecBole's `Dataset._calcu_split_ids` computes them.

    Ratios are normalised to sum 1; val and test are `int(ratio * n)` (rounded down) and train the rest; then
    test, and after it val, take one row from train when their `ratio * n` lies strictly between 0 and 1, as
    long as train keeps more than one row. The same float arithmetic as RecBole, so the sizes match exactly.
    """
    total = sum(ratios)
    r_val, r_test = ratios[1] / total, ratios[2] / total
    counts = [0, int(r_val * n), int(r_test * n)]
    counts[0] = n - counts[1] - counts[2]
    for part, ratio in ((2, r_test), (1, r_val)):
        if counts[0] <= 1:
            break
        if 0 < ratio * n < 1:
            counts[part] += 1
            counts[0] -= 1
    return counts[0], counts[1], counts[2]


GROUP_BY = ("user", "none")


class RandomRatioSplit:
    """Random split by ratios, RecBole's "RS" (e.g. 8:1:1), per user (`group_by: user`) or over all rows
    (`group_by: none`, RecBole's context-aware default).

    Rows (positives and negatives alike) are put in a seeded random order and cut by counts computed as
    RecBole's `_calcu_split_ids` does (`recbole_split_counts`), for a part with `n` rows and ratios normalised
    to sum 1: `n_val = floor(val * n)`, `n_test = floor(test * n)`, `n_train = n - n_val - n_test`; then, so
    that no part is empty when its ratio is not, test and after it val each take one row from train when their
    `ratio * n` lies strictly between 0 and 1, as long as train keeps more than one row. For 8:1:1, n = 10
    gives 8/1/1, n = 5 gives 3/1/1, n = 3 gives 1/1/1, n = 2 gives 1/0/1 and n = 1 gives 1/0/0.

    - `group_by="user"`: each user's rows are cut by the user's own counts (RecBole's general default).
    - `group_by="none"`: the whole table is cut once, by the counts of all its rows (RecBole's
      `split_by_ratio(group_by=None)`): the first n_train rows of the random order train, the next n_val
      validate, the rest test, so a user may have rows in test and none in training.

    The order is numpy's `default_rng(seed).permutation` of all rows (restricted to each user when grouped),
    so the split is reproducible for the same table and seed (RecBole shuffles with torch, so its exact rows
    differ; its counts do not). There are no global cutoffs (`cutoffs_` stays None).

    Args:
        ratios: (train, val, test) weights; normalised to sum 1.
        seed: seed of the random order.
        group_by: "user" (cut each user's rows) or "none" (cut all rows at once).
    """

    name = "random_ratio"

    def __init__(
        self,
        ratios: tuple[float, float, float] | list[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        group_by: str = "user",
    ) -> None:
        ratios = tuple(float(r) for r in ratios)
        if len(ratios) != 3 or min(ratios) < 0 or ratios[0] <= 0:
            raise ValueError(
                f"data.split.ratios={list(ratios)} must be three non-negative weights (train, val, test) with "
                "a positive train weight"
            )
        if group_by not in GROUP_BY:
            raise ValueError(f"data.split.group_by='{group_by}' is unknown; expected one of {GROUP_BY}")
        self.ratios = ratios
        self.seed = seed
        self.group_by = group_by
        self.cutoffs_: tuple[int, int] | None = None

    def assign(self, inter: pl.DataFrame) -> np.ndarray:
        """int8 split code per row (TRAIN / VAL / TEST)."""
        if self.group_by == "none":
            _require(inter, (), self.name)
            # row i takes position key[i] in the random order; the first n_train positions train, and so on
            key = np.random.default_rng(self.seed).permutation(inter.height)
            n_train, n_val, _ = recbole_split_counts(inter.height, self.ratios)
            codes = np.full(inter.height, TEST, dtype=np.int8)
            codes[key < n_train + n_val] = VAL
            codes[key < n_train] = TRAIN
            return codes
        _require(inter, ("user_id",), self.name)
        total = sum(self.ratios)
        r_val, r_test = self.ratios[1] / total, self.ratios[2] / total
        n = pl.len().over("user_id").cast(pl.Float64)
        # position of the row in its user's random order (0-based); the keys are distinct, so no ties
        position = pl.col("key").rank("ordinal").over("user_id").cast(pl.Int64) - 1
        key = np.random.default_rng(self.seed).permutation(inter.height).astype(np.int64)
        counts = inter.select("user_id", pl.Series("key", key)).with_columns(
            position.alias("position"),
            pl.len().over("user_id").cast(pl.Int64).alias("n"),
            (n * r_val).alias("x_val"),
            (n * r_test).alias("x_test"),
        )
        counts = counts.with_columns(
            pl.col("x_val").floor().cast(pl.Int64).alias("n_val"),
            pl.col("x_test").floor().cast(pl.Int64).alias("n_test"),
        ).with_columns((pl.col("n") - pl.col("n_val") - pl.col("n_test")).alias("n_train"))
        # RecBole's "no empty part" adjustment: test first, then val, each only while train keeps > 1 row
        for part in ("test", "val"):
            x = pl.col(f"x_{part}")
            bump = ((pl.col("n_train") > 1) & (x > 0) & (x < 1)).cast(pl.Int64)
            counts = counts.with_columns(
                (pl.col(f"n_{part}") + bump).alias(f"n_{part}"), (pl.col("n_train") - bump).alias("n_train")
            )
        code = (
            pl.when(pl.col("position") < pl.col("n_train"))
            .then(TRAIN)
            .when(pl.col("position") < pl.col("n_train") + pl.col("n_val"))
            .then(VAL)
            .otherwise(TEST)
        )
        return counts.select(code.cast(pl.Int8)).to_series().to_numpy()

    def describe(self) -> dict:
        out = {"split": self.name, "ratios": list(self.ratios), "split_seed": self.seed}
        if self.group_by != "user":  # the default is not described: its caches keep their fingerprint
            out["group_by"] = self.group_by
        return out


class LastSamplesSplit:
    """TALLRec's protocol (Bao et al., RecSys 2023; SAI990323/TALLRec `preprocess_movie.py`): sliding-window
    samples, the last ones kept, cut into consecutive train / validation / test slices.

    Every row with at least `min_history` earlier rows of the same user is a sample (a user's rows ordered by
    timestamp, ties by row order). Samples are listed user by user — users in the order of their first row in
    the file, each user's samples in time order — and the last `samples` of that list are cut into consecutive
    slices by `ratios` (int(n * 0.8), int(n * 0.9) as in TALLRec): mostly whole blocks of users, not periods
    of time. Every other row only feeds histories (code `HISTORY`). No global cutoffs.

    Args:
        samples: how many of the last samples are used (TALLRec: 10000).
        min_history: earlier rows a sample needs (TALLRec: 10, the prompt's history length).
        ratios: train / validation / test shares of those samples.
    """

    name = "last_samples"

    def __init__(
        self, samples: int = 10000, min_history: int = 10, ratios: list[float] | tuple = (0.8, 0.1, 0.1)
    ) -> None:
        ratios = [float(r) for r in ratios]
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 3:
            raise ValueError(f"data.split.samples={samples}: expected an integer >= 3")
        if isinstance(min_history, bool) or not isinstance(min_history, int) or min_history < 0:
            raise ValueError(f"data.split.min_history={min_history}: expected an integer >= 0")
        if len(ratios) != 3 or any(r <= 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
            raise ValueError(f"data.split.ratios={ratios}: expected three positive shares summing to 1")
        self.samples, self.min_history, self.ratios = samples, min_history, ratios
        self.cutoffs_: tuple[int, int] | None = None

    def assign(self, inter: pl.DataFrame) -> np.ndarray:
        """int8 code per row: TRAIN / VAL / TEST for the kept samples, HISTORY for every other row."""
        _require(inter, ("user_id", "timestamp"), self.name)
        frame = inter.select("user_id", "timestamp").with_row_index(_ROW)
        first = frame.group_by("user_id").agg(pl.col(_ROW).min().alias("__first"))
        ordered = (
            frame.join(first, on="user_id")
            .sort(["__first", "timestamp", _ROW])  # users by first appearance, then time, ties by row
            .with_columns(pl.int_range(pl.len()).over("user_id").alias("__position"))
        )
        picked = ordered.filter(pl.col("__position") >= self.min_history).tail(self.samples)
        n = picked.height
        if n < 3:
            raise SourceError(
                f"data.split ({self.name}): only {n} rows have {self.min_history} earlier rows of their user"
            )
        cut_val, cut_test = int(n * self.ratios[0]), int(n * (self.ratios[0] + self.ratios[1]))
        codes = np.full(inter.height, HISTORY, dtype=np.int8)
        rows = picked.get_column(_ROW).to_numpy()
        codes[rows[:cut_val]] = TRAIN
        codes[rows[cut_val:cut_test]] = VAL
        codes[rows[cut_test:]] = TEST
        return codes

    def describe(self) -> dict:
        return {
            "split": self.name,
            "samples": self.samples,
            "min_history": self.min_history,
            "ratios": self.ratios,
        }


class PreSplit:
    """The split the data comes with: a column of "train" / "val" / "test" per row.

    Any other value (or a missing one) is an error that names the value and how many rows carry it. There
    are no global cutoffs (`cutoffs_` stays None), even when the given periods happen to be temporal.

    Args:
        column: the interactions column holding the split names.
    """

    name = "pre_split"

    def __init__(self, column: str = "split") -> None:
        self.column = column
        self.cutoffs_: tuple[int, int] | None = None

    def assign(self, inter: pl.DataFrame) -> np.ndarray:
        """int8 split code per row (TRAIN / VAL / TEST)."""
        _require(inter, (self.column,), self.name)
        values = inter.get_column(self.column)
        if isinstance(values.dtype, (pl.Categorical, pl.Enum)):
            values = values.cast(pl.String)
        if values.dtype != pl.String:
            raise SourceError(
                f"data.split ({self.name}): column '{self.column}' has dtype {values.dtype}; expected strings "
                "'train' / 'val' / 'test'"
            )
        counts = values.value_counts(sort=True)
        bad = counts.filter(pl.col(self.column).is_null() | ~pl.col(self.column).is_in(list(SPLIT_NAMES)))
        if bad.height:
            found = ", ".join(
                f"{'null' if v is None else repr(v)} in {c} row{'s' if c != 1 else ''}"
                for v, c in bad.iter_rows()
            )
            raise SourceError(
                f"data.split ({self.name}): column '{self.column}' has values other than 'train', 'val' and "
                f"'test': {found}"
            )
        return values.replace_strict(SPLIT_NAMES, return_dtype=pl.Int8).to_numpy()

    def describe(self) -> dict:
        return {"split": self.name, "split_column": self.column}
