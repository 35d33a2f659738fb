"""Tiny schemas and random batches for unit and contract tests (no data files, no downloads)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl
import torch

from recsys_lab.data.batch import Batch, Seq
from recsys_lab.data.schema import Feature, Schema


def tiny_schema(num_users: int = 13, num_items: int = 17, history_len: int = 5) -> Schema:
    """A schema shaped like the e-commerce simulator's, with every feature kind except text."""
    features = [
        Feature("user_id", "sparse", "user", vocab_size=num_users),
        Feature("age", "sparse", "user", vocab_size=4),
        Feature("item_id", "sparse", "item", vocab_size=num_items),
        Feature("cat", "sparse", "item", vocab_size=3),
        Feature("hour", "sparse", "context", vocab_size=24),
        Feature("price", "dense", "item", dim=1),
        Feature("image", "dense", "item", dim=4),
        Feature("hist_item_id", "seq", "user", vocab_size=num_items, max_len=history_len, embed_as="item_id"),
        Feature("hist_cat", "seq", "user", vocab_size=3, max_len=history_len, embed_as="cat"),
    ]
    counts = torch.arange(num_items, dtype=torch.float32)  # item 0 never seen: exercises smoothing
    g = torch.Generator().manual_seed(0)
    pairs = torch.stack(  # training (user code, item code) pairs, codes >= 1 as a vocabulary gives them
        [
            torch.randint(1, num_users, (3 * num_users,), generator=g),
            torch.randint(1, num_items, (3 * num_users,), generator=g),
        ],
        dim=1,
    )
    return Schema(features=features, labels=["click", "purchase"], item_counts=counts, train_pairs=pairs)


def random_batch(schema: Schema, batch_size: int = 6, seed: int = 0) -> Batch:
    """A batch with every schema feature; lengths include 0 and full so masking is exercised."""
    g = torch.Generator().manual_seed(seed)
    batch = Batch()
    for f in schema.select("sparse"):
        batch.sparse[f.name] = torch.randint(0, f.vocab_size, (batch_size,), generator=g)
    for f in schema.select("dense"):
        shape = (batch_size,) if f.dim == 1 else (batch_size, f.dim)
        batch.dense[f.name] = torch.randn(shape, generator=g)
    seq_feats = schema.select("seq")
    if seq_feats:
        max_len = max(f.max_len for f in seq_feats)
        lengths = torch.randint(0, max_len + 1, (batch_size,), generator=g)
        lengths[0], lengths[-1] = 0, max_len
        for f in seq_feats:
            ids = torch.randint(0, f.vocab_size, (batch_size, max_len), generator=g)
            batch.seq[f.name] = Seq(ids=ids, lengths=lengths.clone())
    for name in schema.labels:
        batch.labels[name] = torch.randint(0, 2, (batch_size,), generator=g).float()
    return batch


class KillAt(pl.Callback):
    """Kills its own process with SIGKILL at a given training batch: an abrupt crash (no cleanup, no checkpoint
    written on the way out) for testing that a resumed run continues the interrupted one exactly.

    Args:
        epoch: the epoch (0-based) in which to die.
        batch: the batch index within that epoch at whose start to die.
    """

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class MeanSequenceModel(torch.nn.Module):
    """A minimal sequence model for testing the next-item and masked-item tasks: the hidden state at position
    t is the mean of the item embeddings at positions <= t (causal), or of every real position when
    `bidirectional` (with a [MASK] code `mask_id` = V)."""

    def __init__(self, schema: Schema, dim: int = 8, bidirectional: bool = False) -> None:
        super().__init__()
        self.items = torch.nn.Embedding(schema.num_items + 1, dim)  # + [MASK]
        self.mask_id, self.bidirectional = schema.num_items, bidirectional

    def encode_sequence(self, batch: Batch) -> torch.Tensor:
        seq = batch.seq["hist_item_id"]
        x = self.items(seq.ids) * seq.mask().unsqueeze(-1)  # (B, L, D)
        if self.bidirectional:
            return (x.sum(1, keepdim=True) / seq.lengths.clamp(min=1).view(-1, 1, 1)).expand_as(x)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device).view(1, -1, 1)
        return x.cumsum(1) / steps  # (B, L, D)

    def item_table(self) -> torch.Tensor:
        return self.items.weight[: self.mask_id]  # (V, D)

    def encode_query(self, batch: Batch) -> torch.Tensor:
        hidden = self.encode_sequence(batch)
        last = (batch.seq["hist_item_id"].lengths - 1).clamp(min=0)
        return hidden[torch.arange(len(last)), last]  # (B, D)

    def encode_item(self, batch: Batch) -> torch.Tensor:
        return self.item_table()[batch.sparse["item_id"]]

    def forward(self, batch: Batch) -> torch.Tensor:
        return (self.encode_query(batch) * self.encode_item(batch)).sum(-1)


def tiny_item_content(
    schema: Schema, seed: int = 0, image_size: int = 16, audio_samples: int = 512
) -> Schema:
    """`schema` with item content tables (`schema.item_content`) for content-model tests: the dense `image`
    vector (kind "vector"), a picture (`image_rgb`, uint8 (V, 3, S, S)) and a sound (`audio`, (V, T)). Which
    items have which is fixed, so every case occurs: code 0 has nothing; codes divisible by 3 lack the
    picture, codes = 1 mod 4 lack the sound, codes divisible by 5 lack the vector."""
    import dataclasses

    from recsys_lab.data.schema import ContentTable

    g = torch.Generator().manual_seed(seed)
    V = schema.num_items
    codes = torch.arange(V)

    def table(kind: str, values: torch.Tensor, present: torch.Tensor) -> ContentTable:
        present = present & (codes > 0)
        shape = (-1,) + (1,) * (values.dim() - 1)
        return ContentTable(kind, values * present.view(shape).to(values.dtype), present)

    content = {
        "image": table("vector", torch.randn(V, schema["image"].dim, generator=g), codes % 5 != 0),
        "image_rgb": table(
            "image",
            torch.randint(0, 256, (V, 3, image_size, image_size), generator=g, dtype=torch.uint8),
            codes % 3 != 0,
        ),
        "audio": table("audio", torch.randn(V, audio_samples, generator=g), codes % 4 != 1),
    }
    return dataclasses.replace(schema, item_content=content)
