"""Reference AUCs of fixed scorers (true click probabilities, popularity counts) with torchmetrics, not sklearn.

The data layer reports how well an oracle and a popularity baseline rank a split, as yardsticks for models.
`torchmetrics.functional.classification.binary_auroc` takes any score, but applies a sigmoid to every score
vector that leaves [0, 1]: in float32, popularity counts such as 50 and 51 both become 1.0 and tie. Each score
vector is therefore first mapped into [0, 1] by its dense ranks, which preserves its order and ties exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc


def _unit_interval_ranks(scores: Tensor) -> Tensor:
    """float64 [M] in [0, 1] with the order and ties of scores [M]: dense rank / largest dense rank.

    AUC depends on the order of the scores only, and float64 holds every rank up to 2**53 exactly, so distinct
    scores stay distinct and equal scores stay equal.
    """
    _, dense_rank = torch.unique(scores, sorted=True, return_inverse=True)  # (M,): 0 for the lowest score
    return dense_rank.double() / dense_rank.max().clamp(min=1).double()


def reference_aucs(labels: Tensor, scores: dict[str, Tensor]) -> dict[str, float]:
    """ROC AUC of each named scorer on the same rows; `{}` when the labels hold a single class.

    Tied scores count one half, as in `sklearn.metrics.roc_auc_score`.

    Args:
        labels: [M], 0/1 labels (int, bool or float).
        scores: name -> [M] scores of that scorer (any dtype, any range; higher means more likely positive).
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be [M], got shape {tuple(labels.shape)}")
    if ((labels != 0) & (labels != 1)).any():
        raise ValueError("labels must contain only 0 and 1")
    target = labels.long()  # (M,)
    # AUC is undefined without both classes; an empty result lets the caller log nothing.
    if target.numel() == 0 or bool((target == target[0]).all()):
        return {}
    out: dict[str, float] = {}
    for name, score in scores.items():
        if score.shape != labels.shape:
            raise ValueError(f"scores[{name!r}] must be [M] like labels; got {tuple(score.shape)}")
        if score.is_floating_point() and bool(torch.isnan(score).any()):
            raise ValueError(f"scores[{name!r}] contain NaN")
        preds = _unit_interval_ranks(score.detach().to(target.device))  # (M,)
        out[name] = float(binary_auroc(preds, target, thresholds=None))
    return out
