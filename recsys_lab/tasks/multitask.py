"""Multi-task CTR: one binary cross-entropy per label on a model's heads, combined by a configurable weighting."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.data.views import CTRView
from recsys_lab.metrics import CTRMetrics
from recsys_lab.modules.multitask import head_labels
from recsys_lab.tasks.base import RecTask
from recsys_lab.tasks.ctr import IMPRESSION_METRICS
from recsys_lab.utils.checks import ModelMismatchError


class FixedWeights(nn.Module):
    """total = sum_t w_t * L_t with weights from config.

    Args:
        labels: the model's heads (given by the task).
        weights: label -> weight; a head not named gets 1.0; None = 1.0 for every head.
    """

    def __init__(self, labels: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(labels))
        if unknown:
            raise ValueError(
                f"model.weighting.weights names {unknown}, which the model has no head for; heads are {list(labels)}"
            )
        self.labels = list(labels)
        self.register_buffer("w", torch.tensor([float(weights.get(t, 1.0)) for t in self.labels]))

    def weights(self) -> dict[str, Tensor]:
        return dict(zip(self.labels, self.w, strict=True))

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        return sum(w * losses[t] for t, w in self.weights().items())


class UncertaintyWeights(nn.Module):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, arXiv:1705.07115).

    One learned s_t = log sigma_t^2 per task, trained with the model. For a classification likelihood (a
    softmax, here a sigmoid, scaled by 1/sigma^2) the paper's eq. 10 approximates the task's negative log
    likelihood by (1/sigma_t^2) L_t + log sigma_t, so

        total = sum_t exp(-s_t) * L_t + s_t / 2.

    Learning s_t rather than sigma_t keeps the weight positive and the loss finite (the paper's sec. 3.2).
    At the optimum for a fixed L_t, exp(-s_t) = 1 / (2 L_t): a task with a larger loss gets a smaller weight.

    Args:
        labels: the model's heads (given by the task).
        init: the starting s_t of every task (0: weight 1).

    Logs as weights: exp(-s_t).
    """

    def __init__(self, labels: Sequence[str], init: float = 0.0) -> None:
        super().__init__()
        self.labels = list(labels)
        self.log_var = nn.Parameter(torch.full((len(self.labels),), float(init)))  # (T,): s_t

    def weights(self) -> dict[str, Tensor]:
        return dict(zip(self.labels, torch.exp(-self.log_var.detach()), strict=True))

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        loss = torch.stack([losses[t] for t in self.labels])  # (T,)
        return (torch.exp(-self.log_var) * loss + 0.5 * self.log_var).sum()


class MultiTaskTask(RecTask):
    """Trains a model's `forward_heads(batch) -> {label: logits [B]}` with one BCE per label, weighted.

    The heads and their order are the model's `labels` (first = what `forward` returns; multi-task models
    take them from `model.net.labels`, default every label of the dataset). Training logs `train/loss` (the
    weighted total), `train/<label>/loss` and `train/<label>/weight`.

    Evaluation on logged impressions logs `{stage}/<label>/auc`, `/gauc`, `/logloss` for every head, and
    `{stage}/auc`, `/gauc`, `/logloss` for the first one (so the default monitor `val/auc` is the first label's
    AUC, as under `CTRTask`). Under a ranking evaluation (implicit data) the base class ranks with `forward`,
    the first head.

    Args:
        net, schema, optimizer, scheduler, ks: see `RecTask`. The net must offer `forward_heads` and `labels`.
        weighting: a partial taking `labels` and returning the loss combiner (`FixedWeights`,
            `UncertaintyWeights`, `_partial_: true` in config); its parameters train with the model.
            None = `FixedWeights` with every weight 1.
    """

    view = CTRView

    def __init__(
        self,
        net: nn.Module,
        schema: Schema,
        optimizer: Callable,
        scheduler: Callable | None = None,
        weighting: Callable[..., nn.Module] | None = None,
        ks: Sequence[int] = (10, 20, 50),
    ) -> None:
        if not callable(getattr(net, "forward_heads", None)) or not hasattr(net, "labels"):
            lacks = "forward_heads(batch)" if not hasattr(net, "forward_heads") else "a `labels` attribute"
            raise ModelMismatchError(
                f"MultiTaskTask needs a multi-task model (forward_heads(batch) -> {{label: logits}} and its "
                f"head labels in `labels`); {type(net).__name__} lacks {lacks}. Train it with CTRTask, or use "
                "model=shared_bottom / mmoe / ple / esmm"
            )
        super().__init__(net, schema, optimizer, scheduler, ks)
        self.labels = head_labels(schema, net.labels)  # the model's own check, for nets built without it
        self.weighting = (weighting or FixedWeights)(labels=self.labels)
        self.metrics = nn.ModuleDict(
            {stage: nn.ModuleList(CTRMetrics() for _ in self.labels) for stage in ("val", "test")}
        )

    def task_losses(self, batch: Batch) -> dict[str, Tensor]:
        """The unweighted BCE of every head on its label: {label: scalar}."""
        heads = self.net.forward_heads(batch)  # {label: (B,)}
        return {t: F.binary_cross_entropy_with_logits(heads[t], batch.labels[t]) for t in self.labels}

    def training_step(self, batch: Batch, batch_idx: int):
        losses = self.task_losses(batch)
        loss = self.weighting(losses)
        values = {"train/loss": loss}
        for t, weight in self.weighting.weights().items():
            values[f"train/{t}/loss"], values[f"train/{t}/weight"] = losses[t].detach(), weight
        self.log_training(values, batch_idx, len(batch))
        return loss

    def impression_metric_names(self) -> list[str]:
        return [*IMPRESSION_METRICS, *(f"{t}/{m}" for t in self.labels for m in IMPRESSION_METRICS)]

    def evaluate_impressions(self, batch: Batch, stage: str) -> None:
        heads = self.net.forward_heads(batch)
        users = batch.sparse[self.schema.user_id]
        for t, metrics in zip(self.labels, self.metrics[stage], strict=True):
            metrics.update(heads[t], batch.labels[t], users)
        # the analysis (calibration, slices, per-user values) reads the first label's head, the headline one
        self.analyse_impressions(batch, stage, heads[self.labels[0]], batch.labels[self.labels[0]])

    def end_impressions(self, stage: str) -> dict[str, Tensor]:
        values = {}
        for t, metrics in zip(self.labels, self.metrics[stage], strict=True):
            computed = metrics.compute()
            metrics.reset()
            values |= {f"{t}/{k}": v for k, v in computed.items()}
            if t == self.labels[0]:
                values |= computed
        return values
