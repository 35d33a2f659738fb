"""What every task shares: the optimizer from config and the checkpoint identity check."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
from torch import nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema


class CheckpointMismatchError(RuntimeError):
    """A checkpoint written by another model or for another feature layout."""


class RecTask(pl.LightningModule):
    """Base of the tasks: holds the net and schema, builds the optimizer, stamps and checks checkpoints.

    Args:
        net: the model (a plain nn.Module).
        schema: the dataset's schema (feature names, training statistics).
        optimizer: a partial taking the parameters (`_partial_: true` in config).
        scheduler: optional partial taking the optimizer; stepped once per epoch.
    """

    view: str  # which DataModule view feeds this objective
    monitor: str  # headline validation metric (checkpointing, early stopping, sweeps)

    def __init__(
        self,
        net: nn.Module,
        schema: Schema,
        optimizer: Callable,
        scheduler: Callable | None = None,
    ) -> None:
        super().__init__()
        self.net, self.schema = net, schema
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer)}}

    # ---- evaluation: subclasses fill self.metrics[stage] in _eval_step -----------------------------------
    def _eval_step(self, batch: Batch, stage: str) -> None:
        raise NotImplementedError

    def _eval_end(self, stage: str) -> None:
        values = self.metrics[stage].compute()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")
        self.metrics[stage].reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

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
            raise CheckpointMismatchError("checkpoint was not written by recsys_lab (no 'recsys_lab_model' entry)")
        if saved != now:
            diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            raise CheckpointMismatchError(
                "checkpoint does not match this run: "
                + "; ".join(f"{k}: checkpoint has {a}, this run builds {b}" for k, (a, b) in diff.items())
            )
