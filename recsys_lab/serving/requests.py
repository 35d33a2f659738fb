"""Served requests in the data's own terms: raw user and item ids, raw context values and filters, encoded with
the vocabularies the model was trained with, and gathered into the `Batch` every model reads.

A request is a user (a raw id), a list of recent items (raw ids), or both; anything the training data did not
know is a normal path, never an error:

- an unknown user reads the "unknown" user row (code 0, features at their training mean), like any user the
  training split never saw;
- an item of the catalogue that was never a training positive keeps its features and content (its id reads
  code 0, "unknown"); an item id the catalogue does not have at all is left out of the history and reported
  back in `EncodedRequests.unknown_items`, never dropped silently;
- a context value outside the training vocabulary is code 0, a missing context column is "unknown" as in
  ranking evaluation (`FeatureStore.unknown_context`).

A known user's history is every positive of the prepared log (the deployment view: all splits) plus the events
posted since the service started (`OnlineHistories`), then the request's own recent items, most recent last.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recsys_lab.data.batch import Batch, Seq
from recsys_lab.data.store import LEVELS, FeatureStore


class RequestError(ValueError):
    """A request the data cannot answer as asked (an unknown filter column, a malformed value): a 4xx."""


@dataclass
class Filters:
    """Business rules on the recommended items.

    Args:
        include: {item categorical column: raw values}: only items whose value is one of them.
        ranges: {item numeric column: (low, high)} in the column's raw units (either bound None: open).
        exclude_items: raw item ids never to recommend.
    """

    include: dict[str, list[Any]] = field(default_factory=dict)
    ranges: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    exclude_items: list[Any] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.include or self.ranges or self.exclude_items)


@dataclass
class Request:
    """One recommendation request: `user_id` and / or recent `items` (raw ids), or a free-text search `text`
    (retrieval models with `encode_text`), how many items, the interaction's context ({context column: raw
    value}) and the filters."""

    user_id: Any = None
    items: list[Any] = field(default_factory=list)
    text: str | None = None
    k: int = 10
    context: dict[str, Any] = field(default_factory=dict)
    filters: Filters = field(default_factory=Filters)


@dataclass
class EncodedRequests:
    """B requests as model input: the query `batch` (user features, context, history), the history as item
    codes (B, L) with lengths, which users were known, and the ids that were not."""

    batch: Batch
    history: Seq  # item entities, right-padded, most recent last
    known_user: Tensor  # bool (B,)
    unknown_items: list[list[Any]]
    exclude: list[np.ndarray]  # item codes to leave out per request (seen items and excluded ids)
    texts: list[str | None] = field(default_factory=list)  # free-text searches (None: none), per request


class OnlineHistories:
    """Positives posted to the service (`POST /events`) since it started, by raw user id (as a string), each a
    list of raw item ids, appended to the prepared log's timelines; thread-safe. Raw ids, not table rows: a
    reloaded pipeline, prepared on other data, reads them through its own tables."""

    def __init__(self) -> None:
        self._items: dict[str, list[Any]] = {}
        self._lock = threading.Lock()

    def add(self, user_id: Any, item_id: Any) -> None:
        with self._lock:
            self._items.setdefault(str(user_id), []).append(item_id)

    def get(self, user_id: Any) -> list[Any]:
        with self._lock:
            return list(self._items.get(str(user_id), ()))

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._items.values())


def _raw_index(values: Sequence[Any]) -> dict[str, int]:
    """str(raw id) -> row: requests arrive as JSON (an id may come as 7 or "7"), the tables keep their dtype."""
    return {str(v): i for i, v in enumerate(values)}


class RequestEncoder:
    """Turns `Request`s into model batches with a run's vocabularies and tables (see the module docstring).

    Args:
        store: the run's feature store (its tables, vocabularies and timelines).
        users_raw / items_raw: the raw id of every user / item entity (the prepared tables' `user_id` /
            `item_id` columns, in entity order).
        online: positives posted since start; None: none.
    """

    def __init__(
        self,
        store: FeatureStore,
        users_raw: Sequence[Any],
        items_raw: Sequence[Any],
        online: OnlineHistories | None = None,
    ) -> None:
        self.store, self.meta = store, store.meta
        self.user_entity = _raw_index(users_raw)
        self.item_entity = _raw_index(items_raw)
        self.items_raw = list(items_raw)
        self.online = online if online is not None else OnlineHistories()
        # raw id of every item code (code 0 and codes without an entity: None)
        codes = store.item_codes(torch.arange(len(items_raw))).numpy()
        self.code_raw: list[Any] = [None] * store.num_item_codes
        for entity, code in enumerate(codes):
            if code > 0:
                self.code_raw[code] = self.items_raw[entity]
        self._vocab = {c: {v: i + 1 for i, v in enumerate(vs)} for c, vs in self.meta.vocabularies.items()}
        self._raw_numeric: dict[str, np.ndarray] = {}

    # ---- ids ----------------------------------------------------------------------------------------------
    def item_entities(self, raw: Sequence[Any]) -> tuple[list[int], list[Any]]:
        """Entities of raw item ids in order, and the ids the catalogue does not have (left out)."""
        entities, unknown = [], []
        for r in raw:
            entity = self.item_entity.get(str(r))
            if entity is None:
                unknown.append(r)
            else:
                entities.append(entity)
        return entities, unknown

    def item_codes(self, raw: Sequence[Any]) -> tuple[list[int], list[Any]]:
        """Codes of raw item ids in order (0 for catalogue items the model has no id for), and the ids the
        catalogue does not have (left out)."""
        entities, unknown = self.item_entities(raw)
        return self.store.item_codes(torch.tensor(entities, dtype=torch.long)).tolist(), unknown

    def user_entity_of(self, raw: Any) -> int | None:
        return None if raw is None else self.user_entity.get(str(raw))

    def encode_value(self, column: str, value: Any) -> float | int:
        """A raw value of a categorical or numeric column as the model reads it (code / standardised)."""
        f = self.meta.features.get(column)
        if f is None:
            raise RequestError(f"'{column}' is not a feature of this model's data")
        if f.kind == "categorical":
            stats = self.meta.normalisers.get(column)
            if stats is not None and "boundaries" in stats:  # a bucketised numeric column
                x = _number(column, value)
                return int(1 + np.searchsorted(stats["boundaries"], x, side="right"))
            return self._vocab.get(column, {}).get(str(value), 0)
        if f.kind == "numeric":
            x = _number(column, value)
            stats = self.meta.normalisers[column]
            if stats.get("log1p"):
                x = math.log1p(max(x, 0.0))
            return float((x - stats["mean"][0]) / stats["std"][0])
        raise RequestError(f"'{column}' is a {f.kind} feature: requests can set categorical or numeric ones")

    def raw_numeric(self, column: str) -> np.ndarray:
        """A numeric item column per item code in raw units (the standardisation undone): range filters.
        Computed once per column (read-only afterwards, so safe across request threads)."""
        if column not in self._raw_numeric:
            stats = self.meta.normalisers[column]
            z = self.store.items.dense[column][self.store.item_entity].numpy().astype(np.float64)
            x = z * stats["std"][0] + stats["mean"][0]
            self._raw_numeric[column] = np.expm1(x) if stats.get("log1p") else x
        return self._raw_numeric[column]

    # ---- filters -------------------------------------------------------------------------------------------
    def allowed(self, filters: Filters) -> np.ndarray | None:
        """bool (V,): the item codes the category and range filters admit (code 0 never); None when there are
        none. Excluded ids are not here: they join each request's exclusions (`encode`), which every retrieval
        path filters, the index's included."""
        if not (filters.include or filters.ranges):
            return None
        ok = np.ones(self.store.num_item_codes, dtype=bool)
        ok[0] = False
        for column, values in filters.include.items():
            f = self.meta.features.get(column)
            if f is None or f.side != "item" or f.kind != "categorical":
                raise RequestError(f"filters.include: '{column}' is not a categorical item column")
            wanted = [self.encode_value(column, v) for v in values]
            codes = self.store.items.sparse[column][self.store.item_entity].numpy()
            ok &= np.isin(codes, [w for w in wanted if w > 0])
        for column, (low, high) in filters.ranges.items():
            f = self.meta.features.get(column)
            if f is None or f.side != "item" or f.kind != "numeric":
                raise RequestError(f"filters.ranges: '{column}' is not a numeric item column")
            values = self.raw_numeric(column)
            # the raw values are rebuilt from float32 standardised ones: a bound equal to an item's value must
            # admit it, so the bounds get a relative tolerance well above that rounding (~1e-6)
            if low is not None:
                low = _number(f"filters.ranges.{column}", low)
                ok &= values >= low - 1e-5 * max(1.0, abs(low))
            if high is not None:
                high = _number(f"filters.ranges.{column}", high)
                ok &= values <= high + 1e-5 * max(1.0, abs(high))
        return ok

    # ---- batches ------------------------------------------------------------------------------------------
    def encode(self, requests: Sequence[Request], exclude_seen: bool = True) -> EncodedRequests:
        """The query batch of B requests (see the module docstring)."""
        store, L = self.store, self.store.history_len
        B = len(requests)
        entities = [self.user_entity_of(r.user_id) for r in requests]
        known = torch.tensor([e is not None for e in entities])
        users = torch.tensor([e if e is not None else 0 for e in entities], dtype=torch.long)
        batch = Batch()
        store.users.into(batch, users)
        _blank_unknown_users(batch, ~known)
        store.unknown_context(batch, users)
        for b, r in enumerate(requests):
            for column, value in r.context.items():
                f = self.meta.features.get(column)
                if f is None or f.side != "context" or column not in self.meta.context:
                    raise RequestError(
                        f"context: '{column}' is not a context feature of this model's data; context "
                        f"features are {sorted(self.meta.context)}"
                    )
                target = batch.sparse if f.kind == "categorical" else batch.dense
                target[column][b] = self.encode_value(column, value)

        full = store.timelines[LEVELS - 1]  # every positive of the log: the deployment view
        histories, unknown_items, exclude = [], [], []
        for b, r in enumerate(requests):
            past: list[int] = []  # item entities, oldest first
            if entities[b] is not None:
                past = full.values[full.offsets[entities[b]] : full.offsets[entities[b] + 1]].tolist()
            if r.user_id is not None:  # events posted since the start (ids the catalogue lacks are skipped)
                past += self.item_entities(self.online.get(r.user_id))[0]
            given, missing = self.item_entities(r.items)
            histories.append(past + given)
            unknown_items.append(missing)
            seen = store.item_codes(torch.tensor(past + given if exclude_seen else [], dtype=torch.long))
            banned, _ = self.item_codes(r.filters.exclude_items)
            exclude.append(np.unique(np.concatenate([seen.numpy(), np.asarray(banned, dtype=np.int64)])))

        ids = torch.zeros(B, L, dtype=torch.long)  # item entities
        lengths = torch.zeros(B, dtype=torch.long)
        for b, h in enumerate(histories):
            recent = h[-L:]  # the L most recent, most recent last (the timelines' order)
            ids[b, : len(recent)] = torch.tensor(recent, dtype=torch.long)
            lengths[b] = len(recent)
        history = Seq(ids, lengths, torch.zeros_like(ids))  # no times: the request is now
        store.write_history(batch, history)
        return EncodedRequests(batch, history, known, unknown_items, exclude, [r.text for r in requests])

    def encode_stored(self, users: Tensor, level: int, exclude: list[np.ndarray]) -> EncodedRequests:
        """Queries of user entities as of a timeline level (the offline evaluation of the pipeline: level 1 is
        the test queries' view, train + validation), gathered exactly as ranking evaluation gathers them."""
        batch, hist = self.store._query_part(users, level)
        if hist is None:  # a model that reads no history: an empty one for the explanations
            hist = Seq(torch.zeros(len(users), 1, dtype=torch.long), torch.zeros_like(users))
        known = torch.ones(len(users), dtype=torch.bool)
        return EncodedRequests(batch, Seq(hist.ids, hist.lengths), known, [[] for _ in users], exclude)

    def candidate_rows(self, encoded: EncodedRequests, codes: Tensor) -> Batch:
        """(query, candidate) rows: each of the B queries with each of its C candidate item codes, query-major
        (B*C rows), with the candidates' item features: what a ranker's `forward` reads."""
        B, C = codes.shape
        rows = encoded.batch.select(torch.arange(B).repeat_interleave(C))
        items = self.store.item_entity[codes.reshape(-1)]
        self.store.items.into(rows, items)
        text = self.store.text
        if text is not None and text.pairs and self.store.gather_history:  # a cross-encoder's pair text
            hist = encoded.history
            rows.text = text.pair_inputs(
                Seq(hist.ids.repeat_interleave(C, 0), hist.lengths.repeat_interleave(C)), items
            )
        return rows


def _blank_unknown_users(batch: Batch, unknown: Tensor) -> None:
    """Rows of users the data does not know read the "unknown" user: code 0, empty lists, mean features."""
    if not unknown.any():
        return
    for value in batch.sparse.values():
        value[unknown] = 0
    for seq in batch.seq.values():
        seq.lengths[unknown] = 0
    for value in batch.dense.values():
        value[unknown] = 0.0


def _number(column: str, value: Any) -> float:
    try:  # a JSON integer may have any number of digits: beyond float's range it is no usable number
        x = float(value) if not isinstance(value, (bool, str)) and isinstance(value, (int, float)) else None
    except OverflowError:
        x = None
    if x is None or not math.isfinite(x):
        shown = repr(value) if len(repr(value)) < 40 else repr(value)[:37] + "..."
        raise RequestError(f"'{column}': expected a finite number, got {shown}")
    return x
