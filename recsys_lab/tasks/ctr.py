"""Click-through-rate prediction: pointwise binary cross-entropy on labelled (or negative-sampled) rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.data.views import CTRView
from recsys_lab.metrics import CTRMetrics
from recsys_lab.tasks.base import RecTask

IMPRESSION_METRICS = ("auc", "gauc", "logloss")  # what logged impressions are scored by


class CTRTask(RecTask):
    """Trains any `forward(batch) -> logits [B]` model with binary cross-entropy.

    Evaluation on logged impressions logs `{stage}/auc`, `{stage}/gauc` (per-user, impression-weighted) and
    `{stage}/logloss`; under a ranking protocol the model scores (query, candidate) pairs and logs the
    ranking metrics (see `RankingEvaluation`).

    Args:
        net, schema, optimizer, scheduler, ks: see `RecTask`.
        label: the label to predict; None = the dataset's first label ("click" on the simulator, "label" on
            implicit data).
    """

    view = CTRView

    def __init__(
        self,
        net: nn.Module,
        schema: Schema,
        optimizer: Callable,
        scheduler: Callable | None = None,
        label: str | None = None,
        ks: Sequence[int] = (10, 20, 50),
    ) -> None:
        super().__init__(net, schema, optimizer, scheduler, ks)
        label = schema.labels[0] if label is None else label
        if label not in schema.labels:
            raise ValueError(
                f"model.label='{label}' is not a label of this dataset; labels are {schema.labels}"
            )
        self.label = label
        self.metrics = nn.ModuleDict({stage: CTRMetrics() for stage in ("val", "test")})

    def training_step(self, batch: Batch, batch_idx: int):
        """BCE on the label, plus the net's own auxiliary loss when it defines one.

        Auxiliary-loss hook: a net with `forward_with_auxiliary_loss(batch) -> (logits (B,), scalar)` (DIEN's
        next-behaviour loss, sharing one pass of its interest extractor with the logits) has the scalar added to
        the objective as it comes — the net weights it by its own config — and logged as `train/aux_loss`;
        `train/loss` is the total. Nets without the method train on BCE alone.
        """
        aux_loss = None
        if callable(getattr(self.net, "forward_with_auxiliary_loss", None)):
            logits, aux_loss = self.net.forward_with_auxiliary_loss(batch)  # (B,), scalar
        else:
            logits = self.net(batch)  # (B,)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels[self.label])
        values = {"train/loss": loss}
        if aux_loss is not None:
            loss = loss + aux_loss
            values = {"train/loss": loss, "train/aux_loss": aux_loss}
        self.log_training(values, batch_idx, len(batch))
        return loss

    def impression_metric_names(self) -> list[str]:
        return list(IMPRESSION_METRICS)

    def evaluate_impressions(self, batch: Batch, stage: str) -> None:
        logits = self.net(batch)
        self.metrics[stage].update(logits, batch.labels[self.label], batch.sparse[self.schema.user_id])
        self.analyse_impressions(batch, stage, logits, batch.labels[self.label])

    def end_impressions(self, stage: str) -> dict[str, Tensor]:
        values = self.metrics[stage].compute()
        self.metrics[stage].reset()
        return values
