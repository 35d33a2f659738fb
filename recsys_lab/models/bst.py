"""Behavior Sequence Transformer: a Transformer layer reads the user's behaviour sequence together with the
candidate item, and every position's output goes into the CTR MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.embeddings import FeatureEmbedding, pooled_seq_and_dense, pooled_width
from recsys_lab.modules.mlp import MLP
from recsys_lab.modules.sequence import (
    FeedForward,
    LearnedPositions,
    MultiHeadSelfAttention,
    PostNormBlock,
    attention_mask,
    behaviour_history,
)


def leaky_relu(width: int) -> nn.Module:
    """Activation factory for `MLP`: the paper's MLP uses LeakyReLU."""
    return nn.LeakyReLU()


class BST(nn.Module):
    """Behavior Sequence Transformer (Chen et al., DLP-KDD 2019, arXiv:1905.06874).

    Behaviour history and candidate are chosen as in DIN (`behaviour_history`); every item — the candidate and
    each behaviour — is the concatenation of its behaviour features' embeddings (E = behaviours * D, the paper's
    item id and category) with a position embedding of width D, concatenated rather than added, as in the paper:
    tokens are W = E + D wide.

    Sequence order. The tokens are laid out by recency: slot 0 is the candidate, slot s the s-th most recent
    behaviour (the paper's sequence with the target appended, read from its end; self-attention does not care
    about the layout, only the positions do). Slots beyond each row's history are padding: masked as attention
    keys by length and zeroed in the output, so padding ids never reach a real slot.

    Positions. The paper embeds the time gap t(candidate) - t(v_i). The batch carries each behaviour's timestamp
    (`Seq.times`) but not the candidate's, so the position embedding here is the sum of a learned embedding of
    the reversed index (the slot: 0 = candidate, 1 = most recent, ...) and a learned embedding of the log2-bucketed
    gap to the most recent behaviour, t(last) - t(v_i) in seconds — the paper's gap minus a per-row constant,
    the rest of which the slot carries. The candidate and a history without timestamps read gap bucket 0.

    Output. As in the paper, the outputs of all slots (candidate included) are concatenated, padded slots as
    zeros, with the other features — every sparse embedding not already in the tokens (user, context, item
    features the history lacks), masked means of other seq features, dense features — and fed to an MLP with
    LeakyReLU.

    Args:
        schema: the dataset's features. Needs at least one seq feature with `embed_as` on an item-side feature;
            its max_len fixes the number of slots (max_len + 1) and the MLP's input width.
        embedding_dim: D, width of every embedding and of the position embedding (the paper: 4 to 64).
        num_blocks: stacked Transformer layers (the paper: 1, its best).
        num_heads: attention heads; must divide W = (behaviour features + 1) * D (the paper: 8).
        feed_forward_dim: inner width of the point-wise feed-forward network.
        mlp_hidden: hidden widths of the prediction MLP (the paper: 1024-512-256).
        dropout: on sub-layer outputs and MLP hidden layers (the paper: 0.2; not on the attention weights).
        num_time_buckets: log2 buckets of the time gap; the last one takes every longer gap (32: ~136 years).

    forward(batch) -> logits (B,); tokens(batch) -> Transformer inputs (B, S, W), mask bool (B, S);
    encode_behaviour(batch) -> Transformer outputs (B, S, W), 0 at padding, and the mask; S = max_len + 1, slot 0
    the candidate; forward_with_attention(batch) -> logits (B,), the candidate's attention on each behaviour
    (B, L) in history order, 0 at padding.
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 8,
        num_blocks: int = 1,
        num_heads: int = 8,
        feed_forward_dim: int = 128,
        mlp_hidden: list[int] = [1024, 512, 256],  # noqa: B006 - never mutated; plain lists keep Hydra configs simple
        dropout: float = 0.2,
        num_time_buckets: int = 32,
    ) -> None:
        super().__init__()
        self.behaviour, self.candidate = behaviour_history(schema, "BST")
        width = (len(self.behaviour) + 1) * embedding_dim  # W: item features + position
        if width % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide the token width (behaviour features + 1) * embedding_dim = "
                f"({len(self.behaviour)} + 1) * {embedding_dim} = {width}"
            )
        self.max_len = schema[self.behaviour[0]].max_len
        self.num_time_buckets = num_time_buckets
        candidate = set(self.candidate)
        self.other_sparse = [f.name for f in schema.select("sparse") if f.name not in candidate]
        self.other_seq = [f.name for f in schema.select("seq") if f.name not in self.behaviour]
        self.dense_features = [f.name for f in schema.select("dense")]

        self.embedding = FeatureEmbedding(schema, embedding_dim)
        self.positions = LearnedPositions(self.max_len + 1, embedding_dim)  # slot = reversed index
        self.time_gaps = nn.Embedding(num_time_buckets, embedding_dim)
        self.blocks = nn.ModuleList(
            PostNormBlock(
                # no dropout on the attention weights: the paper does not place its dropout, and on the CPU
                # a (B, H, S, S) dropout mask costs a third of a training step
                MultiHeadSelfAttention(width, num_heads, dropout=0.0),
                FeedForward(width, feed_forward_dim, nn.LeakyReLU(), dropout),
                width,
                dropout,
            )
            for _ in range(num_blocks)
        )
        input_dim = (
            (self.max_len + 1) * width
            + len(self.other_sparse) * embedding_dim
            + pooled_width(schema, embedding_dim, self.other_seq, self.dense_features)
        )
        self.mlp = MLP(input_dim, mlp_hidden, activation=leaky_relu, dropout=dropout, output_dim=1)

    def tokens(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Transformer inputs: the candidate and the behaviours in recency order (B, S, W), and the mask of real
        slots (B, S) — the first lengths + 1 of each row."""
        seq = batch.seq[self.behaviour[0]]
        B, L = seq.ids.shape
        if L > self.max_len:
            raise ValueError(f"BST: history of length {L} is longer than the schema's max_len={self.max_len}")
        S = self.max_len + 1
        lengths = seq.lengths  # (B,)

        # recency layout: slot s >= 1 holds history position lengths - s (right-padded, oldest first)
        slots = torch.arange(1, S, device=lengths.device)  # (S-1,)
        real = slots.unsqueeze(0) <= lengths.unsqueeze(1)  # (B, S-1)
        source = (lengths.unsqueeze(1) - slots).clamp(min=0)  # (B, S-1), a valid index wherever real
        history = self.embedding.seq(batch, self.behaviour)  # (B, L, E)
        recent = history.gather(1, source.unsqueeze(-1).expand(-1, -1, history.shape[-1]))  # (B, S-1, E)
        recent = recent * real.unsqueeze(-1)  # (B, S-1, E): padded slots hold no id's embedding
        candidate = self.embedding.sparse(batch, self.candidate).flatten(1)  # (B, E)
        items = torch.cat([candidate.unsqueeze(1), recent], dim=1)  # (B, S, E)

        # time gap to the most recent behaviour, in log2 buckets; the candidate and untimed histories: bucket 0
        if seq.times is not None:
            last = seq.times.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1))  # (B, 1)
            gaps = (last - seq.times.gather(1, source)).clamp(min=0) * real  # (B, S-1) seconds, 0 at padding
            buckets = torch.log2(gaps.double() + 1).floor().long().clamp(max=self.num_time_buckets - 1)
        else:
            buckets = torch.zeros_like(source)  # (B, S-1)
        buckets = torch.cat([torch.zeros_like(buckets[:, :1]), buckets], dim=1)  # (B, S)
        positions = self.positions(S) + self.time_gaps(buckets)  # (B, S, D)

        mask = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)  # (B, S): the candidate is always real
        return torch.cat([items, positions], dim=-1), mask  # (B, S, W), (B, S)

    def encode_behaviour(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Transformer outputs of the candidate and the behaviours in recency order (B, S, W), zeros at padded
        slots, and the mask of real slots (B, S)."""
        outputs, mask, _ = self._encode(batch)
        return outputs, mask

    def _encode(self, batch: Batch) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """`encode_behaviour`, plus the last block's input (B, S, W) and attention mask (B, S, S): what
        `forward_with_attention` needs to recompute that block's attention weights."""
        x, mask = self.tokens(batch)  # (B, S, W), (B, S)
        S = x.shape[1]
        lengths = batch.seq[self.behaviour[0]].lengths
        allowed = attention_mask(
            lengths + 1, S, causal=False
        )  # (B, S, S): real keys, every slot sees them all
        last_input = x
        for block in self.blocks:
            last_input = x
            x = block(x, allowed)  # (B, S, W)
        return x * mask.unsqueeze(-1), mask, (last_input, allowed)

    def forward(self, batch: Batch) -> Tensor:
        outputs, _ = self.encode_behaviour(batch)  # (B, S, W)
        return self._predict(batch, outputs)

    def forward_with_attention(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Logits (B,) and the candidate's attention on every behaviour (B, L), in history order, 0 at
        padding: why this score.

        The weights are those of the candidate slot (slot 0 as the query) in the last Transformer block,
        averaged over the heads: the share of the candidate's attention output each behaviour's value fed.
        Slot 0 also attends itself, and that share is no behaviour's, so a row's weights sum to less than 1.
        With several blocks the earlier ones have already mixed the slots, so a weight names a slot (a
        behaviour's position) more than the item alone.
        """
        outputs, _, (x, allowed) = self._encode(batch)  # (B, S, W), last block's input (B, S, W), (B, S, S)
        logits = self._predict(batch, outputs)  # (B,)
        # the fused attention (scaled_dot_product_attention) never returns its weights: recompute slot 0's
        attention = self.blocks[-1].attention
        B, S, W = x.shape
        H = attention.num_heads
        q, k, _ = attention.qkv(x).view(B, S, 3, H, W // H).permute(2, 0, 3, 1, 4)  # each (B, H, S, W/H)
        scores = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) / (W // H) ** 0.5  # (B, H, S)
        scores = scores.masked_fill(~allowed[:, :1], float("-inf"))  # slot 0's keys: the real slots
        slots = torch.softmax(scores, dim=-1).mean(1)  # (B, S)

        # back to history order: position p of a right-padded history sits in slot lengths - p
        seq = batch.seq[self.behaviour[0]]
        L = seq.ids.shape[1]
        positions = torch.arange(L, device=slots.device).unsqueeze(0)  # (1, L)
        slot = (seq.lengths.unsqueeze(1) - positions).clamp(min=0)  # (B, L), slot 0 wherever padded
        weights = slots.gather(1, slot) * seq.mask()  # (B, L)
        return logits, weights

    def _predict(self, batch: Batch, outputs: Tensor) -> Tensor:
        """Logits (B,) from the Transformer outputs (B, S, W) and the features outside the tokens."""
        parts = [outputs.flatten(1)]  # (B, S*W): the paper concatenates every position's output
        if self.other_sparse:
            parts.append(self.embedding.sparse(batch, self.other_sparse).flatten(1))  # (B, F*D)
        parts += pooled_seq_and_dense(self.embedding, batch, self.other_seq, self.dense_features)
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)
