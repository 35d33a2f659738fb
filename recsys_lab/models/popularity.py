"""Most-popular baseline: every user gets the items with the most training positives."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema


class Popularity(nn.Module):
    """Popularity ranking, the baseline every recommender must beat (e.g. Rendle et al., arXiv:1205.2618, sec. 6).

    Score = scale * log(1 + training positives of the item) + bias. Only `scale` and `bias` are trained, so the
    ranking is fixed by popularity while the CTR task can still calibrate probabilities (log loss). Being an
    `encode_query` / `encode_item` model, it runs under the retrieval task and its full-ranking protocol too.

    Args:
        schema: needs `item_counts` (fitted by the DataModule on the training split).
    """

    reads_features = False  # ids only: its batches carry the user and item ids, nothing else

    def __init__(self, schema: Schema) -> None:
        super().__init__()
        if schema.item_counts is None:
            raise ValueError("Popularity needs schema.item_counts (training positives per item)")
        self.item_key = schema.item_id
        self.register_buffer("log_count", torch.log1p(schema.item_counts.float()))  # (N,)
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))

    def encode_query(self, batch: Batch) -> Tensor:
        # every query is the same: ranking comes from the items alone
        n = len(batch)
        return torch.ones(n, 1, device=self.log_count.device)  # (B, 1)

    def encode_item(self, batch: Batch) -> Tensor:
        items = batch.sparse[self.item_key]
        return (self.scale.abs() * self.log_count[items] + self.bias).unsqueeze(-1)  # (N, 1)

    def forward(self, batch: Batch) -> Tensor:
        return (self.encode_query(batch) * self.encode_item(batch)).sum(-1)  # (B,)
