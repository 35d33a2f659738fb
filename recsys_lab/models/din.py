"""Deep Interest Network: a CTR ranker that pools the user's behaviour history by relevance to the candidate."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.attention import TargetAttention
from recsys_lab.modules.content import ItemContent
from recsys_lab.modules.embeddings import FeatureEmbedding, pooled_seq_and_dense, pooled_width
from recsys_lab.modules.mlp import MLP, Dice
from recsys_lab.modules.sequence import behaviour_history


class DIN(nn.Module):
    """Deep Interest Network (Zhou et al., KDD 2018, arXiv:1706.06978).

    The behaviour history is every seq feature whose `embed_as` names an item-side sparse feature; the candidate
    is those sparse features, in the same order, so history items and candidate share tables and live in one
    space. Behaviour seq features are parallel columns of the same events (item id, category, ...): they share
    L and lengths, and the mask comes from the first. Dice is the activation everywhere, as in the paper.

    Args:
        schema: the dataset's features. Needs at least one seq feature with `embed_as` on an item-side feature.
        embedding_dim: D, width of every embedding; history items and candidate are E = (behaviour features) * D.
        attention_hidden: hidden widths of the local activation unit's MLP.
        mlp_hidden: hidden widths of the prediction MLP.
        dropout: dropout after each hidden layer of the prediction MLP.
        content: item content (`model/content=...`): a partial of `ItemContent` called with the schema. Its
            fused content vector (C wide) is appended to the candidate and to every history item, so the
            attention compares items by content as well as by id (E becomes E + C), and to the MLP's input.

    forward(batch) -> logits (B,); forward_with_attention(batch) -> logits (B,), attention weights (B, L).
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 16,
        attention_hidden: list[int] = [80, 40],  # noqa: B006 - never mutated; plain lists keep Hydra configs simple
        mlp_hidden: list[int] = [200, 80],  # noqa: B006
        dropout: float = 0.0,
        content: Callable[..., ItemContent] | None = None,
    ) -> None:
        super().__init__()
        self.behaviour, self.candidate = behaviour_history(schema, "DIN")
        self.content = content(schema=schema) if content is not None else None
        content_dim = self.content.dim if self.content is not None else 0
        self.sparse_features = [f.name for f in schema.select("sparse")]
        # seq features that are not behaviour (no embed_as, or pointing at user/context tables) are other groups
        self.other_seq = [f.name for f in schema.select("seq") if f.name not in self.behaviour]
        self.dense_features = [f.name for f in schema.select("dense")]

        self.embedding = FeatureEmbedding(schema, embedding_dim)
        item_dim = len(self.behaviour) * embedding_dim + content_dim  # E (+ C)
        self.attention = TargetAttention(item_dim, attention_hidden, activation=Dice)
        # the candidate is already among the sparse embeddings, so it is not concatenated a second time
        input_dim = (
            len(self.sparse_features) * embedding_dim
            + content_dim  # the candidate's content (its ids are among the sparse embeddings)
            + item_dim
            + pooled_width(schema, embedding_dim, self.other_seq, self.dense_features)
        )
        self.mlp = MLP(input_dim, mlp_hidden, activation=Dice, dropout=dropout, output_dim=1)

    def forward_with_attention(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Logits (B,) and the attention weight of every history item (B, L), 0 at padding: why this score."""
        sparse = self.embedding.sparse(batch, self.sparse_features).flatten(1)  # (B, F*D)
        candidate = self.embedding.sparse(batch, self.candidate).flatten(1)  # (B, E)
        history = self.embedding.seq(batch, self.behaviour)  # (B, L, E)
        mask = batch.seq[self.behaviour[0]].mask()  # (B, L)
        own = []
        if self.content is not None:  # content beside the ids: (B, E + C), (B, L, E + C)
            item_content = self.content(batch.sparse[self.candidate[0]])  # (B, C)
            candidate = torch.cat([candidate, item_content], dim=-1)
            history = torch.cat([history, self.content(batch.seq[self.behaviour[0]].ids)], dim=-1)
            own = [item_content]
        interest, weights = self.attention(history, candidate, mask)  # (B, E), (B, L)

        rest = pooled_seq_and_dense(self.embedding, batch, self.other_seq, self.dense_features)
        logits = self.mlp(torch.cat([sparse, *own, interest, *rest], dim=-1)).squeeze(-1)  # (B,)
        return logits, weights

    def forward(self, batch: Batch) -> Tensor:
        return self.forward_with_attention(batch)[0]
