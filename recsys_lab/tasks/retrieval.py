"""Retrieval: a query/item encoder trained with a sampled softmax, evaluated by ranking the catalogue."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.data.views import RetrievalView
from recsys_lab.tasks.base import RecTask
from recsys_lab.tasks.ranking import require_methods


class RetrievalTask(RecTask):
    """Trains `encode_query` / `encode_item` models on positive interactions; evaluates every query against
    the whole catalogue or its stored sampled candidates (see `RankingEvaluation`).

    Logs `train/loss` and `{stage}/recall@k`, `{stage}/ndcg@k`, `{stage}/hit@k`, `{stage}/mrr`.

    Args:
        net, schema, optimizer, scheduler, ks: see `RecTask`.
        loss: module `(query, item, item_ids, log_q) -> loss`, e.g. `SampledSoftmaxLoss`.
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
    ) -> None:
        super().__init__(net, schema, optimizer, scheduler, ks)
        require_methods(net, "RetrievalTask")
        self.loss = loss
        # log of each item's share of training positives: the in-batch sampling probability for logQ correction
        self.register_buffer("log_q", schema.item_log_prob(), persistent=False)

    def training_step(self, batch: Batch, batch_idx: int):
        query = self.net.encode_query(batch)  # (B, D)
        item = self.net.encode_item(batch)  # (B, D)
        loss = self.loss(query, item, batch.sparse[self.schema.item_id], self.log_q)
        self.log_training({"train/loss": loss}, batch_idx, len(batch))
        return loss
