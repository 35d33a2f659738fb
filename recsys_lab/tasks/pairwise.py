"""Pairwise ranking: a positive interaction scored above sampled negatives (BPR), for MF-BPR and LightGCN."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.data.views import PairwiseView
from recsys_lab.modules.losses import BPRLoss
from recsys_lab.tasks.base import RecTask
from recsys_lab.tasks.ranking import require_methods


class PairwiseTask(RecTask):
    """Trains `encode_query` / `encode_item` models so that s(u, i⁺) > s(u, i⁻) for every training positive
    i⁺ and its sampled negatives i⁻ (`data.train_negatives`, e.g. uniform_1), s = q_u · v_i.

    Negative items are encoded from the catalogue's item features (so models with item-side features work
    too), cached on the model's device once per run.

    Args:
        net, schema, optimizer, scheduler, ks: see `RecTask`.
        loss: `(positive (B,), negative (B, n)) -> loss`; BPR by default.
    """

    view = PairwiseView

    def __init__(
        self,
        net: nn.Module,
        schema: Schema,
        optimizer: Callable,
        loss: nn.Module | None = None,
        scheduler: Callable | None = None,
        ks: Sequence[int] = (10, 20, 50),
    ) -> None:
        super().__init__(net, schema, optimizer, scheduler, ks)
        require_methods(net, "PairwiseTask")
        self.loss = loss if loss is not None else BPRLoss()
        self._catalogue: tuple[torch.device, Batch] | None = (
            None  # the catalogue on the device it was moved to
        )

    def _items(self, codes: Tensor) -> Batch:
        if self._catalogue is None or self._catalogue[0] != codes.device:
            self._catalogue = (codes.device, self.context.catalogue().to(codes.device))
        return self._catalogue[1].select(codes)

    def training_step(self, batch: Batch, batch_idx: int):
        query = self.net.encode_query(batch)  # (B, D)
        positive = (query * self.net.encode_item(batch)).sum(-1)  # (B,)
        codes = batch.targets["negative_item"].ids  # (B, n)
        negatives = self.net.encode_item(self._items(codes.reshape(-1))).view(*codes.shape, -1)  # (B, n, D)
        negative = torch.einsum("bd,bnd->bn", query, negatives)  # (B, n)
        loss = self.loss(positive, negative)
        self.log_training({"train/loss": loss}, batch_idx, len(codes))
        return loss
