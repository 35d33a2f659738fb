"""GRU4Rec: a recurrent network reads the item sequence and predicts the next item at every step."""

from __future__ import annotations

from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.sequence import item_sequence, last_position


class GRU4Rec(nn.Module):
    """GRU4Rec (Hidasi et al., ICLR 2016, "Session-based Recommendations with Recurrent Neural Networks",
    arXiv:1511.06939). The loss is the task's (config): full-catalogue cross-entropy by default, as in RecBole.

    Item embedding -> dropout -> GRU layers -> a linear map back to the embedding width; the score of item j
    after position t is the dot product of that state with row j of the item table: the input embedding itself
    (`tie_embeddings`; the official GRU4Rec code calls this "constrained embeddings", and RecBole does the same)
    or a separate output embedding, as in the original paper's output layer.

    Args:
        schema: the dataset's features; reads the item-id history (`hist_item_id`).
        embedding_dim: D, width of the item embeddings and of the hidden state the items are scored against.
        hidden_dim: width of the GRU state.
        num_layers: stacked GRU layers.
        dropout: dropout on the input embeddings and between GRU layers.
        tie_embeddings: score against the input embedding table (True) or a separate output table (False).

    encode_sequence(batch) -> (B, L, D); encode_query(batch) -> (B, D), the state after the last real item;
    item_table() -> (V, D); encode_item(batch) -> (N, D); forward(batch) -> (B,), their row-wise dot.
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 64,
        hidden_dim: int = 128,
        num_layers: int = 1,
        dropout: float = 0.3,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        self.sequence = item_sequence(schema, "GRU4Rec").name
        self.item_id = schema.item_id
        self.items = nn.Embedding(schema.num_items, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        # nn.GRU's dropout acts between layers only (it warns when set with one layer)
        self.gru = nn.GRU(
            embedding_dim,
            hidden_dim,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.project = nn.Linear(hidden_dim, embedding_dim)
        self.output = None if tie_embeddings else nn.Embedding(schema.num_items, embedding_dim)
        for table in (self.items, self.output):
            if table is not None:  # small embeddings: N(0, 1) rows would give huge initial logits
                nn.init.normal_(table.weight, std=0.02)

    def encode_sequence(self, batch: Batch) -> Tensor:
        seq = batch.seq[self.sequence]
        # Right padding comes after every real step of a forward recurrence, so it can never reach a real
        # position: no packing needed (pack_padded_sequence also runs several times slower on CPU). Zeroing the
        # padded inputs keeps even the padded states — and the unused query of an empty row — independent of
        # whatever ids the padding holds.
        x = self.dropout(self.items(seq.ids)) * seq.mask().unsqueeze(-1)  # (B, L, D)
        hidden, _ = self.gru(x)  # (B, L, hidden_dim)
        return self.project(hidden)  # (B, L, D)

    def item_table(self) -> Tensor:
        return (self.items if self.output is None else self.output).weight  # (V, D)

    def encode_query(self, batch: Batch) -> Tensor:
        return last_position(self.encode_sequence(batch), batch.seq[self.sequence].lengths)  # (B, D)

    def encode_item(self, batch: Batch) -> Tensor:
        return self.item_table()[batch.sparse[self.item_id]]  # (N, D)

    def forward(self, batch: Batch) -> Tensor:
        return (self.encode_query(batch) * self.encode_item(batch)).sum(-1)  # (B,)
