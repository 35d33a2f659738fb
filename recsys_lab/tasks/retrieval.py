"""Retrieval: a query/item encoder trained with a sampled softmax, evaluated by ranking the catalogue."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.data.views import RetrievalView
from recsys_lab.modules.distributed import gather_rows, world
from recsys_lab.tasks.base import RecTask
from recsys_lab.tasks.ranking import require_methods


class RetrievalTask(RecTask):
    """Trains `encode_query` / `encode_item` models on positive interactions; evaluates every query against
    the whole catalogue or its stored sampled candidates (see `RankingEvaluation`).

    Logs `train/loss` and `{stage}/recall@k`, `{stage}/ndcg@k`, `{stage}/hit@k`, `{stage}/mrr`.

    Args:
        net, schema, optimizer, scheduler, ks: see `RecTask`.
        loss: module `(query, item, item_ids, log_q, positive) -> loss`, e.g. `SampledSoftmaxLoss`.
        cross_rank_negatives: under DDP, score each query against the items of every process's batch, not its
            own process's only (`gather_rows`: gathered with gradients), so the in-batch negatives grow with
            the world size and a step equals one process's step on the global batch. No effect in one process.
    """

    view = RetrievalView

    def __init__(
        self,
        net: nn.Module,
        schema: Schema,
        optimizer: Callable,
        loss: nn.Module,
        scheduler: Callable | None = None,
        ks: Sequence[int] = (10, 20, 50),
        cross_rank_negatives: bool = True,
    ) -> None:
        super().__init__(net, schema, optimizer, scheduler, ks)
        require_methods(net, "RetrievalTask")
        self.loss = loss
        self.cross_rank_negatives = cross_rank_negatives
        # log of each item's share of training positives: the in-batch sampling probability for logQ correction
        self.register_buffer("log_q", schema.item_log_prob(), persistent=False)

    def training_step(self, batch: Batch, batch_idx: int):
        query = self.net.encode_query(batch)  # (B, D)
        item = self.net.encode_item(batch)  # (B, D)
        item_ids = batch.sparse[self.schema.item_id]  # (B,)
        positive = None
        if self.cross_rank_negatives and world()[1] > 1:
            item, offset = gather_rows(item)  # (N, D): every process's items
            item_ids, _ = gather_rows(item_ids)  # (N,)
            positive = offset + torch.arange(len(query), device=query.device)  # (B,)
        loss = self.loss(query, item, item_ids, self.log_q, positive)
        self.log_training({"train/loss": loss}, batch_idx, len(batch))
        return loss
