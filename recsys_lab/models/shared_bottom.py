"""Shared-bottom multi-task ranker: one MLP shared by every task, then one tower per task."""

from __future__ import annotations

from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.fields import FieldEmbedding
from recsys_lab.modules.mlp import MLP
from recsys_lab.modules.multitask import Towers, head_labels


class SharedBottom(nn.Module):
    """Shared-bottom multi-task learning (Caruana, "Multitask Learning", Machine Learning 28, 1997).

    The hard-parameter-sharing baseline of MMoE and PLE: the tasks share the field embeddings and a bottom MLP,
    and each task has its own tower on top, so the bottom learns what helps all tasks at once (and is pulled
    between them when the tasks disagree).

    Args:
        schema: the dataset's features; every sparse, seq and dense feature becomes a field (`FieldEmbedding`).
        embedding_dim: D, the width of every field.
        bottom_hidden: hidden widths of the shared MLP (ReLU) on the flattened fields (B, F*D).
        tower_hidden: hidden widths of each task's tower; each tower ends in one logit.
        dropout: dropout after every hidden layer.
        labels: the labels that get a head, first = `forward`'s; None = every label of the dataset.

    forward_heads(batch) -> {label: logits (B,)}; forward(batch) -> the first label's logits (B,).
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 16,
        bottom_hidden: list[int] = [256, 128],  # noqa: B006 - never mutated; plain lists keep Hydra configs simple
        tower_hidden: list[int] = [64],  # noqa: B006
        dropout: float = 0.0,
        labels: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.labels = head_labels(schema, labels)
        self.fields = FieldEmbedding(schema, embedding_dim)
        self.bottom = MLP(self.fields.num_fields * embedding_dim, bottom_hidden, dropout=dropout)
        self.towers = Towers(len(self.labels), self.bottom.output_dim, tower_hidden, dropout)

    def forward_heads(self, batch: Batch) -> dict[str, Tensor]:
        x = self.fields(batch).flatten(1)  # (B, F, D) -> (B, F*D)
        shared = self.bottom(x)  # (B, H)
        logits = self.towers([shared] * len(self.labels))  # T x (B,)
        return dict(zip(self.labels, logits, strict=True))

    def forward(self, batch: Batch) -> Tensor:
        return self.forward_heads(batch)[self.labels[0]]  # (B,)
