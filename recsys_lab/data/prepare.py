"""From a source's raw tables to the prepared, encoded form every model consumes.

    raw tables ─ Preprocess (implicit conversion, duplicates, k-core; counted) ─ split ─ vocabularies and
    normalisers fitted on the training split ─ encoded tables + evaluation queries (+ sampled candidates)

The result (`Prepared`) is cached with a fingerprint of the source files, every protocol setting and the
code version, so a second run reuses it and a changed config rebuilds it.

Entities and codes: every user/item known to the source has an *entity* index (its row in the entity table);
its `user_id` / `item_id` feature is a *code* from a vocabulary fitted on the training rows (0 = unknown).
A cold-start item keeps its own entity row, so its content features describe it, while its id is unknown.
Ranking candidates are item codes 1..V (the training vocabulary).

Growing vocabularies (`data.vocab_from`, incremental training): the vocabularies and normalisers of an earlier
prepared dataset are inherited instead of fitted. Every id and category it knew keeps its code; the ones new
in this training split get codes after them (`recsys_lab.data.vocab.extend_vocab`), so a model trained on the
earlier data reads the same embedding row for the same id and its tables only grow (`init_from` copies the
old rows in place: `recsys_lab.utils.warm_start`). Numeric normalisers and bucket boundaries are applied as
they were fitted, so the inputs keep the scale the earlier model learned.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch

from recsys_lab.data.sources.raw import RawData, SourceError
from recsys_lab.data.splits import HISTORY, TEST, TRAIN, UNUSED, VAL
from recsys_lab.data.store import Ragged
from recsys_lab.data.vocab import bucketise, encode, encode_lists, extend_vocab, fit_vocab, standardise

PREPARE_VERSION = 4  # 2: data.cold_items (first_cold_item in meta); 3: item media, vector presence columns;
# 4: categorical vocabularies in meta (serving reads raw values)
PRESENT = "__present"  # suffix of the bool column saying which rows of a dense vector were given (not null)
STAGES = {"train": TRAIN, "val": VAL, "test": TEST}
# context derived from each interaction's timestamp (`data.time_context`): name -> (column, kind)
TIME_CONTEXT = {
    "hour": ("time_hour", "categorical"),
    "weekday": ("time_weekday", "categorical"),
    "gap": ("time_gap", "numeric"),
}
MAX_LIST_LEN = 16  # tokens kept per multi-categorical value (e.g. genres of a movie)
_ROW = "__row"  # a temporary row-number column


class DataCacheError(RuntimeError):
    """A cache folder that is corrupt, was written by another version, or cannot be written."""


@dataclass
class FeatureMeta:
    """One encoded feature column: its kind ("categorical", "multi_categorical", "numeric", "dense_vector",
    "text", "image", "audio"), its side ("user", "item", "context"), the longest list kept (multi-categorical)
    and the width (numeric: 1, dense_vector: D, image: 3 * S * S pixel values, audio: T samples)."""

    kind: str
    side: str
    max_len: int = 0
    dim: int = 1


@dataclass
class PreparedMeta:
    """Everything about a prepared dataset besides its tables, typed (stored as meta.json in the cache).

    Args:
        features: every encoded feature column of the user, item and interaction tables.
        vocab_sizes: codes per categorical feature, the id features included (code 0 = unknown).
        normalisers: per numeric / dense column, its standardisation statistics, or its bucket boundaries
            (`data.numeric_buckets`); fitted on training entities (user / item columns) or training rows
            (context columns).
        counts: rows removed by each preprocessing step, rows and queries per split, unrankable targets.
        labels: label columns of `rows` ("click", "purchase"; "label" on implicit data).
        context: columns of `rows` that describe the interaction (hour, device, basket value, ...): categorical
            codes, or standardised floats for numeric ones (their kind is in `features`).
        oracle: the `rows` column with the true click probability (simulated data), or None.
        item_text: the item column language models read, or None.
        item_counts: positives per item code in the training split (popularity, logQ; code 0 is 0).
        has_negatives: per stage, whether its rows hold negative labels (impression logs do).
        split: the split's description; cutoffs: its fitted time cutoffs (temporal splits).
        eval_candidates: the candidate protocol's name ("full", "uniform_100", ...).
        first_cold_item: with `data.cold_items`, the first code of the items that have no training interaction
            (codes first_cold_item..V-1, after the training vocabulary); None when they are not ranked.
        vocabularies: per categorical / multi-categorical column (user, item and context; not the ids, whose
            raw values stay in the entity tables), its training values as strings in code order: value i has
            code i + 1 (code 0 is "unknown"). What a served request's raw values are encoded with.
        first_new_code: with `data.vocab_from`, per categorical column (ids included) the first code that is not
            inherited: codes 1..first_new_code-1 are the earlier vocabulary's, kept in place (their id may have
            no interaction in this training split), later codes are this training split's new values. Empty
            without `data.vocab_from`.
    """

    features: dict[str, FeatureMeta]
    vocab_sizes: dict[str, int]
    normalisers: dict[str, Any]
    counts: dict[str, int]
    labels: list[str]
    context: list[str]
    oracle: str | None
    item_text: str | None
    item_counts: list[float]
    has_negatives: dict[str, bool]
    split: dict[str, Any]
    cutoffs: list[Any]
    eval_candidates: str
    first_cold_item: int | None = None
    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    first_new_code: dict[str, int] = field(default_factory=dict)

    def without_context(self) -> PreparedMeta:
        """The same dataset described without its interaction context features (the `data.context=false`
        ablation): the columns stay in the cache, no batch or schema carries them."""
        features = {name: f for name, f in self.features.items() if f.side != "context"}
        return dataclasses.replace(self, features=features, context=[])

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PreparedMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["features"] = {name: FeatureMeta(**f) for name, f in values["features"].items()}
        return cls(**values)

    def columns(self, side: str, *kinds: str) -> list[str]:
        """Feature columns of one side, of the given kinds (all kinds when none given), in stored order."""
        return [n for n, f in self.features.items() if f.side == side and (not kinds or f.kind in kinds)]


@dataclass
class Prepared:
    """Encoded tables of one dataset under one protocol.

    Args:
        rows: one row per interaction: `user`, `item` (entity indices), `timestamp`, `split` (0/1/2),
            `positive`, label columns (float32), context columns (codes), optional oracle column.
        users / items: entity tables; `user_id` / `item_id` codes, categorical codes, numeric and dense
            columns (standardised), multi-categorical columns as List[int64] of codes, item text.
        queries: per evaluation stage, one row per ranking query: `user` (entity), `targets` (item codes the
            user interacted with in the stage and not before), `seen` (codes interacted with before: masked),
            `candidates` (List of item codes: targets first, then sampled negatives; null for full ranking).
        meta: feature kinds and sides, vocabulary sizes, labels, statistics, counts (`PreparedMeta`).
    """

    rows: pl.DataFrame
    users: pl.DataFrame
    items: pl.DataFrame
    queries: dict[str, pl.DataFrame]
    meta: PreparedMeta

    def save(self, folder: Path, fingerprint: str) -> None:
        """Write the tables as parquet, then meta.json last (`PreparedCache` writes into a private folder and
        renames it into place, so readers never see a half-written cache)."""
        folder.mkdir(parents=True, exist_ok=True)
        frames = {"rows": self.rows, "users": self.users, "items": self.items}
        frames.update({f"queries_{s}": q for s, q in self.queries.items()})
        for name, frame in frames.items():
            frame.write_parquet(folder / f"{name}.parquet")
        meta = {
            "format": PREPARE_VERSION,
            "fingerprint": fingerprint,
            "row_counts": {k: v.height for k, v in frames.items()},
            **self.meta.to_json(),
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=1, default=str))

    @classmethod
    def load(cls, folder: Path, fingerprint: str) -> Prepared | None:
        """The cached tables; None when nothing is cached; DataCacheError when the cache cannot be trusted."""
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            return None
        hint = f"delete the folder {folder} to rebuild it"
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataCacheError(f"data cache {meta_path} is corrupt ({err}); {hint}") from err
        if meta.get("format") != PREPARE_VERSION or meta.get("fingerprint") != fingerprint:
            raise DataCacheError(
                f"data cache {folder} was written by another version (format {meta.get('format')}, fingerprint "
                f"{meta.get('fingerprint')}; expected format {PREPARE_VERSION}, fingerprint {fingerprint}); {hint}"
            )
        frames = {}
        for name, expected in meta["row_counts"].items():
            path = folder / f"{name}.parquet"
            try:
                frames[name] = pl.read_parquet(path)
            except Exception as err:  # polars raises several error types for truncated or garbled files
                raise DataCacheError(f"data cache file {path} is corrupt or missing ({err}); {hint}") from err
            if frames[name].height != expected:
                raise DataCacheError(
                    f"data cache file {path} has {frames[name].height} rows, meta.json says {expected}; {hint}"
                )
        try:
            typed = PreparedMeta.from_json(meta)
        except (KeyError, TypeError) as err:
            raise DataCacheError(f"data cache {meta_path} lacks or garbles a field ({err}); {hint}") from err
        queries = {s: frames[f"queries_{s}"] for s in ("val", "test") if f"queries_{s}" in frames}
        return cls(frames["rows"], frames["users"], frames["items"], queries, typed)


class PreparedCache:
    """The prepared-data cache folder of one fingerprint: read it, or build it once and move it into place.

    Several processes may start on an empty cache at once (a multirun, two terminals). The build holds an
    exclusive lock on `<folder>.lock`, so one process builds while the others wait and then read its result;
    the tables are written into a private temporary folder that is renamed into place when complete, so a
    reader sees either no cache or a whole one — never a file being rewritten under it.
    """

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = Path(folder), fingerprint

    def load(self) -> Prepared | None:
        return Prepared.load(self.folder, self.fingerprint)

    def load_or_build(self, build) -> Prepared:
        """The cached tables, or `build()`'s result after writing it (one builder at a time)."""
        cached = self.load()
        if cached is not None:
            return cached
        parent = self.folder.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            with self._lock(parent / f".{self.folder.name}.lock"):
                cached = self.load()  # another process may have built it while this one waited
                if cached is not None:
                    return cached
                prepared = build()
                tmp = parent / f".{self.folder.name}.tmp-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                prepared.save(tmp, self.fingerprint)
                if self.folder.exists():  # an unfinished write of an older version (no meta.json)
                    shutil.rmtree(self.folder)
                os.rename(tmp, self.folder)
        except PermissionError as err:
            raise DataCacheError(
                f"data cache folder {parent} is not writable ({err.strerror}: {err.filename}); point "
                "paths.data_dir (or the RECSYS_LAB_DATA environment variable) at a writable folder"
            ) from err
        return self.load()  # one code path (parquet round trip) for fresh and cached data

    @staticmethod
    @contextmanager
    def _lock(path: Path):
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"data cache: another process is building {path.stem}; waiting for it", file=sys.stderr)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Inherited:
    """The fitted encodings of an earlier prepared dataset, kept by this one (`data.vocab_from`).

    Args:
        folder: the earlier prepared-data folder (for error messages).
        fingerprint: its cache fingerprint (part of this dataset's fingerprint).
        vocabularies: per categorical column, its values in code order (value i has code i + 1): the
            `user_id` / `item_id` values (read from the entity tables, where the id codes live) and every
            categorical / multi-categorical column of `PreparedMeta.vocabularies` (strings).
        normalisers: per numeric / dense column, its standardisation statistics or bucket boundaries.
        grow: append this training split's new values (True: incremental training), or keep the vocabularies
            exactly as they were, new values reading code 0 (False: evaluating the earlier model as it was).
    """

    folder: Path
    fingerprint: str
    vocabularies: dict[str, pl.Series]
    normalisers: dict[str, Any]
    grow: bool = True

    @classmethod
    def read(cls, folder: Path, grow: bool = True) -> Inherited:
        """Read an earlier prepared folder (any format that holds entity tables and meta.json)."""
        meta_path = folder / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataCacheError(f"data.vocab_from: cannot read {meta_path} ({err})") from err
        if meta.get("first_cold_item") is not None:
            raise SourceError(
                f"data.vocab_from: {folder} was prepared with data.cold_items=true; the codes it gave to items "
                "without training interactions cannot be carried over (prepare the earlier run without it)"
            )
        vocabularies = {}
        for side in ("user", "item"):
            key = f"{side}_id"
            table = pl.read_parquet(folder / f"{side}s.parquet", columns=[key, f"{key}_code"])
            known = table.filter(pl.col(f"{key}_code") > 0).sort(f"{key}_code")
            if not np.array_equal(known[f"{key}_code"].to_numpy(), np.arange(1, known.height + 1)):
                raise DataCacheError(
                    f"data.vocab_from: the {key} codes of {folder} are not 1..{known.height}"
                )
            vocabularies[key] = known[key]
        for col, values in meta.get("vocabularies", {}).items():
            vocabularies[col] = pl.Series(col, values, dtype=pl.String)
        return cls(folder, str(meta.get("fingerprint")), vocabularies, meta.get("normalisers", {}), grow)

    def vocab(self, col: str, train_values: pl.Series) -> pl.DataFrame:
        """The earlier vocabulary of `col`, extended with `train_values` it lacks when growing."""
        if col not in self.vocabularies:
            raise SourceError(
                f"data.vocab_from: {self.folder} has no vocabulary for the categorical column '{col}' (it has "
                f"{sorted(self.vocabularies)}); both datasets must prepare the same features"
            )
        return extend_vocab(self.vocabularies[col], train_values, grow=self.grow)

    def normaliser(self, col: str, field_name: str) -> dict:
        """The earlier statistics of a numeric column; `field_name` ("mean" or "boundaries") says which
        encoding this dataset asks for, which must be the one the earlier dataset used."""
        stats = self.normalisers.get(col)
        if stats is None or field_name not in stats:
            encoding = "bucketised (data.numeric_buckets)" if field_name == "boundaries" else "standardised"
            raise SourceError(
                f"data.vocab_from: column '{col}' is {encoding} here but {_numeric_encoding(stats)} in "
                f"{self.folder}; both datasets must encode it the same way"
            )
        return stats


def _numeric_encoding(stats: dict | None) -> str:
    """How an earlier dataset encoded a numeric column, in words (for errors)."""
    if stats is None:
        return "not a numeric column"
    return "bucketised" if "boundaries" in stats else "standardised"


def _vocab(col: str, train_values: pl.Series, meta: dict, inherited: Inherited | None) -> pl.DataFrame:
    """The vocabulary of one categorical column: fitted on its training values, or inherited (and grown);
    records its size (codes 0..V-1) and, when inherited, its first new code."""
    if inherited is None:
        vocab = fit_vocab(train_values)
    else:
        vocab = inherited.vocab(col, train_values)
        meta["first_new_code"][col] = len(inherited.vocabularies[col]) + 1
    meta["vocab_sizes"][col] = vocab.height + 1
    return vocab


# ---- preparation -------------------------------------------------------------------------------------------
def prepare(
    raw: RawData,
    preprocess,
    split,
    eval_candidates=None,
    log_dense: list[str] | tuple[str, ...] = (),
    oracle: str | None = None,
    numeric_buckets: dict[str, int] | None = None,
    time_context: list[str] | tuple[str, ...] = (),
    cold_items: bool = False,
    inherited: Inherited | None = None,
) -> Prepared:
    """Filter, split, fit on train and encode `raw` (see the module docstring).

    `inherited` (`data.vocab_from`): the vocabularies and normalisers of an earlier prepared dataset, kept and
    (for vocabularies) grown instead of fitted. Rows the split marks UNUSED (after its test period) are
    dropped first; HISTORY rows only feed histories.

    `cold_items` gives every catalogue item without a training interaction a code after the training
    vocabulary, so that content models can rank it (its id embedding never trains); otherwise such items keep
    code 0 and their held-out interactions are counted as unrankable targets.

    `numeric_buckets` ({column: n}) turns numeric columns into categorical ones of up to n equal-frequency
    buckets (training quantiles); the other numeric columns are standardised. `time_context` adds context
    columns computed from each interaction's timestamp (`TIME_CONTEXT`)."""
    inter, counts = preprocess(raw.interactions, list(raw.labels))
    kinds = dict(raw.features)
    inter, kinds = _with_time_context(inter, kinds, time_context)
    numeric_buckets = dict(numeric_buckets or {})
    _check_numeric_columns(kinds, numeric_buckets, log_dense)
    if cold_items and inherited is not None:
        raise SourceError(
            "data.cold_items=true with data.vocab_from: the codes of untrained items would collide with the "
            "ids a grown vocabulary appends; use one or the other"
        )
    codes = split.assign(inter)
    if (codes == UNUSED).any():  # after the test period (WindowSplit): not part of this dataset at all
        counts["unused_rows_after_test"] = int((codes == UNUSED).sum())
        inter, codes = inter.filter(pl.Series(codes != UNUSED)), codes[codes != UNUSED]
    inter = inter.with_columns(pl.Series("split", codes, dtype=pl.Int8))
    for stage, code in STAGES.items():
        counts[f"{stage}_rows"] = int((codes == code).sum())
        if counts[f"{stage}_rows"] == 0:
            raise SourceError(
                f"data.split ({split.describe()}): the {stage} split is empty after filtering "
                f"({counts['rows_out']} rows kept)"
            )
    if (codes == HISTORY).any():  # rows that only feed histories (LastSamplesSplit, WindowSplit)
        counts["history_only_rows"] = int((codes == HISTORY).sum())

    # entity tables: every user / item known to the source (tables or interactions) or to an inherited
    # vocabulary (an id with a code needs an entity row, even if it is absent from these interactions)
    earlier = inherited.vocabularies if inherited is not None else {}
    users = _entities(raw.users, inter, "user_id", earlier.get("user_id"))
    items = _entities(raw.items, inter, "item_id", earlier.get("item_id"))
    inter = inter.join(
        users.select("user_id", pl.int_range(pl.len()).alias("user")), on="user_id", how="left"
    )
    inter = inter.join(
        items.select("item_id", pl.int_range(pl.len()).alias("item")), on="item_id", how="left"
    )
    train = inter.filter(pl.col("split") == TRAIN)
    train_users = np.unique(train["user"].to_numpy())
    train_items = np.unique(train["item"].to_numpy())

    meta: dict[str, Any] = {
        "features": {},
        "vocab_sizes": {},
        "normalisers": {},
        "counts": counts,
        "vocabularies": {},
        "first_new_code": {},
    }  # -> PreparedMeta
    # ids: vocabularies of the training rows (or inherited, and grown with them)
    user_vocab = _vocab("user_id", train["user_id"], meta, inherited)
    item_vocab = _vocab("item_id", train["item_id"], meta, inherited)
    users = users.with_columns(pl.Series("user_id_code", encode(users["user_id"], user_vocab)))
    items = items.with_columns(pl.Series("item_id_code", encode(items["item_id"], item_vocab)))
    if cold_items:
        items, meta["first_cold_item"] = _with_cold_codes(items, item_vocab.height + 1)
        meta["vocab_sizes"]["item_id"] = int(items["item_id_code"].max()) + 1
        counts["cold_item_codes"] = meta["vocab_sizes"]["item_id"] - meta["first_cold_item"]

    numeric = NumericEncoding(list(log_dense), numeric_buckets)
    users, ufeat = _encode_table(users, "user", kinds, train_users, numeric, meta, inherited)
    items, ifeat = _encode_table(items, "item", kinds, train_items, numeric, meta, inherited)
    # context: categorical and numeric columns of the interactions themselves, fitted on the training rows
    context = [c for c, k in kinds.items() if c in inter.columns and k in ("categorical", "numeric")]
    train_rows = (inter["split"] == TRAIN).to_numpy()
    for col in context:
        if kinds[col] == "categorical":
            vocab = _vocab(col, train[col].cast(pl.String), meta, inherited)
            inter = inter.with_columns(pl.Series(col, encode(inter[col].cast(pl.String), vocab)))
            meta["vocabularies"][col] = vocab["value"].to_list()
            meta["features"][col] = FeatureMeta("categorical", "context")
            continue
        values, kind = _encode_numeric(
            col, _floats(inter[col], "numeric"), train_rows, numeric, meta, inherited
        )
        inter = inter.with_columns(pl.Series(col, values))
        meta["features"][col] = FeatureMeta(kind, "context")
    meta["features"].update(ufeat)
    meta["features"].update(ifeat)

    labels = list(raw.labels) or ["label"]
    if not raw.labels:  # implicit data: the label is the positive flag
        inter = inter.with_columns(pl.col("positive").cast(pl.Float32).alias("label"))
    keep = ["user", "item", "timestamp", "split", "positive", *labels, *context]
    if oracle:
        keep.append(oracle)
    rows = inter.select([pl.col(c) for c in keep]).with_columns([pl.col(c).cast(pl.Float32) for c in labels])

    # per item code: positives in training (popularity, logQ)
    n_codes = meta["vocab_sizes"]["item_id"]
    item_code = items["item_id_code"].to_numpy()
    pos_train = rows.filter((pl.col("split") == TRAIN) & pl.col("positive"))
    counts_per_code = np.bincount(item_code[pos_train["item"].to_numpy()], minlength=n_codes).astype(
        np.float32
    )
    counts_per_code[0] = 0.0
    meta.update(
        labels=labels,
        context=context,
        oracle=oracle,
        item_text=raw.item_text if raw.item_text in items.columns else None,
        item_counts=counts_per_code.tolist(),
        has_negatives={
            s: bool((~rows.filter(pl.col("split") == c)["positive"]).any()) for s, c in STAGES.items()
        },
        split=split.describe(),
        cutoffs=list(getattr(split, "cutoffs_", ()) or ()),
    )
    mask_seen = getattr(eval_candidates, "mask_seen", True)  # False: RecBole's sequential full ranking
    queries = {
        s: _queries(rows, item_code, STAGES[s], counts, mask_seen, meta.get("first_cold_item"))
        for s in ("val", "test")
    }
    if eval_candidates is not None:
        queries = {
            s: _with_candidates(q, rows, item_code, counts_per_code, eval_candidates, s)
            for s, q in queries.items()
        }
    meta["eval_candidates"] = getattr(eval_candidates, "name", "full")
    return Prepared(rows=rows, users=users, items=items, queries=queries, meta=PreparedMeta(**meta))


def _entities(
    table: pl.DataFrame | None, inter: pl.DataFrame, key: str, known: pl.Series | None = None
) -> pl.DataFrame:
    """The entity table: the source's table plus ids that only occur in interactions or in `known` (the ids of
    an inherited vocabulary), without features."""
    ids = inter.select(pl.col(key)).unique()
    if known is not None:
        extra = pl.DataFrame({key: known.cast(ids[key].dtype, strict=False)}).drop_nulls()
        ids = pl.concat([ids, extra]).unique()
    if table is None:
        return ids.sort(key)
    if table[key].n_unique() != table.height:
        raise SourceError(f"the {key.split('_')[0]} table has duplicate '{key}' values")
    table = table.with_columns(pl.col(key).cast(ids[key].dtype, strict=False))
    missing = ids.join(table.select(key), on=key, how="anti")
    return pl.concat([table, missing], how="diagonal_relaxed")


def _encode_table(
    table: pl.DataFrame,
    side: str,
    kinds: dict,
    train_entities: np.ndarray,
    numeric: NumericEncoding,
    meta: dict,
    inherited: Inherited | None = None,
) -> tuple[pl.DataFrame, dict]:
    """Encode one entity table's feature columns with statistics of the entities seen in training (or the
    inherited ones)."""
    key = f"{side}_id"
    out = {key: table[key], f"{key}_code": table[f"{key}_code"]}
    features = {}
    train_table = table[train_entities]
    for col in table.columns:
        kind = kinds.get(col)
        if col in (key, f"{key}_code") or kind is None:
            continue
        if kind == "categorical":
            vocab = _vocab(col, train_table[col].cast(pl.String), meta, inherited)
            out[col] = pl.Series(col, encode(table[col].cast(pl.String), vocab))
            meta["vocabularies"][col] = vocab["value"].to_list()
        elif kind == "multi_categorical":
            tokens = train_table[col].cast(pl.List(pl.String)).explode()
            vocab = _vocab(col, tokens, meta, inherited)
            lists = table[col].cast(pl.List(pl.String))
            longest = int(lists.list.len().max() or 1)
            ids, lengths = encode_lists(lists, vocab, min(longest, MAX_LIST_LEN))
            valid = np.arange(ids.shape[1]) < lengths[:, None]  # (N, G): kept codes are left-aligned
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            out[col] = Ragged(torch.as_tensor(ids[valid]), torch.as_tensor(offsets)).to_lists(col)
            meta["vocabularies"][col] = vocab["value"].to_list()
            features[col] = FeatureMeta(kind, side, max_len=int(ids.shape[1]))
            continue
        elif kind == "numeric":
            values, encoded_kind = _encode_numeric(
                col, _floats(table[col], kind), train_entities, numeric, meta, inherited
            )
            out[col] = pl.Series(col, values)
            features[col] = FeatureMeta(encoded_kind, side)
            continue
        elif kind == "dense_vector":
            values, stats = standardise(
                _floats(table[col], kind),
                train_entities,
                log=col in numeric.log_dense,
                name=col,
                fitted=inherited.normaliser(col, "mean") if inherited is not None else None,
            )
            meta["normalisers"][col] = stats
            out[col] = pl.Series(col, values.tolist())
            # a null vector is filled (with the training mean) for the feature; content models read it as a
            # missing modality instead, so the mask is kept
            out[col + PRESENT] = table[col].is_not_null()
            features[col] = FeatureMeta(kind, side, dim=int(values.shape[1]))
            continue
        elif kind in ("image", "audio"):
            # raw media pass through as they are (null: the item has none); content encoders read them
            out[col] = table[col]
            features[col] = FeatureMeta(kind, side, dim=_media_width(table[col], col))
            continue
        elif kind == "text":
            out[col] = table[col].cast(pl.String).fill_null("")
        else:
            continue
        features[col] = FeatureMeta(kind, side)
    return pl.DataFrame(out), features


class NumericEncoding(NamedTuple):
    """How numeric columns are encoded: `log_dense` ones take log1p before standardising; `buckets`
    ({column: n}) ones become up to n equal-frequency bucket codes instead."""

    log_dense: list[str]
    buckets: dict[str, int]


def _encode_numeric(
    col: str,
    values: np.ndarray,
    train: np.ndarray,
    numeric: NumericEncoding,
    meta: dict,
    inherited: Inherited | None = None,
) -> tuple[np.ndarray, str]:
    """One numeric column [N], fitted on `train` (a boolean mask or indices) or with inherited statistics:
    bucket codes (kind "categorical") when `data.numeric_buckets` names it, else standardised floats (kind
    "numeric"). log1p (`data.log_dense`) applies before standardising; equal-frequency buckets do not change
    under it."""
    if col in numeric.buckets:
        fitted = inherited.normaliser(col, "boundaries") if inherited is not None else None
        codes, stats = bucketise(values, train, numeric.buckets[col], name=col, fitted=fitted)
        meta["normalisers"][col] = stats
        meta["vocab_sizes"][col] = stats["buckets"] + 1
        return codes, "categorical"
    fitted = inherited.normaliser(col, "mean") if inherited is not None else None
    values, stats = standardise(values, train, log=col in numeric.log_dense, name=col, fitted=fitted)
    meta["normalisers"][col] = stats
    return values, "numeric"


def _with_time_context(
    inter: pl.DataFrame, kinds: dict, names: list[str] | tuple[str, ...]
) -> tuple[pl.DataFrame, dict]:
    """`inter` with the context columns of `data.time_context` computed from its timestamps (seconds, UTC):

    - hour: hour of day 0..23 (`time_hour`, categorical);
    - weekday: day of week, 0 = Monday (`time_weekday`, categorical; 1970-01-01 was a Thursday);
    - gap: log1p of the seconds since the user's previous interaction in the prepared log, null on the user's
      first (`time_gap`, numeric: standardised, or bucketised by `data.numeric_buckets.time_gap`). Only the
      past is read, so the feature is known when the interaction happens.
    Sources without time use the row order as the timestamp; these columns are then meaningless."""
    kinds = dict(kinds)
    unknown = [n for n in names if n not in TIME_CONTEXT]
    if unknown:
        raise SourceError(f"data.time_context: unknown {unknown}; expected names from {list(TIME_CONTEXT)}")
    for name in dict.fromkeys(names):
        column, kind = TIME_CONTEXT[name]
        if column in inter.columns or column in kinds:
            raise SourceError(f"data.time_context: the source already has a column '{column}'")
        ts = pl.col("timestamp")
        if name == "hour":
            values = inter.select((ts // 3600) % 24).to_series()
        elif name == "weekday":
            values = inter.select((ts // 86400 + 3) % 7).to_series()
        else:  # seconds since the user's previous row in time order (a stable sort keeps the file order of ties)
            gap = (ts - ts.shift(1).over("user_id")).cast(pl.Float64).clip(lower_bound=0).log1p()
            values = (
                inter.with_row_index(_ROW)
                .sort(["user_id", "timestamp"], maintain_order=True)
                .select(_ROW, gap.alias(column))
                .sort(_ROW)[column]
            )
        inter = inter.with_columns(values.alias(column))
        kinds[column] = kind
    return inter, kinds


def _check_numeric_columns(kinds: dict, numeric_buckets: dict, log_dense) -> None:
    """`data.numeric_buckets` and `data.log_dense` may only name numeric columns."""
    numeric = sorted(c for c, k in kinds.items() if k == "numeric")
    vectors = sorted(c for c, k in kinds.items() if k == "dense_vector")
    for key, names, allowed in (
        ("numeric_buckets", numeric_buckets, numeric),
        ("log_dense", log_dense, numeric + vectors),
    ):
        bad = [n for n in names if n not in allowed]
        if bad:
            raise SourceError(
                f"data.{key}: {bad} are not numeric columns of the source; numeric columns are {allowed}"
            )


def _media_width(column: pl.Series, name: str) -> int:
    """The common length of a media list column (pixels, samples); a clear error if rows differ."""
    lengths = column.list.len().drop_nulls().unique()
    if len(lengths) > 1:
        raise SourceError(
            f"item column '{name}': every row must have the same number of values (one image size, one sound "
            f"length), found lengths {sorted(lengths.to_list())[:5]}"
        )
    return int(lengths[0]) if len(lengths) else 0


def _floats(column: pl.Series, kind: str) -> np.ndarray:
    """float64 [N] (numeric) or [N, D] (dense_vector); nulls become NaN (filled after fitting)."""
    if kind == "numeric":
        return column.cast(pl.Float64).fill_null(float("nan")).to_numpy()
    present = column.drop_nulls()
    dim = len(present[0]) if len(present) else 1
    rows = [np.full(dim, np.nan) if v is None else np.asarray(v, dtype=np.float64) for v in column.to_list()]
    return np.stack(rows) if rows else np.zeros((0, dim))


def _with_cold_codes(items: pl.DataFrame, first: int) -> tuple[pl.DataFrame, int]:
    """Codes first, first+1, ... for the items outside the training vocabulary (code 0), in item_id order
    (deterministic); returns the table and `first`."""
    cold = items["item_id_code"].to_numpy() == 0
    codes = items["item_id_code"].to_numpy().copy()
    order = np.argsort(items["item_id"].to_numpy()[cold], kind="stable")
    cold_rows = np.flatnonzero(cold)[order]
    codes[cold_rows] = np.arange(first, first + len(cold_rows), dtype=np.int64)
    return items.with_columns(pl.Series("item_id_code", codes)), first


def _queries(
    rows: pl.DataFrame,
    item_code: np.ndarray,
    stage: int,
    counts: dict,
    mask_seen: bool = True,
    first_cold_item: int | None = None,
) -> pl.DataFrame:
    """Ranking queries of one stage: each user with positives in the stage, as of the stage's start.

    The query's history is every positive of the earlier splits (train for validation, train + validation for
    test); its targets are the distinct known items of its positives in the stage that are not in that
    history (those are masked as `seen`). This is RecBole's masking for general models: its test-time history
    is every item of the user's training and validation interactions, less the test items. With
    `mask_seen=False` nothing is masked (`seen` is empty) and every distinct known item of the stage's
    positives is a target, re-consumed ones included. Targets whose item is unknown to the training
    vocabulary cannot be ranked by an id model: they are counted, not silently dropped.
    """
    name = "val" if stage == VAL else "test"
    pos = rows.filter(pl.col("positive")).select("user", "item", "split", "timestamp")
    pos = pos.with_columns(pl.Series("code", item_code[pos["item"].to_numpy()]))
    seen = (
        pos.filter(pl.col("split") < stage).group_by("user").agg(pl.col("code").unique().sort().alias("seen"))
    )
    period = pos.filter(pl.col("split") == stage)
    unknown = int((period["code"] == 0).sum())
    known = period.filter(pl.col("code") > 0)
    if mask_seen:
        known = known.join(seen.explode("seen").rename({"seen": "code"}), on=["user", "code"], how="anti")
    else:
        seen = seen.clear()  # nothing is masked: every query's `seen` list is empty
    targets = known.group_by("user").agg(pl.col("code").unique().sort().alias("targets"))
    queries = targets.join(seen, on="user", how="left").with_columns(
        pl.col("seen").fill_null(pl.lit([], dtype=pl.List(pl.Int64)))
    )
    counts[f"{name}_targets_unknown_item"] = unknown
    if first_cold_item is not None:  # `data.cold_items`: targets on items without a training interaction
        counts[f"{name}_targets_cold_item"] = int((targets["targets"].explode() >= first_cold_item).sum())
    counts[f"{name}_users_without_new_targets"] = int(period["user"].n_unique() - queries.height)
    counts[f"{name}_queries"] = queries.height
    return queries.sort("user").with_columns(pl.lit(None, dtype=pl.List(pl.Int64)).alias("candidates"))


def _with_candidates(queries, rows, item_code, counts_per_code, sampler, stage: str) -> pl.DataFrame:
    """Draw the sampled candidates once (seeded) and store them with the queries."""
    from recsys_lab.data.sampling import PositiveSet

    if queries.height == 0:
        return queries
    pos = rows.filter(pl.col("positive"))
    n_codes = len(counts_per_code)
    exclude = PositiveSet(
        torch.tensor(pos["user"].to_numpy()), torch.as_tensor(item_code[pos["item"].to_numpy()]), n_codes
    )
    targets = Ragged.from_lists(queries["targets"])
    allowed = torch.ones(n_codes, dtype=torch.bool)
    allowed[0] = False
    cands = sampler.candidates(
        torch.as_tensor(queries["user"].to_numpy()),
        targets,
        exclude,
        n_codes,
        torch.as_tensor(counts_per_code),
        allowed,
    )
    if cands is None:
        return queries
    return queries.with_columns(cands.to_lists("candidates"))
