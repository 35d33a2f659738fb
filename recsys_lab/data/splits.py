"""Splitting protocols. Each is a config object (`_target_`) and describes itself for the results table."""

from __future__ import annotations

import numpy as np

TRAIN, VAL, TEST = 0, 1, 2


class TemporalSplit:
    """Global temporal split by timestamp quantiles: the leak-free default for non-sequential models.

    Every interaction before the `1 - val_fraction - test_fraction` quantile of time trains, the next
    `val_fraction` validates, the last `test_fraction` tests. Features of a row only ever use interactions that
    happened strictly before it, so later periods may use earlier periods' interactions as history.

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

    def cutoffs(self, timestamps: np.ndarray) -> tuple[int, int]:
        """(start of validation, start of test) as timestamps."""
        q = np.quantile(timestamps, [1 - self.val_fraction - self.test_fraction, 1 - self.test_fraction])
        return int(np.ceil(q[0])), int(np.ceil(q[1]))

    def assign(self, timestamps: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """int8 split code per row (TRAIN / VAL / TEST) and the two cutoffs."""
        t_val, t_test = self.cutoffs(timestamps)
        split = np.full(len(timestamps), TRAIN, dtype=np.int8)
        split[timestamps >= t_val] = VAL
        split[timestamps >= t_test] = TEST
        return split, (t_val, t_test)

    def describe(self) -> dict:
        return {"split": self.name, "val_fraction": self.val_fraction, "test_fraction": self.test_fraction}
