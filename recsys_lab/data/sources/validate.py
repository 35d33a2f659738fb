"""Column checks shared by the file sources: one clear `SourceError` per problem, nothing dropped.

Each helper takes the frame as it was read (column names as in the file), checks one column and returns it
converted. Messages name the file, the column, what was expected and the first offending value with its data
row (1-based, header not counted). Rows are never dropped here: filtering is a protocol choice made downstream,
where it is counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import polars as pl

from recsys_lab.data.sources.raw import FEATURE_KINDS, SourceError


def _first_bad(values: pl.Series, bad: pl.Series) -> tuple[int, int, object]:
    """(number of flagged rows, 1-based row of the first, its value in `values`)."""
    bad = bad.fill_null(True)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return 0, 0, None
    index = int(bad.arg_true()[0])
    return n_bad, index + 1, values[index]


def require_columns(
    frame: pl.DataFrame, columns: Iterable[str], file: str | Path, expected: str = ""
) -> None:
    """Raise if any of `columns` is not in `frame`, listing the columns the file does have."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        hint = f"; expected {expected}" if expected else ""
        raise SourceError(f"{file}: missing column(s) {missing} (the file has {frame.columns}){hint}")


def check_kind(kind: str, where: str) -> None:
    if kind not in FEATURE_KINDS:
        raise SourceError(f"{where}: unknown feature kind {kind!r}; expected one of {list(FEATURE_KINDS)}")


def check_ids(frame: pl.DataFrame, columns: Iterable[str], file: str | Path) -> None:
    """Ids must be present: null, NaN and empty (or blank) strings are errors, not rows to skip."""
    for column in columns:
        series = frame.get_column(column)
        bad = series.is_null()
        if series.dtype == pl.String:
            bad = bad | (series.str.strip_chars() == "")
        elif series.dtype.is_float():
            bad = bad | series.is_nan()
        n_bad, row, value = _first_bad(series, bad)
        if n_bad:
            hint = " (all of them: is the field missing or misspelled?)" if n_bad == len(series) else ""
            raise SourceError(
                f"{file}: column {column!r} holds ids and must not be null or empty, but {n_bad} of {len(series)} "
                f"rows are{hint}; the first is data row {row} (value {value!r})"
            )


def check_unique(frame: pl.DataFrame, column: str, file: str | Path) -> None:
    """A feature table needs one row per id."""
    dup = frame.get_column(column).is_duplicated()
    n_bad, row, value = _first_bad(frame.get_column(column), dup)
    if n_bad:
        raise SourceError(
            f"{file}: column {column!r} must have one row per id; {n_bad} rows share an id, e.g. {value!r} "
            f"(data row {row})"
        )


def to_float(frame: pl.DataFrame, column: str, file: str | Path, *, allow_null: bool = False) -> pl.Series:
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
            f"{file}: column {column!r} must be numeric{null}; {n_bad} rows are not, the first at data row "
            f"{row} (value {value!r})"
        )
    return cast.alias(column)


def to_label(frame: pl.DataFrame, column: str, file: str | Path) -> pl.Series:
    """A 0/1 label column as int64 (booleans, 0/1 integers or floats, "0"/"1" strings)."""
    series = frame.get_column(column)
    values = series.cast(pl.Float64) if series.dtype == pl.Boolean else to_float(frame, column, file)
    n_bad, row, value = _first_bad(series, ~values.is_in([0.0, 1.0]))
    if n_bad:
        raise SourceError(
            f"{file}: label column {column!r} must be 0 or 1; {n_bad} rows are not, the first at data row {row} "
            f"(value {value!r})"
        )
    return values.cast(pl.Int64).alias(column)


def to_timestamp(
    frame: pl.DataFrame, column: str, file: str | Path, fmt: str | None = None, *, scale: int = 1
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
        bad = as_float.is_null() | as_float.is_nan() | (as_float != as_float.floor())
        hint = " (set data.source.timestamp_format to parse date strings)" if dtype == pl.String else ""
        expect = f"integer seconds since the epoch{hint}"
    else:
        raise SourceError(f"{file}: column {column!r} must hold timestamps, found type {dtype}")
    n_bad, row, value = _first_bad(series, bad)
    if n_bad:
        raise SourceError(
            f"{file}: column {column!r} must hold {expect}; {n_bad} rows do not, the first at data row {row} "
            f"(value {value!r})"
        )
    if scale != 1:
        out = out // scale
    return out.cast(pl.Int64).alias(column)


def to_list(series: pl.Series, file: str | Path, separator: str) -> pl.Series:
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


def to_vector(series: pl.Series, file: str | Path, separator: str = " ") -> pl.Series:
    """A fixed-length float vector column as List[f64]: lists pass through, strings are split on `separator`."""
    if series.dtype == pl.String:
        parts = to_list(series, file, separator)
        vectors = parts.list.eval(pl.element().cast(pl.Float64, strict=False))
        bad = vectors.list.eval(pl.element().is_null().any()).list.first()
        n_bad, row, value = _first_bad(series, bad.fill_null(False))
        if n_bad:
            raise SourceError(
                f"{file}: column {series.name!r} must hold {separator!r}-separated numbers; {n_bad} rows do not, "
                f"the first at data row {row} (value {value!r})"
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
