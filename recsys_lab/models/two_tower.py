"""Two-tower retrieval: queries and items encoded apart, scored by a dot product an ANN index can serve."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema, Side
from recsys_lab.modules.attention import masked_mean
from recsys_lab.modules.embeddings import FeatureEmbedding, concat_dense
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
    ) -> None:
        super().__init__()
        self.embedding = FeatureEmbedding(schema, embedding_dim, sides=("user", "item"))
        self.query_features = self._features(schema, "user")
        self.item_features = self._features(schema, "item")
        self.query_tower = MLP(
            self._input_dim(schema, self.query_features, embedding_dim),
            tower_hidden,
            activation=relu,
            dropout=dropout,
            output_dim=output_dim,
        )
        self.item_tower = MLP(
            self._input_dim(schema, self.item_features, embedding_dim),
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

    def _encode(self, batch: Batch, features: dict[str, list[str]], tower: MLP) -> Tensor:
        parts = []
        if features["sparse"]:
            parts.append(self.embedding.sparse(batch, features["sparse"]).flatten(1))  # (B, F*D)
        for name in features["seq"]:
            parts.append(masked_mean(self.embedding.seq(batch, [name]), batch.seq[name].mask()))  # (B, D)
        if features["dense"]:
            parts.append(concat_dense(batch, features["dense"]))  # (B, sum(dim))
        return F.normalize(tower(torch.cat(parts, dim=-1)), dim=-1)  # (B, output_dim), unit norm

    def encode_query(self, batch: Batch) -> Tensor:
        """User-side features of B rows -> unit-norm query encodings (B, output_dim)."""
        return self._encode(batch, self.query_features, self.query_tower)

    def encode_item(self, batch: Batch) -> Tensor:
        """Item-side features of N items (a catalogue Batch may hold nothing else) -> unit-norm (N, output_dim)."""
        return self._encode(batch, self.item_features, self.item_tower)

    def forward(self, batch: Batch) -> Tensor:
        return (self.encode_query(batch) * self.encode_item(batch)).sum(dim=-1)  # (B,)
