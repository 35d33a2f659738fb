"""What every task shares: the optimizer from config, evaluation and the checkpoint identity check."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytorch_lightning as pl
from torch import Tensor, nn

from recsys_lab.analysis.evaluation import AnalysisData, EvaluationSpec, TestAnalysis
from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.data.views import EvalContext, View
from recsys_lab.tasks.ranking import RankingEvaluation

ANALYSIS_KEYS = ("slice/", "gap/")  # the test analysis's per-group keys (recsys_lab.analysis.evaluation)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint written by another model or for another feature layout."""


class RecTask(pl.LightningModule):
    """Base of the tasks: holds the net and schema, builds the optimizer, evaluates, checks checkpoints.

    Contract with the data (one way, wired once by the entry point): `view` names the data view this objective
    trains on; `connect(context)` hands over how that view's validation/test batches are scored — "ranking"
    query batches by `RankingEvaluation` (any model, any protocol), "impressions" batches by the subclass's
    `evaluate_impressions`. `begin_evaluation` / `evaluate_batch` / `end_evaluation` are the public evaluation
    API (the Lightning hooks call them; so does `scripts/benchmark.py`).

    Args:
        net: the model (a plain nn.Module).
        schema: the dataset's schema (feature names, training statistics).
        optimizer: a partial taking the parameters (`_partial_: true` in config).
        scheduler: optional partial taking the optimizer; stepped once per epoch.
        ks: cut-offs of the ranking metrics (`model.ks`).
    """

    view: type[View]  # the data view this objective trains on

    def __init__(
        self,
        net: nn.Module,
        schema: Schema,
        optimizer: Callable,
        scheduler: Callable | None = None,
        ks: Sequence[int] = (10, 20, 50),
    ) -> None:
        super().__init__()
        self.net, self.schema = net, schema
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        try:
            self.ranking = RankingEvaluation(ks, first_cold_item=schema.first_cold_item)
        except ValueError as err:
            raise ValueError(f"model.ks={list(ks) if isinstance(ks, Sequence) else ks}: {err}") from None
        self.context: EvalContext | None = None
        self.analysis: TestAnalysis | None = None
        self.analysis_metrics: dict[str, float] = {}  # the last stage's slices and gaps (see `_log_stage`)

    # ---- the data contract -------------------------------------------------------------------------------
    def connect(self, context: EvalContext) -> None:
        """How validation/test batches are scored (from the view); call once before fitting or testing."""
        self.context = context

    def configure_analysis(self, spec: EvaluationSpec, data: AnalysisData) -> None:
        """What the test stage reports besides accuracy (`evaluation` config); after `connect`."""
        self.analysis = TestAnalysis(
            spec, data, self.evaluation, self.ranking.ks, self.ranking.per_query_names
        )

    @property
    def evaluation(self) -> str:
        if self.context is None:
            raise RuntimeError(f"{type(self).__name__}: call connect(view.eval_context()) before evaluating")
        return self.context.kind

    def metric_names(self, stage: str) -> list[str]:
        """Every `{stage}/...` metric this task logs under its evaluation (checked against `monitor`)."""
        names = (
            self.ranking.metric_names() if self.evaluation == "ranking" else self.impression_metric_names()
        )
        return [f"{stage}/{n}" for n in names]

    def impression_metric_names(self) -> list[str]:
        return []

    def default_monitor(self) -> str:
        """Headline validation metric (checkpointing, early stopping, sweeps) under the connected evaluation."""
        return f"val/ndcg@{min(self.ranking.ks)}" if self.evaluation == "ranking" else "val/auc"

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self._parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer)},
        }

    def _parameter_groups(self) -> list[dict]:
        """What the optimizer updates: the net's own groups where it defines them (`net.param_groups()`, e.g. a
        smaller rate for pretrained weights) plus the task's other parameters; frozen weights are left out."""
        own = getattr(self.net, "param_groups", None)
        groups = (
            own() if callable(own) else [{"params": [p for p in self.net.parameters() if p.requires_grad]}]
        )
        in_net = {id(p) for p in self.net.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in in_net]
        groups = [g for g in groups if g["params"]] + ([{"params": rest}] if rest else [])
        if not groups:
            raise ValueError(
                f"{type(self.net).__name__} has no trainable parameter (a frozen encoder without heads?): "
                "nothing to fit; evaluate it as it is with train=false"
            )
        return groups

    # ---- evaluation: public API ----------------------------------------------------------------------------
    def begin_evaluation(self, stage: str) -> None:
        if self.evaluation == "ranking":
            self.ranking.start(self.net, self.context, self.device)

    def evaluate_batch(self, batch: Batch, stage: str) -> None:
        """Score one validation/test batch and update the stage's metrics."""
        analysis = self.analysis if stage == "test" else None
        if self.evaluation == "ranking":
            self.ranking.step(self.net, batch, stage, self.context.pairs, self.context.num_items, analysis)
        else:
            self.evaluate_impressions(batch, stage)

    def end_evaluation(self, stage: str) -> dict[str, Tensor]:
        """The stage's metrics (keys without the stage prefix); resets them for the next epoch."""
        values = self.ranking.end(stage) if self.evaluation == "ranking" else self.end_impressions(stage)
        if stage == "test" and self.analysis is not None:
            values |= self.analysis.end()
        return values

    def analyse_impressions(self, batch: Batch, stage: str, logits: Tensor, labels: Tensor) -> None:
        """Hand a test batch of impressions to the analysis (subclasses call it from `evaluate_impressions`
        with the logits and labels of their headline label)."""
        if stage == "test" and self.analysis is not None and batch.rows is not None:
            self.analysis.impression_step(batch.rows, logits, labels)

    def evaluate_impressions(self, batch: Batch, stage: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} evaluates ranking queries only")

    def end_impressions(self, stage: str) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} evaluates ranking queries only")

    def log_training(self, values: dict[str, Tensor], batch_idx: int, batch_size: int) -> None:
        """Log training values (`train/loss` also in the progress bar) on the steps the logger writes: every
        `trainer.log_every_n_steps` batches, and an epoch's last batch so that every epoch has a value.

        Lightning's `self.log` costs about a millisecond per call — as much as a whole MF-BPR step on the CPU —
        and a value logged between two of the logger's writes is overwritten unseen (training values are
        logged per step, not averaged per epoch). Under `fast_dev_run` every step is logged."""
        trainer = self._trainer
        # a step called outside a Trainer (scripts/benchmark.py times training_step alone) logs nothing
        if trainer is None:
            return
        every = max(1, int(trainer.log_every_n_steps))
        last = batch_idx + 1 >= trainer.num_training_batches
        if (batch_idx + 1) % every and not last:
            return
        for name, value in values.items():
            self.log(name, value, prog_bar=name == "train/loss", batch_size=batch_size)

    # ---- Lightning hooks -----------------------------------------------------------------------------------
    def _log_stage(self, stage: str) -> None:
        values = self.end_evaluation(stage)
        headline = {f"{stage}/{k}": v for k, v in values.items() if "/" not in k}
        self.log_dict(headline, prog_bar=stage == "val")
        sliced = {
            f"{stage}/{k}": v for k, v in values.items() if "/" in k and not k.startswith(ANALYSIS_KEYS)
        }
        self.log_dict(sliced)  # the cold-start slice (cold/...)
        # The test analysis's slices and gaps (a few hundred values, already reduced across processes) go to
        # the loggers directly: through `self.log` each costs about a millisecond and Lightning would print
        # them all in its own table. `stage_metrics` reads them from here.
        self.analysis_metrics = {
            f"{stage}/{k}": float(v) for k, v in values.items() if k.startswith(ANALYSIS_KEYS)
        }
        if self.analysis_metrics and self._trainer is not None:
            for logger in self.loggers:
                logger.log_metrics(self.analysis_metrics, step=self.global_step)

    def on_validation_epoch_start(self) -> None:
        self.begin_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self.begin_evaluation("test")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluate_batch(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluate_batch(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_stage("val")

    def on_test_epoch_end(self) -> None:
        self._log_stage("test")

    # ---- checkpoint identity -----------------------------------------------------------------------------
    def _identity(self) -> dict:
        net = type(self.net)
        return {
            "task": f"{type(self).__module__}.{type(self).__qualname__}",
            "net": f"{net.__module__}.{net.__qualname__}",
            "schema_fingerprint": self.schema.fingerprint(),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["recsys_lab_model"] = self._identity()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning calls this before loading the state dict: fail with names, not with a key-mismatch dump.
        saved, now = checkpoint.get("recsys_lab_model"), self._identity()
        if saved is None:
            raise CheckpointMismatchError(
                "checkpoint was not written by recsys_lab (no 'recsys_lab_model' entry)"
            )
        if saved != now:
            diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            raise CheckpointMismatchError(
                "checkpoint does not match this run: "
                + "; ".join(f"{k}: checkpoint has {a}, this run builds {b}" for k, (a, b) in diff.items())
            )
