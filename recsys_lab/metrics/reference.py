"""AUC of reference scorers (training popularity, the simulator's true click probability) on evaluated rows."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc


def _unit_interval(scores: Tensor) -> Tensor:
    """Order-preserving, exact map into [0, 1] (dense ranks): binary_auroc applies a sigmoid to anything
    outside it, which would turn large counts into ties."""
    _, dense_rank = torch.unique(scores.double(), return_inverse=True)
    return dense_rank.double() / max(int(dense_rank.max()), 1)


def reference_aucs(labels: Tensor, scores: dict[str, Tensor]) -> dict[str, float]:
    """ROC AUC of each named score vector [M] against 0/1 labels [M]; {} when the labels hold one class."""
    labels = labels.long()
    if len(labels) == 0 or int(labels.min()) == int(labels.max()):
        return {}
    return {
        name: float(binary_auroc(_unit_interval(s), labels, thresholds=None)) for name, s in scores.items()
    }
