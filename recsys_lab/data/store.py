"""In-memory feature tables and the tensor-indexing gatherers that turn row indices into whole `Batch`es.

Nothing here touches one sample at a time: a batch of B rows is a handful of `tensor[index]` lookups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
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


@dataclass
class EntityTable:
    """Features of users or items, indexed by entity (row of the source's table).

    sparse: categorical codes int64 [N] (the id feature included); seq: multi-categorical codes as padded
    int64 [N, G] with lengths [N]; dense: float32 [N] or [N, D].
    """

    sparse: dict[str, Tensor]
    seq: dict[str, tuple[Tensor, Tensor]]
    dense: dict[str, Tensor]

    def into(self, batch: Batch, entities: Tensor) -> None:
        for name, table in self.sparse.items():
            batch.sparse[name] = table[entities]
        for name, (ids, lengths) in self.seq.items():
            batch.seq[name] = Seq(ids[entities], lengths[entities])
        for name, table in self.dense.items():
            batch.dense[name] = table[entities]


class FeatureStore:
    """Feature tables of one prepared dataset and the gatherers that build whole batches from row indices.

    Args:
        users / items: entity tables (see `EntityTable`); `item_key` in `items.sparse` holds item codes.
        item_entity: int64 [V], the entity of each item code (code 0, "unknown", points at entity 0 and is
            never a candidate).
        row_sparse: per-interaction categorical codes (context), each int64 [R].
        labels: per-interaction labels, float32 [R].
        user / item / split: per-interaction entity indices and split codes, int64 [R].
        timelines: per split level s (0 train, 1 +validation, 2 +test), each user's positives of splits <= s
            as item entities in time order. A row of split s reads timeline s, so a training row never sees a
            validation or test interaction.
        n_prior: int64 [R], the row's user's positives in its timeline strictly before the row's timestamp.
        history_len: L, the most recent positives a batch carries.
        history_features: item categorical columns gathered along the history besides the item id.
        text: tokenized item texts (indexed by entity), when a language model is used.
    """

    def __init__(
        self,
        *,
        item_key: str,
        users: EntityTable,
        items: EntityTable,
        item_entity: Tensor,
        row_sparse: dict[str, Tensor],
        labels: dict[str, Tensor],
        user: Tensor,
        item: Tensor,
        split: Tensor,
        timelines: list[Ragged],
        n_prior: Tensor,
        history_len: int,
        history_features: list[str],
        text: TextTables | None,
    ) -> None:
        self.item_key = item_key
        self.users, self.items, self.item_entity = users, items, item_entity
        self.row_sparse, self.labels = row_sparse, labels
        self.user, self.item, self.split = user, item, split
        self.timelines, self.n_prior = timelines, n_prior
        self.history_len, self.history_features, self.text = history_len, history_features, text

    # ---- pieces ------------------------------------------------------------------------------------------
    def _history_part(self, batch: Batch, users: Tensor, level: Tensor, n_prior: Tensor) -> Seq:
        """Item-entity history of each row (its timeline level, `n_prior` entries), as codes and features."""
        hist = None
        for lvl in torch.unique(level).tolist():
            at = (level == lvl).nonzero().squeeze(1)
            part = self.timelines[lvl].gather(users[at], ends=n_prior[at], max_len=self.history_len)
            if hist is None:
                hist = Seq(
                    torch.zeros(len(users), self.history_len, dtype=torch.long), torch.zeros_like(users)
                )
            hist.ids[at], hist.lengths[at] = part.ids, part.lengths
        if hist is None:
            hist = Seq(torch.zeros(0, self.history_len, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        # entities -> codes and item features (padded positions read entity 0 and stay masked by lengths)
        batch.seq[f"hist_{self.item_key}"] = Seq(self.items.sparse[self.item_key][hist.ids], hist.lengths)
        for name in self.history_features:
            batch.seq[f"hist_{name}"] = Seq(self.items.sparse[name][hist.ids], hist.lengths)
        return hist

    def _text_part(self, batch: Batch, hist_entities: Seq, item_entities: Tensor) -> None:
        t = self.text
        batch.text = build_pair_inputs(
            t.item_tokens,
            t.item_lengths,
            hist_entities,
            item_entities,
            cls_id=t.cls_id,
            sep_id=t.sep_id,
            pad_id=t.pad_id,
            max_length=t.max_length,
            max_history_items=t.max_history_items,
        )

    # ---- batches -----------------------------------------------------------------------------------------
    def impressions(self, rows: Tensor, items: Tensor | None = None) -> Batch:
        """One row per interaction: user, context, candidate item, the history before it, labels.
        `items` (entities) replaces the rows' items, e.g. with sampled negatives."""
        users = self.user[rows]
        items = self.item[rows] if items is None else items
        batch = Batch()
        self.users.into(batch, users)
        self.items.into(batch, items)
        for name, column in self.row_sparse.items():
            batch.sparse[name] = column[rows]
        hist = self._history_part(batch, users, self.split[rows], self.n_prior[rows])
        for name, column in self.labels.items():
            batch.labels[name] = column[rows]
        if self.text is not None:
            self._text_part(batch, hist, items)
        return batch

    def with_negatives(self, rows: Tensor, negative_codes: Tensor) -> Batch:
        """Positive rows followed by their sampled negatives [B, n] (same user, context and history; the
        candidate replaced; every label 0)."""
        n = negative_codes.shape[1]
        positives = self.impressions(rows)
        negatives = self.impressions(rows.repeat_interleave(n), self.item_entity[negative_codes.reshape(-1)])
        negatives.labels = {k: torch.zeros_like(v) for k, v in negatives.labels.items()}
        return Batch.concat([positives, negatives])

    def _query_part(self, users: Tensor, level: int) -> tuple[Batch, Seq]:
        """A query as of an evaluation cutoff: user features, unknown context (code 0) and every positive of
        timeline `level` as history. Returns the batch and the history as item entities."""
        batch = Batch()
        self.users.into(batch, users)
        for name in self.row_sparse:
            batch.sparse[name] = torch.zeros_like(users)
        levels = torch.full_like(users, level)
        hist = self._history_part(batch, users, levels, self.timelines[level].lengths(users))
        return batch, hist

    def queries(self, users: Tensor, level: int, eval_seqs: dict[str, Seq]) -> Batch:
        """Ranking queries (see `_query_part`) plus the evaluation sequences (targets, seen, candidates;
        item codes)."""
        batch, _ = self._query_part(users, level)
        batch.seq.update(eval_seqs)
        batch.sparse["eval.user"] = users  # entity index: lets the evaluator build (query, candidate) pairs
        return batch

    def pairs(self, users: Tensor, level: int, codes: Tensor) -> Batch:
        """(query, candidate) rows for models without separate encoders: user entities [B] x item codes
        [B, C] -> B*C rows, query-major, each a query (see `_query_part`) with one candidate."""
        B, C = codes.shape
        users = users.repeat_interleave(C)  # (B*C,)
        items = self.item_entity[codes.reshape(-1)]  # (B*C,)
        batch, hist = self._query_part(users, level)
        self.items.into(batch, items)
        if self.text is not None:
            self._text_part(batch, hist, items)
        return batch

    def items_batch(self, codes: Tensor) -> Batch:
        """Item-side features of item codes: what `encode_item` reads for the catalogue."""
        batch = Batch()
        self.items.into(batch, self.item_entity[codes])
        return batch
