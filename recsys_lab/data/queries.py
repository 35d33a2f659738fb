"""Ranking queries of one evaluation stage, in CSR form: who is asked, what to find, what to mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor

from recsys_lab.data.batch import EvalTargets
from recsys_lab.data.ragged import Ragged


@dataclass
class QuerySet:
    """One row per ranking query (see `recsys_lab.data.prepare._queries`).

    Args:
        users: int64 [Q], the query's user entity.
        targets: item codes to find (interacted with in the stage and not before).
        seen: item codes interacted with before the stage (masked from the ranking).
        candidates: sampled protocols only — the stored candidates of each query (targets first, then the
            negatives); None for full-catalogue ranking.
    """

    users: Tensor
    targets: Ragged
    seen: Ragged
    candidates: Ragged | None

    @classmethod
    def from_frame(cls, frame: pl.DataFrame) -> QuerySet:
        sampled = frame["candidates"].null_count() < frame.height
        return cls(
            users=torch.as_tensor(frame["user"].to_numpy().astype(np.int64)),
            targets=Ragged.from_lists(frame["targets"]),
            seen=Ragged.from_lists(frame["seen"]),
            candidates=Ragged.from_lists(frame["candidates"]) if sampled else None,
        )

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, rows: Tensor) -> QuerySet:
        """The queries `rows` (e.g. a seeded subsample), in that order."""
        return QuerySet(
            self.users[rows],
            self.targets.select(rows),
            self.seen.select(rows),
            self.candidates.select(rows) if self.candidates is not None else None,
        )

    def eval_targets(self, rows: Tensor) -> EvalTargets:
        """What the evaluator needs for queries `rows`: user entities and padded target / seen / candidate
        codes."""
        return EvalTargets(
            user=self.users[rows],
            targets=self.targets.gather(rows),
            seen=self.seen.gather(rows),
            candidates=self.candidates.gather(rows) if self.candidates is not None else None,
        )
