"""The raw form every real-data source returns, before filtering, splitting and vocabulary fitting.

Sources only read and validate files; everything that is a protocol choice (implicit conversion, k-core,
splits, vocabularies, normalisers) happens downstream, in config, so it is logged with the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import polars as pl

FeatureKind = Literal["categorical", "multi_categorical", "numeric", "dense_vector", "text", "image", "audio"]
FEATURE_KINDS = ("categorical", "multi_categorical", "numeric", "dense_vector", "text", "image", "audio")


class SourceError(ValueError):
    """Bad input: the message names the file, the column and what was expected."""


@dataclass
class RawData:
    """Tables with raw ids (strings or integers, as in the files).

    Args:
        interactions: one row per interaction with columns `user_id`, `item_id`, `timestamp` (int64 seconds;
            sources without time use the row order), and optionally `rating` (float64), label columns
            (0/1 ints, e.g. `click`), context columns (declared in `features`), and `split`
            ("train" / "val" / "test", for pre-split data).
        users: `user_id` + user feature columns, or None.
        items: `item_id` + item feature columns, or None.
        features: kind of every feature column of users, items and interactions (context):
            "categorical" (one token), "multi_categorical" (a List[str] column, e.g. genres), "numeric"
            (float), "dense_vector" (fixed-length list of floats), "text" (a string for language models),
            "image" (item pictures: a list of S * S * 3 uint8 values, an S x S RGB picture flattened in
            height, width, channel order as `numpy.asarray(PIL.Image)` gives it), "audio" (item sounds: a
            list of float samples, every row the same length). A null dense vector, image or sound is a
            missing modality.
        labels: label columns present in `interactions` (empty for rating / implicit data).
        item_text: the item column that language models read (title + attributes), or None.
        files: the files the tables were read from (for messages and the cache fingerprint).
        oracle: an interactions column holding the true click probability (simulated data only), or None.
    """

    interactions: pl.DataFrame
    users: pl.DataFrame | None = None
    items: pl.DataFrame | None = None
    features: dict[str, FeatureKind] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    item_text: str | None = None
    files: list[str] = field(default_factory=list)
    oracle: str | None = None
