"""Feature tables of one prepared dataset and the gatherers that turn row indices into whole `Batch`es.

Nothing here touches one sample at a time: a batch of B rows is a handful of `tensor[index]` lookups. The
schema (`FeatureStore.schema`) is built here, next to the code that writes the features it describes, so a
feature name — the `hist_*` behaviour sequences included — is defined in one place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
from torch import Tensor

from recsys_lab.data.batch import Batch, EvalTargets, Seq
from recsys_lab.data.ragged import Ragged
from recsys_lab.data.sampling import TrainingNegatives
from recsys_lab.data.schema import ContentTable, Feature, Schema
from recsys_lab.data.text import TextSpec, TextTables

if TYPE_CHECKING:
    from recsys_lab.data.prepare import Prepared, PreparedMeta

__all__ = ["EntityTable", "FeatureStore", "Ragged", "history_feature"]

LEVELS = 3  # timeline levels: 0 = train, 1 = train + validation, 2 = train + validation + test


def history_feature(column: str) -> str:
    """Name of the behaviour-sequence feature that carries item column `column` along the history."""
    return f"hist_{column}"


@dataclass
class EntityTable:
    """Features of users or items, indexed by entity (row of the source's table).

    sparse: categorical codes int64 [N] (the id feature included); seq: multi-categorical codes as padded
    int64 [N, G] with lengths [N]; dense: float32 [N] or [N, D].
    """

    sparse: dict[str, Tensor]
    seq: dict[str, tuple[Tensor, Tensor]]
    dense: dict[str, Tensor]

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, side: str, meta: PreparedMeta) -> EntityTable:
        """The encoded columns of a prepared user or item table (see `recsys_lab.data.prepare`)."""
        sparse = {f"{side}_id": torch.as_tensor(frame[f"{side}_id_code"].to_numpy().astype(np.int64))}
        seq, dense = {}, {}
        everyone = torch.arange(frame.height)
        for name, f in meta.features.items():
            if f.side != side:
                continue
            if f.kind == "categorical":
                sparse[name] = torch.as_tensor(frame[name].to_numpy().astype(np.int64))
            elif f.kind == "multi_categorical":
                r = Ragged.from_lists(frame[name])
                seq[name] = (r.gather(everyone, max_len=f.max_len).ids, r.lengths(everyone))
            elif f.kind == "numeric":
                dense[name] = torch.as_tensor(frame[name].to_numpy().astype(np.float32))
            elif f.kind == "dense_vector":
                dense[name] = torch.as_tensor(np.stack(frame[name].to_list()).astype(np.float32))
        return cls(sparse, seq, dense)

    def into(self, batch: Batch, entities: Tensor) -> None:
        for name, table in self.sparse.items():
            batch.sparse[name] = table[entities]
        for name, (ids, lengths) in self.seq.items():
            batch.seq[name] = Seq(ids[entities], lengths[entities])
        for name, table in self.dense.items():
            batch.dense[name] = table[entities]

    def to(self, device: torch.device | str) -> EntityTable:
        return EntityTable(
            {k: v.to(device) for k, v in self.sparse.items()},
            {k: (ids.to(device), lengths.to(device)) for k, (ids, lengths) in self.seq.items()},
            {k: v.to(device) for k, v in self.dense.items()},
        )


def _item_media(items: pl.DataFrame, meta: PreparedMeta, table: EntityTable) -> dict[str, ContentTable]:
    """Every item dense vector, image and audio column as a `ContentTable` by item entity: vectors as the
    feature holds them (standardised; the presence column says which were given), pictures as uint8
    (N, 3, S, S), sounds as float32 (N, T); missing rows are zeros with present False."""
    from recsys_lab.data.prepare import PRESENT  # prepare imports this module

    media = {}
    for name, f in meta.features.items():
        if f.side != "item" or f.kind not in ("dense_vector", "image", "audio"):
            continue
        if f.kind == "dense_vector":  # preparation wrote which vectors were given
            present = torch.as_tensor(items[name + PRESENT].to_numpy())
            media[name] = ContentTable("vector", table.dense[name], present)
            continue
        column = items[name]
        present = column.is_not_null().to_numpy()
        dtype = np.uint8 if f.kind == "image" else np.float32
        values = np.zeros((items.height, f.dim), dtype=dtype)
        if present.any():  # the given rows, flattened and reshaped in one go (no Python loop over items)
            values[present] = column.drop_nulls().explode().to_numpy().astype(dtype).reshape(-1, f.dim)
        values_t = torch.as_tensor(values)
        if f.kind == "image":
            side = int(round((f.dim / 3) ** 0.5))
            values_t = values_t.reshape(-1, side, side, 3).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
        media[name] = ContentTable(f.kind, values_t, torch.as_tensor(present))
    return media


class FeatureStore:
    """Feature tables of one prepared dataset and the gatherers that build whole batches from row indices.

    Build it with `FeatureStore.from_prepared`; the constructor takes the finished tables.

    Args:
        meta: the prepared dataset's feature kinds, vocabularies and labels.
        users / items: entity tables (see `EntityTable`); `items.sparse["item_id"]` holds item codes.
        item_entity: int64 [V], the entity of each item code (code 0, "unknown", points at entity 0 and is
            never a candidate).
        row_sparse: per-interaction categorical codes (context), each int64 [R].
        row_dense: per-interaction numeric context values (standardised), each float32 [R].
        labels: per-interaction labels, float32 [R].
        user / item / split / timestamp: per-interaction entity indices, split codes and times, int64 [R].
        positive: bool [R], the interaction is a positive (a click, a rating above the threshold).
        timelines: per split level s (0 train, 1 +validation, 2 +test), each user's positives of splits <= s
            as item entities in time order. A row of split s reads timeline s, so a training row never sees a
            validation or test interaction.
        timeline_times: per level, the timestamp of every timeline entry (aligned with its values).
        n_prior: int64 [R], the row's user's positives in its timeline strictly before the row's timestamp.
        history_len: L, the most recent positives a batch carries.
        history_features: item categorical columns gathered along the history besides the item id.
        text: tokenized item texts (indexed by entity), when a language model is used.
        item_texts: every item entity's raw text (the source's item text column), or None without one: models
            that tokenize with their own tokenizer (the LLM ranker) read it through `Schema.item_texts`.
        item_media: the item modalities content models read (`ContentTable` per item column, indexed by
            entity): every item dense vector, image and audio column, with which items have it. Reach
            models through `Schema.item_content`, by code; never gathered into batches.
        gather_history: False leaves the `hist_*` features (and text pairs) out of every batch: for models
            that read ids only (`reads_history = False`), whose training batches would otherwise spend most
            of their gathering on histories nobody reads. See `without_history`.
    """

    item_key = "item_id"

    def __init__(
        self,
        *,
        meta: PreparedMeta,
        users: EntityTable,
        items: EntityTable,
        item_entity: Tensor,
        row_sparse: dict[str, Tensor],
        labels: dict[str, Tensor],
        row_dense: dict[str, Tensor] | None = None,
        user: Tensor,
        item: Tensor,
        split: Tensor,
        timestamp: Tensor,
        positive: Tensor,
        timelines: list[Ragged],
        timeline_times: list[Tensor],
        n_prior: Tensor,
        history_len: int,
        history_features: list[str],
        text: TextTables | None,
        gather_history: bool = True,
        item_texts: list[str] | None = None,
        item_media: dict[str, ContentTable] | None = None,
    ) -> None:
        self.meta = meta
        self.users, self.items, self.item_entity = users, items, item_entity
        self.row_sparse, self.labels = row_sparse, labels
        self.row_dense = dict(row_dense or {})
        self.user, self.item, self.split, self.timestamp, self.positive = (
            user,
            item,
            split,
            timestamp,
            positive,
        )
        self.timelines, self.timeline_times, self.n_prior = timelines, timeline_times, n_prior
        self.history_len, self.history_features, self.text = history_len, history_features, text
        self.gather_history = gather_history
        self.item_texts = item_texts
        self.item_media = dict(item_media or {})
        self.features_gathered = "all"  # "ids" after `ids_only()`

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_prepared(
        cls,
        prepared: Prepared,
        history_len: int,
        history_features: list[str] | tuple[str, ...] = (),
        text: TextSpec | None = None,
        context: bool = True,
    ) -> FeatureStore:
        """Tables, timelines and history counts of a prepared dataset; item texts tokenized once if `text`;
        without the interaction context features (hour, device, ...) if not `context`."""
        meta = prepared.meta if context else prepared.meta.without_context()
        item_categoricals = meta.columns("item", "categorical")
        for name in history_features:
            if name not in item_categoricals:
                raise ValueError(
                    f"data.history_features: '{name}' is not a categorical item column; item columns are "
                    f"{sorted(item_categoricals)}"
                )
        rows = prepared.rows
        user = torch.as_tensor(rows["user"].to_numpy().astype(np.int64))
        item = torch.as_tensor(rows["item"].to_numpy().astype(np.int64))
        split = torch.as_tensor(rows["split"].to_numpy().astype(np.int64))
        ts = torch.as_tensor(rows["timestamp"].to_numpy().astype(np.int64))
        positive = torch.as_tensor(rows["positive"].to_numpy())
        n_users, n_items = prepared.users.height, prepared.items.height

        # timelines: positives of splits <= level, per user in time order
        order = np.lexsort((ts.numpy(), user.numpy()))
        timelines, timeline_ts = [], []
        for level in range(LEVELS):
            keep = order[positive.numpy()[order] & (split.numpy()[order] <= level)]
            timelines.append(Ragged.from_groups(user.numpy()[keep], item.numpy()[keep], n_users))
            timeline_ts.append(torch.as_tensor(ts.numpy()[keep]))
        n_prior = torch.zeros_like(user)
        for level in range(LEVELS):
            at = (split == level).nonzero().squeeze(1)
            n_prior[at] = timelines[level].count_before(timeline_ts[level], user[at], ts[at])

        item_code = torch.as_tensor(prepared.items["item_id_code"].to_numpy().astype(np.int64))
        item_entity = torch.zeros(meta.vocab_sizes["item_id"], dtype=torch.long)
        known = item_code > 0
        item_entity[item_code[known]] = torch.arange(n_items)[known]

        items = EntityTable.from_frame(prepared.items, "item", meta)
        text_tables = None
        if text is not None:
            if meta.item_text is None:
                raise ValueError("data.text is set but this data source has no item text column")
            text_tables = TextTables.tokenize(text, prepared.items[meta.item_text].to_list())
        return cls(
            meta=meta,
            users=EntityTable.from_frame(prepared.users, "user", meta),
            items=items,
            item_entity=item_entity,
            row_sparse={
                c: torch.as_tensor(rows[c].to_numpy().astype(np.int64))
                for c in meta.context
                if meta.features[c].kind == "categorical"
            },
            row_dense={
                c: torch.as_tensor(rows[c].to_numpy().astype(np.float32))
                for c in meta.context
                if meta.features[c].kind == "numeric"
            },
            labels={c: torch.as_tensor(rows[c].to_numpy().astype(np.float32)) for c in meta.labels},
            user=user,
            item=item,
            split=split,
            timestamp=ts,
            positive=positive,
            timelines=timelines,
            timeline_times=timeline_ts,
            n_prior=n_prior,
            history_len=history_len,
            history_features=list(history_features),
            text=text_tables,
            item_texts=[t or "" for t in prepared.items[meta.item_text].to_list()]
            if meta.item_text
            else None,
            item_media=_item_media(prepared.items, meta, items),
        )

    def schema(self) -> Schema:
        """Every feature a batch of this store carries, with training statistics (vocabularies, popularity)."""
        v, L = self.meta.vocab_sizes, self.history_len
        feats = [Feature("user_id", "sparse", "user", vocab_size=v["user_id"])]
        feats.append(Feature(self.item_key, "sparse", "item", vocab_size=v[self.item_key]))
        for name, f in self.meta.features.items():
            if f.kind == "categorical":
                feats.append(Feature(name, "sparse", f.side, vocab_size=v[name]))
            elif f.kind == "multi_categorical":
                feats.append(Feature(name, "seq", f.side, vocab_size=v[name], max_len=f.max_len))
            elif f.kind in ("numeric", "dense_vector"):
                feats.append(Feature(name, "dense", f.side, dim=f.dim))
        for column in [self.item_key, *self.history_features]:  # what `_history_part` writes
            name = history_feature(column)
            feats.append(Feature(name, "seq", "user", vocab_size=v[column], max_len=L, embed_as=column))
        if self.text is not None and self.text.pairs:
            feats.append(Feature("pair_text", "text", "context", max_len=self.text.max_length))
        return Schema(
            feats,
            labels=list(self.meta.labels),
            item_counts=self.item_counts,
            train_pairs=self.train_pairs(),
            first_cold_item=self.meta.first_cold_item,
            item_text=self.text.by_code(self.item_entity) if self.text is not None else None,
            item_texts=self.texts_by_code(),
            item_content={name: t.by_code(self.item_entity) for name, t in self.item_media.items()},
        )

    def texts_by_code(self) -> list[str] | None:
        """The raw text of every item code (code 0, unknown, is ""), or None when the source has none."""
        if self.item_texts is None:
            return None
        texts = [self.item_texts[e] for e in self.item_entity.tolist()]
        texts[0] = ""
        return texts

    def train_positive_rows(self) -> Tensor:
        """int64 [P]: every positive interaction of the training split (the whole split, never a subsample)."""
        return ((self.split == 0) & self.positive).nonzero().squeeze(1)

    def train_pairs(self) -> Tensor:
        """int64 [P, 2]: (user code, item code) of every positive training interaction."""
        rows = self.train_positive_rows()
        users = self.users.sparse["user_id"][self.user[rows]]
        return torch.stack([users, self.item_codes(self.item[rows])], dim=1)

    def training_negatives(self, sampler, seed: int) -> TrainingNegatives:
        """Fresh negatives per batch from `sampler`, never one of the user's training positives."""
        rows = self.train_positive_rows()
        return TrainingNegatives(
            sampler,
            self.user[rows],
            self.item_codes(self.item[rows]),
            self.num_item_codes,
            self.item_counts,
            seed,
        )

    @property
    def item_counts(self) -> Tensor:
        """float32 [V]: positive training interactions per item code (code 0 is 0)."""
        return torch.as_tensor(self.meta.item_counts, dtype=torch.float32)

    @property
    def num_item_codes(self) -> int:
        return len(self.item_entity)

    def item_codes(self, entities: Tensor) -> Tensor:
        """Item codes of item entities (0 for items unknown to the training vocabulary)."""
        return self.items.sparse[self.item_key][entities]

    def to(self, device: torch.device | str) -> FeatureStore:
        """A copy whose gatherers build batches directly on `device` (no host round trip per batch)."""
        return FeatureStore(
            meta=self.meta,
            users=self.users.to(device),
            items=self.items.to(device),
            item_entity=self.item_entity.to(device),
            row_sparse={k: v.to(device) for k, v in self.row_sparse.items()},
            row_dense={k: v.to(device) for k, v in self.row_dense.items()},
            labels={k: v.to(device) for k, v in self.labels.items()},
            user=self.user.to(device),
            item=self.item.to(device),
            split=self.split.to(device),
            timestamp=self.timestamp.to(device),
            positive=self.positive.to(device),
            timelines=[t.to(device) for t in self.timelines],
            timeline_times=[t.to(device) for t in self.timeline_times],
            n_prior=self.n_prior.to(device),
            history_len=self.history_len,
            history_features=self.history_features,
            text=self.text.to(device) if self.text is not None else None,
            gather_history=self.gather_history,
            item_texts=self.item_texts,
            item_media=self.item_media,  # read by models (which move it themselves), never by the gatherers
        )

    def without_history(self) -> FeatureStore:
        """The same tables (shared, not copied) with batches that carry no history features."""
        store = copy.copy(self)
        store.gather_history = False
        return store

    def ids_only(self) -> FeatureStore:
        """The same rows with batches that carry only the user and item ids (and labels, targets): for
        models that read nothing else (`reads_features = False`), whose small steps (BPR: ~3 ms) would
        otherwise spend a sixth of their time gathering user, item and context features nobody reads."""
        store = self.without_history()
        store.users = EntityTable({"user_id": self.users.sparse["user_id"]}, {}, {})
        store.items = EntityTable({self.item_key: self.items.sparse[self.item_key]}, {}, {})
        store.row_sparse, store.row_dense = {}, {}
        store.features_gathered = "ids"
        return store

    # ---- pieces ------------------------------------------------------------------------------------------
    def _history_part(self, batch: Batch, users: Tensor, level: Tensor, n_prior: Tensor) -> Seq | None:
        """Item-entity history of each row (its timeline level, `n_prior` entries), as codes and features;
        nothing (None) when the store gathers no history."""
        if not self.gather_history:
            return None
        L = self.history_len
        zeros = torch.zeros(len(users), L, dtype=torch.long, device=users.device)
        hist = Seq(zeros, torch.zeros_like(users), zeros.clone())  # item entities, lengths, timestamps
        for lvl in torch.unique(level).tolist():
            at = (level == lvl).nonzero().squeeze(1)
            part = self.timelines[lvl].gather(users[at], n_prior[at], L, times=self.timeline_times[lvl])
            hist.ids[at], hist.lengths[at], hist.times[at] = part.ids, part.lengths, part.times
        self.write_history(batch, hist)
        return hist

    def write_history(self, batch: Batch, hist: Seq) -> None:
        """The `hist_*` features of item-entity histories (B, L): item codes (with the times) and the
        `history_features` columns. Padded positions read entity 0 and stay masked by the lengths. Also what
        serving writes for a request's history (`recsys_lab.serving.requests`)."""
        if not self.gather_history:
            return
        batch.seq[history_feature(self.item_key)] = Seq(self.item_codes(hist.ids), hist.lengths, hist.times)
        for column in self.history_features:
            batch.seq[history_feature(column)] = Seq(self.items.sparse[column][hist.ids], hist.lengths)

    def unknown_context(self, batch: Batch, users: Tensor) -> None:
        """Context of a request whose interaction has not happened yet (a ranking query, a next-item
        prediction): categorical context is code 0 ("unknown") and numeric context 0 (its training mean)."""
        for name in self.row_sparse:
            batch.sparse[name] = torch.zeros_like(users)
        for name in self.row_dense:
            batch.dense[name] = torch.zeros(len(users), device=users.device)

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
        for name, column in self.row_dense.items():
            batch.dense[name] = column[rows]
        hist = self._history_part(batch, users, self.split[rows], self.n_prior[rows])
        for name, column in self.labels.items():
            batch.labels[name] = column[rows]
        if self.text is not None and self.text.pairs and hist is not None:
            batch.text = self.text.pair_inputs(hist, items)
        return batch

    def histories(self, rows: Tensor) -> Batch:
        """The user side of interaction rows, without their item: user features, unknown context (code 0) and
        the history strictly before each row (what a next-item model reads to predict the row's item)."""
        users = self.user[rows]
        batch = Batch()
        self.users.into(batch, users)
        self.unknown_context(batch, users)
        self._history_part(batch, users, self.split[rows], self.n_prior[rows])
        return batch

    def with_negatives(self, rows: Tensor, negative_codes: Tensor) -> Batch:
        """Positive rows followed by their sampled negatives [B, n] (same user, context and history; the
        candidate replaced; every label 0)."""
        n = negative_codes.shape[1]
        positives = self.impressions(rows)
        negatives = self.impressions(rows.repeat_interleave(n), self.item_entity[negative_codes.reshape(-1)])
        negatives.labels = {k: torch.zeros_like(v) for k, v in negatives.labels.items()}
        return Batch.concat([positives, negatives])

    def _query_part(self, users: Tensor, level: int) -> tuple[Batch, Seq | None]:
        """A query as of an evaluation cutoff: user features, unknown context (code 0) and every positive of
        timeline `level` as history. Returns the batch and the history as item entities."""
        batch = Batch()
        self.users.into(batch, users)
        self.unknown_context(batch, users)
        levels = torch.full_like(users, level)
        hist = self._history_part(batch, users, levels, self.timelines[level].lengths(users))
        return batch, hist

    def query_batch(self, targets: EvalTargets, level: int) -> Batch:
        """Ranking queries of users `targets.user` (see `_query_part`) carrying their evaluation targets."""
        batch, _ = self._query_part(targets.user, level)
        batch.eval = targets
        return batch

    def pairs(self, users: Tensor, level: int, codes: Tensor) -> Batch:
        """(query, candidate) rows for models without separate encoders: user entities [B] x item codes
        [B, C] -> B*C rows, query-major, each a query (see `_query_part`) with one candidate."""
        B, C = codes.shape
        users = users.repeat_interleave(C)  # (B*C,)
        items = self.item_entity[codes.reshape(-1)]  # (B*C,)
        batch, hist = self._query_part(users, level)
        self.items.into(batch, items)
        if self.text is not None and self.text.pairs and hist is not None:
            batch.text = self.text.pair_inputs(hist, items)
        return batch

    def items_batch(self, codes: Tensor) -> Batch:
        """Item-side features of item codes: what `encode_item` reads for the catalogue."""
        batch = Batch()
        self.items.into(batch, self.item_entity[codes])
        return batch
