"""Two-tower retrieval: queries and items encoded apart, scored by a dot product an ANN index can serve."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema, Side
from recsys_lab.data.store import history_feature
from recsys_lab.modules.attention import masked_mean
from recsys_lab.modules.content import ItemContent
from recsys_lab.modules.embeddings import FeatureEmbedding, UnknownItemIds, concat_dense
from recsys_lab.modules.mlp import MLP, relu


class TwoTower(nn.Module):
    """Two-tower retrieval (Yi et al., RecSys 2019, "Sampling-Bias-Corrected Neural Modeling"; Covington et al. 2016).

    Each tower reads the features of its side: sparse embeddings, masked-mean-pooled seq features and dense
    features, then an MLP and L2 normalisation, so the score is a cosine. The query tower reads side "user", the
    item tower side "item". Context features are left out of both: they belong to rankers, and a retrieval query
    for a user has no single context to put in. A history whose `embed_as` names the item-id table shares it with
    the item tower. The temperature of the cosine belongs to the loss, not here.

    Args:
        schema: the dataset's features; each tower needs at least one feature of its side.
        embedding_dim: D, width of every embedding.
        tower_hidden: hidden widths of each tower's MLP.
        output_dim: width of the query and item encodings.
        dropout: dropout after each hidden layer of the towers.
        content: item content (`model/content=...`): a partial of `ItemContent` called with the schema; its
            fused (text, image, audio, vector) encoding of the item enters the item tower beside the item
            features, and the query tower reads the mean content of the user's history when the batch
            carries it. With content, items never a training positive read the item id row 0 ("unknown")
            instead of an untrained random row, and `id_dropout` trains that row (DropoutNet, Volkovs et
            al., NeurIPS 2017): a cold-start item is then ranked by its content and features alone.
        id_dropout: with content, the probability of hiding a training item's id (row 0) in a training step.

    encode_query(batch) -> (B, output_dim); encode_item(item batch) -> (N, output_dim), reading item-side features
    only; forward(batch) -> (B,), the row-wise dot of the two.
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 32,
        tower_hidden: list[int] = [128],  # noqa: B006 - never mutated; plain lists keep Hydra configs simple
        output_dim: int = 64,
        dropout: float = 0.0,
        content: Callable[..., ItemContent] | None = None,
        id_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embedding = FeatureEmbedding(schema, embedding_dim, sides=("user", "item"))
        self.query_features = self._features(schema, "user")
        self.item_features = self._features(schema, "item")
        self.item_id = schema.item_id
        self.content = content(schema=schema) if content is not None else None
        content_dim = self.content.dim if self.content is not None else 0
        self.history = history_feature(schema.item_id)
        self.history_content = self.content is not None and self.history in self.query_features["seq"]
        # read with content only: cold items then read the "unknown" id row, trained by id dropout
        self.unknown_ids = UnknownItemIds(schema, id_dropout)
        self.query_tower = MLP(
            self._input_dim(schema, self.query_features, embedding_dim) + content_dim * self.history_content,
            tower_hidden,
            activation=relu,
            dropout=dropout,
            output_dim=output_dim,
        )
        self.item_tower = MLP(
            self._input_dim(schema, self.item_features, embedding_dim) + content_dim,
            tower_hidden,
            activation=relu,
            dropout=dropout,
            output_dim=output_dim,
        )

    @staticmethod
    def _features(schema: Schema, side: Side) -> dict[str, list[str]]:
        features = {kind: [f.name for f in schema.select(kind, side)] for kind in ("sparse", "seq", "dense")}
        if not any(features.values()):
            raise ValueError(f"TwoTower: the schema has no sparse, seq or dense feature on side '{side}'")
        return features

    @staticmethod
    def _input_dim(schema: Schema, features: dict[str, list[str]], embedding_dim: int) -> int:
        # one D-wide embedding per sparse and per pooled seq feature, plus the raw dense columns
        embedded = (len(features["sparse"]) + len(features["seq"])) * embedding_dim
        return embedded + sum(schema[name].dim for name in features["dense"])

    def _encode(
        self, batch: Batch, features: dict[str, list[str]], tower: MLP, extra: list[Tensor]
    ) -> Tensor:
        parts = []
        if features["sparse"]:
            parts.append(self.embedding.sparse(batch, features["sparse"]).flatten(1))  # (B, F*D)
        for name in features["seq"]:
            parts.append(masked_mean(self.embedding.seq(batch, [name]), batch.seq[name].mask()))  # (B, D)
        if features["dense"]:
            parts.append(concat_dense(batch, features["dense"]))  # (B, sum(dim))
        return F.normalize(tower(torch.cat(parts + extra, dim=-1)), dim=-1)  # (B, output_dim), unit norm

    def encode_query(self, batch: Batch) -> Tensor:
        """User-side features of B rows -> unit-norm query encodings (B, output_dim)."""
        extra = []
        if self.history_content:  # the mean content of the history items; their untrained ids read "unknown"
            history = batch.seq[self.history]
            extra.append(masked_mean(self.content(history.ids), history.mask()))  # (B, content dim)
            known = dataclasses.replace(history, ids=self.unknown_ids(history.ids, hide=False))
            batch = dataclasses.replace(batch, seq={**batch.seq, self.history: known})
        return self._encode(batch, self.query_features, self.query_tower, extra)

    def encode_item(self, batch: Batch) -> Tensor:
        """Item-side features of N items (a catalogue Batch may hold nothing else) -> unit-norm (N, output_dim)."""
        if self.content is None:
            return self._encode(batch, self.item_features, self.item_tower, [])
        codes = batch.sparse[self.item_id]
        ids = self.unknown_ids(codes)  # untrained rows are noise: read "unknown"
        batch = dataclasses.replace(batch, sparse={**batch.sparse, self.item_id: ids})
        return self._encode(batch, self.item_features, self.item_tower, [self.content(codes)])

    def forward(self, batch: Batch) -> Tensor:
        return (self.encode_query(batch) * self.encode_item(batch)).sum(dim=-1)  # (B,)
