"""Pieces the sequence models share (GRU4Rec, SASRec, BERT4Rec, HSTU): which history they read, the hidden state
at the last real position, attention masks over right-padded sequences, learned positions, and the multi-head
self-attention and feed-forward sub-layers of the two Transformer encoders (SASRec, BERT4Rec).

Convention (`recsys_lab.data.batch.Seq`): sequences are oldest first and right-padded, with explicit lengths;
padding ids are arbitrary, so everything here masks by length, never by id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.data.schema import Feature, Schema


def item_sequence(schema: Schema, model: str) -> Feature:
    """The schema's item-id history (the seq feature embedded as the item id): what a sequence model reads."""
    for feature in schema.select("seq"):
        if feature.embed_as == schema.item_id:
            return feature
    raise ValueError(
        f"{model} needs an item-id history (a seq feature with embed_as='{schema.item_id}'); the schema's seq "
        f"features are {[(f.name, f.embed_as) for f in schema.select('seq')]}"
    )


def behaviour_history(schema: Schema, model: str) -> tuple[list[str], list[str]]:
    """The behaviour history a target-aware ranker reads (DIN, DIEN, BST): every seq
    feature whose `embed_as` names an item-side sparse feature, and the candidate's matching sparse features in
    the same order, so history items and candidate share tables and live in one space. Returns (behaviour seq
    names, candidate sparse names). The behaviour features are parallel columns of the same events (item id,
    category, ...): they share L and lengths."""
    sides = {f.name: f.side for f in schema.features}
    behaviour = [f.name for f in schema.select("seq") if f.embed_as and sides[f.embed_as] == "item"]
    if not behaviour:
        raise ValueError(
            f"{model} needs a behaviour history: at least one seq feature whose embed_as names an item-side "
            f"sparse feature; the schema's seq features are {[(f.name, f.embed_as) for f in schema.select('seq')]}"
        )
    return behaviour, [schema[name].embed_as for name in behaviour]


def last_position(hidden: Tensor, lengths: Tensor) -> Tensor:
    """hidden (B, L, D) at each row's last real position `lengths - 1` -> (B, D).

    An empty row (length 0) reads position 0, whatever the model computed there: it has no history to encode.
    """
    last = (lengths - 1).clamp(min=0)  # (B,)
    return hidden[torch.arange(len(last), device=hidden.device), last]  # (B, D)


def attention_mask(lengths: Tensor, length: int, causal: bool) -> Tensor:
    """bool (B, L, L), True where query position i may attend key position j.

    Keys are the real positions (j < length of the row), and, when `causal`, only j <= i. Every query may also
    attend itself: a real query sees itself anyway, and a padded query of an empty row would otherwise see
    nothing, which makes softmax attention NaN — and a NaN at a padded value reaches real positions through
    `0 * NaN` in the next layer. Real queries therefore never see a padded key, whatever the padding holds.
    """
    positions = torch.arange(length, device=lengths.device)
    allowed = positions.view(1, 1, length) < lengths.view(-1, 1, 1)  # (B, 1, L): real keys
    if causal:
        causal_pairs = positions.view(1, length, 1) >= positions.view(1, 1, length)  # (1, L, L): j <= i
        allowed = allowed & causal_pairs  # (B, L, L)
    return allowed | torch.eye(length, dtype=torch.bool, device=lengths.device)  # (B, L, L)


class LearnedPositions(nn.Module):
    """A learned embedding per absolute position, counted from the oldest item of the (right-padded) window.

    Args:
        max_len: the longest sequence the model reads (the data's history length).
        dim: D, width of each position's embedding.

    forward(length) -> (L, D), broadcastable over the batch.
    """

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.table = nn.Embedding(max_len, dim)

    def forward(self, length: int) -> Tensor:
        if length > self.max_len:
            raise ValueError(
                f"sequence of length {length} is longer than the {self.max_len} positions the model was built "
                "for (data.history_len)"
            )
        return self.table.weight[:length]  # (L, D)


class MultiHeadSelfAttention(nn.Module):
    """Scaled dot-product self-attention with H heads (Vaswani et al., NeurIPS 2017, arXiv:1706.03762).

    Args:
        dim: D, model width (split evenly over the heads).
        num_heads: H.
        dropout: dropout on the attention weights (training only).

    forward(x (B, L, D), allowed bool (B, L, L) from `attention_mask`) -> (B, L, D).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        B, L, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each (B, H, L, D/H)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed.unsqueeze(1), dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, D/H)
        return self.out(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class FeedForward(nn.Module):
    """Position-wise feed-forward network: Linear -> activation -> dropout -> Linear, applied at every position
    alone (so it can never mix positions).

    Args:
        dim: D, input and output width.
        hidden_dim: inner width.
        activation: the non-linearity (ReLU in SASRec, GELU in BERT4Rec).
        dropout: dropout on the inner activations.

    forward(x (B, L, D)) -> (B, L, D).
    """

    def __init__(self, dim: int, hidden_dim: int, activation: nn.Module, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim), activation, nn.Dropout(dropout), nn.Linear(hidden_dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PostNormBlock(nn.Module):
    """A Transformer layer with LayerNorm after each residual sum (post-LN, Vaswani et al. 2017), as BERT4Rec and
    BST use it: x = LN(x + Dropout(SelfAttention(x))), then LN(x + Dropout(FFN(x))). The FFN's activation is the
    caller's (GELU for BERT4Rec, LeakyReLU for BST).

    Args:
        attention: the self-attention sub-layer.
        feed_forward: the point-wise feed-forward sub-layer.
        dim: D, for the LayerNorms.
        dropout: dropout on each sub-layer's output.

    forward(x (B, L, D), allowed bool (B, L, L)) -> (B, L, D).
    """

    def __init__(self, attention: nn.Module, feed_forward: nn.Module, dim: int, dropout: float) -> None:
        super().__init__()
        self.attention, self.attention_norm = attention, nn.LayerNorm(dim)
        self.feed_forward, self.feed_forward_norm = feed_forward, nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, allowed)))  # (B, L, D)
        return self.feed_forward_norm(x + self.dropout(self.feed_forward(x)))  # (B, L, D)


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation, used by RecBole's SASRec/BERT4Rec: N(0, std) weights for linear and embedding
    layers, zero biases, unit LayerNorm. PyTorch's N(0, 1) embeddings would dwarf positions and overflow the
    sqrt(D)-scaled inputs. Apply with `model.apply(init_normal)`."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
