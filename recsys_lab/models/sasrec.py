"""SASRec: a causal Transformer over the item sequence predicts the next item at every position."""

from __future__ import annotations

import math

from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.sequence import (
    FeedForward,
    LearnedPositions,
    MultiHeadSelfAttention,
    PostNormBlock,
    attention_mask,
    init_normal,
    item_sequence,
    last_position,
)


class SASRecBlock(nn.Module):
    """One SASRec block, pre-LayerNorm as in the paper (sec. III-B, "g(x) = x + Dropout(g(LayerNorm(x)))"):
    x + Dropout(SelfAttention(LN(x))), then x + Dropout(FFN(LN(x))), the FFN a ReLU network of width D.

    Args:
        attention: the self-attention sub-layer.
        feed_forward: the point-wise feed-forward sub-layer.
        dim: D, for the LayerNorms.
        dropout: dropout on each sub-layer's output.

    forward(x (B, L, D), allowed bool (B, L, L)) -> (B, L, D).
    """

    def __init__(self, attention: nn.Module, feed_forward: nn.Module, dim: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm, self.attention = nn.LayerNorm(dim), attention
        self.feed_forward_norm, self.feed_forward = nn.LayerNorm(dim), feed_forward
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), allowed))  # (B, L, D)
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))  # (B, L, D)


class SASRec(nn.Module):
    """Self-Attentive Sequential Recommendation (Kang & McAuley, ICDM 2018, arXiv:1808.09781).

    Input at position t: the item embedding scaled by sqrt(D) (as in the paper's code) plus a learned embedding
    of t, counted from the oldest item of the window (sequences are right-padded, as in RecBole). Dropout, then
    `num_blocks` pre-LN blocks of causal self-attention + point-wise FFN, then a final LayerNorm. Attention is
    causal (position t sees positions <= t) and padded keys are masked by length, so neither later items nor
    padding can change a real position. The item embedding is also the output table (shared, as in the paper).

    Args:
        schema: the dataset's features; reads the item-id history, whose max_len bounds the positions.
        embedding_dim: D (paper, ML-1M: 50).
        num_blocks: stacked blocks (paper: 2).
        num_heads: attention heads (paper: 1).
        dropout: on the inputs, the attention weights and every sub-layer output (paper, ML-1M: 0.2).
        feed_forward_dim: the FFN's inner width; None = D, the paper's (RecBole's SASRec uses 256 = 4D).
        layout: "paper" — the above; "recbole" — RecBole's implementation of the same model: inputs item +
            position embedding without the sqrt(D) scale, LayerNorm on the inputs, post-LN blocks
            (`PostNormBlock`) with a GELU FFN, no final LayerNorm.

    encode_sequence(batch) -> (B, L, D); encode_query(batch) -> (B, D), the state at the last real item;
    item_table() -> (V, D); encode_item(batch) -> (N, D); forward(batch) -> (B,), their row-wise dot.
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        feed_forward_dim: int | None = None,
        layout: str = "paper",
    ) -> None:
        super().__init__()
        if layout not in ("paper", "recbole"):
            raise ValueError(f"model.net.layout='{layout}': expected 'paper' or 'recbole'")
        self.layout = layout
        sequence = item_sequence(schema, "SASRec")
        self.sequence, self.item_id = sequence.name, schema.item_id
        self.items = nn.Embedding(schema.num_items, embedding_dim)
        self.positions = LearnedPositions(sequence.max_len, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            (SASRecBlock if layout == "paper" else PostNormBlock)(
                MultiHeadSelfAttention(embedding_dim, num_heads, dropout),
                FeedForward(
                    embedding_dim,
                    feed_forward_dim or embedding_dim,
                    nn.ReLU() if layout == "paper" else nn.GELU(),
                    dropout,
                ),
                embedding_dim,
                dropout,
            )
            for _ in range(num_blocks)
        )
        self.norm = nn.LayerNorm(embedding_dim)  # paper: after the blocks; recbole: on the inputs
        self.apply(init_normal)

    def encode_sequence(self, batch: Batch) -> Tensor:
        seq = batch.seq[self.sequence]
        B, L = seq.ids.shape
        D = self.items.embedding_dim
        if self.layout == "paper":
            x = self.items(seq.ids) * math.sqrt(D) + self.positions(L)  # (B, L, D)
        else:
            x = self.norm(self.items(seq.ids) + self.positions(L))  # (B, L, D)
        # zero the padded inputs, as the paper's code does: with the key mask they could not reach a real
        # position anyway, but this keeps padded states independent of whatever ids the padding holds
        x = self.dropout(x) * seq.mask().unsqueeze(-1)  # (B, L, D)
        allowed = attention_mask(seq.lengths, L, causal=True)  # (B, L, L)
        for block in self.blocks:
            x = block(x, allowed)  # (B, L, D)
        return self.norm(x) if self.layout == "paper" else x  # (B, L, D)

    def item_table(self) -> Tensor:
        return self.items.weight  # (V, D)

    def encode_query(self, batch: Batch) -> Tensor:
        return last_position(self.encode_sequence(batch), batch.seq[self.sequence].lengths)  # (B, D)

    def encode_item(self, batch: Batch) -> Tensor:
        return self.item_table()[batch.sparse[self.item_id]]  # (N, D)

    def forward(self, batch: Batch) -> Tensor:
        return (self.encode_query(batch) * self.encode_item(batch)).sum(-1)  # (B,)
