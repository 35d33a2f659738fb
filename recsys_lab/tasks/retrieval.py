"""Retrieval: a query/item encoder trained with a sampled softmax, evaluated by full-catalogue ranking."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.metrics import FullRankingMetrics
from recsys_lab.tasks.base import RecTask


class RetrievalTask(RecTask):
    """Trains `encode_query` / `encode_item` models on positive interactions; evaluates every query against the
    whole catalogue (items the user interacted with before the evaluation period are masked).

    The catalogue is encoded once per evaluation epoch; each query batch is one chunk of the score matrix
    (B, N), reduced with `torch.topk` inside `FullRankingMetrics`.

    Logs `train/loss` and `{stage}/recall@k`, `{stage}/ndcg@k`, `{stage}/hit@k`, `{stage}/mrr`.

    Args:
        net, schema, optimizer, scheduler: see `RecTask`.
        loss: module `(query, item, item_ids, log_q) -> loss`, e.g. `SampledSoftmaxLoss`.
        ks: cut-offs of the ranking metrics; the largest is the monitored recall.
        item_chunk: items encoded per forward pass when encoding the catalogue.
    """

    view = "retrieval"

    def __init__(
        self,
        net: nn.Module,
        schema: Schema,
        optimizer: Callable,
        loss: nn.Module,
        scheduler: Callable | None = None,
        ks: Sequence[int] = (10, 20, 50),
        item_chunk: int = 65536,
    ) -> None:
        super().__init__(net, schema, optimizer, scheduler)
        for method in ("encode_query", "encode_item"):
            if not callable(getattr(net, method, None)):
                raise TypeError(f"RetrievalTask needs a model with {method}(); {type(net).__name__} has none")
        self.loss = loss
        self.ks = tuple(ks)
        self.item_chunk = item_chunk
        self.monitor = f"val/recall@{max(self.ks)}"
        # log of each item's share of training positives: the in-batch sampling probability for logQ correction
        self.register_buffer("log_q", schema.item_log_prob(), persistent=False)
        self.metrics = nn.ModuleDict({stage: FullRankingMetrics(self.ks) for stage in ("val", "test")})
        self._catalogue: Tensor | None = None

    def training_step(self, batch: Batch, batch_idx: int):
        query = self.net.encode_query(batch)  # (B, D)
        item = self.net.encode_item(batch)  # (B, D)
        loss = self.loss(query, item, batch.sparse[self.schema.item_id], self.log_q)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    @torch.no_grad()
    def encode_catalogue(self, items: Batch) -> Tensor:
        """(N, D) item encodings, in chunks of `item_chunk` items."""
        n = len(items)
        chunks = [
            self.net.encode_item(items.select(torch.arange(s, min(s + self.item_chunk, n))).to(self.device))
            for s in range(0, n, self.item_chunk)
        ]
        return torch.cat(chunks)

    def _start(self) -> None:
        self._catalogue = self.encode_catalogue(self.trainer.datamodule.catalogue())

    def _eval_step(self, batch: Batch, stage: str) -> None:
        scores = self.net.encode_query(batch) @ self._catalogue.T  # (B, N)
        seen, targets = batch.seq["eval.seen"], batch.seq["eval.targets"]
        rows = torch.arange(len(scores), device=scores.device).unsqueeze(1)
        # padded positions point at item 0; route them to a scratch column so they touch nothing real
        scratch = scores.shape[1]
        seen_cols = torch.where(seen.mask(), seen.ids, scratch)
        target_cols = torch.where(targets.mask(), targets.ids, scratch)
        scores = torch.cat([scores, scores.new_zeros(len(scores), 1)], 1)  # (B, N + 1)
        scores[rows, seen_cols] = float("-inf")
        relevant = torch.zeros_like(scores, dtype=torch.bool)
        relevant[rows, target_cols] = True
        self.metrics[stage].update(scores[:, :scratch], relevant[:, :scratch])

    def _eval_end(self, stage: str) -> None:
        super()._eval_end(stage)
        self._catalogue = None

    def on_validation_epoch_start(self) -> None:
        self._start()

    def on_test_epoch_start(self) -> None:
        self._start()
