"""The one batch type every model reads: named features with explicit lengths.

Batches are gathered whole with tensor indexing (see `recsys_lab.data.datasets`), never one Python sample at a
time. Lightning moves a `Batch` to the device through `apply_to_collection`, which walks dataclasses and dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass  # not frozen: Lightning's half-precision path rejects frozen dataclasses
class Seq:
    """A right-padded id sequence. ids: int64 [B, L]; lengths: int64 [B] (0 <= lengths <= L).

    Positions at or beyond `lengths` hold arbitrary ids (0 by convention); models must mask with `mask()`,
    never by testing for id 0.
    """

    ids: Tensor
    lengths: Tensor

    def mask(self) -> Tensor:
        """bool [B, L]: True at real (non-padding) positions."""
        positions = torch.arange(self.ids.shape[1], device=self.ids.device)
        return positions.unsqueeze(0) < self.lengths.unsqueeze(1)


@dataclass
class Batch:
    """Named features of B rows.

    Args:
        sparse: one categorical id per row, int64 [B].
        seq: histories and other id lists, `Seq` of [B, L] + lengths [B].
        dense: float32 [B] or [B, D].
        labels: float32 [B] targets ("click", "purchase", ...).
        text: token tensors for language models, int64 [B, T] ("input_ids", "attention_mask", ...).
    """

    sparse: dict[str, Tensor] = field(default_factory=dict)
    seq: dict[str, Seq] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)
    text: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        for group in (self.sparse, self.dense, self.labels, self.text):
            for value in group.values():
                return int(value.shape[0])
        for value in self.seq.values():
            return int(value.ids.shape[0])
        return 0

    def to(self, device: torch.device | str) -> Batch:
        """A copy on `device` (Lightning moves training batches itself; this is for batches we build)."""
        return Batch(
            sparse={k: v.to(device) for k, v in self.sparse.items()},
            seq={k: Seq(v.ids.to(device), v.lengths.to(device)) for k, v in self.seq.items()},
            dense={k: v.to(device) for k, v in self.dense.items()},
            labels={k: v.to(device) for k, v in self.labels.items()},
            text={k: v.to(device) for k, v in self.text.items()},
        )

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        """Rows of several batches with the same features, one after another (sequences padded to the
        longest)."""
        first = batches[0]

        def seq(name: str) -> Seq:
            width = max(b.seq[name].ids.shape[1] for b in batches)
            ids = [
                torch.nn.functional.pad(b.seq[name].ids, (0, width - b.seq[name].ids.shape[1]))
                for b in batches
            ]
            return Seq(torch.cat(ids), torch.cat([b.seq[name].lengths for b in batches]))

        return Batch(
            sparse={k: torch.cat([b.sparse[k] for b in batches]) for k in first.sparse},
            seq={k: seq(k) for k in first.seq},
            dense={k: torch.cat([b.dense[k] for b in batches]) for k in first.dense},
            labels={k: torch.cat([b.labels[k] for b in batches]) for k in first.labels},
            text={k: torch.cat([b.text[k] for b in batches]) for k in first.text},
        )

    def select(self, index: Tensor) -> Batch:
        """Rows `index` of every feature (used to take sub-batches, e.g. the clicked rows)."""
        return Batch(
            sparse={k: v[index] for k, v in self.sparse.items()},
            seq={k: Seq(v.ids[index], v.lengths[index]) for k, v in self.seq.items()},
            dense={k: v[index] for k, v in self.dense.items()},
            labels={k: v[index] for k, v in self.labels.items()},
            text={k: v[index] for k, v in self.text.items()},
        )
