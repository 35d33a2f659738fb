"""Column checks shared by the file sources: one clear `SourceError` per problem, nothing dropped.

Each helper takes the frame as it was read (column names as in the file), checks one column and returns it
converted. Messages name the file, the column, what was expected and the first offending value with its data
row (1-based, header not counted) and, for text files passed as a `TextFile`, the line an editor shows. Rows
are never dropped here: filtering is a protocol choice made downstream, where it is counted.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys_lab.data.sources.raw import FEATURE_KINDS, SourceError

# How CSV writers, spreadsheets and databases spell a missing value (pandas' default `na_values`, plus None,
# nil and NaT). Read as text, such an id would become one real user or item pooling unrelated rows.
NULL_SPELLINGS = (
    "nan", "-nan", "+nan", "null", "none", "nil", "nat", "na", "n/a", "<na>", "#n/a", "#n/a n/a", "#na",
    "-1.#ind", "1.#ind", "-1.#qnan", "1.#qnan",
)  # fmt: skip
_NULL_SPELLING = r"(?i)^\s*(?:" + "|".join(re.escape(s) for s in NULL_SPELLINGS) + r")\s*$"
_CHUNK = 2**24


def _holds(path: Path, needle: bytes) -> bool:
    with path.open("rb") as handle:
        return any(needle in chunk for chunk in iter(lambda: handle.read(_CHUNK), b""))


@dataclass(frozen=True)
class TextFile:
    """A delimited text file, for messages: `str()` is its path, `line(row)` the line where a data row starts.

    Args:
        path: the file.
        header: lines before the first data row (1 for a header line, 0 for none).
        quote: the quote character when the reader honours quoting, else None. A quoted field may span
            lines, so the line is then counted by re-reading the file as CSV, only when a message needs it.
        separator: the field separator (read with `quote`).
    """

    path: Path
    header: int = 1
    quote: str | None = None
    separator: str = ","

    def __str__(self) -> str:
        return str(self.path)

    def line(self, row: int) -> int | None:
        """The 1-based line of 1-based data row `row`; None when the file has fewer rows."""
        if self.quote is None or not _holds(self.path, self.quote.encode()):
            return self.header + row
        with self.path.open(newline="", encoding="utf-8", errors="replace") as handle:
            # csv.reader yields a blank line as an empty record, as polars reads it as a row of nulls
            reader = csv.reader(handle, delimiter=self.separator, quotechar=self.quote)
            for _ in range(self.header + row - 1):
                if next(reader, None) is None:
                    return None
            return reader.line_num + 1


# where a message says a value is: a path, or a TextFile for line numbers
File = str | Path | TextFile


def at(file: File, row: int) -> str:
    """Where data row `row` is: "line 3, data row 2" in a text file, else "data row 2"."""
    line = file.line(row) if isinstance(file, TextFile) else None
    return f"data row {row}" if line is None else f"line {line}, data row {row}"


def check_utf8(path: Path, expected: str = "UTF-8") -> None:
    """Raise naming the line of the first byte that is not UTF-8. Readers call it after they failed, so
    reading the whole file costs nothing on the normal path."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SourceError(
            f"{path}: line {line} is not valid UTF-8 (byte {data[err.start : err.start + 1]!r} at offset "
            f"{err.start}); expected {expected}: convert the file, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _first_bad(values: pl.Series, bad: pl.Series) -> tuple[int, int, object]:
    """(number of flagged rows, 1-based row of the first, its value in `values`)."""
    bad = bad.fill_null(True)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return 0, 0, None
    index = int(bad.arg_true()[0])
    return n_bad, index + 1, values[index]


def require_columns(frame: pl.DataFrame, columns: Iterable[str], file: File, expected: str = "") -> None:
    """Raise if any of `columns` is not in `frame`, listing the columns the file does have."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        hint = f"; expected {expected}" if expected else ""
        raise SourceError(f"{file}: missing column(s) {missing} (the file has {frame.columns}){hint}")


def check_kind(kind: str, where: str) -> None:
    if kind not in FEATURE_KINDS:
        raise SourceError(f"{where}: unknown feature kind {kind!r}; expected one of {list(FEATURE_KINDS)}")


def check_ids(frame: pl.DataFrame, columns: Iterable[str], file: File) -> None:
    """Ids must be present and written one way.

    Errors, not rows to skip: null, NaN and empty (or blank) strings; spellings of a missing value
    (`NULL_SPELLINGS`, any case), which would pool unrelated rows under one id; and leading or trailing
    whitespace, which would make " 1" and "1" two ids.
    """
    for column in columns:
        series = frame.get_column(column)
        bad = series.is_null()
        if series.dtype == pl.String:
            bad = bad | (series.str.strip_chars() == "")
        elif series.dtype.is_float():
            bad = bad | series.is_nan()
        n_bad, row, value = _first_bad(series, bad)
        start = f"{file}: column {column!r} holds ids"
        if n_bad:
            hint = " (all of them: is the field missing or misspelled?)" if n_bad == len(series) else ""
            raise SourceError(
                f"{start} and must not be null or empty, but {n_bad} of {len(series)} rows are{hint}; the "
                f"first is {at(file, row)} (value {value!r})"
            )
        if series.dtype != pl.String:
            continue
        n_bad, row, value = _first_bad(series, series.str.contains(_NULL_SPELLING))
        if n_bad:
            raise SourceError(
                f"{start}, but {n_bad} of {len(series)} rows hold a spelling of a missing value; the first "
                f"is {at(file, row)} (value {value!r}). Read as text it would become one id pooling unrelated "
                f"rows: fill in the ids or remove those rows (rejected, any case: "
                f"{', '.join(NULL_SPELLINGS)})"
            )
        n_bad, row, value = _first_bad(series, series.str.contains(r"^\s|\s$"))
        if n_bad:
            raise SourceError(
                f"{start}, but {n_bad} of {len(series)} rows have leading or trailing whitespace; the first "
                f"is {at(file, row)} (value {value!r}). {value.strip()!r} and {value!r} would be two different "
                f"ids: remove the whitespace in the file"
            )


def check_unique(frame: pl.DataFrame, column: str, file: File) -> None:
    """A feature table needs one row per id."""
    dup = frame.get_column(column).is_duplicated()
    n_bad, row, value = _first_bad(frame.get_column(column), dup)
    if n_bad:
        raise SourceError(
            f"{file}: column {column!r} must have one row per id; {n_bad} rows share an id, e.g. {value!r} "
            f"({at(file, row)})"
        )


def to_float(frame: pl.DataFrame, column: str, file: File, *, allow_null: bool = False) -> pl.Series:
    """The column as float64; a value that is not a number (or a null / NaN / "", unless allowed) is an error.

    With `allow_null`, NaN and "" become null.
    """
    series = frame.get_column(column)
    if series.dtype == pl.String:
        text = series.str.strip_chars().replace("", None)  # "" is a missing value, not a number
        cast = text.cast(pl.Float64, strict=False)
        missing = text.is_null()
    elif series.dtype.is_numeric() and series.dtype != pl.Boolean:
        cast = series.cast(pl.Float64)
        missing = series.is_null()
    else:
        raise SourceError(f"{file}: column {column!r} must be numeric, found type {series.dtype}")
    missing = missing | cast.is_nan().fill_null(False)  # NaN is a missing value too
    cast = cast.fill_nan(None)
    bad = cast.is_null() & ~missing
    if not allow_null:
        bad = bad | missing
    n_bad, row, value = _first_bad(series, bad)
    if n_bad:
        null = "" if allow_null else " and not null"
        raise SourceError(
            f"{file}: column {column!r} must be numeric{null}; {n_bad} rows are not, the first at "
            f"{at(file, row)} (value {value!r})"
        )
    return cast.alias(column)


def to_label(frame: pl.DataFrame, column: str, file: File) -> pl.Series:
    """A 0/1 label column as int64 (booleans, 0/1 integers or floats, "0"/"1" strings)."""
    series = frame.get_column(column)
    values = series.cast(pl.Float64) if series.dtype == pl.Boolean else to_float(frame, column, file)
    n_bad, row, value = _first_bad(series, ~values.is_in([0.0, 1.0]))
    if n_bad:
        raise SourceError(
            f"{file}: label column {column!r} must be 0 or 1; {n_bad} rows are not, the first at "
            f"{at(file, row)} (value {value!r})"
        )
    return values.cast(pl.Int64).alias(column)


def to_timestamp(
    frame: pl.DataFrame, column: str, file: File, fmt: str | None = None, *, scale: int = 1
) -> pl.Series:
    """Timestamps as int64 seconds.

    Accepted: integers (divided by `scale`, e.g. 1000 for milliseconds), integral floats, datetimes and dates
    (seconds since the epoch; a naive datetime is read as UTC), and strings — integers without `fmt`, or
    parsed strictly with the strptime format `fmt` (e.g. "%Y-%m-%d %H:%M:%S"). Nulls are errors.
    """
    series = frame.get_column(column)
    dtype = series.dtype
    if dtype == pl.Date or isinstance(dtype, pl.Datetime):
        out = series.cast(pl.Datetime("us")).dt.epoch("s") if dtype == pl.Date else series.dt.epoch("s")
        expect, bad = "timestamps", out.is_null()
    elif dtype == pl.String and fmt is not None:
        out = series.str.strip_chars().str.strptime(pl.Datetime("us"), fmt, strict=False).dt.epoch("s")
        expect, bad = f"times in the format {fmt!r} (data.source.timestamp_format)", out.is_null()
    elif dtype == pl.String or (dtype.is_numeric() and dtype != pl.Boolean):
        number = series.str.strip_chars() if dtype == pl.String else series
        as_float = number.cast(pl.Float64, strict=False)
        # integers go through Int64 directly: float64 is exact only up to 2**53
        out = number.cast(pl.Int64, strict=False).fill_null(as_float.cast(pl.Int64, strict=False))
        # an infinite or out-of-range number has no int64 value: it would become a silent null
        bad = as_float.is_null() | as_float.is_nan() | (as_float != as_float.floor()) | out.is_null()
        hint = " (set data.source.timestamp_format to parse date strings)" if dtype == pl.String else ""
        expect = f"integer seconds since the epoch{hint}"
    else:
        raise SourceError(f"{file}: column {column!r} must hold timestamps, found type {dtype}")
    n_bad, row, value = _first_bad(series, bad)
    if n_bad:
        raise SourceError(
            f"{file}: column {column!r} must hold {expect}; {n_bad} rows do not, the first at "
            f"{at(file, row)} (value {value!r})"
        )
    if scale != 1:
        out = out // scale
    return out.cast(pl.Int64).alias(column)


def to_list(series: pl.Series, file: File, separator: str) -> pl.Series:
    """A multi-valued column as List[str]: lists pass through, strings are split on `separator`.

    Parts are stripped and empty parts removed; "" and null are the empty list (an empty CSV or atomic field
    means "no values").
    """
    if isinstance(series.dtype, (pl.List, pl.Array)):
        return series.cast(pl.List(pl.String)).fill_null([])
    if series.dtype != pl.String:
        raise SourceError(
            f"{file}: column {series.name!r} must be a list or a {separator!r}-separated string, "
            f"found type {series.dtype}"
        )
    parts = series.fill_null("").str.split(separator).list.eval(pl.element().str.strip_chars())
    return parts.list.eval(pl.element().filter(pl.element() != ""))


def to_vector(series: pl.Series, file: File, separator: str = " ") -> pl.Series:
    """A fixed-length float vector column as List[f64]: lists pass through, strings are split on `separator`."""
    if series.dtype == pl.String:
        parts = to_list(series, file, separator)
        vectors = parts.list.eval(pl.element().cast(pl.Float64, strict=False))
        bad = vectors.list.eval(pl.element().is_null().any()).list.first()
        n_bad, row, value = _first_bad(series, bad.fill_null(False))
        if n_bad:
            raise SourceError(
                f"{file}: column {series.name!r} must hold {separator!r}-separated numbers; {n_bad} rows do not, "
                f"the first at {at(file, row)} (value {value!r})"
            )
    elif isinstance(series.dtype, (pl.List, pl.Array)) and series.dtype.inner.is_numeric():
        vectors = series.cast(pl.List(pl.Float64))
    else:
        raise SourceError(
            f"{file}: column {series.name!r} must hold float vectors, found type {series.dtype}"
        )
    lengths = vectors.list.len().drop_nulls().unique().sort()
    if len(lengths) > 1:
        raise SourceError(
            f"{file}: column {series.name!r} must hold vectors of one length; found lengths {lengths.to_list()}"
        )
    return vectors


def to_media(series: pl.Series, file: File, kind: str) -> pl.Series:
    """An item media column: "image" -> List[u8] of S * S * 3 pixel values (height, width, RGB), "audio" ->
    List[f32] samples; every non-null row of one length; null stays null (the item has no such media)."""
    if not (isinstance(series.dtype, (pl.List, pl.Array)) and series.dtype.inner.is_numeric()):
        raise SourceError(
            f"{file}: {kind} column {series.name!r} must hold lists of numbers (pixels or samples), found type "
            f"{series.dtype}"
        )
    values = series.cast(pl.List(pl.Float64))
    lengths = values.list.len().drop_nulls().unique().sort()
    if len(lengths) > 1:
        raise SourceError(
            f"{file}: {kind} column {series.name!r} must hold rows of one length; found lengths {lengths.to_list()}"
        )
    if kind == "audio":
        return series.cast(pl.List(pl.Float32))
    side = int(round((int(lengths[0]) / 3) ** 0.5)) if len(lengths) else 0
    if len(lengths) and 3 * side * side != int(lengths[0]):
        raise SourceError(
            f"{file}: image column {series.name!r} must hold S * S * 3 values (a square RGB picture), found "
            f"{int(lengths[0])} per row"
        )
    low, high = values.list.min().min(), values.list.max().max()
    if low is not None and (low < 0 or high > 255):
        raise SourceError(
            f"{file}: image column {series.name!r} must hold pixel values in 0..255, found {low}..{high}"
        )
    return series.cast(pl.List(pl.UInt8))
