"""Models fitted in closed form when they are built (EASE): no gradient steps, the same entry point."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.data.views import RetrievalView
from recsys_lab.tasks.base import RecTask
from recsys_lab.tasks.ranking import require_methods


class FittedTask(RecTask):
    """Evaluates a model that fitted itself on the training split in its constructor (from
    `schema.train_pairs`), so `python train.py model=ease` needs no epochs: the single training epoch takes no
    optimizer step (one batch, ignored) and stops; validation, checkpointing and testing run as for every
    model.

    Args:
        net, schema, ks: see `RecTask`; the net exposes `encode_query` / `encode_item`.
        optimizer: unused (fitted models have no trainable parameters); kept for the shared config shape.
    """

    view = RetrievalView
    takes_no_steps = True  # RunCheckpoint saves the fitted model at global step 0

    def __init__(
        self,
        net: nn.Module,
        schema: Schema,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        ks: Sequence[int] = (10, 20, 50),
    ) -> None:
        super().__init__(net, schema, optimizer, scheduler, ks)
        require_methods(net, "FittedTask")
        self.automatic_optimization = False  # nothing to optimise: the fit happened in the constructor

    def configure_optimizers(self):
        return None

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        return None

    def on_fit_start(self) -> None:
        # One training batch, read before the loop counts the epoch's batches: the epoch ends after it, so
        # validation, early stopping and the checkpoint run as for every model, without a pass over the data.
        self.trainer.limit_train_batches = 1

    def on_train_epoch_end(self) -> None:
        self.trainer.should_stop = True  # one epoch: a second would validate the same model again
