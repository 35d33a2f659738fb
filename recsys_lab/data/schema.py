"""The feature schema: one description of every feature that drives embedding creation in every model.

The schema comes from the DataModule at run time (vocabularies and statistics are fitted on the training split)
and is passed to the model constructor by `train.py`, so model configs never repeat feature names or sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from recsys_lab.data.text import ItemTokens

Kind = Literal["sparse", "seq", "dense", "text"]
Side = Literal["user", "item", "context"]


@dataclass(frozen=True)
class Feature:
    """One named feature.

    Args:
        name: key in the matching `Batch` dict (`batch.sparse[name]`, `batch.seq[name]`, ...).
        kind: "sparse" (one id per row), "seq" (id list + lengths), "dense" (float [B] or [B, dim]),
            "text" (token ids built by the DataModule).
        side: "user" and "context" features describe the query; "item" features describe the candidate.
            Two-tower models split on this.
        vocab_size: number of ids for sparse/seq features (ids are 0..vocab_size-1).
        dim: width of a dense feature.
        max_len: longest sequence (seq) or token count (text).
        embed_as: for a seq feature, the sparse feature whose embedding table it shares (a click history of
            items is embedded with the item-id table, so history and candidate live in one space).
        buckets: for a sparse feature, hash its ids into this many embedding rows instead of one row per id
            (`data.hash_buckets`; `recsys_lab.modules.embeddings.HashedEmbedding`); None: one row per id.
        qr_collisions: for a sparse feature, m of a quotient-remainder embedding (`data.qr_embeddings`;
            `recsys_lab.modules.embeddings.QREmbedding`): ceil(V / m) + m rows, every id distinct.
        torchrec_table: for a sparse feature, True: its table is a TorchRec `EmbeddingCollection`
            (`data.torchrec_tables`; `recsys_lab.modules.embeddings.TorchRecEmbedding`), which `trainer=torchrec`
            shards across processes; None: an `nn.Embedding`.
    """

    name: str
    kind: Kind
    side: Side
    vocab_size: int = 0
    dim: int = 1
    max_len: int = 0
    embed_as: str | None = None
    buckets: int | None = None
    qr_collisions: int | None = None
    torchrec_table: bool | None = None


# Feature fields left out of `Schema.to_dict` when unset
OPTIONAL_KEYS = ("buckets", "qr_collisions", "torchrec_table")


@dataclass
class ContentTable:
    """One item modality for content models: what every item has of it, and which items have it.

    kind: "vector" (a precomputed dense vector: float (N, D)), "image" (uint8 pixels (N, 3, S, S)) or "audio"
        (float samples (N, T)); values: rows of missing items are zeros; present: bool (N,), False where the
        item has none (and for item code 0, "unknown").
    """

    kind: str
    values: Tensor
    present: Tensor

    def by_code(self, item_entity: Tensor) -> ContentTable:
        """Re-indexed from item entities to item codes (`item_entity[code]`); code 0 is never present."""
        present = self.present[item_entity].clone()
        present[0] = False
        return ContentTable(self.kind, self.values[item_entity], present)


@dataclass
class Schema:
    """All features of a dataset plus statistics fitted on the training split.

    Args:
        features: every feature a Batch of this dataset may carry.
        user_id / item_id: names of the sparse features holding the user and item ids.
        labels: label names present in `batch.labels` ("click", "purchase", ...).
        item_counts: float [num_items], positive training interactions per item. Popularity baselines score with
            it and sampled-softmax losses use it as the sampling probability for logQ correction.
        train_pairs: int64 [P, 2], the (user code, item code) of every positive training interaction: the
            user-item graph of LightGCN and the interaction matrix of EASE, fitted on the training split only.
        first_cold_item: with `data.cold_items`, item codes >= this are catalogue items without a training
            interaction (ranked, and reported as the cold-start slice); None when there are none.
        item_text: every item code's text as token ids (`recsys_lab.data.text.ItemTokens`), when `data.text`
            is set: what text towers encode.
        item_texts: every item code's raw text ("" for code 0), when the source has an item text column: for
            models that tokenize with their own tokenizer (the LLM ranker).
        item_content: every item dense vector, image and audio column by item code (`ContentTable`): what
            content encoders (`recsys_lab.modules.content`) read.
    """

    features: list[Feature]
    user_id: str = "user_id"
    item_id: str = "item_id"
    labels: list[str] = field(default_factory=lambda: ["click"])
    item_counts: Tensor | None = None
    train_pairs: Tensor | None = None
    first_cold_item: int | None = None
    item_text: ItemTokens | None = None
    item_texts: list[str] | None = field(default=None, repr=False)
    item_content: dict[str, ContentTable] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"schema: feature names must be unique, got duplicates {duplicates}")
        by_name = {f.name: f for f in self.features}
        for f in self.features:
            if f.kind in ("sparse", "seq") and f.vocab_size <= 0:
                raise ValueError(f"schema: feature '{f.name}' ({f.kind}) needs vocab_size > 0")
            if f.kind == "seq" and f.embed_as is not None:
                target = by_name.get(f.embed_as)
                if target is None or target.kind != "sparse" or target.vocab_size != f.vocab_size:
                    raise ValueError(
                        f"schema: seq feature '{f.name}' has embed_as='{f.embed_as}', which must name a sparse "
                        f"feature with the same vocab_size ({f.vocab_size})"
                    )
        for key in (self.user_id, self.item_id):
            if key not in by_name or by_name[key].kind != "sparse":
                raise ValueError(f"schema: '{key}' must be a sparse feature; features are {names}")

    def with_qr(self, collisions: dict[str, int]) -> Schema:
        """The same schema with sparse features `collisions` ({name: m}) embedded by quotient-remainder tables
        (`data.qr_embeddings`); a feature is hashed or compositional, not both."""

        def check(f: Feature, m: Any) -> str | None:
            if isinstance(m, bool) or not isinstance(m, int) or not 2 <= m < f.vocab_size:
                return (
                    f"expected an integer 2 <= m < {f.vocab_size} (the vocabulary); about "
                    f"sqrt({f.vocab_size}) = {round(f.vocab_size**0.5)} uses the fewest rows"
                )
            return f"'{f.name}' is in data.hash_buckets too; choose one" if f.buckets else None

        return self._compressed("data.qr_embeddings", "qr_collisions", collisions, check)

    def with_buckets(self, buckets: dict[str, int]) -> Schema:
        """The same schema with the ids of sparse features `buckets` ({name: rows}) hashed into that many
        embedding rows (seq features sharing their table follow them); `data.hash_buckets`."""

        def check(f: Feature, n: Any) -> str | None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                return "expected an integer >= 2 (row 0 stays 'unknown')"
            return None

        return self._compressed("data.hash_buckets", "buckets", buckets, check)

    def with_torchrec(self, names: list[str]) -> Schema:
        """The same schema with the tables of sparse features `names` held by TorchRec (seq features sharing
        their table follow them); `data.torchrec_tables`. A TorchRec table has one row per id: a hashed or
        quotient-remainder feature cannot be one."""

        def check(f: Feature, _: Any) -> str | None:
            if f.buckets or f.qr_collisions:
                return f"'{f.name}' is in data.hash_buckets or data.qr_embeddings too; choose one"
            return None

        return self._compressed("data.torchrec_tables", "torchrec_table", dict.fromkeys(names, True), check)

    def _compressed(
        self, key: str, field_name: str, values: dict[str, Any], check: Callable[[Feature, Any], str | None]
    ) -> Schema:
        """The schema with `field_name` set on the sparse features named in `values` (config `key`); a
        ValueError naming the key for any other feature or a value `check` refuses."""
        by_name = {f.name: f for f in self.features}
        for name, value in values.items():
            if name not in by_name or by_name[name].kind != "sparse":
                sparse = [f.name for f in self.features if f.kind == "sparse"]
                raise ValueError(f"{key}: '{name}' is not a sparse feature; sparse features are {sparse}")
            problem = check(by_name[name], value)
            if problem:
                raise ValueError(f"{key}.{name}={value!r}: {problem}")
        features = [
            dataclasses.replace(f, **{field_name: values[f.name]}) if f.name in values else f
            for f in self.features
        ]
        return dataclasses.replace(self, features=features)

    # --- lookups --------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"schema has no feature '{name}'; features are {[f.name for f in self.features]}")

    def __contains__(self, name: str) -> bool:
        return any(f.name == name for f in self.features)

    def select(self, kind: Kind | None = None, side: Side | tuple[Side, ...] | None = None) -> list[Feature]:
        """Features of one kind and/or side(s), in schema order."""
        sides = (side,) if isinstance(side, str) else side
        return [
            f
            for f in self.features
            if (kind is None or f.kind == kind) and (sides is None or f.side in sides)
        ]

    @property
    def num_items(self) -> int:
        return self[self.item_id].vocab_size

    @property
    def num_users(self) -> int:
        return self[self.user_id].vocab_size

    # --- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain-Python form (no tensors): safe for hparams, JSON and `weights_only` checkpoints."""
        return {
            # `buckets` / `qr_collisions` / `torchrec_table` only when set: the layout (and the fingerprint) of
            # schemas without them stays as it was
            "features": [
                {k: v for k, v in asdict(f).items() if k not in OPTIONAL_KEYS or v is not None}
                for f in self.features
            ],
            "user_id": self.user_id,
            "item_id": self.item_id,
            "labels": list(self.labels),
        }

    @classmethod
    def from_dict(
        cls, data: dict, item_counts: Tensor | None = None, train_pairs: Tensor | None = None
    ) -> Schema:
        return cls(
            features=[Feature(**f) for f in data["features"]],
            user_id=data["user_id"],
            item_id=data["item_id"],
            labels=list(data["labels"]),
            item_counts=item_counts,
            train_pairs=train_pairs,
        )

    def fingerprint(self) -> str:
        """Short hash of the feature layout: a checkpoint only loads into a model built for the same layout."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def require_train_pairs(self, model: str) -> Tensor:
        """int64 [P, 2] training (user code, item code) pairs; a clear error for schemas built without them."""
        if self.train_pairs is None:
            raise ValueError(
                f"{model} needs schema.train_pairs (the training interactions); the DataModule sets it"
            )
        return self.train_pairs

    def item_log_prob(self) -> Tensor:
        """float [num_items]: log of each item's share of training positives (add-one smoothed)."""
        if self.item_counts is None:
            raise ValueError("schema.item_counts is not set: the DataModule fits it on the training split")
        counts = self.item_counts.double() + 1.0
        return torch.log(counts / counts.sum()).float()
