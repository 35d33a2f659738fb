"""RecDataModule orchestration on a small simulator: temporal splits, statistics fitted on training rows only,
seeded subsamples, training negatives (state, exclusions, worker streams) and configuration errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_lab.data.splits import TEST, TRAIN, VAL
from tests.datamodule_fixtures import (  # noqa: F401  (fixtures)
    CONTEXT_COLS,
    ClicksOnly,
    cache_root,
    dm,
    make_dm,
    raw,
    ready,
    ref,
)

STAGE_CODES = {"train": TRAIN, "val": VAL, "test": TEST}


def test_temporal_split_boundaries(dm, ref):
    t_val, t_test = dm.split.cutoffs_
    assert dm.prepared().meta.cutoffs == [t_val, t_test]
    ts = torch.as_tensor(ref.ts)
    assert ts[dm.rows["train"]].max() < t_val <= ts[dm.rows["val"]].min()
    assert ts[dm.rows["val"]].max() < t_test <= ts[dm.rows["test"]].min()
    every = torch.cat([dm.rows["train"], dm.rows["val"], dm.rows["test"]])
    n = len(ref.ts)
    assert torch.equal(every.sort().values, torch.arange(n))  # a partition
    for stage, code in STAGE_CODES.items():
        assert (dm.store.split[dm.rows[stage]] == code).all()
        assert dm.counts[f"{stage}_rows"] == dm.counts[f"{stage}_rows_used"] == len(dm.rows[stage])
    assert abs(len(dm.rows["val"]) - 0.1 * n) < 0.02 * n and abs(len(dm.rows["test"]) - 0.1 * n) < 0.02 * n
    # every period has real negatives (an impression log)
    assert dm.prepared().meta.has_negatives == {"train": True, "val": True, "test": True}


def test_item_counts_are_training_clicks_only(dm, ref):
    train_clicks = ref.item[ref.is_train & (ref.click == 1)]
    expected = np.bincount(ref.code[train_clicks], minlength=dm.schema.num_items).astype(np.float32)
    assert expected[0] == 0  # every clicked training item has a code
    assert torch.equal(dm.schema.item_counts, torch.as_tensor(expected))
    assert torch.equal(dm.store.item_counts, dm.schema.item_counts)
    assert dm.schema.item_counts.sum() == len(train_clicks) < ref.click.sum()  # later periods are not counted


def test_vocabularies_hold_only_training_entities(dm, ref):
    user_code = dm.store.users.sparse["user_id"].numpy()
    assert {u for u in range(300) if user_code[u] > 0} == ref.train_users
    assert {i for i in range(200) if ref.code[i] > 0} == ref.train_items
    assert dm.schema.num_users == len(ref.train_users) + 1 and dm.schema.num_items == len(ref.train_items) + 1
    # items shown only after training exist (late releases), and are unknown
    later = set(ref.item[~ref.is_train].tolist()) - ref.train_items
    assert len(later) >= 5 and all(ref.code[i] == 0 for i in later)
    assert dm.schema.num_items < 200


def test_dense_standardised_with_training_statistics(dm, raw, ref):
    train_items = torch.as_tensor(sorted(ref.train_items))
    assert torch.equal(train_items, torch.unique(dm.store.item[dm.rows["train"]]))
    for name, table in dm.store.items.dense.items():
        seen = table[train_items].double()
        torch.testing.assert_close(seen.mean(0), torch.zeros_like(seen.mean(0)), atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(
            seen.std(0, unbiased=False), torch.ones_like(seen.mean(0)), atol=1e-3, rtol=0
        )
    assert dm.store.items.dense["image"].shape == (200, 16)
    # the catalogue-wide statistics would differ (items outside training exist)
    log_price = np.log1p(raw.items["price"].to_numpy())
    catalogue_z = (log_price - log_price.mean()) / log_price.std()
    assert np.abs(dm.store.items.dense["price"].numpy() - catalogue_z).max() > 1e-3
    assert dm.prepared().meta.normalisers["price"]["log1p"] is True
    assert dm.prepared().meta.normalisers["image"]["log1p"] is False


def test_the_context_ablation_drops_context_features_and_nothing_else(cache_root, dm):
    # data.context=false: the same prepared data and rows; no batch or schema carries hour, weekday, device
    bare = ready(make_dm(cache_root, context=False))
    assert bare.cache_path == dm.cache_path
    context = {f.name for f in dm.schema.features if f.side == "context"}
    assert context == set(CONTEXT_COLS)
    assert {f.name for f in bare.schema.features} == {f.name for f in dm.schema.features} - context
    assert dm.describe()["context_features"] == CONTEXT_COLS and bare.describe()["context_features"] == []
    rows = dm.rows["train"][:20]
    full, ablated = dm.store.impressions(rows), bare.store.impressions(rows)
    assert set(ablated.sparse) == set(full.sparse) - context
    for name, values in ablated.sparse.items():
        assert torch.equal(values, full.sparse[name]), name
    assert torch.equal(ablated.labels["click"], full.labels["click"])


def test_subsampling_is_seeded(cache_root, dm):
    def sub(seed):
        return ready(make_dm(cache_root, max_train_rows=500, max_eval_rows=10, seed=seed))

    a, b, c = sub(0), sub(0), sub(1)
    assert a.cache_path == dm.cache_path  # the prepared data are shared; only the rows used differ
    for stage in ("train", "val", "test"):
        assert torch.equal(a.rows[stage], b.rows[stage])
        assert len(a.rows[stage]) == (500 if stage == "train" else 10)
        assert torch.equal(a.rows[stage], a.rows[stage].unique())  # sorted, no repeats
        assert torch.isin(a.rows[stage], dm.rows[stage]).all()  # drawn from the stage's own rows
        assert not torch.equal(a.rows[stage], c.rows[stage])
    for stage in ("val", "test"):
        qa, qb = a.queries[stage], b.queries[stage]
        assert len(qa.users) == 10 and torch.equal(qa.users, qb.users)
        assert torch.equal(qa.users, qa.users.unique())
        full = dm.queries[stage]
        assert torch.isin(qa.users, full.users).all()
        # each kept query keeps its own targets and seen items
        for k, u in enumerate(qa.users.tolist()):
            j = int((full.users == u).nonzero())
            for key in ("targets", "seen"):
                mine = getattr(qa, key).values[getattr(qa, key).offsets[k] : getattr(qa, key).offsets[k + 1]]
                theirs = getattr(full, key).values[
                    getattr(full, key).offsets[j] : getattr(full, key).offsets[j + 1]
                ]
                assert torch.equal(mine, theirs)
    assert a.counts["train_rows_used"] == 500 and a.counts["val_queries_used"] == 10
    assert a.counts["train_rows"] == dm.counts["train_rows"]  # the split itself is unchanged
    assert sum(len(x) for x in a.train_dataloader()) == 500
    # statistics are fitted on the whole training split, not the subsample
    assert torch.equal(a.schema.item_counts, dm.schema.item_counts)
    assert torch.equal(a.store.n_prior, dm.store.n_prior)


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size", "history_len"])
def test_non_positive_sizes_raise(tmp_path, key):
    with pytest.raises(ValueError, match=f"data.{key}=0"):
        make_dm(tmp_path, **{key: 0})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("eval_candidates", "bogus_5", r"data\.eval_candidates='bogus_5'"),
        ("eval_candidates", "uniform_0", r"data\.eval_candidates='uniform_0'"),
        ("train_negatives", "many_4", r"data\.train_negatives='many_4'"),
        ("ctr_eval", "nope", r"data\.ctr_eval='nope'"),
    ],
)
def test_bad_protocol_values_raise(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        make_dm(tmp_path, **{key: value})


@pytest.mark.parametrize("name", ["price", "title", "hour", "age", "nope"])
def test_history_features_must_be_item_categoricals(cache_root, name):
    bad = make_dm(cache_root, history_features=["cat2", name])
    with pytest.raises(ValueError, match=f"data.history_features: '{name}' is not a categorical item column"):
        bad.setup()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_workers", -1, r"data\.num_workers=-1: expected an integer >= 0"),
        ("max_train_rows", 0, r"data\.max_train_rows=0: expected a positive integer or null"),
        ("max_eval_rows", -3, r"data\.max_eval_rows=-3: expected a positive integer or null"),
        ("batch_size", 2.5, r"data\.batch_size=2\.5: expected a positive integer"),
    ],
)
def test_bad_loader_settings_name_their_key(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        make_dm(tmp_path, **{key: value})


@pytest.fixture(scope="module")
def implicit(cache_root):
    """Clicks only (implicit data) with 4 sampled negatives per positive, training rows subsampled."""
    return ready(
        make_dm(
            cache_root,
            source=ClicksOnly(),
            train_negatives="uniform_4",
            ctr_eval="ranking",
            max_train_rows=60,
        )
    )


def test_negatives_avoid_every_training_positive_not_just_the_subsample(implicit):
    """The exclusion set is the whole training split: a positive left out of the `max_train_rows` subsample is
    still never drawn as a negative of its user."""
    store, negatives = implicit.store, implicit.negatives
    train = (store.split == TRAIN) & store.positive
    assert int(train.sum()) > 60 == len(implicit.rows["train"])
    every = set(zip(store.user[train].tolist(), store.item_codes(store.item[train]).tolist(), strict=True))
    assert len(negatives.exclude) == len(every)
    users = store.user[train]
    # draw many times for the users with most positives: never one of their training positives
    busiest = users.bincount().argsort(descending=True)[:20]
    for _ in range(20):
        drawn = negatives.sample(busiest)  # (20, 4) item codes
        pairs = set(zip(busiest.repeat_interleave(4).tolist(), drawn.reshape(-1).tolist(), strict=True))
        assert not pairs & every
        assert (drawn > 0).all()


def test_negative_sampler_state_is_checkpointed(implicit):
    """The DataModule's state_dict carries the sampler's generator: restoring it replays the same draws."""
    state = implicit.state_dict()
    users = torch.arange(10)
    first = implicit.negatives.sample(users)
    implicit.load_state_dict(state)
    assert torch.equal(implicit.negatives.sample(users), first)
    assert not torch.equal(implicit.negatives.sample(users), first)  # and the stream moves on


class _SameUsers(torch.utils.data.Dataset):
    """Two items, each one draw of negatives for the same users: item k is drawn by worker k."""

    def __init__(self, negatives, users: torch.Tensor) -> None:
        self.negatives, self.users = negatives, users

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.negatives.sample(self.users)


def test_dataloader_workers_draw_different_negatives(implicit):
    """Each DataLoader worker draws from its own generator (seeded with the worker's seed): two workers asked
    for the same users draw different negatives, where copies of one generator would repeat each other."""
    users = implicit.store.user[implicit.rows["train"]][:32]
    loader = torch.utils.data.DataLoader(
        _SameUsers(implicit.negatives, users), batch_size=None, num_workers=2
    )
    torch.manual_seed(0)
    first, second = list(loader)
    assert first.shape == second.shape == (32, 4)
    assert not torch.equal(first, second)
    torch.manual_seed(0)  # the worker seeds derive from the main process's generator: reproducible
    again = list(loader)
    assert torch.equal(again[0], first) and torch.equal(again[1], second)


def test_tensor_batches_are_the_dataloaders_batches_as_tensors():
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
    from torch.utils.data.distributed import DistributedSampler

    from recsys_lab.data.views import TensorBatches

    data = list(range(103))

    def epochs(loader, n=3):
        return [[torch.as_tensor(b).tolist() for b in loader] for _ in range(n)]

    # shuffled: in a DataLoader, the same permutation per epoch as DataLoader(shuffle=True) from the same global
    # RNG state (the loader's iterator draws its own base seed first, in both cases)
    torch.manual_seed(5)
    reference = epochs(DataLoader(data, batch_size=10, shuffle=True, collate_fn=lambda b: b))
    torch.manual_seed(5)
    ours = TensorBatches(RandomSampler(data), 10, drop_last=False)
    got = epochs(DataLoader(data, batch_sampler=ours, collate_fn=lambda b: b))
    assert got == reference and got[0] != got[1]  # epochs differ, as they should
    assert all(isinstance(b, torch.Tensor) and b.dtype == torch.long for b in ours)
    assert len(ours) == 11 and [len(b) for b in got[0]][-1] == 3
    # in order, with drop_last
    ordered = TensorBatches(SequentialSampler(data), 25, drop_last=True)
    assert [b.tolist() for b in ordered] == [list(range(s, s + 25)) for s in range(0, 100, 25)]
    assert len(ordered) == 4
    # any other sampler (Lightning's DistributedSampler under DDP, injected through this signature) is batched
    # as BatchSampler would batch it
    for rank in (0, 1):
        spread = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3)
        batches = TensorBatches(spread, batch_size=8, drop_last=False)
        assert [b.tolist() for b in batches] == list(BatchSampler(spread, 8, drop_last=False))


def test_sharded_batches_are_the_single_process_batches_split():
    """DDP with world_size processes of batch b sees, step by step, the batch one process of world_size × b
    would see; evaluation rows are split without repeats."""
    from torch.utils.data import RandomSampler, SequentialSampler

    from recsys_lab.data.views import TensorBatches

    data = list(range(103))
    torch.manual_seed(7)
    single = [b.tolist() for b in TensorBatches(RandomSampler(data), 20, drop_last=False)]
    parts = []
    for rank in (0, 1):
        torch.manual_seed(7)  # every process starts an epoch from the same global RNG state
        sharded = TensorBatches(RandomSampler(data), 10, drop_last=False, shard=(rank, 2))
        parts.append([b.tolist() for b in sharded])
        assert len(sharded) == len(parts[-1]) == 6
    assert [
        a + b for a, b in zip(*parts, strict=True)
    ] == single  # 5 global batches of 20, then 3 rows: 2 + 1
    torch.manual_seed(7)
    three = [b.tolist() for b in TensorBatches(RandomSampler(data[:41]), 10, drop_last=False, shard=(2, 3))]
    assert len(three) == 2  # 30 rows, then 11 rows split 4 / 4 / 3
    torch.manual_seed(7)
    assert len(list(TensorBatches(RandomSampler(data[:61]), 10, drop_last=False, shard=(1, 2)))) == 3
    torch.manual_seed(7)  # a last global batch with fewer rows than processes is dropped
    assert len(list(TensorBatches(RandomSampler(data[:41]), 10, drop_last=False, shard=(1, 2)))) == 2
    # evaluation: contiguous parts, batched, every row exactly once across the processes
    rows = [
        b.tolist() for r in range(3) for b in TensorBatches(SequentialSampler(data), 16, False, shard=(r, 3))
    ]
    assert sorted(sum(rows, [])) == data and max(len(b) for b in rows) == 12  # 35 rows: 12 + 12 + 11
    assert [len(TensorBatches(SequentialSampler(data), 16, False, shard=(r, 3))) for r in range(3)] == [
        3,
        3,
        3,
    ]
    # 97 rows: parts of 49 and 48; batched by 16 alone they would take 4 and 3 steps, and a process whose
    # evaluation steps are collectives (TorchRec's sharded tables) would wait on the other forever
    uneven = [
        [b.tolist() for b in TensorBatches(SequentialSampler(data[:97]), 16, False, (r, 2))] for r in (0, 1)
    ]
    assert [len(p) for p in uneven] == [
        len(TensorBatches(SequentialSampler(data[:97]), 16, False, (r, 2))) for r in (0, 1)
    ]
    assert [len(p) for p in uneven] == [4, 4] and max(len(b) for p in uneven for b in p) <= 16
    assert sum(sum(uneven, []), []) == data[:97]  # in order, each row once
    # fewer rows than processes: the last process has nothing to evaluate, and no empty batch
    assert [list(TensorBatches(SequentialSampler(data[:1]), 16, False, (r, 2))) for r in (0, 1)][1] == []


def test_training_loader_yields_tensor_batches_in_a_seeded_order(dm):
    loader = dm.train_dataloader()
    torch.manual_seed(0)
    first = [b.sparse["item_id"].clone() for b in loader]
    torch.manual_seed(0)
    again = [b.sparse["item_id"].clone() for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    rows = sum(len(b) for b in first)
    assert rows == len(dm.rows["train"])  # every training row once per epoch
