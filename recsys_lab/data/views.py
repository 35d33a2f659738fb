"""Views: what one training objective reads from a prepared dataset — its training rows, its evaluation rows
and how those are scored.

A task names its view class (`CTRTask.view = CTRView`); the entry point asks the DataModule for that view once
(`datamodule.use_view(task.view)`) and wires the view's `EvalContext` into the task (`task.connect(...)`), so
neither reaches into the other at run time. A new objective (next-item training on whole sequences, multi-task
labels) is one new `View` subclass reading the same `ViewData`; nothing else changes.

Evaluation kinds:

* "impressions" — validation/test rows are logged impressions with labels (AUC, GAUC, LogLoss); needs real
  negatives, as the simulator's impression log has.
* "ranking" — validation/test rows are ranking queries (`QuerySet`): one per user with new positives in the
  period, as of the period's start, carrying `batch.eval` (targets, seen items, stored candidates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Dataset, RandomSampler, SequentialSampler

from recsys_lab.data.batch import Batch, PositionTargets, Seq
from recsys_lab.data.prepare import STAGES
from recsys_lab.data.queries import QuerySet
from recsys_lab.data.sampling import TrainingNegatives, UniformNegatives
from recsys_lab.data.store import FeatureStore, history_feature

EVALUATIONS = ("impressions", "ranking")


class Rows(Dataset):
    """Map-style dataset whose `__getitems__` gathers a whole batch with tensor indexing."""

    def __init__(self, n: int, gather: Callable[[Tensor], Batch]) -> None:
        self.n, self.gather = n, gather

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Batch:  # DataLoader uses __getitems__; kept for completeness
        return self.gather(torch.tensor([index]))

    def __getitems__(self, indices: Tensor | list[int]) -> Batch:
        return self.gather(torch.as_tensor(indices, dtype=torch.long))  # `TensorBatches` gives a tensor


class TensorBatches(BatchSampler):
    """Batches of dataset indices as int64 tensors, sliced from one permutation (a `RandomSampler`) or from
    arange (a `SequentialSampler`): a batch's indices never pass through Python ints, which for small models
    (BPR: 40 steps of ~3 ms per epoch) cost ~10% of the epoch in `RandomSampler` / `BatchSampler` alone.

    The batches are those `DataLoader(shuffle=...)` makes from the same RNG state: like `RandomSampler`, an epoch
    draws its seed from the global torch RNG and permutes with a generator seeded by it (a test checks the
    equality on the installed torch). Any other sampler is batched as `BatchSampler` would, then turned into
    tensors.

    Several processes (DDP; `shard=(rank, world_size)`, set by the DataModule, which shards batches itself
    instead of Lightning's `DistributedSampler`):

    * shuffled (training) batches: every process draws the same order — rank 0's epoch seed, broadcast — and
      cuts it into global batches of `world_size × batch_size` rows, the first `world_size` pieces of which go
      to the processes in rank order. One optimizer step of `world_size` processes with `data.batch_size=b`
      therefore sees exactly the batch a single process with `data.batch_size=world_size × b` would have seen
      in the same epoch (the same order when the global RNG matches, as in the first epoch). A last global
      batch with fewer rows than processes is dropped (no process may step on nothing).
    * ordered (evaluation) batches: process r takes the r-th of `world_size` contiguous parts of the rows and
      cuts it into as many batches as the largest part needs (at most `batch_size` rows each), so that every
      process runs the same number of evaluation steps. Nothing is repeated — Lightning's `DistributedSampler` pads with repeats, which count twice
      in every evaluation metric — and the metric states add up across processes.
    """

    def __init__(
        self, sampler, batch_size: int, drop_last: bool, shard: tuple[int, int] | None = None
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.shard = shard

    def __iter__(self) -> Iterator[Tensor]:
        sampler = self.sampler
        if (
            type(sampler) is RandomSampler
            and sampler.generator is None
            and not sampler.replacement
            and sampler.num_samples == len(sampler.data_source)
        ):
            seed = int(torch.empty((), dtype=torch.int64).random_().item())  # as RandomSampler.__iter__
            if self.shard is not None:
                seed = _broadcast_from_rank_zero(seed)
            order = torch.randperm(len(sampler.data_source), generator=torch.Generator().manual_seed(seed))
        elif type(sampler) is SequentialSampler:
            order = torch.arange(len(sampler.data_source))
            if self.shard is not None:
                part = torch.tensor_split(order, self.shard[1])[self.shard[0]]  # (about N / world,)
                if len(part):  # never an empty batch (only with batch_size 1 can a part have fewer rows)
                    yield from torch.tensor_split(part, min(len(self), len(part)))
                return
        else:
            for indices in super().__iter__():
                yield torch.as_tensor(indices, dtype=torch.long)
            return
        if self.shard is not None:
            yield from self._global_batches(order)
            return
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            yield order[start : start + self.batch_size]

    def _global_batches(self, order: Tensor) -> Iterator[Tensor]:
        """This process's part of each global batch of `world × batch_size` rows of `order`."""
        rank, world = self.shard
        size = world * self.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            if len(batch) < (size if self.drop_last else world):
                return
            yield torch.tensor_split(batch, world)[rank]

    def __len__(self) -> int:
        if self.shard is None:
            return super().__len__()
        rank, world = self.shard
        n = len(self.sampler)
        if type(self.sampler) is SequentialSampler:
            # the same number of batches on every process (the largest part's), each of at most batch_size
            # rows: lookups of sharded tables (TorchRec) are collectives that every process must join
            largest = -(-n // world)
            return -(-largest // self.batch_size) if n > rank else 0
        size = world * self.batch_size
        full, rest = divmod(n, size)
        return full + (1 if rest >= (size if self.drop_last else world) else 0)


def _broadcast_from_rank_zero(value: int) -> int:
    """Rank 0's value on every process (no-op without an initialised process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


@dataclass
class ViewData:
    """What every view is built from: the DataModule's tables after its seeded subsamples.

    Args:
        store: feature tables and gatherers.
        rows: int64 interaction rows per stage ("train", "val", "test").
        queries: ranking queries per evaluation stage ("val", "test").
        negatives: sampled training negatives (implicit data), or None to train on the logged labels.
        ctr_eval: how CTR objectives are evaluated on this data: "impressions" or "ranking".
        oracle: float32 [R], the true click probability of every row (simulated data), else None.
        seed: the data seed (for samplers a view creates itself).
    """

    store: FeatureStore
    rows: dict[str, Tensor]
    queries: dict[str, QuerySet]
    negatives: TrainingNegatives | None
    ctr_eval: str
    oracle: Tensor | None = None
    seed: int = 0


class PairBuilder:
    """(query, candidate) rows for models that score pairs (`forward(batch)`, no separate encoders).

    Builds on the device of the requested codes: the store's tables are copied there once, so scoring a
    validation batch involves no host round trip.
    """

    def __init__(self, store: FeatureStore) -> None:
        self._stores = {torch.device("cpu"): store}

    def __call__(self, users: Tensor, codes: Tensor, stage: str) -> Batch:
        """B*C rows, query-major: user entities [B] (as of `stage`'s start) x item codes [B, C]."""
        device = codes.device
        if device not in self._stores:
            self._stores[device] = self._stores[torch.device("cpu")].to(device)
        return self._stores[device].pairs(users.to(device), STAGES[stage] - 1, codes)


def _with_rows(batch: Batch, rows: Tensor) -> Batch:
    batch.rows = rows
    return batch


@dataclass
class EvalContext:
    """Everything a task needs to score a view's validation/test batches, handed over once.

    Args:
        kind: "impressions" or "ranking".
        num_items: V, the item codes ranked (code 0, unknown, is always masked).
        catalogue: item-side features of every code 0..V-1, for `encode_item` models (ranking only).
        pairs: builds (query, candidate) rows for pair-scoring models (ranking only).
    """

    kind: str
    num_items: int
    catalogue: Callable[[], Batch] | None = None
    pairs: PairBuilder | None = None


class View:
    """Base of the views. Subclasses set `evaluation` and `train_dataset`; evaluation datasets follow it."""

    evaluation: str

    def __init__(self, data: ViewData) -> None:
        self.data, self.store = data, data.store
        if self.evaluation not in EVALUATIONS:
            raise ValueError(
                f"{type(self).__name__}: evaluation '{self.evaluation}' is not one of {EVALUATIONS}"
            )
        for stage in ("val", "test"):
            self._check_evaluable(stage)

    # ---- what subclasses provide ----------------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    # ---- evaluation, shared ----------------------------------------------------------------------------------
    def eval_dataset(self, stage: str) -> Dataset:
        """Validation / test rows: query batches under ranking, labelled impressions otherwise."""
        if self.evaluation == "ranking":
            queries, level = self.data.queries[stage], STAGES[stage] - 1
            return Rows(len(queries), lambda i: self.store.query_batch(queries.eval_targets(i), level))
        rows = self.data.rows[stage]
        return Rows(len(rows), lambda i: _with_rows(self.store.impressions(rows[i]), rows[i]))

    def eval_context(self) -> EvalContext:
        num_items = self.store.num_item_codes
        if self.evaluation == "impressions":
            return EvalContext("impressions", num_items)
        return EvalContext(
            "ranking",
            num_items,
            catalogue=lambda: self.store.items_batch(torch.arange(num_items)),
            pairs=PairBuilder(self.store),
        )

    def reference_scores(self, stage: str) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Labels of the rows an impressions evaluation scores, and reference scorers on the same rows:
        training popularity and (simulated data) the true click probability. None under ranking."""
        if self.evaluation != "impressions":
            return None
        rows = self.data.rows[stage]
        labels = self.store.labels[self.store.meta.labels[0]][rows]
        scores = {"popularity_auc": self.store.item_counts[self.store.item_codes(self.store.item[rows])]}
        if self.data.oracle is not None:
            scores["oracle_auc"] = self.data.oracle[rows]
        return labels, scores

    def describe(self) -> dict:
        meta = self.store.meta
        return {
            "evaluation": self.evaluation,
            "eval_candidates": meta.eval_candidates if self.evaluation == "ranking" else "logged impressions",
            "history_gathered": self.store.gather_history,
            "features_gathered": self.store.features_gathered,
        }

    def _check_evaluable(self, stage: str) -> None:
        """Stop before training when a stage cannot be evaluated the way this view scores it."""
        meta = self.store.meta
        if self.evaluation == "impressions" and not meta.has_negatives[stage]:
            raise ValueError(
                f"data.ctr_eval=impressions needs negative labels in the {stage} split, and it has none "
                "(implicit data): use data.ctr_eval=ranking"
            )
        if self.evaluation == "ranking" and len(self.data.queries[stage]) == 0:
            c = meta.counts
            raise ValueError(
                f"the {stage} split has no rankable query: {c.get(f'{stage}_rows')} {stage} rows, "
                f"{c.get(f'{stage}_targets_unknown_item')} positives on items unknown to training, "
                f"{c.get(f'{stage}_users_without_new_targets')} users with no new known item; change data.split "
                "(larger validation/test share) or data.preprocess (k-core) so held-out users have new items"
            )


class CTRView(View):
    """Pointwise click-through-rate training: interactions with their labels.

    On implicit data (positives only) each positive row is followed by `negatives.n` sampled negatives of the
    same user and context. Validation/test follow `ViewData.ctr_eval`.
    """

    def __init__(self, data: ViewData) -> None:
        self.evaluation = data.ctr_eval
        super().__init__(data)
        rows = data.rows["train"]
        if data.negatives is None and not bool((~data.store.positive[rows]).any()):
            raise ValueError(
                "data.train_negatives is required: the training split has only positive labels (implicit "
                "data); set e.g. data.train_negatives=uniform_4"
            )

    def train_dataset(self) -> Dataset:
        rows, store, negatives = self.data.rows["train"], self.store, self.data.negatives
        if negatives is None:
            return Rows(len(rows), lambda i: store.impressions(rows[i]))
        positives = rows[store.positive[rows]]

        def gather(i: Tensor) -> Batch:
            chosen = positives[i]
            return store.with_negatives(chosen, negatives.sample(store.user[chosen]))

        return Rows(len(positives), gather)


class RetrievalView(View):
    """In-batch softmax retrieval: the positive training interactions; evaluation ranks items per query."""

    evaluation = "ranking"

    def train_dataset(self) -> Dataset:
        rows = self.data.rows["train"]
        positives = rows[self.store.positive[rows]]
        return Rows(len(positives), lambda i: self.store.impressions(positives[i]))


class SequenceView(View):
    """Next-item training on whole sequences (SASRec's recipe): one training row per user.

    A row is the user's training positives in time order — the last `data.history_len` of them — as
    `batch.seq["hist_item_id"]` (item codes, lengths, timestamps), with `batch.targets["next_item"]` holding the
    item that follows each position (`ids[t]` = the item at t + 1; the last real position has no successor
    and is not supervised). Every position is supervised at once under a causal mask, so one pass over the
    users is one epoch. Users with fewer than two training positives have nothing to predict and are left out.
    User features ride along; context features are unknown (code 0), as for ranking queries. Evaluation ranks
    the catalogue from the user's history as of the period's start (the query batches of every ranking view).
    """

    evaluation = "ranking"

    def __init__(self, data: ViewData) -> None:
        super().__init__(data)
        train = self.store.timelines[0]
        everyone = torch.arange(train.n_rows)
        self.users = everyone[train.lengths(everyone) >= 2]  # (U,) entities with something to predict

    def train_dataset(self) -> Dataset:
        return Rows(len(self.users), lambda i: self.sequences(self.users[i]))

    def sequences(self, users: Tensor) -> Batch:
        """The training sequences of user entities [B] and their next-item targets."""
        store, L = self.store, self.store.history_len
        items = store.timelines[0].gather(
            users, max_len=L, times=store.timeline_times[0]
        )  # (B, L), oldest first
        batch = Batch()
        store.users.into(batch, users)
        store.unknown_context(batch, users)
        ids = store.item_codes(items.ids)  # (B, L) codes; padding reads entity 0 and stays masked
        batch.seq[history_feature(store.item_key)] = Seq(ids, items.lengths, items.times)
        for column in store.history_features:
            batch.seq[history_feature(column)] = Seq(store.items.sparse[column][items.ids], items.lengths)
        following = torch.cat([ids[:, 1:], ids.new_zeros(len(users), 1)], dim=1)  # (B, L): item at t + 1
        supervised = torch.arange(L).unsqueeze(0) < (items.lengths - 1).unsqueeze(1)  # (B, L)
        batch.targets["next_item"] = PositionTargets(following * supervised, supervised)
        return batch


class PrefixSequenceView(SequenceView):
    """The one-row-per-prefix augmentation of GRU4Rec / RecBole: a training row per training positive that has
    a predecessor, holding the history before it (the last `history_len` items) and, as its only supervised
    target, that positive at the history's last position. Same targets as `SequenceView`, many more rows."""

    def train_dataset(self) -> Dataset:
        store = self.store
        rows = self.data.rows["train"]
        rows = rows[store.positive[rows] & (store.n_prior[rows] >= 1)]
        return Rows(len(rows), lambda i: self.prefixes(rows[i]))

    def prefixes(self, rows: Tensor) -> Batch:
        batch = self.store.histories(rows)  # the row's item is the target: it is not among the inputs
        hist = batch.seq[history_feature(self.store.item_key)]
        last = (hist.lengths - 1).unsqueeze(1)  # (B, 1)
        positions = torch.arange(hist.ids.shape[1]).unsqueeze(0)  # (1, L)
        supervised = positions == last  # (B, L): only the prediction after the whole history
        target = self.store.item_codes(self.store.item[rows]).unsqueeze(1)  # (B, 1)
        batch.targets["next_item"] = PositionTargets(target * supervised, supervised)
        return batch


class PairwiseView(View):
    """Pairwise (BPR) training: each positive training interaction with sampled negatives (never one of the
    user's training positives) as `batch.targets["negative_item"]` (item codes [B, n], all supervised).

    The negatives are `data.train_negatives`; where the data config has none (an impression log, whose CTR
    models train on the logged labels), one uniform negative per positive, as BPR does, seeded with the data
    seed and stated in the protocol. Evaluation ranks the catalogue.
    """

    evaluation = "ranking"

    def __init__(self, data: ViewData) -> None:
        super().__init__(data)
        self.negatives = data.negatives
        if self.negatives is None:
            self.negatives = self.store.training_negatives(UniformNegatives(n=1), data.seed)

    def describe(self) -> dict:
        return {**super().describe(), "pairwise_negatives": self.negatives.describe()}

    def train_dataset(self) -> Dataset:
        rows, store, negatives = self.data.rows["train"], self.store, self.negatives
        positives = rows[store.positive[rows]]

        def gather(i: Tensor) -> Batch:
            chosen = positives[i]
            batch = store.impressions(chosen)
            codes = negatives.sample(store.user[chosen])  # (B, n)
            batch.targets["negative_item"] = PositionTargets(codes, torch.ones_like(codes, dtype=torch.bool))
            return batch

        return Rows(len(positives), gather)
