"""Click-through-rate prediction: pointwise binary cross-entropy on impressions."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.metrics import CTRMetrics
from recsys_lab.tasks.base import RecTask


class CTRTask(RecTask):
    """Trains any `forward(batch) -> logits [B]` model on impressions with binary cross-entropy.

    Logs `train/loss` and, per evaluation stage, `{stage}/auc`, `{stage}/gauc` (per-user, impression-weighted)
    and `{stage}/logloss`.

    Args:
        net, schema, optimizer, scheduler: see `RecTask`.
        label: which label to predict ("click"; "purchase" for conversion).
    """

    view = "ctr"
    monitor = "val/auc"

    def __init__(
        self,
        net: nn.Module,
        schema: Schema,
        optimizer: Callable,
        scheduler: Callable | None = None,
        label: str = "click",
    ) -> None:
        super().__init__(net, schema, optimizer, scheduler)
        if label not in schema.labels:
            raise ValueError(f"model.label='{label}' is not a label of this dataset; labels are {schema.labels}")
        self.label = label
        self.metrics = nn.ModuleDict({stage: CTRMetrics() for stage in ("val", "test")})

    def training_step(self, batch: Batch, batch_idx: int):
        logits = self.net(batch)  # (B,)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels[self.label])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def _eval_step(self, batch: Batch, stage: str) -> None:
        logits = self.net(batch)
        self.metrics[stage].update(logits, batch.labels[self.label], batch.sparse[self.schema.user_id])
