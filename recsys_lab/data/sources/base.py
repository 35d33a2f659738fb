"""The form every source produces and the on-disk cache of it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

CACHE_FORMAT = 1
_FRAMES = ("interactions", "users", "items")


class DataCacheError(RuntimeError):
    """A cache folder that is corrupt or was written by another version."""


@dataclass
class SourceData:
    """Raw tables with integer ids, before splitting.

    Args:
        interactions: one row per impression/interaction: `user_id`, `item_id`, `timestamp` (int seconds), the
            context columns, the label columns and optionally the oracle column.
        users: `user_id` plus categorical user features (one row per user id 0..n_users-1).
        items: `item_id` plus categorical, dense and text item features (one row per item id 0..n_items-1).
        vocab_sizes: every categorical column (in any table) -> number of ids (ids are 0..n-1).
        labels: label columns of `interactions` (0/1).
        dense: dense item columns (float, or fixed-size float arrays).
        item_text: item column with a short text (title + attributes) for language models, or None.
        oracle: interactions column with the true click probability (simulated data only), or None.
    """

    interactions: pl.DataFrame
    users: pl.DataFrame
    items: pl.DataFrame
    vocab_sizes: dict[str, int]
    labels: list[str] = field(default_factory=lambda: ["click", "purchase"])
    dense: list[str] = field(default_factory=lambda: ["price", "image"])
    item_text: str | None = "title"
    oracle: str | None = "true_click_prob"

    def meta(self) -> dict:
        return {
            "vocab_sizes": self.vocab_sizes,
            "labels": self.labels,
            "dense": self.dense,
            "item_text": self.item_text,
            "oracle": self.oracle,
        }


def save_cache(data: SourceData, folder: Path, fingerprint: str) -> None:
    """Write the tables as parquet, then meta.json last: a folder without meta.json is an unfinished write."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in _FRAMES:
        frame: pl.DataFrame = getattr(data, name)
        frame.write_parquet(folder / f"{name}.parquet")
        rows[name] = frame.height
    meta = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "rows": rows, **data.meta()}
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / "meta.json")


def load_cache(folder: Path, fingerprint: str) -> SourceData | None:
    """The cached tables, None when nothing is cached; DataCacheError when the cache cannot be trusted."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    hint = f"delete the folder {folder} to rebuild it"
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataCacheError(f"data cache {meta_path} is corrupt ({err}); {hint}") from err
    if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != fingerprint:
        raise DataCacheError(
            f"data cache {folder} was written by another version (format {meta.get('format')}, fingerprint "
            f"{meta.get('fingerprint')}; expected format {CACHE_FORMAT}, fingerprint {fingerprint}); {hint}"
        )
    frames = {}
    for name in _FRAMES:
        path = folder / f"{name}.parquet"
        try:
            frames[name] = pl.read_parquet(path)
        except Exception as err:  # polars raises several error types for truncated/garbled files
            raise DataCacheError(f"data cache file {path} is corrupt or missing ({err}); {hint}") from err
        if frames[name].height != meta["rows"][name]:
            raise DataCacheError(
                f"data cache file {path} has {frames[name].height} rows, meta.json says {meta['rows'][name]}; {hint}"
            )
    return SourceData(
        **frames,
        vocab_sizes=meta["vocab_sizes"],
        labels=meta["labels"],
        dense=meta["dense"],
        item_text=meta["item_text"],
        oracle=meta["oracle"],
    )
