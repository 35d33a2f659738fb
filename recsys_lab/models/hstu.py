"""HSTU: the Hierarchical Sequential Transduction Unit of generative recommenders — pointwise (not softmax)
attention with relative position and time biases, gated element-wise by a fourth projection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.sequence import LearnedPositions, attention_mask, item_sequence, last_position


def time_buckets(delta: Tensor, num_buckets: int, width: float) -> Tensor:
    """Log buckets of time differences in seconds: floor(ln(max(|Δt|, 1)) / width), clamped to [0, num_buckets].

    The reference implementation's bucketing (width 0.301: each bucket spans a factor e^0.301 ≈ 1.35; gaps of a
    second or less share bucket 0, a day is bucket 37, a year bucket 57). int64 (...) -> int64 (...).
    """
    return (torch.log(delta.abs().clamp(min=1).double()) / width).floor().long().clamp(0, num_buckets)


class RelativeAttentionBias(nn.Module):
    """rab^{p,t} (paper sec. 3.1): a learned scalar per relative position i - j plus one per log bucket of the
    time gap |t_i - t_j| between query and key, shared by the heads.

    The query's own timestamp is used: the reference implementation takes the gap from the *next* item's time,
    which a query batch here does not carry (and which would tell the model when the target happens).

    Args:
        max_len: the longest sequence (relative positions span -(max_len - 1)..max_len - 1).
        num_time_buckets: time buckets beyond bucket 0 (the table has num_time_buckets + 1 rows; reference: 128).
        time_bucket_width: width of a bucket in ln-seconds (reference: 0.301).

    forward(times int64 (B, L)) -> (B, L, L).
    """

    def __init__(self, max_len: int, num_time_buckets: int, time_bucket_width: float) -> None:
        super().__init__()
        self.max_len, self.num_time_buckets = max_len, num_time_buckets
        self.time_bucket_width = time_bucket_width
        self.position = nn.Parameter(torch.empty(2 * max_len - 1).normal_(std=0.02))
        self.time = nn.Parameter(torch.empty(num_time_buckets + 1).normal_(std=0.02))

    def forward(self, times: Tensor) -> Tensor:
        B, L = times.shape
        positions = torch.arange(L, device=times.device)
        relative = positions.view(L, 1) - positions.view(1, L)  # (L, L): i - j
        position_bias = self.position[relative + self.max_len - 1]  # (L, L)
        gaps = times.view(B, L, 1) - times.view(B, 1, L)  # (B, L, L): t_i - t_j
        time_bias = self.time[time_buckets(gaps, self.num_time_buckets, self.time_bucket_width)]  # (B, L, L)
        return position_bias + time_bias  # (B, L, L)


def pointwise_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, allowed: Tensor, n: int) -> Tensor:
    """HSTU's spatial aggregation (paper eq. 2): A(X)V(X) = φ2(Q K^T + rab^{p,t}) V(X), with φ2 = SiLU / n.

    Pointwise, not softmax: the weights of a query do not sum to one, so how much history there is for the
    target, and how strongly it matches, both survive aggregation (the paper's argument for streaming
    vocabularies and intensity). n is a fixed normaliser (the model's sequence length, as in the reference),
    so a position's output depends on nothing after it. Disallowed pairs get weight exactly 0.

    q, k (B, H, L, d_qk); v (B, H, L, d_v); bias (B, L, L); allowed bool (B, L, L) -> (B, H, L, d_v).
    """
    weights = F.silu(q @ k.transpose(-2, -1) + bias.unsqueeze(1)) / n  # (B, H, L, L)
    weights = weights * allowed.unsqueeze(1)  # (B, H, L, L): causal, real keys only
    return weights @ v  # (B, H, L, d_v)


class HSTULayer(nn.Module):
    """One HSTU layer (paper eqs. 1-3):

        U, V, Q, K = Split(SiLU(f1(Norm(X))))                      pointwise projection
        A V = SiLU(Q K^T + rab^{p,t}) V / n, causal                 spatial aggregation
        Y = X + f2(Dropout(Norm(A V) ⊙ U))                          pointwise transformation, residual

    The paper writes f1(X); the reference implementation normalises X first (pre-norm, which keeps the stacked
    residual stream trainable) and so does this layer. Norm is a LayerNorm without learned scale or shift
    (eps 1e-6) over D before f1 and over H * d_v after aggregation, as in the reference; f1 has no bias.

    Args:
        dim: D, width of the residual stream.
        num_heads: H.
        attention_dim: d_qk per head.
        linear_dim: d_v (and width of U) per head.
        dropout: on the gated output before f2.
        relative_bias: this layer's rab^{p,t}.
        n: the attention normaliser (the model's sequence length).

    forward(x (B, L, D), times int64 (B, L), allowed bool (B, L, L)) -> (B, L, D).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention_dim: int,
        linear_dim: int,
        dropout: float,
        relative_bias: RelativeAttentionBias,
        n: int,
    ) -> None:
        super().__init__()
        self.num_heads, self.attention_dim, self.linear_dim, self.n = num_heads, attention_dim, linear_dim, n
        self.uvqk = nn.Linear(dim, num_heads * (2 * linear_dim + 2 * attention_dim), bias=False)  # f1
        self.relative_bias = relative_bias
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(num_heads * linear_dim, dim)  # f2
        nn.init.normal_(self.uvqk.weight, std=0.02)  # reference initialisation
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, x: Tensor, times: Tensor, allowed: Tensor) -> Tensor:
        B, L, D = x.shape
        H, dv, dqk = self.num_heads, self.linear_dim, self.attention_dim
        projected = F.silu(self.uvqk(F.layer_norm(x, (D,), eps=1e-6)))  # (B, L, H*(2 dv + 2 dqk))
        u, v, q, k = projected.split([H * dv, H * dv, H * dqk, H * dqk], dim=-1)

        def heads(t: Tensor) -> Tensor:
            return t.view(B, L, H, -1).transpose(1, 2)  # (B, H, L, d)

        av = pointwise_attention(heads(q), heads(k), heads(v), self.relative_bias(times), allowed, self.n)
        av = av.transpose(1, 2).reshape(B, L, H * dv)  # (B, L, H*dv)
        return x + self.out(self.dropout(u * F.layer_norm(av, (H * dv,), eps=1e-6)))  # (B, L, D)


class HSTU(nn.Module):
    """HSTU (Zhai et al., ICML 2024, "Actions Speak Louder than Words: Trillion-Parameter Sequential
    Transducers for Generative Recommendations", arXiv:2402.17152), as a next-item model (paper sec. 4.1.1).

    Input at position t: the item embedding scaled by sqrt(D) plus a learned embedding of t (from the oldest
    item of the right-padded window), dropout, padded positions zeroed — the reference implementation's input
    preprocessing. Then `num_blocks` HSTU layers, each with its own relative attention bias over positions and
    log-bucketed time gaps (`Seq.times`). Attention is causal and never reaches a padded key. As in the
    reference, queries and items are L2-normalised and scored by cosine / `temperature`: `encode_sequence`
    returns unit vectors divided by the temperature, `item_table` unit vectors.

    A history without timestamps (`Seq.times` None) reads as all gaps zero (every pair in time bucket 0).

    Args:
        schema: the dataset's features; reads the item-id history, whose max_len bounds positions and is n.
        embedding_dim: D (reference, ML-1M: 50).
        num_blocks: stacked HSTU layers (reference: 2, or 8 for "HSTU-large").
        num_heads: H (reference: 2 for ML-1M large, 1 otherwise).
        attention_dim: d_qk per head (reference: 25 with 2 heads).
        linear_dim: d_v per head (reference: 25 with 2 heads).
        dropout: on the inputs and before each f2 (reference: 0.2).
        num_time_buckets: log time buckets beyond bucket 0 (reference: 128).
        time_bucket_width: bucket width in ln-seconds (reference: 0.301).
        temperature: scores are cosine / temperature (reference: 0.05).

    encode_sequence(batch) -> (B, L, D); encode_query(batch) -> (B, D), the state at the last real item;
    item_table() -> (V, D); encode_item(batch) -> (N, D); forward(batch) -> (B,), their row-wise dot.
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 64,
        num_blocks: int = 2,
        num_heads: int = 2,
        attention_dim: int = 32,
        linear_dim: int = 32,
        dropout: float = 0.2,
        num_time_buckets: int = 128,
        time_bucket_width: float = 0.301,
        temperature: float = 0.05,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: expected a positive number")
        sequence = item_sequence(schema, "HSTU")
        self.sequence, self.item_id, self.temperature = sequence.name, schema.item_id, temperature
        self.items = nn.Embedding(schema.num_items, embedding_dim)
        self.positions = LearnedPositions(sequence.max_len, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            HSTULayer(
                embedding_dim,
                num_heads,
                attention_dim,
                linear_dim,
                dropout,
                RelativeAttentionBias(sequence.max_len, num_time_buckets, time_bucket_width),
                n=sequence.max_len,
            )
            for _ in range(num_blocks)
        )
        # reference initialisation: both inputs start at about the same scale once items are scaled by sqrt(D)
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.positions.table.weight, std=1 / math.sqrt(embedding_dim))

    def encode_sequence(self, batch: Batch) -> Tensor:
        seq = batch.seq[self.sequence]
        B, L = seq.ids.shape
        D = self.items.embedding_dim
        x = self.items(seq.ids) * math.sqrt(D) + self.positions(L)  # (B, L, D)
        x = self.dropout(x) * seq.mask().unsqueeze(-1)  # (B, L, D), padding zeroed
        times = seq.times if seq.times is not None else torch.zeros_like(seq.ids)  # (B, L)
        allowed = attention_mask(seq.lengths, L, causal=True)  # (B, L, L)
        for layer in self.layers:
            x = layer(x, times, allowed)  # (B, L, D)
        return F.normalize(x, dim=-1) / self.temperature  # (B, L, D): dot with item_table = cosine / τ

    def item_table(self) -> Tensor:
        return F.normalize(self.items.weight, dim=-1)  # (V, D), unit rows

    def encode_query(self, batch: Batch) -> Tensor:
        return last_position(self.encode_sequence(batch), batch.seq[self.sequence].lengths)  # (B, D)

    def encode_item(self, batch: Batch) -> Tensor:
        return self.item_table()[batch.sparse[self.item_id]]  # (N, D)

    def forward(self, batch: Batch) -> Tensor:
        return (self.encode_query(batch) * self.encode_item(batch)).sum(-1)  # (B,)
