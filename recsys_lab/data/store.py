"""In-memory feature tables and the tensor-indexing gatherers that turn row indices into whole `Batch`es.

Nothing here touches one sample at a time: a batch of B rows is a handful of `tensor[index]` lookups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from recsys_lab.data.batch import Batch, Seq
from recsys_lab.data.text import build_pair_inputs


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
        return cls(torch.as_tensor(values[order], dtype=torch.long), torch.as_tensor(offsets, dtype=torch.long))

    def count_before(self, times: Tensor, rows: Tensor, t: Tensor) -> Tensor:
        """int64 [B]: entries of row `rows[b]` whose time (in `times`, aligned with `values` and sorted within
        each row) is strictly before `t[b]`. One global searchsorted over (row, time) keys, no Python loop."""
        if len(times) == 0 or len(rows) == 0:  # (min() of an empty tensor raises)
            return torch.zeros_like(rows)
        t_min = int(torch.minimum(times.min(), t.min()))
        span = int(torch.maximum(times.max(), t.max())) - t_min + 1
        owner = torch.repeat_interleave(torch.arange(len(self.offsets) - 1), self.offsets.diff())
        keys = owner * span + (times - t_min)  # sorted: by row, then time
        probe = rows * span + (t - t_min)
        return torch.searchsorted(keys, probe, right=False) - self.offsets[rows]

    def lengths(self, rows: Tensor) -> Tensor:
        return self.offsets[rows + 1] - self.offsets[rows]

    def gather(self, rows: Tensor, ends: Tensor | None = None, max_len: int | None = None) -> Seq:
        """The last `max_len` entries of each row before position `ends` (default: the row's end), as a
        right-padded `Seq` in stored order (oldest first, most recent at position lengths-1)."""
        start_of_row = self.offsets[rows]  # (B,)
        stop = start_of_row + (self.lengths(rows) if ends is None else ends)  # (B,)
        width = int((stop - start_of_row).max().item()) if max_len is None and len(rows) else (max_len or 0)
        lengths = torch.minimum(stop - start_of_row, torch.tensor(width))  # (B,)
        first = stop - lengths  # (B,)
        positions = first.unsqueeze(1) + torch.arange(width)  # (B, L)
        valid = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)
        if len(self.values) == 0:
            return Seq(torch.zeros((len(rows), width), dtype=torch.long), lengths)
        ids = self.values[positions.clamp(max=len(self.values) - 1)] * valid  # (B, L), padding -> 0
        return Seq(ids, lengths)


@dataclass
class TextTables:
    """Item texts tokenized once; pairs are assembled per batch with tensor ops."""

    item_tokens: Tensor  # int64 [N, T_item]
    item_lengths: Tensor  # int64 [N]
    cls_id: int
    sep_id: int
    pad_id: int
    max_length: int
    max_history_items: int


class FeatureStore:
    """Feature tables of one prepared dataset.

    Args:
        user_sparse: user-table categorical columns, each int64 [U] (indexed by user id).
        item_sparse: item-table categorical columns, each int64 [N] (indexed by item id).
        item_dense: item dense columns, float32 [N] or [N, D].
        row_sparse: per-interaction categorical columns (context), each int64 [R].
        labels: per-interaction labels, float32 [R].
        user / item / timestamp: per-interaction ids and times, int64 [R].
        history: each user's positive interactions (item ids) in time order.
        n_prior: int64 [R], positives of the row's user strictly before the row's timestamp.
        history_len: L, the longest history a batch carries.
        history_features: item-table categorical columns gathered along the history (besides the item id).
        text: tokenized item texts, when a language model is used.
    """

    def __init__(
        self,
        *,
        user_key: str,
        item_key: str,
        user_sparse: dict[str, Tensor],
        item_sparse: dict[str, Tensor],
        item_dense: dict[str, Tensor],
        row_sparse: dict[str, Tensor],
        labels: dict[str, Tensor],
        user: Tensor,
        item: Tensor,
        timestamp: Tensor,
        history: Ragged,
        n_prior: Tensor,
        history_len: int,
        history_features: list[str],
        text: TextTables | None,
    ) -> None:
        self.user_key, self.item_key = user_key, item_key
        self.user_sparse, self.item_sparse, self.item_dense = user_sparse, item_sparse, item_dense
        self.row_sparse, self.labels = row_sparse, labels
        self.user, self.item, self.timestamp = user, item, timestamp
        self.history, self.n_prior = history, n_prior
        self.history_len, self.history_features, self.text = history_len, history_features, text

    # ---- pieces ------------------------------------------------------------------------------------------
    def _user_part(self, batch: Batch, users: Tensor) -> None:
        batch.sparse[self.user_key] = users
        for name, table in self.user_sparse.items():
            batch.sparse[name] = table[users]

    def _item_part(self, batch: Batch, items: Tensor) -> None:
        batch.sparse[self.item_key] = items
        for name, table in self.item_sparse.items():
            batch.sparse[name] = table[items]
        for name, table in self.item_dense.items():
            batch.dense[name] = table[items]

    def _history_part(self, batch: Batch, users: Tensor, n_prior: Tensor) -> None:
        hist = self.history.gather(users, ends=n_prior, max_len=self.history_len)  # ids (B, L)
        batch.seq[f"hist_{self.item_key}"] = hist
        for name in self.history_features:
            batch.seq[f"hist_{name}"] = Seq(self.item_sparse[name][hist.ids], hist.lengths)

    # ---- batches -----------------------------------------------------------------------------------------
    def impressions(self, rows: Tensor) -> Batch:
        """One row per interaction: user, context, candidate item, history before it, labels."""
        users, items = self.user[rows], self.item[rows]
        batch = Batch()
        self._user_part(batch, users)
        self._item_part(batch, items)
        for name, column in self.row_sparse.items():
            batch.sparse[name] = column[rows]
        self._history_part(batch, users, self.n_prior[rows])
        for name, column in self.labels.items():
            batch.labels[name] = column[rows]
        if self.text is not None:
            t = self.text
            batch.text = build_pair_inputs(
                t.item_tokens,
                t.item_lengths,
                batch.seq[f"hist_{self.item_key}"],
                items,
                cls_id=t.cls_id,
                sep_id=t.sep_id,
                pad_id=t.pad_id,
                max_length=t.max_length,
                max_history_items=t.max_history_items,
            )
        return batch

    def queries(self, users: Tensor, n_prior: Tensor, targets: Ragged, seen: Ragged, query_rows: Tensor) -> Batch:
        """Full-ranking queries: each user as of the evaluation cutoff (features + the `n_prior` positives
        before it), with the items to find (`eval.targets`) and the items to mask (`eval.seen`) as sequences.
        `query_rows` index `targets` and `seen`."""
        batch = Batch()
        self._user_part(batch, users)
        self._history_part(batch, users, n_prior)
        batch.seq["eval.targets"] = targets.gather(query_rows)
        batch.seq["eval.seen"] = seen.gather(query_rows)
        return batch

    def items_batch(self, items: Tensor) -> Batch:
        """Item-side features only: what `encode_item` reads for the catalogue."""
        batch = Batch()
        self._item_part(batch, items)
        return batch
