"""BERT4Rec: a bidirectional Transformer trained to fill in masked items (the Cloze task)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch, Seq
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


class BERT4Rec(nn.Module):
    """BERT4Rec (Sun et al., CIKM 2019, arXiv:1904.06690), trained by `MaskedItemTask`.

    Input at position t: the item embedding plus a learned embedding of t (from the oldest item of the
    right-padded window), LayerNorm and dropout as in BERT; `num_blocks` bidirectional post-LN Transformer layers
    whose attention sees every real position and never a padded one. Item code V is `[MASK]` (`mask_id`): the
    input table has V + 1 rows, the output table V. Output layer (paper eq. 7): GELU(h W + b), a LayerNorm (as
    in BERT's masked-LM head and the paper's code), then scores against the shared item embedding plus a bias
    per item, P(v) = softmax(GELU(h W + b) E^T + b^O). The bias rides in the vectors so scoring stays a dot
    product: positions are encoded as [g, 1] and items as [e_v, b_v], both (D + 1)-wide.

    At inference `encode_query` appends `[MASK]` after the last real item (dropping the oldest item when the
    window is full) and returns the state there: the prediction of the item that comes next.

    Args:
        schema: the dataset's features; reads the item-id history, whose max_len bounds the positions.
        embedding_dim: D (paper: 64).
        num_blocks: stacked Transformer layers (paper: 2).
        num_heads: attention heads (paper: 2).
        feed_forward_dim: inner width of the FFN (paper: 4 D = 256).
        dropout: on the inputs, the attention weights and every sub-layer output (paper: 0.1).

    encode_sequence(batch) -> (B, L, D + 1), every position (bidirectional); encode_query(batch) -> (B, D + 1);
    item_table() -> (V, D + 1); encode_item(batch) -> (N, D + 1); forward(batch) -> (B,), the row-wise dot.
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 64,
        num_blocks: int = 2,
        num_heads: int = 2,
        feed_forward_dim: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        sequence = item_sequence(schema, "BERT4Rec")
        self.sequence, self.item_id = sequence.name, schema.item_id
        self.mask_id = schema.num_items  # [MASK]: one code past the catalogue, so it is never a candidate
        self.items = nn.Embedding(schema.num_items + 1, embedding_dim)
        self.positions = LearnedPositions(sequence.max_len, embedding_dim)
        self.input_norm = nn.LayerNorm(embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            PostNormBlock(
                MultiHeadSelfAttention(embedding_dim, num_heads, dropout),
                FeedForward(embedding_dim, feed_forward_dim, nn.GELU(), dropout),
                embedding_dim,
                dropout,
            )
            for _ in range(num_blocks)
        )
        self.head = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim), nn.GELU(), nn.LayerNorm(embedding_dim)
        )
        self.output_bias = nn.Parameter(torch.zeros(schema.num_items))
        self.apply(init_normal)

    def encode_sequence(self, batch: Batch) -> Tensor:
        seq = batch.seq[self.sequence]
        B, L = seq.ids.shape
        x = self.dropout(self.input_norm(self.items(seq.ids) + self.positions(L)))  # (B, L, D)
        allowed = attention_mask(seq.lengths, L, causal=False)  # (B, L, L)
        for block in self.blocks:
            x = block(x, allowed)  # (B, L, D)
        g = self.head(x)  # (B, L, D)
        return torch.cat([g, g.new_ones(B, L, 1)], dim=-1)  # (B, L, D + 1): the 1 picks up the item's bias

    def item_table(self) -> Tensor:
        embeddings = self.items.weight[: self.mask_id]  # (V, D): [MASK] is not an item
        return torch.cat([embeddings, self.output_bias.unsqueeze(1)], dim=1)  # (V, D + 1)

    def append_mask(self, seq: Seq) -> Seq:
        """The sequence with [MASK] after its last real item; a full window drops its oldest item first."""
        full = seq.lengths == seq.ids.shape[1]  # (B,)
        # (B, L), a new tensor: full rows shifted left by one (the oldest item leaves the window)
        ids = torch.where(full.unsqueeze(1), seq.ids.roll(-1, dims=1), seq.ids)
        lengths = torch.where(full, seq.lengths, seq.lengths + 1)  # (B,)
        rows = torch.arange(len(lengths), device=ids.device)
        ids[rows, lengths - 1] = self.mask_id
        return Seq(ids, lengths)  # no times: BERT4Rec reads none

    def encode_query(self, batch: Batch) -> Tensor:
        seq = self.append_mask(batch.seq[self.sequence])
        queries = dataclasses.replace(batch, seq={**batch.seq, self.sequence: seq})
        return last_position(self.encode_sequence(queries), seq.lengths)  # (B, D + 1)

    def encode_item(self, batch: Batch) -> Tensor:
        return self.item_table()[batch.sparse[self.item_id]]  # (N, D + 1)

    def forward(self, batch: Batch) -> Tensor:
        return (self.encode_query(batch) * self.encode_item(batch)).sum(-1)  # (B,)
