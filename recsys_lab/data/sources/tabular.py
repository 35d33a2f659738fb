"""Your own interaction table (parquet or CSV), mapped onto the framework's columns by config.

```yaml
data:
  source:
    _target_: recsys_lab.data.sources.tabular.Tabular
    path: /data/clicks.parquet
    columns: {user: customer, item: sku, timestamp: ts, label: clicked}
    item_features: {brand: categorical, tags: multi_categorical, price: numeric, name: text}
    items_path: /data/products.csv        # optional; else item features come from the interactions file
    timestamp_format: "%Y-%m-%d %H:%M:%S" # only for timestamp strings
```

Rules (all documented choices, none silent):

* The format follows the extension: `.parquet`/`.pq`, `.csv`, `.tsv`. CSV columns are read as strings and
  converted here, so a bad value is reported with its row instead of changing a column's inferred type.
* `columns` maps `user`, `item` (required) and `timestamp`, `rating`, `label` (optional) to file columns.
  `label` may name one column or a list (multi-task: click, purchase); label columns keep their names and must
  be 0/1. Ids keep their file type (CSV ids are strings).
* Timestamps: integer seconds, a parquet datetime/date, or strings parsed strictly with `timestamp_format`.
  Without a timestamp column the row order is the time (timestamp = row index 0..n-1), so "last" means "later
  in the file".
* Features: when `users_path` / `items_path` is given, features are read from it, keyed by the mapped id column
  (one row per id). Otherwise they are taken from the interactions file, and each id gets the value on its
  LAST interaction by timestamp (ties: the later row), e.g. a product's current price; the table lists
  ids in the order of their first interaction.
* Feature kinds: categorical (string), multi_categorical (a list, or a "|"-separated string in CSV), numeric
  (float64, null allowed), dense_vector (a list of floats, or a space-separated string in CSV), text (string).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl

from recsys_lab.data.sources import validate
from recsys_lab.data.sources.files import file_fingerprint
from recsys_lab.data.sources.raw import RawData, SourceError

SOURCE_VERSION = 1
MULTI_SEPARATOR = "|"
VECTOR_SEPARATOR = " "
_MAPPING_KEYS = ("user", "item", "timestamp", "rating", "label")
_ROW = "__row"


def read_table(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise SourceError(f"{path} does not exist (data.source.path / items_path / users_path)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pl.read_parquet(path)
        if suffix in (".csv", ".tsv"):
            return pl.read_csv(path, separator="\t" if suffix == ".tsv" else ",", infer_schema=False)
    except (pl.exceptions.PolarsError, OSError) as err:
        raise SourceError(f"{path}: cannot be read as {suffix[1:]} ({str(err).splitlines()[0]})") from err
    raise SourceError(f"{path}: unknown table format {suffix!r}; expected .parquet, .pq, .csv or .tsv")


def _feature(frame: pl.DataFrame, column: str, kind: str, path: Path) -> pl.Series:
    series = frame.get_column(column)
    if kind == "numeric":
        return validate.to_float(frame, column, path, allow_null=True)
    if kind == "multi_categorical":
        return validate.to_list(series, path, MULTI_SEPARATOR)
    if kind == "dense_vector":
        return validate.to_vector(series, path, VECTOR_SEPARATOR)
    if isinstance(series.dtype, (pl.List, pl.Array, pl.Struct)):
        raise SourceError(f"{path}: column {column!r} is a {series.dtype}, which is not a {kind} feature")
    return series.cast(pl.String)  # categorical, text


class Tabular:
    """Interactions from a parquet or CSV file, with optional user and item feature tables.

    Args:
        path: the interactions file.
        columns: {user, item, timestamp=None, rating=None, label=None} -> column names in the file.
        user_features, item_features: feature column -> kind ("categorical", "multi_categorical", "numeric",
            "dense_vector", "text").
        items_path, users_path: feature tables keyed by the mapped item / user column; without them the
            features come from the interactions file (the value on each id's last interaction).
        timestamp_format: strptime format for timestamp strings, e.g. "%Y-%m-%dT%H:%M:%S".
    """

    def __init__(
        self,
        path: str,
        columns: dict,
        user_features: dict[str, str] | None = None,
        item_features: dict[str, str] | None = None,
        items_path: str | None = None,
        users_path: str | None = None,
        timestamp_format: str | None = None,
    ) -> None:
        columns = dict(columns)
        unknown = [k for k in columns if k not in _MAPPING_KEYS]
        if unknown or not columns.get("user") or not columns.get("item"):
            raise SourceError(
                f"data.source.columns={columns} must map 'user' and 'item' (and optionally 'timestamp', 'rating', "
                f"'label') to file columns" + (f"; unknown keys {unknown}" if unknown else "")
            )
        self.path = path
        self.columns = columns
        self.user_features = dict(user_features or {})
        self.item_features = dict(item_features or {})
        for name, kind in {**self.user_features, **self.item_features}.items():
            validate.check_kind(kind, f"data.source feature {name!r}")
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

    def _paths(self) -> list[Path]:
        return [Path(p).expanduser() for p in (self.path, self.items_path, self.users_path) if p]

    def fingerprint(self) -> str:
        """Cache key: the source version, the column mapping, the features and the files."""
        blob = {
            "source": "tabular",
            "source_version": SOURCE_VERSION,
            "columns": self.columns,
            "user_features": self.user_features,
            "item_features": self.item_features,
            "timestamp_format": self.timestamp_format,
            "separate": [bool(self.users_path), bool(self.items_path)],
            "files": file_fingerprint(self._paths()),
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
    def _interactions(self, frame: pl.DataFrame, path: Path) -> pl.DataFrame:
        m = self.columns
        mapped = [m["user"], m["item"], *[m[k] for k in ("timestamp", "rating") if m.get(k)], *self.labels]
        validate.require_columns(
            frame, mapped, path, expected=f"the columns named in data.source.columns={m}"
        )
        validate.check_ids(frame, [m["user"], m["item"]], path)
        out = [frame.get_column(m["user"]).alias("user_id"), frame.get_column(m["item"]).alias("item_id")]
        if m.get("timestamp"):
            out.append(
                validate.to_timestamp(frame, m["timestamp"], path, self.timestamp_format).alias("timestamp")
            )
        else:  # no time column: the row order is the order of events
            out.append(pl.int_range(frame.height, dtype=pl.Int64, eager=True).alias("timestamp"))
        if m.get("rating"):
            out.append(validate.to_float(frame, m["rating"], path).alias("rating"))
        out += [validate.to_label(frame, label, path) for label in self.labels]
        return pl.DataFrame(out)

    def _table(
        self,
        key: str,
        features: dict[str, str],
        table_path: str | None,
        inter: pl.DataFrame,
        frame: pl.DataFrame,
        path: Path,
    ) -> pl.DataFrame | None:
        """One feature table: `key` plus the features, one row per id."""
        if not features:
            return None
        id_column = self.columns["user" if key == "user_id" else "item"]
        if table_path:
            path = Path(table_path).expanduser()
            frame = read_table(path)
            validate.require_columns(
                frame, [id_column, *features], path, expected=f"{id_column!r} and the features"
            )
            validate.check_ids(frame, [id_column], path)
            validate.check_unique(frame, id_column, path)
        else:
            validate.require_columns(
                frame, features, path, expected="the feature columns (no table path given)"
            )
            # the value on each id's last interaction (stable sort by time: ties go to the later row);
            # ids in the order of their first interaction
            last = (
                inter.select(key, "timestamp")
                .with_row_index(_ROW)
                .group_by(key, maintain_order=True)
                .agg(pl.col(_ROW).sort_by("timestamp", maintain_order=True).last())
                .get_column(_ROW)
            )
            frame = frame[last]
        ids = frame.get_column(id_column)
        if ids.dtype != inter.schema[key]:  # e.g. integer ids in parquet, strings in a CSV feature table
            cast = ids.cast(inter.schema[key], strict=False)
            if cast.is_null().any():
                bad = ids[int(cast.is_null().arg_true()[0])]
                raise SourceError(
                    f"{path}: id column {id_column!r} holds {ids.dtype} values such as {bad!r}, which do not "
                    f"match the interactions' {inter.schema[key]} ids"
                )
            ids = cast
        columns = [ids.alias(key)]
        columns += [_feature(frame, name, kind, path).alias(name) for name, kind in features.items()]
        return pl.DataFrame(columns)

    def load(self) -> RawData:
        path = Path(self.path).expanduser()
        frame = read_table(path)
        inter = self._interactions(frame, path)
        users = self._table("user_id", self.user_features, self.users_path, inter, frame, path)
        items = self._table("item_id", self.item_features, self.items_path, inter, frame, path)
        text = [name for name, kind in self.item_features.items() if kind == "text"]
        return RawData(
            interactions=inter,
            users=users,
            items=items,
            features={**self.user_features, **self.item_features},  # type: ignore[dict-item]
            labels=self.labels,
            item_text=text[0] if text else None,
            files=[str(p) for p in self._paths()],
        )
