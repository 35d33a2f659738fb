"""Click-through-rate metrics: AUC, group AUC (GAUC) and log loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.utilities import dim_zero_cat


def _segment_starts(is_start: Tensor) -> tuple[Tensor, Tensor]:
    """Segment id of every element and start offset of every segment, from a bool [M] "new segment" mask."""
    segment_id = is_start.cumsum(dim=0) - 1  # (M,)
    lengths = torch.bincount(segment_id)  # (S,)
    starts = lengths.cumsum(dim=0) - lengths  # (S,)
    return segment_id, starts


def _check_impressions(preds: Tensor, target: Tensor) -> None:
    """ValueError unless preds and target are [B] with 0/1 labels and NaN-free scores."""
    if preds.ndim != 1 or preds.shape != target.shape:
        raise ValueError(
            f"preds and target must both be [B]; got {tuple(preds.shape)}, {tuple(target.shape)}"
        )
    if ((target != 0) & (target != 1)).any():
        raise ValueError("target must contain only 0 and 1")
    if torch.isnan(preds).any():
        raise ValueError("preds contain NaN")


def _exact_scores(preds: Tensor) -> Tensor:
    """Scores in a dtype that keeps every distinction the caller made: float64 stays float64, integers become
    float64 (exact below 2**53), lower-precision floats (bf16, fp16) are promoted to float32, exactly."""
    if preds.dtype == torch.float64 or not preds.is_floating_point():
        return preds.detach().double()
    return preds.detach().float()


def group_auc(preds: Tensor, target: Tensor, groups: Tensor) -> Tensor:
    """Impression-weighted mean of per-group ROC AUC over groups that hold both classes (nan if none).

    Args:
        preds: float [M], any score monotone in the predicted probability (logits are fine).
        target: [M], 0/1 labels.
        groups: int64 [M], group (user) id of each impression; any values, need not be contiguous.
    """
    if preds.numel() == 0:
        return torch.tensor(float("nan"), device=preds.device)
    _, auc, n_total = per_group_auc(preds, target, groups)
    valid = ~torch.isnan(auc)  # AUC is undefined for a single-class group
    if not bool(valid.any()):
        return torch.tensor(float("nan"), device=preds.device)
    # float64 for the weighted sum; the result is float32 like the other metrics.
    weight = n_total[valid].double()  # (G',)
    return ((auc[valid] * weight).sum() / weight.sum()).float()


def per_group_auc(preds: Tensor, target: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each group's ROC AUC: (group values int64 [G] ascending, AUC float64 [G], impressions int64 [G]); the
    AUC is nan for a group whose labels hold a single class.

    Vectorized Mann–Whitney U: sort by (group, score), give tied scores within a group their average rank
    (as `sklearn.metrics.roc_auc_score` does), and sum the positives' ranks per group with `scatter_add`.
    preds: float [M] (M > 0); target: 0/1 [M]; groups: int64 [M].
    """
    # Two stable sorts give a lexicographic (group, score) order without packing both into one key.
    order = torch.argsort(preds, stable=True)  # (M,)
    order = order[torch.argsort(groups[order], stable=True)]  # (M,)
    score = preds[order]  # (M,)
    group = groups[order]  # (M,)
    label = target[order].long()  # (M,)

    new_group = torch.ones_like(group, dtype=torch.bool)  # (M,)
    new_group[1:] = group[1:] != group[:-1]
    # A tie run is a maximal stretch of equal scores inside one group.
    new_run = new_group.clone()  # (M,)
    new_run[1:] |= score[1:] != score[:-1]
    group_id, group_start = _segment_starts(new_group)  # (M,), (G,)
    run_id, run_start = _segment_starts(new_run)  # (M,), (R,)
    run_len = torch.bincount(run_id)  # (R,)

    # A run at 0-based offset a of length L holds ranks a+1..a+L, average a + (L+1)/2. Doubling keeps the
    # rank sums exact in int64, where float32 would round once a group's rank sum passes 2**24.
    twice_rank = 2 * (run_start[run_id] - group_start[group_id]) + run_len[run_id] + 1  # (M,)
    num_groups = group_start.shape[0]
    n_total = torch.bincount(group_id, minlength=num_groups)  # (G,)
    n_pos = torch.zeros(num_groups, dtype=torch.long, device=preds.device).scatter_add_(0, group_id, label)
    twice_rank_sum = torch.zeros_like(n_pos).scatter_add_(0, group_id, twice_rank * label)  # (G,)
    n_neg = n_total - n_pos
    twice_u = twice_rank_sum - n_pos * (n_pos + 1)  # (G,): 2 * Mann–Whitney U of the positives

    valid = (n_pos > 0) & (n_neg > 0)
    auc = twice_u.double() / (2 * n_pos * n_neg).clamp(min=1).double()  # (G,)
    return group[group_start], torch.where(valid, auc, float("nan")), n_total


class GroupAUC(Metric):
    """Group AUC (GAUC) from DIN (Zhou et al., arXiv:1706.06978): per-user AUC weighted by impressions.

    GAUC = sum_u n_u * AUC_u / sum_u n_u over groups u that contain both a positive and a negative label;
    single-class groups are skipped because their AUC is undefined. If no group qualifies (or nothing was
    seen), `compute()` returns nan rather than raising, so that a tiny validation split does not stop training.

    Exact per-group AUC needs every score, so the states are lists concatenated across DDP processes.
    Tied scores get average ranks, matching `sklearn.metrics.roc_auc_score`. Scores are kept in float64 when
    given so (and when integer); lower precisions are stored as float32.

    Shapes (`update`):
        preds: float [B], scores or logits (any monotone score).
        target: [B], 0/1 labels (int, bool or float).
        groups: int64 [B], group (user) ids.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """Add a batch of impressions. preds: float [B]; target: 0/1 [B]; groups: int64 [B]."""
        if preds.ndim != 1 or preds.shape != target.shape or preds.shape != groups.shape:
            raise ValueError(
                "preds, target and groups must all be [B]; got "
                f"{tuple(preds.shape)}, {tuple(target.shape)}, {tuple(groups.shape)}"
            )
        if groups.is_floating_point() or groups.dtype == torch.bool:
            raise ValueError(f"groups must be an integer tensor, got {groups.dtype}")
        _check_impressions(preds, target)
        # Rounding float64 scores to float32 would merge distinct scores into ties.
        self.preds.append(_exact_scores(preds))
        # uint8 keeps the label list small and is supported by NCCL and Gloo all_gather.
        self.target.append(target.detach().to(torch.uint8))
        self.groups.append(groups.detach().long())

    def compute(self) -> Tensor:
        """Scalar GAUC; nan if no group has both classes."""
        if isinstance(self.preds, list) and len(self.preds) == 0:
            return torch.tensor(float("nan"), device=self.device)
        return group_auc(dim_zero_cat(self.preds), dim_zero_cat(self.target), dim_zero_cat(self.groups))


class ExactAUC(Metric):
    """ROC AUC of raw scores (logits), exact: the Mann–Whitney statistic with average ranks for ties.

    torchmetrics' `BinaryAUROC` applies a sigmoid to scores outside [0, 1], and float32 sigmoids of confident
    logits (about 16 and above) round to exactly 1.0, turning distinct scores into ties. Here the scores are
    ranked as given (`group_auc` with a single group), so any monotone score works and nothing is rounded.
    As with `GroupAUC`, the states are lists concatenated across DDP processes, and `compute()` returns nan
    when the labels seen hold a single class (or nothing was seen).

    Shapes (`update`):
        preds: float [B], scores or logits.
        target: [B], 0/1 labels (int, bool or float).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of impressions. preds: float [B]; target: 0/1 [B]."""
        _check_impressions(preds, target)
        self.preds.append(_exact_scores(preds))
        self.target.append(target.detach().to(torch.uint8))

    def compute(self) -> Tensor:
        """Scalar AUC; nan if the labels hold a single class."""
        if isinstance(self.preds, list) and len(self.preds) == 0:
            return torch.tensor(float("nan"), device=self.device)
        preds = dim_zero_cat(self.preds)  # (M,)
        return group_auc(preds, dim_zero_cat(self.target), torch.zeros_like(preds, dtype=torch.long))


class CTRMetrics(nn.Module):
    """AUC, GAUC and log loss of a click model, fed with logits.

    An `nn.Module` rather than a `MetricCollection` because the three metrics take different arguments; being
    a module, its metric states follow `.to(device)` and Lightning's device placement. AUC and GAUC rank the
    logits themselves (`ExactAUC`, `GroupAUC`), never their sigmoids, which tie in float32 for confident
    logits; both are nan when undefined (a single class).

    Shapes (`update`):
        logits: float [B], pre-sigmoid click scores.
        target: [B], 0/1 labels.
        groups: int64 [B], group (user) ids for GAUC.
    """

    def __init__(self) -> None:
        super().__init__()
        self.auroc = ExactAUC()
        self.gauc = GroupAUC()
        self.logloss = MeanMetric()

    def update(self, logits: Tensor, target: Tensor, groups: Tensor) -> None:
        """Add a batch of impressions. logits: float [B]; target: 0/1 [B]; groups: int64 [B]."""
        logits = logits.detach()
        # GAUC first: it validates shapes and labels with the clearest messages.
        self.gauc.update(logits, target, groups)
        self.auroc.update(logits, target)
        # From logits, not probabilities: log(sigmoid(x)) underflows to -inf for very negative x.
        losses = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")  # (B,)
        self.logloss.update(losses)

    def compute(self) -> dict[str, Tensor]:
        """Keys `auc`, `gauc`, `logloss`."""
        return {"auc": self.auroc.compute(), "gauc": self.gauc.compute(), "logloss": self.logloss.compute()}

    def reset(self) -> None:
        """Clear all three metrics (call at the end of each epoch)."""
        self.auroc.reset()
        self.gauc.reset()
        self.logloss.reset()
