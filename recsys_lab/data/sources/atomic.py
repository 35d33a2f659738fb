"""RecBole atomic files: `<name>.inter`, `<name>.user`, `<name>.item`.

Format (https://recbole.io/docs/user_guide/data/atomic_files.html): tab-separated, UTF-8, one header line of
`field:type` names, no quoting. Types and what they become here:

| type | column | feature kind |
|---|---|---|
| `token` | string (empty = null) | categorical |
| `token_seq` | List[str], space-separated tokens | multi_categorical (or text, see below) |
| `float` | float64 | numeric |
| `float_seq` | List[f64], space-separated, one length per column | dense_vector |

Fields with a fixed meaning: `user_id` and `item_id` (the ids, kept as strings), `timestamp` (int64 seconds;
without it the row order is the time), `rating` (float64) and `label` (a 0/1 label column named `label`).
The item text is the first `token_seq` field of `.item` whose name contains "title" or "name", kept as the
original string (kind "text"). `.user` and `.item` are optional.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl

from recsys_lab.data.sources import validate
from recsys_lab.data.sources.files import file_fingerprint, resolve_files
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


def read_atomic(path: Path) -> tuple[pl.DataFrame, dict[str, str]]:
    """The file's columns as raw strings (names without their type), and name -> atomic type."""
    with path.open(encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n").split("\t")
    types: dict[str, str] = {}
    for field in header:
        name, _, kind = field.rpartition(":")
        if not name or kind not in ATOMIC_TYPES:
            raise SourceError(
                f"{path}: header field {field!r} is not of the form name:type with type one of "
                f"{list(ATOMIC_TYPES)} (e.g. 'user_id:token', 'rating:float')"
            )
        types[name] = kind
    try:
        frame = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None, encoding="utf8")
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError) as err:
        raise SourceError(
            f"{path}: cannot be read as tab-separated atomic file with fields {header} ({err})"
        ) from err
    return frame.rename(dict(zip(frame.columns, types, strict=True))), types


def _require(types: dict[str, str], field: str, path: Path) -> None:
    if field not in types:
        raise SourceError(
            f"{path}: required field {field!r} is missing; the header has "
            f"{[f'{n}:{t}' for n, t in types.items()]}, expected a column headed '{field}:token'"
        )


def _convert(
    frame: pl.DataFrame, types: dict[str, str], path: Path, text_field: str | None = None
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


def load_atomic(folder: Path, name: str) -> RawData:
    """Read `<folder>/<name>.inter` and, when present, `.user` and `.item`."""
    inter_path = folder / f"{name}.inter"
    frame, types = read_atomic(inter_path)
    _require(types, "user_id", inter_path)
    _require(types, "item_id", inter_path)
    validate.check_ids(frame, ["user_id", "item_id"], inter_path)
    inter, features = _convert(frame, types, inter_path)
    if "timestamp" not in inter.columns:  # no time: the file's row order is the order of events
        inter = inter.with_columns(pl.int_range(inter.height, dtype=pl.Int64).alias("timestamp"))
    front = ["user_id", "item_id", "timestamp"] + [c for c in ("rating", "label") if c in inter.columns]
    inter = inter.select(*front, *[c for c in inter.columns if c not in front])
    files = [str(inter_path)]

    tables: dict[str, pl.DataFrame | None] = {"user": None, "item": None}
    item_text = None
    for table, key in (("user", "user_id"), ("item", "item_id")):
        path = folder / f"{name}.{table}"
        if not path.is_file():
            continue
        frame, types = read_atomic(path)
        _require(types, key, path)
        validate.check_ids(frame, [key], path)
        validate.check_unique(frame, key, path)
        text_field = None
        if table == "item":
            text_field = next(
                (f for f, t in types.items() if t == "token_seq" and ("title" in f or "name" in f)), None
            )
            item_text = text_field
        converted, kinds = _convert(frame, types, path, text_field)
        tables[table] = converted.select(key, *[c for c in converted.columns if c != key])
        features.update(kinds)
        files.append(str(path))

    return RawData(
        interactions=inter,
        users=tables["user"],
        items=tables["item"],
        features=features,
        labels=["label"] if "label" in inter.columns else [],
        item_text=item_text,
        files=files,
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

    def _paths(self, folder: Path) -> list[Path]:
        return [p for p in (folder / f"{self.dataset}.{s}" for s in ("inter", "user", "item")) if p.is_file()]

    def fingerprint(self) -> str:
        """Cache key: the source version, the data set name and the files."""
        blob = {
            "source": "atomic",
            "version": SOURCE_VERSION,
            "name": self.dataset,
            "files": file_fingerprint(self._paths(self._folder())),
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
