"""Negative sampling for implicit-feedback training, and the candidate sets of sampled-ranking evaluation.

Two kinds of config objects (`_target_`, or the spec strings "uniform_N" / "popularity_N" parsed once by
`negatives_from_spec` / `candidates_from_spec`), each with a `name` and `describe()` for the results table:

- training negatives (`UniformNegatives`, `PopularityNegatives`): `sample(...) -> [B, n]` items each user has
  not interacted with, drawn fresh every batch; `TrainingNegatives` holds a sampler with its state (the set of
  training positives to avoid and the random generator, saved in checkpoints);
- evaluation candidates (`FullRanking`, `SampledRanking`): the items each test query is ranked among, drawn
  once from a fixed seed, without replacement, so that every model is scored on exactly the same candidates.

Every draw is vectorised: proposals come from one inverse-CDF lookup (`searchsorted` over the cumulative
weights), and collisions with a user's positives are found with one `searchsorted` over sorted
(user, item) keys (`PositiveSet`) and redrawn together, round after round. Entries still colliding after
`MAX_ROUNDS` rounds (users whose positives hold almost all of the sampling mass) are drawn exactly from their
user's remaining items, so no user is ever refused a negative that exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from recsys_lab.data.ragged import Ragged

MAX_ROUNDS = 50  # rejection rounds before the exact per-user fallback
DISTINCT_ROUNDS = 8  # rounds of redrawing repeated candidates before the exact without-replacement fallback
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


def _group_entries(owners: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Entries grouped by owner: the distinct owners [R], each entry's owner slot [M], entries per owner [R]
    and each entry's position among its owner's entries [M] (in entry order)."""
    rows, slot = torch.unique(owners, return_inverse=True)  # slot: entry -> index into rows
    per_row = torch.bincount(slot, minlength=len(rows))  # (R,)
    order = torch.argsort(slot, stable=True)
    rank = torch.empty_like(slot)
    rank[order] = torch.arange(len(slot), device=slot.device) - (per_row.cumsum(0) - per_row)[slot[order]]
    return rows, slot, per_row, rank


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
    rows, slot, per_row, rank = _group_entries(owners[bad])
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


def _repeats(owners: Tensor, items: Tensor) -> Tensor:
    """bool [M]: the entry repeats an earlier entry (same owner, same item)."""
    keys = owners * (int(items.max()) + 1 if len(items) else 1) + items
    order = torch.argsort(keys, stable=True)  # equal keys keep their original order: the first one stays
    sorted_keys = keys[order]
    later = torch.zeros(len(keys), dtype=torch.bool, device=keys.device)
    later[1:] = sorted_keys[1:] == sorted_keys[:-1]
    out = torch.zeros_like(later)
    out[order] = later
    return out


def _make_distinct(
    weights: Tensor,
    owners: Tensor,
    items: Tensor,
    forbidden: Callable[[Tensor, Tensor], Tensor],
    generator: torch.Generator,
    users: Tensor,
    n: int,
    what: str,
) -> Tensor:
    """`items` [M] with every repeat within an owner redrawn, so each owner's entries are distinct.

    Repeats are redrawn among the items the owner does not hold yet, round after round; the entries still
    repeating after `DISTINCT_ROUNDS` rounds (owners that need nearly all of their eligible items) are drawn
    exactly without replacement by Gumbel top-k over their remaining weights (Efraimidis & Spirakis, 2006).
    """
    items = items.clone()
    for _ in range(DISTINCT_ROUNDS):
        dup = _repeats(owners, items)
        if not bool(dup.any()):
            return items
        kept = PositiveSet(owners[~dup], items[~dup], len(weights))

        def blocked(r: Tensor, it: Tensor, kept: PositiveSet = kept) -> Tensor:
            return forbidden(r, it) | kept.contains(r, it)

        at = dup.nonzero().squeeze(1)
        items[at] = _draw(weights, owners[at], blocked, generator, users, n, what)
    dup = _repeats(owners, items)
    if not bool(dup.any()):
        return items
    kept = PositiveSet(owners[~dup], items[~dup], len(weights))
    rows, slot, need, rank = _group_entries(owners[dup])  # need: entries to replace per owner
    n_items = len(weights)
    catalogue = torch.arange(n_items, device=owners.device)
    chunk = max(1, _FALLBACK_CELLS // n_items)
    fresh = torch.empty(len(slot), dtype=torch.long, device=owners.device)
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]  # (C,)
        flat_r, flat_i = r.repeat_interleave(n_items), catalogue.repeat(len(r))
        block = (forbidden(flat_r, flat_i) | kept.contains(flat_r, flat_i)).view(len(r), n_items)
        u = torch.rand(len(r), n_items, generator=generator, dtype=torch.float64, device=weights.device)
        keys = weights.double().log() - torch.log(-torch.log(u.clamp_min(1e-300)))  # log w + Gumbel
        keys = keys.masked_fill(block | (weights <= 0), float("-inf"))
        top = torch.topk(keys, int(need[start : start + chunk].max()), dim=1).indices  # (C, need)
        mine = (slot >= start) & (slot < start + len(r))
        fresh[mine] = top[slot[mine] - start, rank[mine]]
    items[dup.nonzero().squeeze(1)] = fresh
    return items


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


def _parse_spec(spec: str, key: str, example: str) -> tuple[str, int]:
    kind, _, n = spec.partition("_")
    if kind not in ("uniform", "popularity") or not n.isdigit() or int(n) < 1:
        raise ValueError(f"{key}='{spec}': expected {example}")
    return kind, int(n)


def negatives_from_spec(spec: Any) -> UniformNegatives | PopularityNegatives | None:
    """`data.train_negatives`: None, a sampler object, or "uniform_N" / "popularity_N" (parsed here, once)."""
    if spec is None or not isinstance(spec, str):
        return spec
    kind, n = _parse_spec(
        spec, "data.train_negatives", "null, 'uniform_N' or 'popularity_N' (e.g. uniform_4)"
    )
    return UniformNegatives(n=n) if kind == "uniform" else PopularityNegatives(n=n)


def candidates_from_spec(spec: Any, seed: int) -> FullRanking | SampledRanking:
    """`data.eval_candidates`: None / "full", "full_unmasked", a candidates object, or "uniform_N" /
    "popularity_N"."""
    if spec is None or spec == "full":
        return FullRanking()
    if spec == UnmaskedFullRanking.name:
        return UnmaskedFullRanking()
    if not isinstance(spec, str):
        return spec
    kind, n = _parse_spec(
        spec,
        "data.eval_candidates",
        "'full', 'full_unmasked', 'uniform_N' or 'popularity_N' (e.g. uniform_100)",
    )
    return SampledRanking(kind=kind, n=n, seed=seed)


class TrainingNegatives:
    """Negatives for CTR training on implicit data, drawn fresh for every batch: a sampler and its state.

    The exclusion set holds every positive training interaction — built from the whole training split, so a
    positive left out of a `max_train_rows` subsample is still never drawn as a negative of its user. In the
    main process draws come from one generator seeded with `seed`, whose state is saved with the DataModule in
    checkpoints (a resumed run draws what the uninterrupted run would have). Each DataLoader worker draws from
    its own generator seeded with the worker's seed, so workers never repeat each other's stream.

    Args:
        sampler: `UniformNegatives` or `PopularityNegatives`.
        users / item_codes: int64 [P], every positive (user entity, item code) of the training split.
        n_codes: item vocabulary size V (code 0, unknown, is never drawn).
        item_counts: float [V], training positives per code (popularity sampling).
        seed: seed of the main-process generator.
    """

    def __init__(
        self, sampler, users: Tensor, item_codes: Tensor, n_codes: int, item_counts: Tensor, seed: int
    ) -> None:
        self.sampler, self.n_codes, self.item_counts = sampler, n_codes, item_counts
        self.exclude = PositiveSet(users, item_codes, n_codes)
        self.allowed = torch.ones(n_codes, dtype=torch.bool)
        self.allowed[0] = False
        self.generator = torch.Generator().manual_seed(seed)
        self._worker: tuple[int, torch.Generator] | None = None  # (worker seed, its generator)

    @property
    def n(self) -> int:
        return self.sampler.n

    def _current_generator(self) -> torch.Generator:
        info = get_worker_info()
        if info is None:
            return self.generator
        if self._worker is None or self._worker[0] != info.seed:
            self._worker = (info.seed, torch.Generator().manual_seed(info.seed))
        return self._worker[1]

    def sample(self, users: Tensor) -> Tensor:
        """int64 [B, n]: item codes the users [B] have no training positive with."""
        return self.sampler.sample(
            users,
            self.exclude,
            self.n_codes,
            self.item_counts,
            self._current_generator(),
            allowed=self.allowed,
        )

    def describe(self) -> dict:
        return self.sampler.describe()

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


# ---- evaluation candidates --------------------------------------------------------------------------------
class FullRanking:
    """Rank each query against the whole catalogue, the user's seen items masked (no candidates drawn)."""

    name = "full"
    mask_seen = True

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


class UnmaskedFullRanking(FullRanking):
    """Rank each query against the whole catalogue without masking what the user interacted with before
    (`data.eval_candidates=full_unmasked`).

    RecBole's full ranking for sequential models (`repeatable: True`, set by its `sequential.yaml`): its
    `FullSortEvalDataLoader` hands no history to mask for them, so an item the user saw before is ranked like
    any other, and a target the user had consumed before is still a target. Only code 0 (unknown to training)
    is masked. `full` masks every earlier positive (RecBole's general models).
    """

    name = "full_unmasked"
    mask_seen = False


class SampledRanking:
    """Rank each query's targets among `n` sampled negatives per target, drawn once from `seed`.

    The protocol of NCF (arXiv:1708.05031), SASRec (arXiv:1808.09781) and BERT4Rec (arXiv:1904.06690), and
    RecBole's "uni100"/"pop100". Its numbers run several times higher than full ranking, hence the name in
    every results table. The negatives of a query are distinct (drawn without replacement: repeats are redrawn,
    and the few rows still repeating after a few rounds are drawn exactly by Gumbel top-k), never among the
    user's interactions in any split (`exclude`) nor the row's targets. "popularity" samples ∝ item_counts
    itself, with no smoothing exponent, as those papers do. A query needing more negatives than its user has
    eligible items is an error naming the numbers. The draw depends only on the seed and the inputs: draw once
    per evaluation split and reuse the result for every model.

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

        self._check_eligible(
            query_users, lengths, exclude, weights, rows.repeat_interleave(lengths), t_values
        )
        n_owner = rows.repeat_interleave(lengths * self.n)  # (T * n,) query of each negative, in row order
        negatives = _draw(weights, n_owner, forbidden, generator, query_users, self.n, self.name)
        negatives = _make_distinct(
            weights, n_owner, negatives, forbidden, generator, query_users, self.n, self.name
        )

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

    def _check_eligible(
        self,
        users: Tensor,
        n_targets: Tensor,
        exclude: PositiveSet,
        weights: Tensor,
        target_rows: Tensor,
        target_items: Tensor,
    ) -> None:
        """Stop with the numbers when a query needs more distinct negatives than its user has items left
        (samplable items that are neither the user's interactions nor the query's targets)."""
        samplable = weights > 0  # (N,)
        n_samplable = int(samplable.sum())
        needed = n_targets * self.n  # (Q,)
        if len(needed) == 0:
            return
        if self.n >= n_samplable:
            raise ValueError(
                f"data.eval_candidates={self.name}: {self.n} negatives per target cannot be drawn without "
                f"replacement from a catalogue of {n_samplable} samplable items; choose N below {n_samplable}"
            )
        key_users, key_items = exclude.keys // exclude.n_items, exclude.keys % exclude.n_items
        n_users = int(max(int(users.max()), int(key_users.max()) if len(key_users) else 0)) + 1
        taken = torch.bincount(key_users[samplable[key_items]], minlength=n_users)  # (U,) positives per user
        # targets that are not already among the user's positives (callers may pass such targets)
        extra = samplable[target_items] & ~exclude.contains(users[target_rows], target_items)
        eligible = (
            n_samplable - taken[users] - torch.bincount(target_rows[extra], minlength=len(users))
        )  # (Q,)
        short = (needed > eligible).nonzero().squeeze(1)
        if len(short):
            q = int(short[0])
            raise ValueError(
                f"data.eval_candidates={self.name}: {len(short)} queries need more distinct negatives than their "
                f"user has eligible items, e.g. user entity {int(users[q])} needs {int(needed[q])} "
                f"({int(n_targets[q])} targets x {self.n}) but only {int(eligible[q])} of the {n_samplable} "
                "samplable items are not among the user's interactions; choose a smaller N"
            )

    def describe(self) -> dict:
        return {
            "eval_candidates": self.name,
            "eval_candidates_kind": self.kind,
            "eval_candidates_n": self.n,
            "eval_candidates_seed": self.seed,
            "eval_candidates_replacement": False,
        }
