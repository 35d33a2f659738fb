"""Vocabularies and normalisers, fitted on the training split only and applied to every split.

Code 0 of every vocabulary is "unknown": values never seen in training (a cold-start item's id, a new
user, a null) map to it, so a model never sees an id it could not have learned in training. Incremental
training (`data.vocab_from`) keeps an earlier run's vocabulary and appends the new training values after it
(`extend_vocab`), and applies the earlier statistics (`fitted=`) instead of refitting them.
"""

from __future__ import annotations

import numpy as np
import polars as pl

UNKNOWN = 0


def fit_vocab(train_values: pl.Series) -> pl.DataFrame:
    """value -> code (1..V) for the distinct non-null training values, sorted for determinism."""
    values = train_values.drop_nulls().unique().sort()
    return pl.DataFrame({"value": values, "code": np.arange(1, len(values) + 1, dtype=np.int64)})


def extend_vocab(previous: pl.Series, train_values: pl.Series, grow: bool = True) -> pl.DataFrame:
    """A previous vocabulary kept as it is, with the training values it lacks appended (`data.vocab_from`).

    `previous` holds the previous vocabulary's values in code order (value i has code i + 1). Every one keeps
    its code, so a model trained with the previous vocabulary reads the same row for the same value; with
    `grow`, the distinct non-null training values not in it follow, sorted, with codes len(previous) + 1, ...
    (the new rows of a grown embedding table). Without `grow` nothing is appended: new values read UNKNOWN,
    as they would for the previous model."""
    if previous.null_count() or previous.n_unique() != len(previous):
        raise ValueError("data.vocab_from: the previous vocabulary has null or repeated values")
    try:
        previous = previous.cast(train_values.dtype)
    except pl.exceptions.InvalidOperationError as err:
        raise ValueError(
            f"data.vocab_from: the previous vocabulary's values ({previous.dtype}) do not convert to this "
            f"data's ({train_values.dtype}): {err}"
        ) from None
    kept = pl.DataFrame({"value": previous, "code": np.arange(1, len(previous) + 1, dtype=np.int64)})
    if not grow:
        return kept
    new = train_values.drop_nulls().unique().sort()
    new = new.filter(~new.is_in(previous))
    added = pl.DataFrame(
        {"value": new, "code": np.arange(len(previous) + 1, len(previous) + 1 + len(new), dtype=np.int64)}
    )
    return pl.concat([kept, added])


def encode(values: pl.Series, vocab: pl.DataFrame) -> np.ndarray:
    """int64 codes of `values` under `vocab`; unseen values and nulls get UNKNOWN."""
    frame = pl.DataFrame({"value": values.cast(vocab["value"].dtype, strict=False)})
    codes = frame.join(vocab, on="value", how="left", maintain_order="left")["code"]
    return codes.fill_null(UNKNOWN).to_numpy().astype(np.int64)


def encode_lists(values: pl.Series, vocab: pl.DataFrame, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A List[str] column as right-padded codes [N, max_len] and lengths [N] (unseen tokens dropped, so a
    list of only unseen tokens has length 0; lists are truncated to max_len)."""
    n = len(values)
    exploded = pl.DataFrame({"row": np.arange(n), "value": values}).explode("value").drop_nulls("value")
    exploded = exploded.with_columns(pl.col("value").cast(vocab["value"].dtype, strict=False))
    coded = exploded.join(vocab, on="value", how="inner", maintain_order="left")
    coded = coded.with_columns(pl.col("row").cum_count().over("row").alias("pos") - 1)
    coded = coded.filter(pl.col("pos") < max_len)
    ids = np.zeros((n, max(max_len, 1)), dtype=np.int64)
    rows, pos = coded["row"].to_numpy(), coded["pos"].to_numpy()
    ids[rows, pos] = coded["code"].to_numpy()
    lengths = np.bincount(rows, minlength=n).astype(np.int64)
    return ids[:, :max_len], lengths


def standardise(
    values: np.ndarray, train_rows: np.ndarray, log: bool = False, name: str = "", fitted: dict | None = None
) -> tuple[np.ndarray, dict]:
    """Standardise a float column [N] or [N, D] with the mean/std of `train_rows`; nulls (NaN) become the
    training mean (0 after standardising). Returns values and the fitted statistics. `fitted`: statistics of
    an earlier fit (`data.vocab_from`), applied as they are instead of fitting (its log1p choice included)."""
    values = np.asarray(values, dtype=np.float64)
    log = fitted["log1p"] if fitted is not None else log
    if log:
        if np.nanmin(values) < 0:
            raise ValueError(f"data.log_dense: column '{name}' has negative values; log1p needs values >= 0")
        values = np.log1p(values)
    if fitted is not None:
        mean, std = np.asarray(fitted["mean"]), np.asarray(fitted["std"])
    else:
        fit = values[train_rows]
        mean = np.nanmean(fit, axis=0) if len(fit) else np.zeros(values.shape[1:])
        std = np.nanstd(fit, axis=0) if len(fit) else np.ones(values.shape[1:])
        mean, std = np.nan_to_num(mean), np.nan_to_num(std) + 1e-6
    out = np.nan_to_num((values - mean) / std, nan=0.0).astype(np.float32)
    return out, {"mean": np.atleast_1d(mean).tolist(), "std": np.atleast_1d(std).tolist(), "log1p": log}


def bucketise(
    values: np.ndarray, train_rows: np.ndarray, buckets: int, name: str = "", fitted: dict | None = None
) -> tuple[np.ndarray, dict]:
    """A numeric column [N] as equal-frequency bucket codes, boundaries fitted on `train_rows`.

    The boundaries are the training quantiles at 1/n, 2/n, ..., (n-1)/n of the non-null values; repeated
    boundaries (a value that fills several quantiles, e.g. many zeros) are merged, so there may be fewer than
    `buckets` buckets, and the statistics say how many. Codes are 1..k (value v goes to 1 + the number of
    boundaries <= v) and nulls get UNKNOWN, like a categorical column, so the vocabulary size is k + 1.
    Returns int64 codes [N] and the statistics (boundaries, bucket count). `fitted`: the statistics of an
    earlier fit (`data.vocab_from`), whose boundaries are applied as they are, so every code keeps its
    meaning."""
    if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 2:
        raise ValueError(f"data.numeric_buckets.{name}: expected an integer >= 2 buckets, got {buckets!r}")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"data.numeric_buckets.{name}: only one-value numeric columns can be bucketised")
    if fitted is not None:
        boundaries = np.asarray(fitted["boundaries"], dtype=np.float64)
    else:
        fit = values[train_rows]
        fit = fit[~np.isnan(fit)]
        if len(fit) == 0:
            raise ValueError(
                f"data.numeric_buckets.{name}: the column has no training value to fit buckets on"
            )
        boundaries = np.unique(np.quantile(fit, np.arange(1, buckets) / buckets))
    codes = 1 + np.searchsorted(boundaries, values, side="right")
    codes[np.isnan(values)] = UNKNOWN
    stats = {"boundaries": boundaries.tolist(), "buckets": len(boundaries) + 1}
    return codes.astype(np.int64), stats
