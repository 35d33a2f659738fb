"""DeepFM: a factorization machine and a DNN on one shared field embedding, summed into one CTR logit."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.fields import FieldEmbedding
from recsys_lab.modules.mlp import MLP


def fm_second_order(fields: Tensor) -> Tensor:
    """FM's pairwise term sum_{i<j} <v_i, v_j> of fields (B, F, D): (B,).

    Computed as 0.5 * sum_d ((sum_f v_f)^2 - sum_f v_f^2) (Rendle, ICDM 2010, lemma 3.1): O(F*D) instead of the
    O(F^2 * D) of the explicit pairs, and exact, since (sum_f v_f)^2 = sum_f v_f^2 + 2 sum_{i<j} v_i v_j.
    """
    square_of_sum = fields.sum(dim=1).pow(2)  # (B, D)
    sum_of_squares = fields.pow(2).sum(dim=1)  # (B, D)
    return 0.5 * (square_of_sum - sum_of_squares).sum(dim=-1)  # (B,)


class DeepFM(nn.Module):
    """DeepFM (Guo et al., IJCAI 2017, arXiv:1703.04247).

    logit = w_0 + sum_f <w_f, x_f> (first order) + sum_{i<j} <v_i, v_j> (FM) + DNN([v_1; ...; v_F]).
    The FM and DNN components read the same field embeddings v_f (the paper's "shared embedding": no
    pre-training, both components train the embedding end to end). Every sparse, seq (masked mean) and dense
    (linear projection) feature of the schema is a field (`FieldEmbedding`); the first-order weights are a
    second `FieldEmbedding` of width 1.

    Args:
        schema: the dataset's features; every sparse, seq and dense feature becomes a field.
        embedding_dim: D, the width of every field (the paper: 10).
        mlp_hidden: hidden widths of the DNN (the paper: 400-400-400, ReLU).
        dropout: dropout after each hidden layer of the DNN (the paper: 0.5).

    forward(batch) -> logits (B,); forward_parts(batch) -> first order, FM, DNN: three (B,) summing to the logit.
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 10,
        mlp_hidden: list[int] = [400, 400, 400],  # noqa: B006 - never mutated; plain lists keep Hydra configs simple
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.fields = FieldEmbedding(schema, embedding_dim)
        self.first_order = FieldEmbedding(schema, 1)
        # w_0; the per-feature biases of the 1-wide dense projections are constants as well, so this one is
        # redundant with them whenever the schema has a dense feature, which costs nothing
        self.bias = nn.Parameter(torch.zeros(()))
        self.dnn = MLP(self.fields.num_fields * embedding_dim, mlp_hidden, dropout=dropout, output_dim=1)

    def forward_parts(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The three components of the logit, each (B,): first-order term (with w_0), FM term, DNN output."""
        v = self.fields(batch)  # (B, F, D)
        linear = self.first_order(batch).sum(dim=(1, 2)) + self.bias  # (B,)
        fm = fm_second_order(v)  # (B,)
        deep = self.dnn(v.flatten(1)).squeeze(-1)  # (B, F*D) -> (B,)
        return linear, fm, deep

    def forward(self, batch: Batch) -> Tensor:
        linear, fm, deep = self.forward_parts(batch)
        return linear + fm + deep  # (B,)
