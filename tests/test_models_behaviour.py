"""Behaviour-sequence CTR rankers: DIEN's auxiliary loss, AUGRU and the task hook that trains with it; BST's
target slot and positions; padding never changes either model."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recsys_lab.data.batch import Batch, Seq
from recsys_lab.models.bst import BST
from recsys_lab.models.dien import DIEN, AUGRUCell
from recsys_lab.models.din import DIN
from recsys_lab.tasks.ctr import CTRTask
from recsys_lab.utils.testing import random_batch, tiny_schema

BEHAVIOUR = ("hist_item_id", "hist_cat")  # tiny_schema's behaviour features (embed_as on item-side features)


def timed_batch(schema, seed: int = 0) -> Batch:
    """random_batch with increasing timestamps on the item history, as the feature store gathers it."""
    batch = random_batch(schema, seed=seed)
    seq = batch.seq["hist_item_id"]
    g = torch.Generator().manual_seed(seed)
    times = 1_000_000 + torch.randint(1, 50_000, seq.ids.shape, generator=g).cumsum(1)  # (B, L) seconds
    batch.seq["hist_item_id"] = Seq(seq.ids, seq.lengths, times)
    return batch


def change_padding(batch: Batch, schema) -> Batch:
    """The same batch with different ids (and times) at every padded position of every seq feature."""
    seq = {}
    for name, s in batch.seq.items():
        padding = ~s.mask()
        ids = torch.where(padding, (s.ids + 1) % schema[name].vocab_size, s.ids)
        times = None if s.times is None else torch.where(padding, s.times * 3 + 12345, s.times)
        seq[name] = Seq(ids, s.lengths, times)
    return Batch(sparse=batch.sparse, seq=seq, dense=batch.dense, labels=batch.labels)


def change_real(batch: Batch, schema, row: int, position: int) -> Batch:
    """The same batch with a different item id at one real position."""
    s = batch.seq["hist_item_id"]
    assert position < int(s.lengths[row])
    ids = s.ids.clone()
    ids[row, position] = (ids[row, position] + 1) % schema["hist_item_id"].vocab_size
    return Batch(
        sparse=batch.sparse,
        seq={**batch.seq, "hist_item_id": Seq(ids, s.lengths, s.times)},
        dense=batch.dense,
        labels=batch.labels,
    )


def dien(schema, **kwargs) -> DIEN:
    torch.manual_seed(0)
    return DIEN(schema, embedding_dim=4, mlp_hidden=[8], **kwargs)


def bst(schema) -> BST:
    torch.manual_seed(0)
    return BST(schema, embedding_dim=4, num_heads=2, feed_forward_dim=8, mlp_hidden=[8])


# ---- DIEN: auxiliary loss ------------------------------------------------------------------------------------
def test_dien_auxiliary_loss_is_positive_weighted_and_trains_the_interest_extractor():
    schema = tiny_schema()
    batch = random_batch(schema)
    assert (batch.seq["hist_item_id"].lengths >= 2).any()  # some row has a next behaviour to predict
    model = dien(schema)
    torch.manual_seed(1)
    loss = model.auxiliary_loss(batch)
    assert loss.dim() == 0 and loss > 0.1  # two log losses per step: far from 0 at init

    loss.backward()
    for name, param in model.extractor.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches extractor.{name}"
    # the item tables learn from it too (positives and negatives are behaviour embeddings)
    assert model.embedding.table("hist_item_id").weight.grad.abs().sum() > 0

    # α scales it: the same draws give half the loss at α = 0.5, and none at α = 0
    for alpha in (0.5, 0.0):
        model.aux_loss_weight = alpha
        torch.manual_seed(1)
        torch.testing.assert_close(model.auxiliary_loss(batch), alpha * loss.detach())


def test_dien_auxiliary_loss_equals_the_explicit_sum_over_steps():
    schema = tiny_schema()
    batch = random_batch(schema)
    model = dien(schema, aux_loss_weight=0.3)
    torch.manual_seed(2)
    loss = model.auxiliary_loss(batch)

    with torch.no_grad():
        history, states, mask = model.interest_states(batch)
        lengths = batch.seq["hist_item_id"].lengths
        # the negatives: uniform draws over the batch's real behaviour events, in row-major order
        events = [(r, t) for r in range(len(batch)) for t in range(int(lengths[r]))]
        torch.manual_seed(2)
        draw = torch.randint(len(events), (len(batch), history.shape[1] - 1))
        terms = []
        for r in range(len(batch)):
            for t in range(int(lengths[r]) - 1):  # step t predicts the real behaviour t + 1
                h = states[r, t]
                term = -torch.log(torch.sigmoid(h @ history[r, t + 1]))
                nr, nt = events[int(draw[r, t])]
                same = all(batch.seq[f].ids[nr, nt] == batch.seq[f].ids[r, t + 1] for f in BEHAVIOUR)
                if not same:  # a draw of the positive event itself is no negative
                    term = term - torch.log(1 - torch.sigmoid(h @ history[nr, nt]))
                terms.append(term)
    assert len(terms) > 3
    torch.testing.assert_close(loss.detach(), 0.3 * torch.stack(terms).mean())


def test_dien_auxiliary_loss_ignores_padded_steps():
    schema = tiny_schema()
    batch = random_batch(schema)
    model = dien(schema)

    def aux(b: Batch) -> torch.Tensor:
        torch.manual_seed(3)  # the same negative draws for both batches
        return model.auxiliary_loss(b)

    before = aux(batch)
    torch.testing.assert_close(aux(change_padding(batch, schema)), before, rtol=0, atol=0)
    # ...while a real next behaviour does count (the check above is not vacuous)
    row = int(batch.seq["hist_item_id"].lengths.argmax())
    assert not torch.equal(aux(change_real(batch, schema, row, 1)), before)


def test_dien_auxiliary_loss_without_two_behaviours_is_zero():
    schema = tiny_schema()
    batch = random_batch(schema)
    for name in BEHAVIOUR:
        s = batch.seq[name]
        batch.seq[name] = Seq(s.ids, s.lengths.clamp(max=1))
    loss = dien(schema).auxiliary_loss(batch)
    assert loss.item() == 0.0 and loss.requires_grad


# ---- DIEN: AUGRU and interest evolution ----------------------------------------------------------------------
def test_augru_with_attention_one_is_a_gru_step_and_with_attention_zero_keeps_the_state():
    torch.manual_seed(0)
    cell, gru = AUGRUCell(3, 5), nn.GRUCell(3, 5)
    with torch.no_grad():
        # GRUCell: rows (r, z, n), h' = (1 - z) n + z h. The paper's u = 1 - z = σ(-(...)): negate the z rows
        sign = torch.ones(15, 1)
        sign[5:10] = -1
        cell.input.weight.copy_(gru.weight_ih * sign)
        cell.input.bias.copy_(gru.bias_ih * sign[:, 0])
        cell.hidden.weight.copy_(gru.weight_hh * sign)
        cell.hidden.bias.copy_(gru.bias_hh * sign[:, 0])
    x, h = torch.randn(4, 3), torch.randn(4, 5)
    torch.testing.assert_close(cell(x, h, torch.ones(4)), gru(x, h))
    torch.testing.assert_close(cell(x, h, torch.zeros(4)), h, rtol=0, atol=0)
    # in between, the update is scaled: h' - h = a * u * (c - h)
    half = cell(x, h, torch.full((4,), 0.5))
    torch.testing.assert_close(half - h, 0.5 * (gru(x, h) - h))


def test_dien_attention_is_a_softmax_over_real_positions():
    schema = tiny_schema()
    batch = random_batch(schema)
    model = dien(schema).eval()
    with torch.no_grad():
        _, attention = model.forward_with_attention(batch)
    mask = batch.seq["hist_item_id"].mask()
    assert (attention[~mask] == 0).all()
    nonempty = mask.any(1)
    torch.testing.assert_close(attention[nonempty].sum(1), torch.ones(int(nonempty.sum())))


def test_dien_evolved_interest_is_the_augru_state_after_each_rows_last_real_step():
    schema = tiny_schema()
    batch = random_batch(schema)
    model = dien(schema).eval()
    with torch.no_grad():
        _, states, mask = model.interest_states(batch)
        _, attention = model.forward_with_attention(batch)
        interest = model.evolve(states, attention, mask)
        # evolve must mask padded steps itself, whatever attention they carry
        torch.testing.assert_close(model.evolve(states, attention + 0.5 * ~mask, mask), interest)
        lengths = batch.seq["hist_item_id"].lengths
        assert (lengths == 0).any() and (lengths < mask.shape[1]).any()
        for row in range(len(batch)):  # one row at a time, its real steps only
            h = torch.zeros(1, states.shape[-1])
            for t in range(int(lengths[row])):
                h = model.evolution(states[row, t : t + 1], h, attention[row, t : t + 1])
            torch.testing.assert_close(interest[row], h[0])


# ---- padding never changes a logit -----------------------------------------------------------------------------
@pytest.mark.parametrize("build", [dien, bst], ids=["dien", "bst"])
def test_padding_does_not_change_logits(build):
    schema = tiny_schema()
    batch = timed_batch(schema)
    model = build(schema).eval()
    with torch.no_grad():
        before = model(batch)
        torch.testing.assert_close(model(change_padding(batch, schema)), before, rtol=0, atol=0)
        # ...while a real behaviour does count
        row = int(batch.seq["hist_item_id"].lengths.argmax())
        changed = model(change_real(batch, schema, row, 0))
    assert not torch.equal(changed[row], before[row])


# ---- BST: the target slot and the positions --------------------------------------------------------------------
def test_bst_reads_the_target_item():
    schema = tiny_schema()
    batch = random_batch(schema)
    model = bst(schema).eval()
    other = Batch(
        sparse={**batch.sparse, "item_id": (batch.sparse["item_id"] + 1) % schema["item_id"].vocab_size},
        seq=batch.seq,
        dense=batch.dense,
    )
    with torch.no_grad():
        assert (model(other) != model(batch)).all()  # every row, the empty-history one included
        # the candidate is slot 0 of the Transformer, the only slot of an empty history
        outputs, mask = model.encode_behaviour(batch)
    assert mask[:, 0].all() and (mask[:, 1:].sum(1) == batch.seq["hist_item_id"].lengths).all()
    assert (outputs[~mask] == 0).all()  # padded slots reach the MLP as zeros
    assert not torch.equal(model.encode_behaviour(other)[0][:, 0], outputs[:, 0])


def test_bst_real_slots_are_computed_as_if_there_were_no_padding():
    schema = tiny_schema()
    batch = timed_batch(schema)
    model = bst(schema).eval()
    with torch.no_grad():
        x, mask = model.tokens(batch)
        outputs, _ = model.encode_behaviour(batch)
        for row in range(len(batch)):  # each row alone, cut to its real slots: nothing to mask
            n = int(mask[row].sum())
            alone = x[row : row + 1, :n]  # (1, n, W)
            for block in model.blocks:
                alone = block(alone, torch.ones(1, n, n, dtype=torch.bool))
            torch.testing.assert_close(outputs[row, :n], alone[0])


def reversed_history(batch: Batch) -> Batch:
    """Each row's real behaviours in the opposite order (padding untouched); times stay where they were."""
    seq = {}
    for name, s in batch.seq.items():
        L = s.ids.shape[1]
        position = torch.arange(L).expand_as(s.ids)
        flipped = (s.lengths.unsqueeze(1) - 1 - position).clamp(min=0)
        source = torch.where(s.mask(), flipped, position)
        seq[name] = Seq(s.ids.gather(1, source), s.lengths, s.times)
    return Batch(sparse=batch.sparse, seq=seq, dense=batch.dense, labels=batch.labels)


def test_bst_sequence_order_matters_through_positions():
    schema = tiny_schema()
    batch = timed_batch(schema)
    row = int(batch.seq["hist_item_id"].lengths.argmax())
    ids = batch.seq["hist_item_id"].ids[row]
    assert not torch.equal(ids, ids.flip(0))  # reversing changes this row
    model = bst(schema).eval()
    with torch.no_grad():
        target = model.encode_behaviour(batch)[0][:, 0]  # (B, W): the candidate's output
        flipped = model.encode_behaviour(reversed_history(batch))[0][:, 0]
        assert not torch.allclose(flipped[row], target[row])

        # without positions (slot and time gap), self-attention reads the history as a set: the candidate's
        # output no longer depends on the order. So the change above comes from the positions
        model.positions.table.weight.zero_()
        model.time_gaps.weight.zero_()
        torch.testing.assert_close(
            model.encode_behaviour(reversed_history(batch))[0][:, 0], model.encode_behaviour(batch)[0][:, 0]
        )


def test_bst_time_gaps_are_read():
    schema = tiny_schema()
    batch = timed_batch(schema)
    model = bst(schema).eval()
    s = batch.seq["hist_item_id"]
    row = int(s.lengths.argmax())
    times = s.times.clone()
    times[row, 0] -= 10_000_000  # the oldest behaviour ~4 months earlier: another log2 bucket
    moved = Batch(
        sparse=batch.sparse,
        seq={**batch.seq, "hist_item_id": Seq(s.ids, s.lengths, times)},
        dense=batch.dense,
    )
    with torch.no_grad():
        before, after = model(batch), model(moved)
    assert not torch.equal(after[row], before[row])
    others = torch.arange(len(batch)) != row
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=0)


def test_bst_rejects_heads_that_do_not_divide_the_token_width():
    with pytest.raises(ValueError, match=r"num_heads=5 must divide the token width .* = 12"):
        BST(tiny_schema(), embedding_dim=4, num_heads=5)


# ---- the task hook ----------------------------------------------------------------------------------------------
def task_for(net: nn.Module, schema) -> tuple[CTRTask, dict]:
    task = CTRTask(net=net, schema=schema, optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    logged: dict = {}
    task.log_training = lambda values, batch_idx, batch_size: logged.update(values)  # what reaches the logger
    return task, logged


def test_ctr_task_adds_the_auxiliary_loss_and_logs_it():
    schema = tiny_schema()
    batch = random_batch(schema)
    net = dien(schema, aux_loss_weight=0.7)
    task, logged = task_for(net, schema)
    torch.manual_seed(5)
    loss = task.training_step(batch, 0)

    torch.manual_seed(5)  # the same negative draws, in the same order (forward, then the auxiliary loss)
    bce = F.binary_cross_entropy_with_logits(net(batch), batch.labels["click"])
    aux = net.auxiliary_loss(batch)
    assert aux > 0
    torch.testing.assert_close(loss, bce + aux)
    assert set(logged) == {"train/loss", "train/aux_loss"}
    torch.testing.assert_close(logged["train/aux_loss"], aux)
    torch.testing.assert_close(logged["train/loss"], loss)


def test_ctr_task_without_an_auxiliary_loss_is_plain_bce():
    schema = tiny_schema()
    batch = random_batch(schema)
    torch.manual_seed(0)
    net = DIN(schema, embedding_dim=4, attention_hidden=[4], mlp_hidden=[8])
    task, logged = task_for(net, schema)
    loss = task.training_step(batch, 0)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(net(batch), batch.labels["click"]))
    assert set(logged) == {"train/loss"}
