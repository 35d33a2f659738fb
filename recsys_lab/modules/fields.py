"""Every feature of the schema as one field vector of width D: the input of feature-interaction models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema, Side
from recsys_lab.modules.attention import masked_mean
from recsys_lab.modules.embeddings import FeatureEmbedding

# the kinds that become fields; text goes to language models, not to an interaction layer
FIELD_KINDS = ("sparse", "seq", "dense")


class FieldEmbedding(nn.Module):
    """Each feature a model reads becomes one field vector of width D, in schema order.

    - sparse: a lookup in the feature's table;
    - seq (multi-categorical values, behaviour histories): the mean of the embeddings at the real positions
      (`Seq.mask()`, explicit lengths; padding is never read), in the table named by `embed_as` when there is
      one, so a history of items shares the candidate item's table;
    - dense, one value: value * w_f + b_f, a learned vector per feature (the "numeric field" of DeepFM-style
      models: the field moves along one direction as the value grows, and b_f keeps a value of 0 from making
      the whole field vanish from every interaction);
    - dense vector of width d (an image embedding): a Linear d -> D.

    Both dense cases are one `nn.Linear(dim, D)`. A numeric column named in `data.numeric_buckets` arrives as a
    sparse feature of bucket codes instead, and is looked up like any other id: the choice is per feature,
    made in the data config, so every model reads it the same way.

    FM's first-order term is the same construction at width 1: `FieldEmbedding(schema, 1)` gives a 1-wide
    embedding per sparse feature (shared through `embed_as` like the wide tables), the masked mean of those for
    seq features, and a scalar weight (+ bias) per dense feature; summing its (B, F, 1) output gives
    sum_f <w_f, x_f>.

    Args:
        schema: the dataset's features.
        embedding_dim: D, the width of every field.
        sides: sides whose sparse, seq and dense features become fields; None keeps all sides.
        init_std: every field parameter (tables, dense projections and their biases) starts as N(0, init_std).
            Small on purpose: nn.Embedding's N(0, 1) makes FM's F(F-1)/2 pairwise products, or a cross layer's
            x_0 ⊙ (W x_l), start as logits in the tens, and training spends its first epoch undoing that.

    forward(batch) -> float (B, F, D), fields in the order of `names`.
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int,
        sides: Sequence[Side] | None = None,
        init_std: float = 1e-2,
    ) -> None:
        super().__init__()
        keep = set(sides) if sides is not None else None
        features = [f for f in schema.features if f.kind in FIELD_KINDS and (keep is None or f.side in keep)]
        if not features:
            raise ValueError(
                f"FieldEmbedding: the schema has no sparse, seq or dense feature (sides={sides})"
            )
        self.names: list[str] = [f.name for f in features]
        self.kinds: list[str] = [f.kind for f in features]
        self.embedding_dim = embedding_dim
        # the tables (and their embed_as sharing) are FeatureEmbedding's, built for the same sides
        self.tables = FeatureEmbedding(schema, embedding_dim, sides=sides)
        self.dense = nn.ModuleDict(
            {f.name: nn.Linear(f.dim, embedding_dim) for f in features if f.kind == "dense"}
        )
        for param in self.parameters():
            nn.init.normal_(param, std=init_std)

    @property
    def num_fields(self) -> int:
        return len(self.names)

    def forward(self, batch: Batch) -> Tensor:
        fields = []
        for name, kind in zip(self.names, self.kinds, strict=True):
            if kind == "sparse":
                fields.append(self.tables.table(name)(batch.sparse[name]))  # (B, D)
            elif kind == "seq":
                seq = batch.seq[name]
                # mean, not sum: a field's scale must not grow with the history length
                fields.append(masked_mean(self.tables.table(name)(seq.ids), seq.mask()))  # (B, D)
            else:
                value = batch.dense[name]
                value = value.reshape(value.shape[0], -1)  # (B, dim): a [B] scalar becomes one column
                fields.append(self.dense[name](value))  # (B, D)
        return torch.stack(fields, dim=1)  # (B, F, D)
