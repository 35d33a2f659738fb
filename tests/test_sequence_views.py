"""The views of issue 7 against a slow reference built from the raw frames: whole training sequences with
next-item targets and timestamps (SequenceView), one row per prefix (PrefixSequenceView), BPR pairs with
sampled negatives (PairwiseView); and the tasks that train on them (NextItemTask, MaskedItemTask,
PairwiseTask, FittedTask)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from recsys_lab.data.views import CTRView, PairwiseView, PrefixSequenceView, SequenceView
from recsys_lab.modules.losses import FullSoftmaxLoss
from recsys_lab.tasks.next_item import MaskedItemTask, NextItemTask
from recsys_lab.utils.testing import MeanSequenceModel
from tests.datamodule_fixtures import L, cache_root, dm, make_dm, raw, ready, ref  # noqa: F401


def training_clicks(ref, user: int) -> list[tuple[int, int]]:
    """(timestamp, item code) of the user's training clicks, in time order."""
    return [(t, int(ref.code[i])) for t, i in ref.clicks[user] if t < ref.t_val]


@pytest.fixture
def sequences(dm):
    yield dm.use_view(SequenceView)
    dm.use_view(CTRView)  # the module's DataModule serves the CTR view to the other tests


def test_sequence_rows_are_whole_training_sequences(dm, ref, sequences):
    expected = {u: training_clicks(ref, u) for u in range(300)}
    users = sorted(u for u, c in expected.items() if len(c) >= 2)
    assert sequences.users.tolist() == users  # users with something to predict, in entity order
    batch = sequences.train_dataset().__getitems__(list(range(len(users))))
    seq, target = batch.seq["hist_item_id"], batch.targets["next_item"]
    assert seq.ids.shape == (len(users), L) and target.ids.shape == (len(users), L)
    n_truncated = 0
    for b, u in enumerate(users):
        clicks = expected[u][-L:]  # the last L training clicks, oldest first
        n = len(clicks)
        n_truncated += len(expected[u]) > L
        assert seq.lengths[b] == n
        assert seq.ids[b, :n].tolist() == [c for _, c in clicks]
        assert seq.times[b, :n].tolist() == [t for t, _ in clicks]
        # the item after each position; the last real position has none and is not supervised
        assert target.mask[b].tolist() == [True] * (n - 1) + [False] * (L - n + 1)
        assert target.ids[b, : n - 1].tolist() == [c for _, c in clicks[1:]]
        assert batch.sparse["user_id"][b] == dm.store.users.sparse["user_id"][u]
    assert n_truncated > 10  # histories longer than L are cut to their most recent L
    assert all((batch.sparse[c] == 0).all() for c in ("hour", "weekday", "device"))  # no context
    assert "item_id" not in batch.sparse  # nothing about the targets leaks in as a feature


def test_prefix_rows_supervise_one_position_each(dm, ref):
    view = dm.use_view(PrefixSequenceView)
    dataset = view.train_dataset()
    clicks = {u: training_clicks(ref, u) for u in range(300)}
    assert len(dataset) == sum(max(len(c) - 1, 0) for c in clicks.values())  # every click with a predecessor
    batch = dataset.__getitems__(list(range(len(dataset))))
    seq, target = batch.seq["hist_item_id"], batch.targets["next_item"]
    assert (target.mask.sum(1) == 1).all()
    last = seq.lengths - 1
    assert target.mask[torch.arange(len(last)), last].all()  # the prediction after the whole history
    got = sorted(
        (tuple(seq.ids[b, : seq.lengths[b]].tolist()), int(target.ids[b, last[b]])) for b in range(len(last))
    )
    want = []
    for c in clicks.values():
        codes = [code for _, code in c]
        want += [(tuple(codes[max(0, k - L) : k]), codes[k]) for k in range(1, len(codes))]
    assert got == sorted(want)
    assert "item_id" not in batch.sparse


def test_pairwise_rows_carry_negatives_never_training_positives(dm, ref):
    view = dm.use_view(PairwiseView)  # the simulator config has no train_negatives: one uniform negative
    assert view.describe()["pairwise_negatives"]["negatives"] == "uniform_1"
    dataset = view.train_dataset()
    batch = dataset.__getitems__(list(range(len(dataset))))
    assert (batch.labels["click"] == 1).all() and len(batch) == int((ref.is_train & (ref.click == 1)).sum())
    negatives = batch.targets["negative_item"].ids  # (B, 1)
    assert negatives.shape == (len(batch), 1) and (negatives > 0).all()
    user_code = dm.store.users.sparse["user_id"].numpy()
    code_to_user = {int(user_code[u]): u for u in range(300)}
    positives = {(u, int(ref.code[i])) for u in range(300) for t, i in ref.clicks[u] if t < ref.t_val}
    drawn = {
        (code_to_user[int(uc)], int(n))
        for uc, n in zip(batch.sparse["user_id"], negatives[:, 0], strict=True)
    }
    assert not drawn & positives


def _task(dm, task_cls, **kwargs):
    net = MeanSequenceModel(dm.schema, bidirectional=task_cls is MaskedItemTask)
    task = task_cls(
        net=net,
        schema=dm.schema,
        optimizer=partial(torch.optim.Adam, lr=0.05),
        loss=FullSoftmaxLoss(),
        **kwargs,
    )
    task.connect(dm.use_view(task.view).eval_context())
    return task


def test_next_item_task_learns_the_training_sequences(dm):
    task = _task(dm, NextItemTask)
    view = dm.use_view(SequenceView)
    batch = view.train_dataset().__getitems__(list(range(len(view.users))))
    optimizer = task.configure_optimizers()
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = task.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    assert _task(dm, NextItemTask, prefix_augmentation=True).view is PrefixSequenceView


def test_masked_item_task_masks_real_positions_only(dm):
    torch.manual_seed(0)
    task = _task(dm, MaskedItemTask, mask_ratio=0.3)
    view = dm.use_view(SequenceView)
    batch = view.train_dataset().__getitems__(list(range(len(view.users))))
    masked_batch, target = task.mask(batch)
    seq, inputs = batch.seq["hist_item_id"], masked_batch.seq["hist_item_id"]
    assert (target.mask & ~seq.mask()).sum() == 0  # never a padding position
    assert (target.mask.sum(1) >= 1).all()  # at least one per sequence
    long = seq.lengths >= 5  # where one forced mask barely moves the rate
    rate = float(target.mask[long].sum()) / float(seq.mask()[long].sum())
    assert 0.25 < rate < 0.36
    assert (inputs.ids[target.mask] == task.net.mask_id).all()
    assert torch.equal(inputs.ids[~target.mask & seq.mask()], seq.ids[~target.mask & seq.mask()])
    assert torch.equal(target.ids, seq.ids)  # the loss compares with the original items
    assert torch.equal(batch.seq["hist_item_id"].ids, seq.ids)  # the input batch is not modified
    with pytest.raises(ValueError, match=r"model\.mask_ratio=1\.5"):
        _task(dm, MaskedItemTask, mask_ratio=1.5)


def test_histories_carry_their_timestamps(dm, ref):
    """Every history (training rows, ranking queries) carries the timestamps of its items, so a model using
    time (HSTU) reads the same kind of input in training and evaluation."""
    queries = dm.queries["test"]
    batch = dm.store.query_batch(queries.eval_targets(torch.arange(len(queries))), level=1)
    hist = batch.seq["hist_item_id"]
    for b, u in enumerate(queries.users.tolist()):
        past = [t for t, _ in ref.clicks[u] if t < ref.t_test][-L:]
        assert hist.times[b, : hist.lengths[b]].tolist() == past
    rows = dm.rows["val"][:50]
    seq = dm.store.impressions(rows).seq["hist_item_id"]
    for b, r in enumerate(rows.tolist()):
        past = [t for t, _ in ref.clicks[int(ref.user[r])] if t < ref.ts[r]][-L:]
        assert seq.times[b, : seq.lengths[b]].tolist() == past
