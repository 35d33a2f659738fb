"""Negative sampling for implicit-feedback training, and the candidate sets of sampled-ranking evaluation.

Two kinds of config objects (`_target_`), each with a `name` and `describe()` for the results table:

- training negatives (`UniformNegatives`, `PopularityNegatives`): `sample(...) -> [B, n]` items each user has
  not interacted with, drawn fresh every batch from the caller's generator;
- evaluation candidates (`FullRanking`, `SampledRanking`): the items each test query is ranked among, drawn
  once from a fixed seed so that every model is scored on exactly the same candidates.

Every draw is vectorised: proposals come from one inverse-CDF lookup (`searchsorted` over the cumulative
weights), and collisions with a user's positives are found with one `searchsorted` over sorted
(user, item) keys (`PositiveSet`) and redrawn together, round after round. Entries still colliding after
`MAX_ROUNDS` rounds (users whose positives hold almost all of the sampling mass) are drawn exactly from their
user's remaining items, so no user is ever refused a negative that exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from recsys_lab.data.store import Ragged

MAX_ROUNDS = 50  # rejection rounds before the exact per-user fallback
_FALLBACK_CELLS = 1 << 22  # rows x items of one fallback chunk (32 MiB of float64 weights)


class PositiveSet:
    """Vectorised membership index of (user, item) pairs: sorted unique int64 keys `user * n_items + item`.

    Args:
        users: int64 [P], the user of each pair.
        items: int64 [P], the item of each pair (ids 0..n_items-1); duplicates are fine.
        n_items: catalogue size, the key stride.
    """

    def __init__(self, users: Tensor, items: Tensor, n_items: int) -> None:
        if users.shape != items.shape:
            raise ValueError(f"PositiveSet: users {tuple(users.shape)} and items {tuple(items.shape)} differ")
        self.n_items = int(n_items)
        self.keys = torch.unique(users.long().reshape(-1) * self.n_items + items.long().reshape(-1))  # sorted

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, users: Tensor, items: Tensor) -> Tensor:
        """bool, shaped like `items`: whether (user, item) is in the set. `users` is broadcast over the
        trailing dimensions `items` has beyond it (users [B], items [B, K] -> [B, K]); same shapes work too."""
        users = users.long().reshape(users.shape + (1,) * (items.dim() - users.dim()))
        probe = users * self.n_items + items.long()  # items' shape
        if len(self.keys) == 0:
            return torch.zeros(probe.shape, dtype=torch.bool, device=probe.device)
        at = torch.searchsorted(self.keys, probe).clamp_(max=len(self.keys) - 1)
        return self.keys[at] == probe


# ---- the shared draw ---------------------------------------------------------------------------------------
def _inverse_cdf(cdf: Tensor, u: Tensor) -> Tensor:
    """Index of the category each uniform `u` in [0, 1) falls in, for cumulative weights `cdf` [..., N]
    (batched over leading dims with `u` [..., K]). Zero-weight categories are never returned."""
    total = cdf[..., -1:]  # (..., 1)
    idx = torch.searchsorted(cdf, u * total, right=True)  # first i with cdf[i] > u * total
    # u * total can round up to total itself; the last positive-weight category then owns it.
    last = (cdf < total).sum(-1, keepdim=True)  # (..., 1)
    return torch.minimum(idx, last)


def _draw(
    weights: Tensor,
    owners: Tensor,
    forbidden: Callable[[Tensor, Tensor], Tensor],
    generator: torch.Generator,
    users: Tensor,
    n: int,
    what: str,
) -> Tensor:
    """One item per entry, each drawn with probability ∝ `weights` [N] among the items `forbidden` allows
    for the entry's owner. `owners` int64 [M] are row ids; `forbidden(rows [K], items [K]) -> bool [K]`;
    `users[row]` and `n` (negatives per row or per target) only word the error."""
    n_items = len(weights)
    if len(owners) == 0:
        return torch.zeros(0, dtype=torch.long, device=owners.device)
    cdf = weights.double().cumsum(0)  # (N,)
    if n_items == 0 or not cdf[-1] > 0:
        raise ValueError(f"{what}: no item has positive sampling weight (check `allowed` and `item_counts`)")

    def propose(k: int) -> Tensor:
        return _inverse_cdf(cdf, torch.rand(k, generator=generator, dtype=torch.float64, device=cdf.device))

    out = propose(len(owners))  # (M,)
    bad = forbidden(owners, out).nonzero().squeeze(1)  # entries to redraw
    for _ in range(MAX_ROUNDS):
        if len(bad) == 0:
            return out
        out[bad] = propose(len(bad))
        bad = bad[forbidden(owners[bad], out[bad])]
    if len(bad) == 0:
        return out

    # Exact fallback for the few owners whose positives hold nearly all the mass: their own masked CDF.
    rows, slot = torch.unique(owners[bad], return_inverse=True)  # slot: bad entry -> index into rows
    order = torch.argsort(slot, stable=True)
    per_row = torch.bincount(slot, minlength=len(rows))  # (R,)
    rank = torch.empty_like(slot)  # position of each bad entry among its row's bad entries
    rank[order] = torch.arange(len(slot), device=slot.device) - (per_row.cumsum(0) - per_row)[slot[order]]
    width = int(per_row.max())
    chunk = max(1, _FALLBACK_CELLS // n_items)  # bounds the (C, N) weights below
    catalogue = torch.arange(n_items, device=owners.device)
    stuck = []
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]  # (C,)
        blocked = forbidden(r.repeat_interleave(n_items), catalogue.repeat(len(r))).view(len(r), n_items)
        row_cdf = weights.double().masked_fill(blocked, 0.0).cumsum(1)  # (C, N)
        stuck.append(r[row_cdf[:, -1] <= 0])
        u = torch.rand(len(r), width, generator=generator, dtype=torch.float64, device=row_cdf.device)
        draws = _inverse_cdf(row_cdf, u)  # (C, width); rows with nothing left are refused below
        mine = (slot >= start) & (slot < start + len(r))
        out[bad[mine]] = draws[slot[mine] - start, rank[mine]]
    stuck_users = users[torch.cat(stuck)].unique()
    if len(stuck_users):
        raise ValueError(
            f"{what}: {len(stuck_users)} user(s) (e.g. user {int(stuck_users[0])}) have interacted with every "
            f"item that can be sampled, so n={n} negatives cannot be drawn for them; drop such users or "
            "widen `allowed`"
        )
    return out


def _item_weights(
    n_items: int, counts: Tensor | None, alpha: float | None, allowed: Tensor | None, what: str
) -> Tensor:
    """float64 [N]: uniform (alpha None) or counts**alpha, zeroed outside `allowed`."""
    if alpha is None:
        weights = torch.ones(n_items, dtype=torch.float64)
    else:
        if counts is None or len(counts) != n_items:
            raise ValueError(f"{what}: popularity sampling needs item_counts of length n_items={n_items}")
        weights = counts.double().clamp(min=0) ** alpha  # count 0 -> weight 0 (alpha > 0)
    if allowed is not None:
        if allowed.shape != (n_items,):
            raise ValueError(f"{what}: allowed has shape {tuple(allowed.shape)}, expected ({n_items},)")
        weights = weights.to(allowed.device) * allowed
    return weights


def _sample_training(
    users: Tensor,
    n: int,
    weights: Tensor,
    exclude: PositiveSet,
    generator: torch.Generator,
    what: str,
) -> Tensor:
    owners = torch.arange(len(users), device=users.device).repeat_interleave(n)  # (B * n,)
    flat = _draw(weights, owners, lambda r, it: exclude.contains(users[r], it), generator, users, n, what)
    return flat.view(len(users), n)


# ---- training negatives -----------------------------------------------------------------------------------
class UniformNegatives:
    """`n` negatives per user, uniform over the allowed items the user has not interacted with.

    Args:
        n: negatives per positive row.
    """

    def __init__(self, n: int = 4) -> None:
        if n < 1:
            raise ValueError(f"UniformNegatives: n={n} must be >= 1")
        self.n = n
        self.name = f"uniform_{n}"

    def sample(
        self,
        users: Tensor,
        exclude: PositiveSet,
        n_items: int,
        item_counts: Tensor | None,
        generator: torch.Generator,
        allowed: Tensor | None = None,
    ) -> Tensor:
        """int64 [B, n]: for each user [B], items outside `exclude` (and inside `allowed` [N] when given).
        `item_counts` is unused (kept so both samplers share one call)."""
        weights = _item_weights(n_items, None, None, allowed, self.name)
        return _sample_training(users, self.n, weights, exclude, generator, self.name)

    def describe(self) -> dict:
        return {"negatives": self.name, "negatives_n": self.n}


class PopularityNegatives:
    """`n` negatives per user with p(item) ∝ count**alpha among the items the user has not interacted with.

    word2vec's smoothed unigram distribution (Mikolov et al., arXiv:1310.4546): alpha=1 is raw popularity,
    alpha=0 would be uniform over items with a count; alpha=0.75 flattens the head. Items with count 0 are
    never drawn.

    Args:
        n: negatives per positive row.
        alpha: smoothing exponent on the training-positive counts.
    """

    def __init__(self, n: int = 4, alpha: float = 0.75) -> None:
        if n < 1:
            raise ValueError(f"PopularityNegatives: n={n} must be >= 1")
        if alpha <= 0:
            raise ValueError(f"PopularityNegatives: alpha={alpha} must be > 0 (use UniformNegatives for 0)")
        self.n, self.alpha = n, alpha
        self.name = f"popularity_{n}"

    def sample(
        self,
        users: Tensor,
        exclude: PositiveSet,
        n_items: int,
        item_counts: Tensor,
        generator: torch.Generator,
        allowed: Tensor | None = None,
    ) -> Tensor:
        """int64 [B, n]: for each user [B], items outside `exclude`, ∝ item_counts [N] ** alpha (restricted
        to `allowed` [N] when given)."""
        weights = _item_weights(n_items, item_counts, self.alpha, allowed, self.name)
        return _sample_training(users, self.n, weights, exclude, generator, self.name)

    def describe(self) -> dict:
        return {"negatives": self.name, "negatives_n": self.n, "negatives_alpha": self.alpha}


# ---- evaluation candidates --------------------------------------------------------------------------------
class FullRanking:
    """Rank each query against the whole catalogue, the user's seen items masked (no candidates drawn)."""

    name = "full"

    def candidates(
        self,
        query_users: Tensor,
        targets: Ragged,
        exclude: PositiveSet,
        n_items: int,
        item_counts: Tensor | None,
        allowed: Tensor | None = None,
    ) -> None:
        return None

    def describe(self) -> dict:
        return {"eval_candidates": self.name}


class SampledRanking:
    """Rank each query's targets among `n` sampled negatives per target, drawn once from `seed`.

    The protocol of NCF (arXiv:1708.05031), SASRec (arXiv:1808.09781) and BERT4Rec (arXiv:1904.06690), and
    RecBole's "uni100"/"pop100". Its numbers run several times higher than full ranking, hence the name in
    every results table. Negatives are drawn with replacement (a row may repeat one), never among the user's
    interactions in any split (`exclude`) nor the row's targets. "popularity" samples ∝ item_counts itself,
    with no smoothing exponent, as those papers do. The draw depends only on the seed and the inputs: draw
    once per evaluation split and reuse the result for every model.

    Args:
        kind: "uniform" or "popularity".
        n: negatives per target.
        seed: seed of the local generator.
    """

    def __init__(self, kind: str = "uniform", n: int = 100, seed: int = 0) -> None:
        if kind not in ("uniform", "popularity"):
            raise ValueError(f"SampledRanking: kind={kind!r}, expected 'uniform' or 'popularity'")
        if n < 1:
            raise ValueError(f"SampledRanking: n={n} must be >= 1")
        self.kind, self.n, self.seed = kind, n, seed
        self.name = f"{kind}_{n}"

    def candidates(
        self,
        query_users: Tensor,
        targets: Ragged,
        exclude: PositiveSet,
        n_items: int,
        item_counts: Tensor | None,
        allowed: Tensor | None = None,
    ) -> Ragged:
        """Row q of the result: the targets of query q, then n * len(targets_q) negatives for user
        `query_users[q]` [Q]. `targets` has Q rows; `allowed` [N] restricts the negatives."""
        Q = len(query_users)
        if len(targets.offsets) != Q + 1:
            raise ValueError(f"{self.name}: targets has {len(targets.offsets) - 1} rows, query_users {Q}")
        alpha = 1.0 if self.kind == "popularity" else None
        weights = _item_weights(n_items, item_counts, alpha, allowed, self.name)
        generator = torch.Generator(device=weights.device).manual_seed(self.seed)

        lengths = targets.offsets.diff()  # (Q,)
        rows = torch.arange(Q, device=lengths.device)
        t_values = targets.values[targets.offsets[0] : targets.offsets[-1]]  # (T,) in row order
        row_targets = PositiveSet(rows.repeat_interleave(lengths), t_values, n_items)  # (query, target) pairs

        def forbidden(r: Tensor, items: Tensor) -> Tensor:
            return exclude.contains(query_users[r], items) | row_targets.contains(r, items)

        n_owner = rows.repeat_interleave(lengths * self.n)  # (T * n,) query of each negative, in row order
        negatives = _draw(weights, n_owner, forbidden, generator, query_users, self.n, self.name)

        # Each output row is its targets then its negatives; both lists are already in row order, so a
        # mask of the target slots places them with two ordered assignments.
        width = lengths * (1 + self.n)  # (Q,)
        offsets = torch.cat([lengths.new_zeros(1), width.cumsum(0)])  # (Q + 1,)
        owner = rows.repeat_interleave(width)  # (total,)
        is_target = torch.arange(len(owner), device=owner.device) - offsets[owner] < lengths[owner]
        values = torch.empty(len(owner), dtype=torch.long, device=owner.device)
        values[is_target] = t_values.long()
        values[~is_target] = negatives
        return Ragged(values, offsets)

    def describe(self) -> dict:
        return {
            "eval_candidates": self.name,
            "eval_candidates_kind": self.kind,
            "eval_candidates_n": self.n,
            "eval_candidates_seed": self.seed,
        }
