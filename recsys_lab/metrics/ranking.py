"""Streaming full-catalogue ranking metrics: Recall@k, NDCG@k, Hit@k and MRR.

torchmetrics' retrieval metrics keep every (query, item, score) triple until `compute()`, which does not scale
when every query is ranked against the whole catalogue. The metrics here are means of per-query values, so the
state is a handful of sums that `dist_reduce_fx="sum"` adds up across DDP processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
from torch import Tensor
from torchmetrics import Metric


def _validate_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated cut-offs; a clear ValueError for anything that is not a positive int."""
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    if len(ks) == 0:
        raise ValueError("ks must be a non-empty sequence of positive ints, got an empty sequence")
    for k in ks:
        # bool is an Integral, but `ks=(True,)` is certainly a mistake.
        if isinstance(k, bool) or not isinstance(k, Integral) or k <= 0:
            raise ValueError(f"every k in ks must be a positive int, got {k!r} in {list(ks)!r}")
    return tuple(sorted({int(k) for k in ks}))


class FullRankingMetrics(Metric):
    """Recall@k, NDCG@k and Hit@k for each k, and MRR, over queries ranked against the full catalogue.

    Every metric is a per-query value averaged over queries (binary relevance):

    - `recall@k` = (#relevant in the top k) / (#relevant);
    - `hit@k` = 1 if any relevant item is in the top k;
    - `ndcg@k` = DCG@k / IDCG@k, DCG@k = sum over top-k positions p (1-based) of rel_p / log2(p + 1),
      IDCG@k = sum_{p=1..min(#relevant, k)} 1 / log2(p + 1);
    - `mrr` = 1 / rank of the best-ranked relevant item over the whole catalogue (not truncated at k), where
      rank = 1 + #items scored strictly higher. Ties are therefore resolved in the relevant item's favour.

    Masking: the caller sets items that must not be recommended (e.g. seen in training) to `-inf`. A relevant
    item scored `-inf` still counts in the denominators (#relevant, IDCG): it is a miss, never a hit, even when
    fewer than k items are finite and `topk` returns it. If every relevant item of a query is `-inf`, that
    query contributes 0 to every metric, MRR included.

    Ties among finite scores inside the top k are broken by `torch.topk` (implementation-defined order), which
    can move Recall/Hit at the k boundary and NDCG within the top k; MRR is tie-independent as defined above.

    Args:
        ks: cut-offs k (positive ints). k larger than the catalogue size N is clamped to N.

    Shapes (`update`):
        scores: float [B, N], one row per query, one column per catalogue item, masked items at `-inf`.
        target: bool [B, N], True for relevant items; every row needs at least one.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (10, 20, 50)) -> None:
        super().__init__()
        self.ks = _validate_ks(ks)
        n_ks = len(self.ks)
        # One vector state per metric family, indexed like `self.ks`.
        self.add_state("recall_sum", default=torch.zeros(n_ks), dist_reduce_fx="sum")
        self.add_state("ndcg_sum", default=torch.zeros(n_ks), dist_reduce_fx="sum")
        self.add_state("hit_sum", default=torch.zeros(n_ks), dist_reduce_fx="sum")
        self.add_state("mrr_sum", default=torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Tensor, target: Tensor) -> None:
        """Add a batch of queries. scores: float [B, N]; target: bool [B, N]."""
        if scores.ndim != 2 or scores.shape != target.shape:
            raise ValueError(
                f"scores and target must both be [B, N]; got {tuple(scores.shape)} and {tuple(target.shape)}"
            )
        if target.dtype != torch.bool:
            raise ValueError(f"target must be a bool tensor, got {target.dtype}")
        if not scores.is_floating_point():
            raise ValueError(f"scores must be a float tensor, got {scores.dtype}")
        num_items = scores.shape[1]
        if scores.shape[0] == 0:
            return
        if torch.isnan(scores).any():
            raise ValueError("scores contain NaN; ranking would be undefined")

        num_relevant = target.sum(dim=1)  # (B,)
        if (num_relevant == 0).any():
            n_bad = int((num_relevant == 0).sum())
            # Skipping such rows silently would change the denominator of every mean.
            raise ValueError(
                f"{n_bad} of {scores.shape[0]} rows have no relevant item; filter them out before update()"
            )

        # One topk for the largest k: every smaller cut-off is a prefix of it.
        k_max = min(self.ks[-1], num_items)
        top_scores, top_idx = torch.topk(scores, k=k_max, dim=1)  # (B, K)
        # A masked (-inf) item can reach the top k when fewer than k items are finite; it is never a hit.
        hits = target.gather(1, top_idx) & (top_scores > float("-inf"))  # (B, K)
        hits = hits.to(self.recall_sum.dtype)

        positions = torch.arange(1, k_max + 1, device=scores.device, dtype=hits.dtype)  # (K,)
        discounts = 1.0 / torch.log2(positions + 1.0)  # (K,)
        cum_hits = hits.cumsum(dim=1)  # (B, K): #hits within the first p positions
        cum_dcg = (hits * discounts).cumsum(dim=1)  # (B, K)
        ideal_dcg = discounts.cumsum(dim=0)  # (K,): IDCG when min(#relevant, k) = p

        cut = torch.tensor([min(k, num_items) for k in self.ks], device=scores.device)  # (n_ks,)
        hits_at_k = cum_hits[:, cut - 1]  # (B, n_ks)
        dcg_at_k = cum_dcg[:, cut - 1]  # (B, n_ks)
        ideal_len = torch.minimum(num_relevant.unsqueeze(1), cut.unsqueeze(0))  # (B, n_ks), >= 1
        idcg_at_k = ideal_dcg[ideal_len - 1]  # (B, n_ks)

        self.recall_sum += (hits_at_k / num_relevant.unsqueeze(1).to(hits.dtype)).sum(dim=0)
        self.hit_sum += (hits_at_k > 0).to(hits.dtype).sum(dim=0)
        self.ndcg_sum += (dcg_at_k / idcg_at_k).sum(dim=0)

        # MRR over the full catalogue without sorting: count the items that beat the best relevant score.
        best_relevant = scores.masked_fill(~target, float("-inf")).amax(dim=1)  # (B,)
        rank = 1 + (scores > best_relevant.unsqueeze(1)).sum(dim=1)  # (B,)
        # A query whose relevant items are all masked has no rank: it contributes 0.
        reciprocal_rank = (best_relevant > float("-inf")).to(hits.dtype) / rank.to(hits.dtype)  # (B,)
        self.mrr_sum += reciprocal_rank.sum()
        self.count += scores.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """Means over all queries seen: keys `recall@{k}`, `ndcg@{k}`, `hit@{k}` for each k, and `mrr`."""
        if int(self.count) == 0:
            raise RuntimeError("FullRankingMetrics.compute() called before any query was passed to update()")
        count = self.count.to(self.recall_sum.dtype)
        out: dict[str, Tensor] = {}
        for i, k in enumerate(self.ks):
            out[f"recall@{k}"] = self.recall_sum[i] / count
            out[f"ndcg@{k}"] = self.ndcg_sum[i] / count
            out[f"hit@{k}"] = self.hit_sum[i] / count
        out["mrr"] = self.mrr_sum / count
        return out
