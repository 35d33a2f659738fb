"""Leakage audit, run on every prepared dataset before anything trains on it. It fails loudly.

Each check recomputes a property from the prepared rows with code independent of the code that built the
features (numpy key arithmetic here, torch CSR gathering there), so a bug in either shows up as a mismatch.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from recsys_lab.data.splits import TRAIN


class LeakageError(RuntimeError):
    """Evaluation information reached training features, statistics or candidates."""


def _count_before(user: np.ndarray, ts: np.ndarray, pool_user: np.ndarray, pool_ts: np.ndarray) -> np.ndarray:
    """For each (user, ts): entries of the pool with the same user and a strictly smaller timestamp."""
    span = int(max(ts.max(initial=0), pool_ts.max(initial=0))) + 2
    offset = min(ts.min(initial=0), pool_ts.min(initial=0))
    pool = np.sort(pool_user.astype(np.int64) * span + (pool_ts - offset))
    probe = user.astype(np.int64) * span + (ts - offset)
    return np.searchsorted(pool, probe, side="left") - np.searchsorted(
        pool, user.astype(np.int64) * span, side="left"
    )


def audit(prepared, store, queries: dict) -> dict:
    """Run every check on a prepared dataset (`Prepared`), its `FeatureStore` and its ranking queries
    (`QuerySet` per stage); raise LeakageError naming the first violation; return a summary for the results."""
    item_counts = store.item_counts
    rows = prepared.rows
    user, item = rows["user"].to_numpy(), rows["item"].to_numpy()
    ts, split = rows["timestamp"].to_numpy(), rows["split"].to_numpy().astype(np.int64)
    positive = rows["positive"].to_numpy()
    item_code = store.items.sparse["item_id"].numpy()
    checks = []

    # 1. no held-out interaction is also a training pair (e.g. overlapping pre-split files)
    events = pl.DataFrame({"user": user, "item": item, "timestamp": ts, "split": split})
    held_out = events.filter(pl.col("split") > TRAIN)
    overlap = events.filter(pl.col("split") == TRAIN).join(
        held_out, on=["user", "item", "timestamp"], how="semi"
    )
    if overlap.height:
        first = overlap.row(0, named=True)
        raise LeakageError(
            f"leakage audit: {overlap.height} training rows are also validation/test interactions, e.g. user "
            f"entity {first['user']}, item entity {first['item']} at timestamp {first['timestamp']}"
        )
    checks.append("held-out interactions are not training pairs")

    # 2. every row's history holds only positives of its own or earlier splits, strictly before the row
    for level in range(3):
        at = split == level
        allowed = positive & (split <= level)
        expected = _count_before(user[at], ts[at], user[allowed], ts[allowed])
        got = store.n_prior.numpy()[at]
        if not np.array_equal(expected, got):
            bad = int(np.flatnonzero(expected != got)[0])
            raise LeakageError(
                f"leakage audit: a split-{level} row's history has {got[bad]} items where only {expected[bad]} "
                f"positives of splits <= {level} precede it (user entity {user[at][bad]}, timestamp {ts[at][bad]})"
            )
        per_user = np.bincount(user[allowed], minlength=len(store.timelines[level].offsets) - 1)
        if not np.array_equal(store.timelines[level].lengths(torch.arange(len(per_user))).numpy(), per_user):
            raise LeakageError(f"leakage audit: timeline {level} holds interactions of later splits")
    checks.append("histories use only earlier positives of the same or earlier splits")

    # 3. statistics come from the training split only
    train_pos = positive & (split == TRAIN)
    counts = np.bincount(item_code[item[train_pos]], minlength=len(item_counts)).astype(np.float32)
    counts[0] = 0
    if not np.array_equal(counts, item_counts.numpy()):
        raise LeakageError("leakage audit: item popularity counts differ from the training split's")
    first_cold = store.meta.first_cold_item  # `data.cold_items`: codes from here on are the untrained items
    for side, ids, table in (("item", item, store.items), ("user", user, store.users)):
        in_train = np.zeros(len(table.sparse[f"{side}_id"]), dtype=bool)
        in_train[ids[split == TRAIN]] = True
        codes = table.sparse[f"{side}_id"].numpy()
        cold = codes >= first_cold if side == "item" and first_cold is not None else np.zeros_like(in_train)
        # `data.vocab_from`: codes below first_new_code come from an earlier run's training vocabulary
        inherited = codes < store.meta.first_new_code.get(f"{side}_id", 1)
        if (((codes > 0) & ~cold & ~inherited) & ~in_train).any():
            raise LeakageError(
                f"leakage audit: the {side}_id vocabulary holds {side}s never seen in training"
            )
        if (cold & in_train).any():
            raise LeakageError("leakage audit: an item with a cold-start code has training interactions")
    checks.append("vocabularies and popularity fitted on training rows")

    # 4. ranking queries: held-out targets are not in the query's history; candidates are never positives
    all_pos = set()  # built lazily only if candidates exist
    for stage, q in queries.items():
        targets, seen = q.targets, q.seen
        n_rows = len(targets.offsets) - 1
        t_owner = np.repeat(np.arange(n_rows), targets.lengths(torch.arange(n_rows)).numpy())
        s_owner = np.repeat(np.arange(n_rows), seen.lengths(torch.arange(n_rows)).numpy())
        span = len(item_counts)
        t_keys = t_owner * span + targets.values.numpy()
        s_keys = s_owner * span + seen.values.numpy()
        if np.intersect1d(t_keys, s_keys).size:
            raise LeakageError(
                f"leakage audit: a {stage} query's target is in the user's history (seen items)"
            )
        if q.candidates is not None:
            if not all_pos:
                all_pos = {
                    "keys": np.unique(
                        user[positive].astype(np.int64) * len(item_counts) + item_code[item[positive]]
                    )
                }
            cands, users = q.candidates, q.users
            owner = torch.repeat_interleave(torch.arange(n_rows), cands.lengths(torch.arange(n_rows)))
            n_targets = targets.lengths(torch.arange(n_rows))
            position = torch.arange(len(cands.values)) - cands.offsets[owner]
            negative = (position >= n_targets[owner]).numpy()
            keys = users[owner].numpy().astype(np.int64) * len(item_counts) + cands.values.numpy()
            if np.isin(keys[negative], all_pos["keys"]).any():
                raise LeakageError(
                    f"leakage audit: a sampled {stage} candidate is one of the user's positives"
                )
    checks.append("query targets are not in query histories; sampled negatives are never positives")
    return {"status": "passed", "checks": checks, "rows": int(len(rows))}
