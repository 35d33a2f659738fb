"""Matrix factorisation for implicit feedback, trained pairwise with BPR (the task holds the loss)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema


class MFBPR(nn.Module):
    """Matrix factorisation trained with BPR (Rendle et al., UAI 2009, "BPR: Bayesian Personalized Ranking from
    Implicit Feedback", arXiv:1205.2618).

    score(u, i) = p_u · q_i (+ b_i), one D-wide embedding per user code and per item code. The model knows nothing
    of pairs: `PairwiseTask` scores a positive against sampled negatives and applies BPR; the paper's L2 prior
    on the parameters is the optimizer's weight decay (config). With `item_bias` the bias rides along as one
    more column (query [p_u, 1], item [q_i, b_i]) so that scores stay an inner product an ANN index can serve.

    Args:
        schema: the dataset's features; reads the user-id and item-id features only.
        embedding_dim: D, width of the user and item factors.
        item_bias: learn a per-item bias b_i (the paper's MF has none; a popularity term for free).

    encode_query(batch) -> (B, D or D + 1); encode_item(item batch) -> (N, D or D + 1);
    forward(batch) -> (B,), the row-wise dot product of the two.
    """

    reads_features = False  # ids only: its batches carry the user and item ids, nothing else

    def __init__(self, schema: Schema, embedding_dim: int = 64, item_bias: bool = False) -> None:
        super().__init__()
        self.user_key, self.item_key = schema.user_id, schema.item_id
        self.user = nn.Embedding(schema.num_users, embedding_dim)
        self.item = nn.Embedding(schema.num_items, embedding_dim)
        # Xavier-normal, as RecBole's BPR: std ~ sqrt(2 / (rows + D)), so initial scores are near 0 and the
        # sigmoid in BPR is not saturated (nn.Embedding's N(0, 1) gives scores of order sqrt(D)).
        nn.init.xavier_normal_(self.user.weight)
        nn.init.xavier_normal_(self.item.weight)
        self.bias = nn.Embedding(schema.num_items, 1) if item_bias else None
        if self.bias is not None:
            nn.init.zeros_(self.bias.weight)

    def encode_query(self, batch: Batch) -> Tensor:
        """User codes of B rows -> user factors (B, D), with a constant 1 column when items carry a bias."""
        p = self.user(batch.sparse[self.user_key])  # (B, D)
        if self.bias is None:
            return p
        return torch.cat([p, p.new_ones(len(p), 1)], dim=-1)  # (B, D + 1)

    def encode_item(self, batch: Batch) -> Tensor:
        """Item codes of N items (a catalogue batch holds only item-side features) -> item factors (N, D)."""
        items = batch.sparse[self.item_key]
        q = self.item(items)  # (N, D)
        if self.bias is None:
            return q
        return torch.cat([q, self.bias(items)], dim=-1)  # (N, D + 1)

    def forward(self, batch: Batch) -> Tensor:
        return (self.encode_query(batch) * self.encode_item(batch)).sum(dim=-1)  # (B,)
