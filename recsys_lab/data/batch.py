"""The one batch type every model reads: named features with explicit lengths.

Batches are gathered whole with tensor indexing (see `recsys_lab.data.store`), never one Python sample at a time.
Lightning moves a `Batch` to the device through `apply_to_collection`, which walks dataclasses and dicts; the
methods here walk the same structure generically (`_map`), so a new group of fields needs no new code.

Conventions every model and task relies on:

* `forward(batch) -> logits [B]` is a model's main head. A model with several heads (multi-task rankers) also
  offers `forward_heads(batch) -> dict[str, Tensor]` (each [B], keyed by label name), and `forward` returns the
  head of its first label, so single-objective tasks and evaluation keep working unchanged.
* Position-wise supervision (next-item training, masked-item prediction) travels in `batch.targets`, aligned
  with an input sequence of `batch.seq`.
* What evaluation needs besides the features (the items to find, to mask, the stored candidates) travels in
  `batch.eval`, never among the features, so a model cannot read it by accident.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass  # not frozen: Lightning's half-precision path rejects frozen dataclasses
class Seq:
    """A right-padded id sequence. ids: int64 [B, L]; lengths: int64 [B] (0 <= lengths <= L); times: optional
    int64 [B, L], the timestamp (seconds) of each entry, carried where the data has it (the item history).

    Positions at or beyond `lengths` hold arbitrary ids (0 by convention); models must mask with `mask()`,
    never by testing for id 0.
    """

    ids: Tensor
    lengths: Tensor
    times: Tensor | None = None

    def mask(self) -> Tensor:
        """bool [B, L]: True at real (non-padding) positions."""
        positions = torch.arange(self.ids.shape[1], device=self.ids.device)
        return positions.unsqueeze(0) < self.lengths.unsqueeze(1)


@dataclass
class PositionTargets:
    """Targets at every position of an input sequence (e.g. the next item after each prefix).

    ids: int64 [B, L], the target at each position; mask: bool [B, L], True where the position is supervised
    (a causal model supervises every real position, a masked-item model only the masked ones).
    """

    ids: Tensor
    mask: Tensor


@dataclass
class EvalTargets:
    """What ranking evaluation needs about a query besides its features.

    user: int64 [B], the query's user entity (lets the evaluator build (query, candidate) pairs);
    targets: item codes to find; seen: item codes to mask (interacted with before the period);
    candidates: for sampled protocols, the stored candidate codes (targets first, then negatives), else None.
    """

    user: Tensor
    targets: Seq
    seen: Seq
    candidates: Seq | None = None


@dataclass
class Batch:
    """Named features of B rows.

    Args:
        sparse: one categorical id per row, int64 [B].
        seq: histories and other id lists, `Seq` of [B, L] + lengths [B].
        dense: float32 [B] or [B, D].
        labels: float32 [B] targets ("click", "purchase", ...).
        text: token tensors for language models, int64 [B, T] ("input_ids", "attention_mask", ...).
        targets: position-wise targets aligned with a seq feature (`PositionTargets`, [B, L]).
        eval: ranking-evaluation targets of query batches (`EvalTargets`), None for training batches.
        rows: int64 [B], the interaction row of each batch row, on evaluation batches of logged impressions
            (the test analysis reads the row's user, item and history length); None elsewhere.
    """

    sparse: dict[str, Tensor] = field(default_factory=dict)
    seq: dict[str, Seq] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)
    text: dict[str, Tensor] = field(default_factory=dict)
    targets: dict[str, PositionTargets] = field(default_factory=dict)
    eval: EvalTargets | None = None
    rows: Tensor | None = None

    def __len__(self) -> int:
        first = next(_tensors(self), None)
        return 0 if first is None else int(first.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """A copy on `device` (Lightning moves training batches itself; this is for batches we build)."""
        return _map(self, lambda t: t.to(device))

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory: the DataLoader calls it (`pin_memory=True`, set by the DataModule when
        training on CUDA) so that Lightning's `non_blocking` copy to the GPU overlaps the step before."""
        return _map(self, lambda t: t.pin_memory())

    def select(self, index: Tensor) -> Batch:
        """Rows `index` of every field (used to take sub-batches, e.g. the clicked rows)."""
        return _map(self, lambda t: t[index])

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        """Rows of several batches with the same fields, one after another. Tensors whose trailing sizes differ
        (sequences of different L, token rows of different T) are right-padded with zeros (False for masks):
        padding is always covered by a length or a mask."""
        return _zip(batches)


# ---- generic walks over the nested fields (Tensor, Seq, dataclasses, dicts, None) ----------------------------
def _map(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return type(value)(**{f.name: _map(getattr(value, f.name), fn) for f in dataclasses.fields(value)})
    return value  # None and plain values


def _tensors(value: Any):
    """Every tensor in field order (the first one gives the batch size)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))


def _pad_cat(tensors: list[Tensor]) -> Tensor:
    if tensors[0].dim() > 1:
        widths = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        tensors = [_pad_to(t, widths) for t in tensors]
    return torch.cat(tensors)


def _pad_to(t: Tensor, widths: list[int]) -> Tensor:
    pad: list[int] = []
    for d in reversed(range(1, t.dim())):  # F.pad lists the last dimension first
        pad += [0, widths[d - 1] - t.shape[d]]
    return F.pad(t, pad) if any(pad) else t


def _zip(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        return _pad_cat(values)
    if isinstance(first, dict):
        return {k: _zip([v[k] for v in values]) for k in first}
    if dataclasses.is_dataclass(first):
        return type(first)(
            **{f.name: _zip([getattr(v, f.name) for v in values]) for f in dataclasses.fields(first)}
        )
    if first is None:
        return None
    raise TypeError(f"Batch.concat: cannot concatenate values of type {type(first).__name__}")
