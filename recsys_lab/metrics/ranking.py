"""Streaming full-catalogue ranking metrics: Recall@k, Precision@k, NDCG@k, Hit@k, MRR@k and MRR.

torchmetrics' retrieval metrics keep every (query, item, score) triple until `compute()`, which does not scale
when every query is ranked against the whole catalogue. The metrics here are means of per-query values, so the
state is a handful of sums that `dist_reduce_fx="sum"` adds up across DDP processes.

Definitions (binary relevance; per query, then averaged over queries; k is clamped to the catalogue size N):

- `recall@k` = (#relevant in the top k) / (#relevant);
- `precision@k` = (#relevant in the top k) / k (RecBole's Precision@k);
- `hit@k` = 1 if any relevant item is in the top k, else 0;
- `ndcg@k` = DCG@k / IDCG@k, DCG@k = sum over top-k positions p (1-based) of rel_p / log2(p + 1), IDCG@k the
  DCG@k of the ideal order (min(#relevant, k) relevant items on top);
- `mrr@k` = 1 / rank of the best-ranked relevant item if that rank is <= k, else 0 (RecBole's MRR@k);
- `mrr` = 1 / rank of the best-ranked relevant item over the whole catalogue (not truncated).

Tie policy: every metric is its expected value when ties are broken uniformly at random, computed exactly (not
by sampling). Coarse scores (popularity counts, quantised logits) tie often; breaking ties in the relevant
item's favour, or in whatever order `torch.topk` returns them, would inflate such baselines. For an item scored
s, let a = #items scored strictly higher and t = #items scored exactly s (itself included): under random
tie-breaking its rank is uniform on a+1..a+t. Recall, precision and DCG follow by linearity of expectation;
Hit@k, MRR@k and MRR depend on the best-placed relevant item and use its exact (hypergeometric) law. See
`FullRankingMetrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
from torch import Tensor
from torchmetrics import Metric

# Positions per chunk of the MRR sum over tie groups (see `_min_position_reciprocal_sum`): bounds its memory
# when a popularity-like scorer ties most of the catalogue.
_RAGGED_CHUNK = 1 << 20


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


def _row_count(mask: Tensor) -> Tensor:
    """int64 [B] number of True entries in each row of a bool [B, N] mask."""
    # Accumulating in int32 is several times faster than in int64 on CPU, and N < 2**31.
    return mask.sum(dim=1, dtype=torch.int32).long()


def _ties_in_sorted(ascending: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """(a, t), int64 [B, X]: #entries of each sorted row above each value, and #entries equal to it.

    ascending: [B, K], every row sorted ascending; values: [B, X], same dtype.
    """
    at_most = torch.searchsorted(ascending, values, right=True)  # (B, X)
    below = torch.searchsorted(ascending, values)  # (B, X)
    return ascending.shape[1] - at_most, at_most - below


def _ties_in_rows(scores: Tensor, values: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """(a, t), int64 [R]: #items of each row in `rows` scored above its value, and #items scored equal to it.

    scores: float [B, N]; values: [B]; rows: int64 [R], distinct.
    """
    if 2 * rows.numel() > scores.shape[0]:
        # Gathering most rows would copy most of the matrix: comparing every row is cheaper.
        value = values.unsqueeze(1)  # (B, 1)
        return _row_count(scores > value)[rows], _row_count(scores == value)[rows]
    subset, value = scores[rows], values[rows].unsqueeze(1)  # (R, N), (R, 1)
    return _row_count(subset > value), _row_count(subset == value)


def _top_tie_groups(
    scores: Tensor,
    target: Tensor,
    top: Tensor,
    top_idx: Tensor,
    top_ascending: Tensor,
    rows: Tensor,
    relevant_scores: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The tie groups that can reach the top k, as (a, t, w), int64 [B, k + 1] each.

    Column p < k describes the item at top-k position p when it is relevant and scored strictly above the k-th
    largest score s_k (w = 1; otherwise w = 0). Every item scored above s_k is in the top k, so its a (#items
    strictly higher) and t (#items tied with it, itself included) can be read off the top k alone. Column k is
    the tie group of s_k itself: `topk` keeps an arbitrary part of it, so t is counted over the whole row, and
    w is its number of relevant items (0 when s_k is -inf: masked items are never hits). Items scored below s_k
    have a >= k, so they never enter a top-k metric and are left out.

    Args:
        scores: float [B, N]; target: bool [B, N].
        top, top_idx: [B, k], `torch.topk(scores, k)`; top_ascending: float64 [B, k], `top` in ascending order.
        rows: int64 [M], row of each relevant item; relevant_scores: [M], its score.
    """
    kth = top[:, -1]  # (B,)
    a_top, t_top = _ties_in_sorted(top_ascending, top.double())  # (B, k) each
    w_top = (target.gather(1, top_idx) & (top > kth.unsqueeze(1))).long()  # (B, k)

    a_kth = _row_count(top > kth.unsqueeze(1))  # (B,)
    in_kth_group = (relevant_scores == kth[rows]).long()  # (M,)
    kth_finite = kth > float("-inf")  # (B,): a masked group holds no hit
    w_kth = torch.zeros_like(a_kth).index_add_(0, rows, in_kth_group) * kth_finite  # (B,)
    # t of a group without a relevant item is never used; untied scores rarely need the pass over N at all.
    t_kth = torch.ones_like(a_kth)  # (B,)
    needed = (w_kth > 0).nonzero().squeeze(1)  # (R,)
    if needed.numel() > 0:
        t_kth[needed] = _ties_in_rows(scores, kth, needed)[1]

    a = torch.cat([a_top, a_kth.unsqueeze(1)], dim=1)  # (B, k + 1)
    t = torch.cat([t_top, t_kth.unsqueeze(1)], dim=1)  # (B, k + 1)
    w = torch.cat([w_top, w_kth.unsqueeze(1)], dim=1)  # (B, k + 1)
    return a, t, w


def _expected_hit(a: Tensor, t: Tensor, w: Tensor, cut: Tensor) -> Tensor:
    """P(at least one relevant item in the top k) under random tie-breaking, float64 [B, n_ks].

    a, t, w: int64 [B, G] tie groups as from `_top_tie_groups`; cut: int64 [n_ks] cut-offs (<= G - 1).
    """
    a, t, w = a.unsqueeze(2), t.unsqueeze(2), w.unsqueeze(2)  # (B, G, 1)
    present = w > 0  # (B, G, 1)
    # A relevant group that ends within the top k is a certain hit.
    sure = (present & (a + t <= cut)).any(dim=1)  # (B, n_ks)
    # Tie groups fill disjoint rank ranges, so at most one straddles position k; all its items share a and t.
    straddle = present & (a < cut) & (a + t > cut)  # (B, G, n_ks)
    r = (w * straddle).sum(dim=1)  # (B, n_ks): relevant items in the straddling group
    a_s = torch.where(straddle, a, 0).amax(dim=1)  # (B, n_ks)
    t_s = torch.where(straddle, t, 0).amax(dim=1)  # (B, n_ks)
    free = torch.where(r > 0, cut - a_s, 0)  # (B, n_ks): m, the top-k slots left to the group, 0 < m < t
    if not bool((free > 0).any()):  # no straddling relevant group, as with untied scores
        return sure.double()
    # The group's order is a uniform permutation, so P(no relevant item in its first m slots) is
    # C(t - r, m) / C(t, m) = prod_{j < m} (1 - r / (t - j)). A product of at most m <= k log1p terms keeps full
    # relative precision where lgamma differences of large t would not, and expm1 keeps it for P(hit) near 0.
    j = torch.arange(int(free.max()), device=a.device)  # (M,)
    ratio = r.unsqueeze(2) / (t_s.unsqueeze(2) - j).clamp(min=1)  # (B, n_ks, M)
    log_miss = torch.where(j < free.unsqueeze(2), torch.log1p(-ratio.clamp(max=1.0)), 0.0).sum(dim=2)
    p_straddle = -torch.expm1(log_miss)  # (B, n_ks)
    return torch.where(sure, 1.0, p_straddle)


def _min_position_reciprocal_sum(a: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """E[1 / (a + X)] for 1 < r < t by summing over X's support; int64 [Q] in, float64 [Q] out.

    X is the smallest of r positions drawn without replacement from 1..t, P(X = x) = C(t - x, r - 1) / C(t, r)
    for x = 1..t-r+1. There is no closed form, so the sum runs over a ragged [sum(t - r + 1)] vector, in chunks
    of about `_RAGGED_CHUNK` positions.
    """
    a64, t64, r64 = a.double(), t.double(), r.double()
    lengths = t - r + 1  # (Q,)
    log_c_t_r = torch.lgamma(t64 + 1) - torch.lgamma(r64 + 1) - torch.lgamma(t64 - r64 + 1)  # (Q,)
    out = torch.zeros_like(a64)
    chunk = (lengths.cumsum(dim=0) - lengths) // _RAGGED_CHUNK  # (Q,)
    for c in torch.unique(chunk).tolist():
        rows = (chunk == c).nonzero().squeeze(1)  # (Q',)
        length = lengths[rows]  # (Q',)
        owner = torch.repeat_interleave(torch.arange(len(rows), device=a.device), length)  # (P,)
        x = torch.arange(len(owner), device=a.device) - (length.cumsum(dim=0) - length)[owner] + 1  # (P,)
        tt, rr, xx = t64[rows][owner], r64[rows][owner], x.double()  # (P,)
        log_c = torch.lgamma(tt - xx + 1) - torch.lgamma(rr) - torch.lgamma(tt - xx - rr + 2)  # (P,)
        term = torch.exp(log_c - log_c_t_r[rows][owner]) / (a64[rows][owner] + xx)  # (P,)
        out[rows] = torch.zeros_like(a64[rows]).index_add_(0, owner, term)
    return out


def _expected_reciprocal_rank(a: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """E[1 / rank of the best relevant item], float64 [Q], from its group: a above, t tied, r relevant (int64 [Q]).

    The best rank is a + X, X the smallest of r positions drawn without replacement from 1..t.
    """
    a64, t64 = a.double(), t.double()
    # r = t (t = 1 included): the group is all relevant, so its first position holds a relevant item.
    out = 1.0 / (a64 + 1)
    # r = 1: the rank is uniform on a+1..a+t, E = (H(a + t) - H(a)) / t, H(n) = digamma(n + 1) + Euler's gamma.
    harmonic = (torch.digamma(a64 + t64 + 1) - torch.digamma(a64 + 1)) / t64
    out = torch.where((r == 1) & (t > 1), harmonic, out)
    several = ((r > 1) & (r < t)).nonzero().squeeze(1)  # (Q',)
    if several.numel() > 0:
        out[several] = _min_position_reciprocal_sum(a[several], t[several], r[several])
    return out


def _expected_truncated_reciprocal_rank(a: Tensor, t: Tensor, r: Tensor, cut: Tensor) -> Tensor:
    """E[1{rank <= k} / rank] of the best relevant item, float64 [Q, n_ks], for each cut-off k in `cut`.

    a, t, r: int64 [Q], the best-scored relevant group (a items above, t tied, r relevant among them);
    cut: int64 [n_ks], the clamped cut-offs. The best rank is a + X, X the smallest of r positions drawn
    without replacement from 1..t, and only X <= k - a <= max(cut) can count, so the sum over X's support has
    at most max(cut) terms (no ragged sum, unlike the untruncated MRR).
    """
    k_max = int(cut.max())
    x = torch.arange(1, k_max + 1, device=a.device, dtype=torch.float64)  # (K,): candidate values of X
    a64, t64, r64 = a.double().unsqueeze(1), t.double().unsqueeze(1), r.double().unsqueeze(1)  # (Q, 1)
    # P(X = x) = S(x - 1) * r / (t - x + 1), S(x) = P(X > x) = prod_{j < x} (1 - r / (t - j)): a product of
    # log1p terms keeps full relative precision where lgamma differences of large t would not. Past the
    # support (x > t - r + 1) the ratio reaches 1 and S drops to exactly 0.
    ratio = (r64 / (t64 - x + 1).clamp(min=1)).clamp(max=1.0)  # (Q, K): r / (t - j) at j = x - 1
    log_survival = torch.log1p(-ratio).cumsum(dim=1)  # (Q, K): log S(x)
    # (Q, K): S(x - 1), with S(0) = 1
    survival_before = torch.cat([torch.zeros_like(a64), log_survival[:, :-1]], dim=1).exp()
    term = survival_before * ratio / (a64 + x)  # (Q, K): P(X = x) / (a + x)
    within = (a64 + x).unsqueeze(2) <= cut.view(1, 1, -1)  # (Q, K, n_ks): rank a + x inside the top k
    return (term.unsqueeze(2) * within).sum(dim=1)  # (Q, n_ks)


class FullRankingMetrics(Metric):
    """Recall@k, Precision@k, NDCG@k, Hit@k and MRR@k for each k, and MRR, over queries ranked against the
    full catalogue.

    Every metric is a per-query value averaged over queries (binary relevance):

    - `recall@k` = (#relevant in the top k) / (#relevant);
    - `precision@k` = (#relevant in the top k) / k;
    - `hit@k` = 1 if any relevant item is in the top k;
    - `ndcg@k` = DCG@k / IDCG@k, DCG@k = sum over top-k positions p (1-based) of rel_p / log2(p + 1),
      IDCG@k = sum_{p=1..min(#relevant, k)} 1 / log2(p + 1);
    - `mrr@k` = 1 / rank of the best-ranked relevant item when it is within the top k, else 0;
    - `mrr` = 1 / rank of the best-ranked relevant item over the whole catalogue (not truncated at k).

    Ties: each per-query value is its exact expectation when tied scores are ordered uniformly at random, so no
    metric depends on the column order or on how `torch.topk` orders ties. For a relevant item with a items
    scored strictly higher and t items tied with it (itself included), the rank is uniform on a+1..a+t:

    - recall@k adds P(rank <= k) = clamp(k - a, 0, t) / t per relevant item; precision@k is the same expected
      count of relevant items in the top k, divided by k instead of #relevant;
    - DCG@k adds (C(min(a + t, k)) - C(min(a, k))) / t per relevant item, C(n) = sum_{p<=n} 1 / log2(p + 1);
    - hit@k is 1 if a relevant group ends within the top k; otherwise, if the one tie group that straddles
      position k holds r relevant items and gets m = k - a of the top-k slots, it is 1 - C(t - r, m) / C(t, m);
    - mrr = E[1 / (a + X)] for the best-scored relevant group, X the smallest of r positions drawn without
      replacement from 1..t: (H(a + t) - H(a)) / t when r = 1 (H = harmonic numbers), a sum over X otherwise;
    - mrr@k = E[1{a + X <= k} / (a + X)] for the same group: the same law of X, summed over x <= k - a only
      (0 when a >= k).

    Without ties these are the usual values. The per-query values are computed in float64, then summed into
    the (float32) states.

    Masking: the caller sets items that must not be recommended (e.g. seen in training) to `-inf`. A relevant
    item scored `-inf` still counts in the denominators (#relevant, IDCG): it is a miss, never a hit, even when
    fewer than k items are finite. If every relevant item of a query is `-inf`, that query contributes 0 to
    every metric, MRR included.

    Args:
        ks: cut-offs k (positive ints). k larger than the catalogue size N is clamped to N (precision@k then
            divides by N: the list holds only N items).

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
        self.add_state("precision_sum", default=torch.zeros(n_ks), dist_reduce_fx="sum")
        self.add_state("mrr_at_k_sum", default=torch.zeros(n_ks), dist_reduce_fx="sum")
        self.add_state("mrr_sum", default=torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def names(self) -> list[str]:
        """The metric names in the column order of `per_query`: recall, ndcg, hit, precision and mrr at each k,
        then the untruncated mrr."""
        return [f"{m}@{k}" for k in self.ks for m in ("recall", "ndcg", "hit", "precision", "mrr")] + ["mrr"]

    def update(self, scores: Tensor, target: Tensor, values: Tensor | None = None) -> None:
        """Add a batch of queries. scores: float [B, N]; target: bool [B, N]; values: their `per_query` rows
        when the caller computed them already (summed instead of computed again)."""
        values = self.per_query(scores, target) if values is None else values  # (B, 5 * n_ks + 1), float64
        if values.shape[0] == 0:
            return
        n_ks = len(self.ks)
        sums = values.sum(dim=0)  # (5 * n_ks + 1,)
        by_family = sums[:-1].view(n_ks, 5)  # (n_ks, 5): recall, ndcg, hit, precision, mrr@k
        self.recall_sum += by_family[:, 0].to(self.recall_sum.dtype)
        self.ndcg_sum += by_family[:, 1].to(self.ndcg_sum.dtype)
        self.hit_sum += by_family[:, 2].to(self.hit_sum.dtype)
        self.precision_sum += by_family[:, 3].to(self.precision_sum.dtype)
        self.mrr_at_k_sum += by_family[:, 4].to(self.mrr_at_k_sum.dtype)
        self.mrr_sum += sums[-1].to(self.mrr_sum.dtype)
        self.count += values.shape[0]

    def per_query(self, scores: Tensor, target: Tensor) -> Tensor:
        """Every metric of every query, float64 [B, 5 * n_ks + 1], columns named by `names`; the metric is the
        mean of these rows (what paired significance tests and slices are computed from). Updates nothing.

        scores: float [B, N]; target: bool [B, N]."""
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
            return scores.new_zeros((0, 5 * len(self.ks) + 1), dtype=torch.float64)
        if torch.isnan(scores).any():
            raise ValueError("scores contain NaN; ranking would be undefined")

        rows, cols = target.nonzero(as_tuple=True)  # (M,): the relevant items, row by row
        relevant_scores = scores[rows, cols]  # (M,)
        num_relevant = torch.bincount(rows, minlength=scores.shape[0])  # (B,)
        if (num_relevant == 0).any():
            n_bad = int((num_relevant == 0).sum())
            # Skipping such rows silently would change the denominator of every mean.
            raise ValueError(
                f"{n_bad} of {scores.shape[0]} rows have no relevant item; filter them out before update()"
            )

        # One topk for the largest k: every smaller cut-off only needs the groups that reach it.
        k_max = min(self.ks[-1], num_items)
        top, top_idx = torch.topk(scores, k=k_max, dim=1)  # (B, K), descending
        # float64 is exact for every float dtype, and searchsorted does not take every low-precision one.
        top_ascending = top.double().flip(1).contiguous()  # (B, K)
        # (B, G) each, G = K + 1: the tie groups that can reach the top K.
        a, t, w = _top_tie_groups(scores, target, top, top_idx, top_ascending, rows, relevant_scores)
        cut = torch.tensor([min(k, num_items) for k in self.ks], device=scores.device)  # (n_ks,)

        positions = torch.arange(1, k_max + 1, device=scores.device, dtype=torch.float64)  # (K,)
        # cum_discount[n] = C(n) = sum of the first n discounts, C(0) = 0.
        cum_discount = torch.cat([positions.new_zeros(1), (1.0 / torch.log2(positions + 1.0)).cumsum(0)])
        a3, t3, w3 = a.unsqueeze(2), t.unsqueeze(2), w.unsqueeze(2).double()  # (B, G, 1)
        # Expected hits and DCG by linearity: each relevant item's rank is uniform on a+1..a+t.
        p_in_top = (cut - a3).clamp(min=0).minimum(t3) / t3  # (B, G, n_ks)
        hits_at_k = (w3 * p_in_top).sum(dim=1)  # (B, n_ks)
        # (B, G, n_ks): the mean discount over the ranks a+1..a+t, those past k counting 0.
        dcg_terms = (cum_discount[(a3 + t3).minimum(cut)] - cum_discount[a3.minimum(cut)]) / t3
        dcg_at_k = (w3 * dcg_terms).sum(dim=1)  # (B, n_ks)
        ideal_len = torch.minimum(num_relevant.unsqueeze(1), cut.unsqueeze(0))  # (B, n_ks), >= 1
        idcg_at_k = cum_discount[ideal_len]  # (B, n_ks)

        recall = hits_at_k / num_relevant.unsqueeze(1)  # (B, n_ks)
        precision = hits_at_k / cut  # (B, n_ks)
        hit = _expected_hit(a, t, w, cut)  # (B, n_ks)
        ndcg = dcg_at_k / idcg_at_k  # (B, n_ks)

        # MRR over the full catalogue from the best relevant score's tie group, without sorting the row.
        best_relevant = relevant_scores.new_full((scores.shape[0],), float("-inf"))  # (B,)
        best_relevant.scatter_reduce_(0, rows, relevant_scores, reduce="amax")
        in_best_group = (relevant_scores == best_relevant[rows]).long()  # (M,)
        r_best = torch.zeros_like(num_relevant).index_add_(0, rows, in_best_group)  # (B,)
        # Above the k-th score the top k holds the whole group; at it, column K counted the group's full size;
        # below it, only a pass over the row can tell, so only those rows pay for one.
        a_best, t_best = _ties_in_sorted(top_ascending, best_relevant.double().unsqueeze(1))  # (B, 1) each
        a_best, t_best = a_best.squeeze(1), t_best.squeeze(1)  # (B,)
        kth = top[:, -1]  # (B,)
        t_best = torch.where(best_relevant == kth, t[:, -1], t_best)  # (B,)
        below_top = ((best_relevant < kth) & (best_relevant > float("-inf"))).nonzero().squeeze(1)  # (R,)
        if below_top.numel() > 0:
            a_best[below_top], t_best[below_top] = _ties_in_rows(scores, best_relevant, below_top)
        reciprocal_rank = _expected_reciprocal_rank(a_best, t_best, r_best)  # (B,)
        # A query whose relevant items are all masked has no rank: it contributes 0.
        reciprocal_rank = torch.where(best_relevant > float("-inf"), reciprocal_rank, 0.0)
        # MRR@k from the same group: only its first k - a positions can count.
        truncated = _expected_truncated_reciprocal_rank(a_best, t_best, r_best, cut)  # (B, n_ks)
        truncated = torch.where((best_relevant > float("-inf")).unsqueeze(1), truncated, 0.0)
        per_k = torch.stack([recall, ndcg, hit, precision, truncated], dim=2)  # (B, n_ks, 5)
        return torch.cat(
            [per_k.flatten(1), reciprocal_rank.unsqueeze(1)], dim=1
        ).double()  # (B, 5 * n_ks + 1)

    def compute(self) -> dict[str, Tensor]:
        """Means over all queries seen: keys `recall@{k}`, `precision@{k}`, `ndcg@{k}`, `hit@{k}`, `mrr@{k}`
        for each k, and `mrr`."""
        if int(self.count) == 0:
            raise RuntimeError("FullRankingMetrics.compute() called before any query was passed to update()")
        count = self.count.to(self.recall_sum.dtype)
        out: dict[str, Tensor] = {}
        for i, k in enumerate(self.ks):
            out[f"recall@{k}"] = self.recall_sum[i] / count
            out[f"ndcg@{k}"] = self.ndcg_sum[i] / count
            out[f"hit@{k}"] = self.hit_sum[i] / count
            out[f"precision@{k}"] = self.precision_sum[i] / count
            out[f"mrr@{k}"] = self.mrr_at_k_sum[i] / count
        out["mrr"] = self.mrr_sum / count
        return out
