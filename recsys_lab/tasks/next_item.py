"""Next-item prediction on whole sequences: the objective of GRU4Rec, SASRec, BERT4Rec and HSTU.

The model contract (a plain `nn.Module`):

* `encode_sequence(batch) -> (B, L, D)`: a hidden state at every position of `batch.seq["hist_item_id"]`
  (causal for next-item models: position t sees positions <= t only);
* `item_table() -> (V, D)`: the output representation of every item code (often the input embedding table);
* `encode_query(batch) -> (B, D)` and `encode_item(batch) -> (N, D)` for ranking evaluation (`q @ items.T`,
  under every protocol), and `forward(batch) -> (B,)`, their row-wise dot product.

The loss is a module picked in config (`recsys_lab.modules.losses`): `FullSoftmaxLoss`,
`UniformSampledSoftmaxLoss`, `InBatchSoftmaxLoss`, `BCENegativeLoss`, `GBCELoss`; each takes the hidden states
of the supervised positions, their target codes, the item table and log q.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from recsys_lab.data.batch import Batch, PositionTargets, Seq
from recsys_lab.data.schema import Schema
from recsys_lab.data.store import history_feature
from recsys_lab.data.views import PrefixSequenceView, SequenceView
from recsys_lab.tasks.base import RecTask
from recsys_lab.tasks.ranking import require_methods
from recsys_lab.utils.checks import ModelMismatchError

SEQUENCE = history_feature("item_id")  # the item sequence every sequence model reads


class NextItemTask(RecTask):
    """Trains a causal sequence model to predict the next item at every position at once.

    Logs `train/loss` and the ranking metrics of `RecTask`.

    Args:
        net, schema, optimizer, scheduler, ks: see `RecTask`.
        loss: a next-item loss module (`FullSoftmaxLoss` by default in the configs).
        prefix_augmentation: train on one row per prefix (`PrefixSequenceView`, as RecBole and GRU4Rec do)
            instead of one row per user with every position supervised (`SequenceView`).
    """

    view = SequenceView

    def __init__(
        self,
        net: nn.Module,
        schema: Schema,
        optimizer: Callable,
        loss: nn.Module,
        scheduler: Callable | None = None,
        ks: Sequence[int] = (10, 20, 50),
        prefix_augmentation: bool = False,
    ) -> None:
        super().__init__(net, schema, optimizer, scheduler, ks)
        require_methods(net, type(self).__name__, ("encode_sequence", "item_table", "encode_query"))
        self.loss = loss
        if prefix_augmentation:
            self.view = PrefixSequenceView
        self.register_buffer("log_q", schema.item_log_prob(), persistent=False)

    def inputs_and_targets(self, batch: Batch) -> tuple[Batch, PositionTargets]:
        """What the model reads and the items it must predict at the supervised positions."""
        return batch, batch.targets["next_item"]

    def training_step(self, batch: Batch, batch_idx: int):
        inputs, target = self.inputs_and_targets(batch)
        hidden = self.net.encode_sequence(inputs)  # (B, L, D)
        loss = self.loss(hidden[target.mask], target.ids[target.mask], self.net.item_table(), self.log_q)
        self.log_training({"train/loss": loss}, batch_idx, int(target.mask.sum()))
        return loss


class MaskedItemTask(NextItemTask):
    """Masked-item prediction (BERT4Rec's Cloze objective, Sun et al., CIKM 2019, arXiv:1904.06690).

    Each real position of a training sequence is replaced by the model's `[MASK]` token with probability
    `mask_ratio` (at least one per sequence: the last one when the draw masked none), and the model predicts the
    original items at the masked positions from both sides. At inference the model appends `[MASK]` after the
    history and ranks from it (the model's `encode_query`).

    Args:
        net, schema, optimizer, scheduler, ks: see `RecTask`; the net exposes `mask_id` (its [MASK] code).
        loss: a next-item loss module applied at the masked positions.
        mask_ratio: probability that a position is masked (BERT4Rec: 0.2 on MovieLens-1M).
    """

    view = SequenceView

    def __init__(
        self,
        net: nn.Module,
        schema: Schema,
        optimizer: Callable,
        loss: nn.Module,
        scheduler: Callable | None = None,
        ks: Sequence[int] = (10, 20, 50),
        mask_ratio: float = 0.2,
    ) -> None:
        super().__init__(net, schema, optimizer, loss, scheduler, ks)
        if not isinstance(getattr(net, "mask_id", None), int):
            raise ModelMismatchError(
                f"MaskedItemTask needs a model with an integer mask_id; {type(net).__name__} has none"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"model.mask_ratio={mask_ratio}: expected a probability in (0, 1)")
        self.mask_ratio = mask_ratio

    def inputs_and_targets(self, batch: Batch) -> tuple[Batch, PositionTargets]:
        return self.mask(batch)

    def mask(self, batch: Batch) -> tuple[Batch, PositionTargets]:
        """The batch with masked inputs, and the original items at the masked positions."""
        seq = batch.seq[SEQUENCE]
        real = seq.mask()  # (B, L)
        masked = (torch.rand(real.shape, device=real.device) < self.mask_ratio) & real
        none = ~masked.any(1) & (seq.lengths > 0)  # (B,): sequences the draw left unmasked
        rows = none.nonzero().squeeze(1)
        masked[rows, seq.lengths[rows] - 1] = True
        inputs = torch.where(masked, torch.full_like(seq.ids, self.net.mask_id), seq.ids)
        masked_batch = dataclasses.replace(
            batch, seq={**batch.seq, SEQUENCE: Seq(inputs, seq.lengths, seq.times)}
        )
        return masked_batch, PositionTargets(seq.ids, masked)
