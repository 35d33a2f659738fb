"""RecBole atomic files: `<name>.inter`, `<name>.user`, `<name>.item`.

Format (https://recbole.io/docs/user_guide/data/atomic_files.html): tab-separated, UTF-8, one header line of
`field:type` names, no quoting. Types and what they become here:

| type | column | feature kind |
|---|---|---|
| `token` | string (empty = null) | categorical |
| `token_seq` | List[str], space-separated tokens | multi_categorical (or text, see below) |
| `float` | float64 | numeric |
| `float_seq` | List[f64], space-separated, one length per column | dense_vector |

Fields with a fixed meaning, and the only type each may be declared with (another declared type is an
error, not ignored): `user_id:token` and `item_id:token` (the ids, kept as strings), `timestamp:float` (int64
seconds; without it the row order is the time), `rating:float` (float64) and `label:float` (a 0/1 label column
named `label`). The item text is the first `token_seq` field of `.item` whose name contains "title" or
"name", kept as the original string (kind "text"). `.user` and `.item` are optional, but when present they
must be files. A byte that is not UTF-8 is an error naming its file and line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl

from recsys_lab.data.sources import validate
from recsys_lab.data.sources.files import file_fingerprint, require_file, resolve_files
from recsys_lab.data.sources.raw import FeatureKind, RawData, SourceError

SOURCE_VERSION = 1
ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
_KINDS: dict[str, FeatureKind] = {
    "token": "categorical",
    "token_seq": "multi_categorical",
    "float": "numeric",
    "float_seq": "dense_vector",
}
_SEQ_SEPARATOR = " "  # RecBole's default `seq_separator`
# Fields the loader reads with a fixed meaning, and the type each must be declared with: a
# `timestamp:token_seq` or `user_id:float` would otherwise be read as if declared correctly, hiding a broken
# conversion.
FIXED_FIELDS = {
    "user_id": ("token", "an id"),
    "item_id": ("token", "an id"),
    "timestamp": ("float", "seconds since the epoch"),
    "rating": ("float", "a rating"),
    "label": ("float", "a 0/1 label"),
}


def _header(path: Path) -> dict[str, str]:
    """name -> atomic type, from the first line."""
    with path.open("rb") as handle:
        first = handle.readline()
    try:
        header = first.decode("utf-8-sig").rstrip("\r\n").split("\t")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError:
        validate.check_utf8(path, "UTF-8, as RecBole's atomic format is")
        raise
    types: dict[str, str] = {}
    for field in header:
        name, _, kind = field.rpartition(":")
        if not name or kind not in ATOMIC_TYPES:
            raise SourceError(
                f"{path}: header field {field!r} is not of the form name:type with type one of "
                f"{list(ATOMIC_TYPES)} (e.g. 'user_id:token', 'rating:float')"
            )
        if name in types:
            raise SourceError(f"{path}: header field {name!r} appears twice ({header})")
        expected, meaning = FIXED_FIELDS.get(name, (kind, ""))
        if kind != expected:
            raise SourceError(
                f"{path}: header field {field!r} declares type {kind!r}, but {name!r} is read as {meaning}; "
                f"expected '{name}:{expected}' (or rename the field if it means something else)"
            )
        types[name] = kind
    return types


def read_atomic(path: Path) -> tuple[pl.DataFrame, dict[str, str]]:
    """The file's columns as raw strings (names without their type), and name -> atomic type."""
    types = _header(path)
    try:
        frame = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None, encoding="utf8")
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError) as err:
        validate.check_utf8(path, "UTF-8, as RecBole's atomic format is")  # the usual cause: name the line
        raise SourceError(
            f"{path}: cannot be read as tab-separated atomic file with fields {list(types)} ({err})"
        ) from err
    return frame.rename(dict(zip(frame.columns, types, strict=True))), types


def _require(types: dict[str, str], field: str, path: validate.File) -> None:
    if field not in types:
        raise SourceError(
            f"{path}: required field {field!r} is missing; the header has "
            f"{[f'{n}:{t}' for n, t in types.items()]}, expected a column headed '{field}:token'"
        )


def _convert(
    frame: pl.DataFrame, types: dict[str, str], path: validate.File, text_field: str | None = None
) -> tuple[pl.DataFrame, dict[str, FeatureKind]]:
    """Typed columns and the feature kinds of the non-special ones."""
    columns: list[pl.Series] = []
    kinds: dict[str, FeatureKind] = {}
    for name, kind in types.items():
        raw = frame.get_column(name)
        if name in ("user_id", "item_id"):
            columns.append(raw)
        elif name == "timestamp":
            columns.append(validate.to_timestamp(frame, name, path))
        elif name == "rating":
            columns.append(validate.to_float(frame, name, path))
        elif name == "label":
            columns.append(validate.to_label(frame, name, path))
        elif name == text_field:
            columns.append(raw.str.strip_chars())
            kinds[name] = "text"
        elif kind == "token":
            columns.append(raw.replace("", None))
            kinds[name] = "categorical"
        elif kind == "token_seq":
            columns.append(validate.to_list(raw, path, _SEQ_SEPARATOR))
            kinds[name] = "multi_categorical"
        elif kind == "float":
            columns.append(validate.to_float(frame, name, path, allow_null=True))
            kinds[name] = "numeric"
        else:
            columns.append(validate.to_vector(raw, path, _SEQ_SEPARATOR))
            kinds[name] = _KINDS[kind]
    return pl.DataFrame(columns), kinds


def optional_files(folder: Path, name: str) -> list[Path]:
    """`<name>.inter` and those of `.user` / `.item` that are present; one present as a non-file is an error,
    not a table left out."""
    paths = [folder / f"{name}.{suffix}" for suffix in ("inter", "user", "item")]
    for path in paths[1:]:
        if path.exists():
            require_file(path, f"the RecBole atomic file {path.name} (or nothing: it is optional)")
    return [paths[0], *[p for p in paths[1:] if p.is_file()]]


def load_atomic(folder: Path, name: str) -> RawData:
    """Read `<folder>/<name>.inter` and, when present, `.user` and `.item`."""
    paths = optional_files(folder, name)
    frame, types = read_atomic(paths[0])
    where = validate.TextFile(paths[0])  # data row r is line r + 1: atomic files have no quoting
    _require(types, "user_id", where)
    _require(types, "item_id", where)
    validate.check_ids(frame, ["user_id", "item_id"], where)
    inter, features = _convert(frame, types, where)
    if "timestamp" not in inter.columns:  # no time: the file's row order is the order of events
        inter = inter.with_columns(pl.int_range(inter.height, dtype=pl.Int64).alias("timestamp"))
    front = ["user_id", "item_id", "timestamp"] + [c for c in ("rating", "label") if c in inter.columns]
    inter = inter.select(*front, *[c for c in inter.columns if c not in front])

    tables: dict[str, pl.DataFrame | None] = {"user": None, "item": None}
    item_text = None
    for path in paths[1:]:
        table = path.suffix[1:]
        key = f"{table}_id"
        frame, types = read_atomic(path)
        where = validate.TextFile(path)
        _require(types, key, where)
        validate.check_ids(frame, [key], where)
        validate.check_unique(frame, key, where)
        text_field = None
        if table == "item":
            text_field = next(
                (f for f, t in types.items() if t == "token_seq" and ("title" in f or "name" in f)), None
            )
            item_text = text_field
        converted, kinds = _convert(frame, types, where, text_field)
        tables[table] = converted.select(key, *[c for c in converted.columns if c != key])
        features.update(kinds)

    return RawData(
        interactions=inter,
        users=tables["user"],
        items=tables["item"],
        features=features,
        labels=["label"] if "label" in inter.columns else [],
        item_text=item_text,
        files=[str(p) for p in paths],
    )


class AtomicFiles:
    """Any data set in RecBole's atomic format (`<name>.inter` plus optional `.user` / `.item`).

    Args:
        name: the file stem, e.g. "ml-100k" for `ml-100k.inter`.
        path: the folder holding the files (or one sub-folder of it), the `.inter` file, or a .zip of them.
        cache_dir: the data cache root; only a .zip `path` is unpacked there (`<cache_dir>/raw/atomic-<name>/`).
    """

    def __init__(self, name: str, path: str, cache_dir: str = "data") -> None:
        self.dataset = name
        self.path = path
        self.cache_dir = cache_dir

    @property
    def name(self) -> str:
        return f"atomic-{self.dataset}"

    def _folder(self) -> Path:
        return resolve_files(self.name, [f"{self.dataset}.inter"], self.path, self.cache_dir)

    def fingerprint(self) -> str:
        """Cache key: the source version, the data set name and the files."""
        blob = {
            "source": "atomic",
            "version": SOURCE_VERSION,
            "name": self.dataset,
            "files": file_fingerprint(optional_files(self._folder(), self.dataset)),
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "source": self.name,
            "source_version": SOURCE_VERSION,
            "dataset": self.dataset,
            "path": self.path,
        }

    def load(self) -> RawData:
        return load_atomic(self._folder(), self.dataset)
