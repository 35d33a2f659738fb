"""Variable-length id lists in CSR form, gathered for whole batches with tensor indexing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from torch import Tensor

from recsys_lab.data.batch import Seq


@dataclass
class Ragged:
    """Variable-length int lists in CSR form: row r is values[offsets[r]:offsets[r+1]]."""

    values: Tensor  # int64 [total]
    offsets: Tensor  # int64 [rows + 1]

    @classmethod
    def from_groups(cls, groups: np.ndarray, values: np.ndarray, n_groups: int) -> Ragged:
        """Group `values` by `groups` (ids 0..n_groups-1), keeping their given order within a group."""
        order = np.argsort(groups, kind="stable")
        counts = np.bincount(groups, minlength=n_groups)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return cls(
            torch.as_tensor(values[order], dtype=torch.long), torch.as_tensor(offsets, dtype=torch.long)
        )

    @classmethod
    def from_lists(cls, lists: pl.Series) -> Ragged:
        """A polars List[int] column (nulls = empty rows) as CSR."""
        lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
        values = (
            lists.explode().drop_nulls().to_numpy().astype(np.int64)
            if lengths.sum()
            else np.zeros(0, np.int64)
        )
        return cls(torch.as_tensor(values), torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)])))

    def to_lists(self, name: str) -> pl.Series:
        """The rows as a polars List[Int64] column (built from the CSR arrays, no Python loop)."""
        array = pa.ListArray.from_arrays(pa.array(self.offsets.numpy()), pa.array(self.values.numpy()))
        return pl.Series(name, pl.from_arrow(array), dtype=pl.List(pl.Int64))

    def to(self, device: torch.device | str) -> Ragged:
        return Ragged(self.values.to(device), self.offsets.to(device))

    @property
    def n_rows(self) -> int:
        return len(self.offsets) - 1

    def select(self, rows: Tensor) -> Ragged:
        """The CSR of rows `rows` (in that order)."""
        lengths = self.lengths(rows)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        owner = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), lengths)
        positions = self.offsets[rows][owner] + torch.arange(len(owner), device=rows.device) - offsets[owner]
        return Ragged(self.values[positions], offsets)

    def count_before(self, times: Tensor, rows: Tensor, t: Tensor) -> Tensor:
        """int64 [B]: entries of row `rows[b]` whose time (in `times`, aligned with `values` and sorted within
        each row) is strictly before `t[b]`. One global searchsorted over (row, time) keys, no Python loop."""
        if len(times) == 0 or len(rows) == 0:  # (min() of an empty tensor raises)
            return torch.zeros_like(rows)
        t_min = int(torch.minimum(times.min(), t.min()))
        span = int(torch.maximum(times.max(), t.max())) - t_min + 1
        owner = torch.repeat_interleave(torch.arange(self.n_rows), self.offsets.diff())
        keys = owner * span + (times - t_min)  # sorted: by row, then time
        probe = rows * span + (t - t_min)
        return torch.searchsorted(keys, probe, right=False) - self.offsets[rows]

    def lengths(self, rows: Tensor) -> Tensor:
        return self.offsets[rows + 1] - self.offsets[rows]

    def gather(
        self,
        rows: Tensor,
        ends: Tensor | None = None,
        max_len: int | None = None,
        times: Tensor | None = None,
    ) -> Seq:
        """The last `max_len` entries of each row before position `ends` (default: the row's end), as a
        right-padded `Seq` in stored order (oldest first, most recent at position lengths-1). With `times`
        (aligned with `values`), the entries' times come along as `Seq.times` from the same positions."""
        device = rows.device
        start_of_row = self.offsets[rows]  # (B,)
        stop = start_of_row + (self.lengths(rows) if ends is None else ends)  # (B,)
        width = int((stop - start_of_row).max().item()) if max_len is None and len(rows) else (max_len or 0)
        lengths = (stop - start_of_row).clamp(max=width)  # (B,)
        first = stop - lengths  # (B,)
        positions = first.unsqueeze(1) + torch.arange(width, device=device)  # (B, L)
        valid = torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)
        if len(self.values) == 0:
            empty = torch.zeros((len(rows), width), dtype=torch.long, device=device)
            return Seq(empty, lengths, None if times is None else empty.clone())
        positions = positions.clamp(max=len(self.values) - 1)
        ids = self.values[positions] * valid  # (B, L), padding -> 0
        return Seq(ids, lengths, None if times is None else times[positions] * valid)
