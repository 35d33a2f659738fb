"""Your own interaction table (parquet or CSV), mapped onto the framework's columns by config.

```yaml
data:
  source:
    _target_: recsys_lab.data.sources.tabular.Tabular
    path: /data/clicks.parquet
    columns: {user: customer, item: sku, timestamp: ts, label: clicked}  # or data.columns.user=... etc.
    item_features: {brand: categorical, tags: multi_categorical, price: numeric, name: text}
    context_features: {device: categorical, basket_value: numeric}  # per-interaction columns
    items_path: /data/products.csv        # optional; else item features come from the interactions file
    timestamp_format: "%Y-%m-%d %H:%M:%S" # only for timestamp strings
```

Rules (all documented choices, none silent):

* The format follows the extension: `.parquet`/`.pq`, `.csv`, `.tsv`. CSV columns are read as strings and
  converted here, so a bad value is reported with its row instead of changing a column's inferred type.
* `path` (`data.path`) is required; it, `items_path` and `users_path` must be files, checked before anything
  else (also by `fingerprint()`, which runs before `load()`).
* `columns` maps `user`, `item` (required) and `timestamp`, `rating`, `label` (optional; null = not in the
  file) to file columns; `conf/data/tabular.yaml` interpolates each from `data.columns`. `label` may name one
  column or a list (multi-task: click, purchase); label columns keep their names and must be 0/1.
* Ids keep their file type (CSV ids are strings). An empty id, a spelling of a missing value ("NaN", "NULL",
  "None", "N/A", ... in any case) and an id with surrounding whitespace are errors naming the file, column,
  line and value: read as text, "NaN" would become one user pooling unrelated rows, and " 1" and "1" two
  users.
* Timestamps: integer seconds, a parquet datetime/date, or strings parsed strictly with `timestamp_format`;
  a null, NaN, infinite or out-of-range value is an error, never a null timestamp.
  Without a timestamp column the row order is the time (timestamp = row index 0..n-1), so "last" means "later
  in the file".
* Features: when `users_path` / `items_path` is given, features are read from it, keyed by the mapped id column
  (one row per id). Otherwise they are taken from the interactions file, and each id gets the value on its
  LAST interaction by timestamp (ties: the later row), e.g. a product's current price; the table lists
  ids in the order of their first interaction. Every row's value is checked, so a bad one is named at its
  own line even when a later row supersedes it.
* Feature kinds: categorical (string), multi_categorical (a list, or a "|"-separated string in CSV), numeric
  (float64, null allowed), dense_vector (a list of floats, or a space-separated string in CSV), text (string).
* Context features (`context_features`) describe the interaction itself (device, page, basket value) and stay
  per row of the interactions file: categorical or numeric only (a context value is one token or one number).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl

from recsys_lab.data.sources import validate
from recsys_lab.data.sources.files import file_fingerprint, require_file
from recsys_lab.data.sources.raw import RawData, SourceError

SOURCE_VERSION = 1
MULTI_SEPARATOR = "|"
VECTOR_SEPARATOR = " "
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".jsonl", ".ndjson")
_MAPPING_KEYS = ("user", "item", "timestamp", "rating", "label")
CONTEXT_KINDS = ("categorical", "numeric")
_ROW = "__row"
_EXAMPLE = (
    "python train.py data=tabular data.path=/data/clicks.parquet data.columns.user=uid data.columns.item=sku"
)


def check_table_path(path: Path, key: str) -> None:
    """`path` (set by the config `key`) must be a table file of a known format."""
    require_file(path, f"a table file ({', '.join(TABLE_SUFFIXES)})", key)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise SourceError(
            f"{key}={path}: unknown table format {path.suffix.lower()!r}; expected "
            f"{', '.join(TABLE_SUFFIXES)}"
        )


def read_table(path: Path, key: str = "data.path") -> tuple[pl.DataFrame, validate.File]:
    """The table at `path` (set by the config `key`), and the file as messages should name its rows."""
    check_table_path(path, key)
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pl.read_parquet(path), path
        if suffix in (".jsonl", ".ndjson"):  # JSON lines, e.g. the serving's event log (POST /events)
            return pl.read_ndjson(path, infer_schema_length=None), path
        separator = "\t" if suffix == ".tsv" else ","
        frame = pl.read_csv(path, separator=separator, infer_schema=False)
        return frame, validate.TextFile(path, header=1, quote='"', separator=separator)
    except (pl.exceptions.PolarsError, OSError) as err:
        if suffix in (".csv", ".tsv"):  # a non-UTF-8 byte is the usual cause: name its line
            validate.check_utf8(path)
        raise SourceError(f"{path}: cannot be read as {suffix[1:]} ({str(err).splitlines()[0]})") from err


def _column_name(key: str, value: object) -> str:
    # Hydra reads `columns.user=1` as an int: the file's column is still named "1"
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise SourceError(
            f"data.columns.{key} (or data.source.columns.{key}) = {value!r}: expected a column name of the file"
            + (" or a list of 0/1 label columns" if key == "label" else "")
        )
    return str(value)


def _mapping(columns: Mapping | None) -> dict[str, str | list[str]]:
    """`data.source.columns` as {key: column name, or a list of them for `label`}. A key mapped to null is
    left out: the config lists every key, and null means "not in the file"."""
    columns = dict(columns or {})
    unknown = [k for k in columns if k not in _MAPPING_KEYS]
    if unknown or columns.get("user") is None or columns.get("item") is None:
        raise SourceError(
            f"data.source.columns={columns} must map 'user' and 'item' (and optionally 'timestamp', 'rating', "
            f"'label') to file columns" + (f"; unknown keys {unknown}" if unknown else "")
        )
    mapping: dict[str, str | list[str]] = {}
    for key, value in columns.items():
        if value is None:
            continue
        if key == "label" and isinstance(value, Sequence) and not isinstance(value, str):
            mapping[key] = [_column_name(key, v) for v in value]  # several labels (multi-task)
        else:
            mapping[key] = _column_name(key, value)
    return mapping


def _feature(frame: pl.DataFrame, column: str, kind: str, where: validate.File) -> pl.Series:
    series = frame.get_column(column)
    if kind == "numeric":
        return validate.to_float(frame, column, where, allow_null=True)
    if kind == "multi_categorical":
        return validate.to_list(series, where, MULTI_SEPARATOR)
    if kind == "dense_vector":
        return validate.to_vector(series, where, VECTOR_SEPARATOR)
    if kind in ("image", "audio"):
        return validate.to_media(series, where, kind)
    if isinstance(series.dtype, (pl.List, pl.Array, pl.Struct)):
        raise SourceError(f"{where}: column {column!r} is a {series.dtype}, which is not a {kind} feature")
    return series.cast(pl.String)  # categorical, text


class Tabular:
    """Interactions from a parquet or CSV file, with optional user and item feature tables.

    Args:
        path: the interactions file (`data.path`).
        columns: {user, item, timestamp=None, rating=None, label=None} -> column names in the file; the
            config interpolates each from `data.columns`, so `data.columns.user=uid` and
            `data.source.columns.user=uid` both set it.
        user_features, item_features: feature column -> kind ("categorical", "multi_categorical", "numeric",
            "dense_vector", "text").
        context_features: interaction column -> "categorical" or "numeric": per-row context of the interaction.
        items_path, users_path: feature tables keyed by the mapped item / user column; without them the
            features come from the interactions file (the value on each id's last interaction).
        timestamp_format: strptime format for timestamp strings, e.g. "%Y-%m-%dT%H:%M:%S".
    """

    def __init__(
        self,
        path: str | None,
        columns: Mapping,
        user_features: dict[str, str] | None = None,
        item_features: dict[str, str] | None = None,
        items_path: str | None = None,
        users_path: str | None = None,
        timestamp_format: str | None = None,
        context_features: dict[str, str] | None = None,
    ) -> None:
        if not path:
            raise SourceError(
                f"data.path is not set: data=tabular reads your own interactions file "
                f"({', '.join(TABLE_SUFFIXES)}), e.g. {_EXAMPLE}"
            )
        self.path = str(path)
        self.columns = _mapping(columns)
        self.user_features = dict(user_features or {})
        self.item_features = dict(item_features or {})
        self.context_features = dict(context_features or {})
        for name, kind in {**self.user_features, **self.item_features}.items():
            validate.check_kind(kind, f"data.source feature {name!r}")
        for name, kind in self.context_features.items():
            if kind not in CONTEXT_KINDS:
                raise SourceError(
                    f"data.source.context_features: {name!r} has kind {kind!r}; a context feature is one of "
                    f"{list(CONTEXT_KINDS)}"
                )
        reserved = sorted(
            {"user_id", "item_id", "timestamp", "rating", "split", *self.labels} & set(self.context_features)
        )
        if reserved:
            raise SourceError(
                f"data.source.context_features: {reserved} are names of the interaction table itself"
            )
        sides = [self.user_features, self.item_features, self.context_features]
        named = [name for side in sides for name in side]
        twice = sorted({n for n in named if named.count(n) > 1})
        if twice:
            raise SourceError(f"data.source: features {twice} are declared on more than one side")
        self.items_path = items_path
        self.users_path = users_path
        self.timestamp_format = timestamp_format

    @property
    def name(self) -> str:
        return f"tabular-{Path(self.path).stem}"

    @property
    def labels(self) -> list[str]:
        label = self.columns.get("label")
        return [] if not label else [label] if isinstance(label, str) else list(label)

    def _files(self) -> list[tuple[str, Path]]:
        """(config key, path) of each file given, checked: fingerprint() runs before load(), so both must
        fail with the same message on a missing file or a directory."""
        keys = {"data.path": self.path, "data.source.items_path": self.items_path}
        keys["data.source.users_path"] = self.users_path
        files = [(key, Path(path).expanduser()) for key, path in keys.items() if path]
        for key, path in files:
            check_table_path(path, key)
        return files

    def fingerprint(self) -> str:
        """Cache key: the source version, the column mapping, the features and the files."""
        blob = {
            "source": "tabular",
            "source_version": SOURCE_VERSION,
            "columns": self.columns,
            "user_features": self.user_features,
            "item_features": self.item_features,
            "context_features": self.context_features,
            "timestamp_format": self.timestamp_format,
            "separate": [bool(self.users_path), bool(self.items_path)],
            "files": file_fingerprint(path for _, path in self._files()),
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "source": self.name,
            "source_version": SOURCE_VERSION,
            "path": self.path,
            "items_path": self.items_path,
            "users_path": self.users_path,
        }

    # ---- reading -------------------------------------------------------------------------------------------
    def _interactions(self, frame: pl.DataFrame, where: validate.File) -> pl.DataFrame:
        m = self.columns
        mapped = [m["user"], m["item"], *[m[k] for k in ("timestamp", "rating") if m.get(k)], *self.labels]
        validate.require_columns(
            frame, mapped, where, expected=f"the columns named in data.columns (or data.source.columns): {m}"
        )
        validate.check_ids(frame, [m["user"], m["item"]], where)
        out = [frame.get_column(m["user"]).alias("user_id"), frame.get_column(m["item"]).alias("item_id")]
        if m.get("timestamp"):
            out.append(
                validate.to_timestamp(frame, m["timestamp"], where, self.timestamp_format).alias("timestamp")
            )
        else:  # no time column: the row order is the order of events
            out.append(pl.int_range(frame.height, dtype=pl.Int64, eager=True).alias("timestamp"))
        if m.get("rating"):
            out.append(validate.to_float(frame, m["rating"], where).alias("rating"))
        out += [validate.to_label(frame, label, where) for label in self.labels]
        if self.context_features:
            validate.require_columns(
                frame, list(self.context_features), where, expected="the context_features columns"
            )
            out += [_feature(frame, n, kind, where).alias(n) for n, kind in self.context_features.items()]
        return pl.DataFrame(out)

    def _table(
        self,
        key: str,
        features: dict[str, str],
        table_path: str | None,
        inter: pl.DataFrame,
        frame: pl.DataFrame,
        where: validate.File,
    ) -> pl.DataFrame | None:
        """One feature table: `key` plus the features, one row per id."""
        if not features:
            return None
        id_column = self.columns["user" if key == "user_id" else "item"]
        rows = None
        if table_path:
            config_key = f"data.source.{'users' if key == 'user_id' else 'items'}_path"
            frame, where = read_table(Path(table_path).expanduser(), config_key)
            validate.require_columns(
                frame, [id_column, *features], where, expected=f"{id_column!r} and the features"
            )
            validate.check_ids(frame, [id_column], where)
            validate.check_unique(frame, id_column, where)
        else:
            validate.require_columns(
                frame, features, where, expected="the feature columns (no table path given)"
            )
            # the value on each id's last interaction (stable sort by time: ties go to the later row);
            # ids in the order of their first interaction
            rows = (
                inter.select(key, "timestamp")
                .with_row_index(_ROW)
                .group_by(key, maintain_order=True)
                .agg(pl.col(_ROW).sort_by("timestamp", maintain_order=True).last())
                .get_column(_ROW)
            )
        # features are converted on every row, so a bad value is reported at its own row of the file
        columns = [_feature(frame, name, kind, where).alias(name) for name, kind in features.items()]
        ids = frame.get_column(id_column)
        if rows is not None:
            ids, columns = ids[rows], [column[rows] for column in columns]
        if ids.dtype != inter.schema[key]:  # e.g. integer ids in parquet, strings in a CSV feature table
            cast = ids.cast(inter.schema[key], strict=False)
            if cast.is_null().any():
                bad = ids[int(cast.is_null().arg_true()[0])]
                raise SourceError(
                    f"{where}: id column {id_column!r} holds {ids.dtype} values such as {bad!r}, which do not "
                    f"match the interactions' {inter.schema[key]} ids"
                )
            ids = cast
        return pl.DataFrame([ids.alias(key), *columns])

    def load(self) -> RawData:
        files = self._files()
        key, path = files[0]
        frame, where = read_table(path, key)
        inter = self._interactions(frame, where)
        users = self._table("user_id", self.user_features, self.users_path, inter, frame, where)
        items = self._table("item_id", self.item_features, self.items_path, inter, frame, where)
        text = [name for name, kind in self.item_features.items() if kind == "text"]
        return RawData(
            interactions=inter,
            users=users,
            items=items,
            features={**self.user_features, **self.item_features, **self.context_features},  # type: ignore[dict-item]
            labels=self.labels,
            item_text=text[0] if text else None,
            files=[str(path) for _, path in files],
        )
