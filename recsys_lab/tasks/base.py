"""What every task shares: the optimizer from config, evaluation dispatch and the checkpoint identity check."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytorch_lightning as pl
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.tasks.ranking import RankingEvaluation


class CheckpointMismatchError(RuntimeError):
    """A checkpoint written by another model or for another feature layout."""


class RecTask(pl.LightningModule):
    """Base of the tasks: holds the net and schema, builds the optimizer, evaluates, checks checkpoints.

    Validation and test follow the DataModule's evaluation: "ranking" query batches are scored by
    `RankingEvaluation` (any model, any protocol); "impressions" batches by the subclass's `_impression_step`.

    Args:
        net: the model (a plain nn.Module).
        schema: the dataset's schema (feature names, training statistics).
        optimizer: a partial taking the parameters (`_partial_: true` in config).
        scheduler: optional partial taking the optimizer; stepped once per epoch.
        ks: cut-offs of the ranking metrics.
    """

    view: str  # which DataModule view feeds this objective

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
        self.ranking = RankingEvaluation(ks)

    def default_monitor(self, evaluation: str) -> str:
        """Headline validation metric (checkpointing, early stopping, sweeps) under an evaluation kind."""
        return f"val/ndcg@{min(self.ranking.ks)}" if evaluation == "ranking" else "val/auc"

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer)},
        }

    # ---- evaluation --------------------------------------------------------------------------------------
    def _ranking(self) -> bool:
        return self.trainer.datamodule.evaluation == "ranking"

    def _impression_step(self, batch: Batch, stage: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} evaluates ranking queries only")

    def _impression_end(self, stage: str) -> dict[str, Tensor]:
        raise NotImplementedError

    def _start(self) -> None:
        if self._ranking():
            self.ranking.start(self.net, self.trainer.datamodule, self.device)

    def _step(self, batch: Batch, stage: str) -> None:
        if self._ranking():
            self.ranking.step(self.net, self.trainer.datamodule, batch, stage)
        else:
            self._impression_step(batch, stage)

    def _end(self, stage: str) -> None:
        values = self.ranking.end(stage) if self._ranking() else self._impression_end(stage)
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")

    def on_validation_epoch_start(self) -> None:
        self._start()

    def on_test_epoch_start(self) -> None:
        self._start()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._end("val")

    def on_test_epoch_end(self) -> None:
        self._end("test")

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
