"""Unit tests of the reusable layers (embeddings, MLP, Dice, attention, pooling) and numbers pinned for DIN."""

from __future__ import annotations

import pytest
import torch

from recsys_lab.data.batch import Seq
from recsys_lab.data.schema import Feature, Schema
from recsys_lab.models.din import DIN
from recsys_lab.modules.attention import TargetAttention, masked_mean
from recsys_lab.modules.embeddings import FeatureEmbedding, concat_dense
from recsys_lab.modules.mlp import MLP, Dice
from recsys_lab.utils.testing import random_batch, tiny_schema


def pad_more(seq: Seq, extra: int, fill: int) -> Seq:
    """The same sequences with `extra` more padded positions holding id `fill`."""
    padding = torch.full((seq.ids.shape[0], extra), fill, dtype=seq.ids.dtype)
    return Seq(torch.cat([seq.ids, padding], dim=1), seq.lengths.clone())


# --- embeddings -----------------------------------------------------------------------------------------------
def test_feature_embedding_shares_tables_through_embed_as() -> None:
    schema = tiny_schema()
    emb = FeatureEmbedding(schema, embedding_dim=4)
    assert emb.table("hist_item_id") is emb.table("item_id")
    assert emb.table("hist_cat") is emb.table("cat")
    assert sorted(emb.tables) == sorted(f.name for f in schema.select("sparse"))

    batch = random_batch(schema, batch_size=3)
    assert emb.sparse(batch, ["user_id", "item_id"]).shape == (3, 2, 4)
    history = emb.seq(batch, ["hist_item_id", "hist_cat"])
    assert history.shape == (3, 5, 8)
    # history and candidate live in one space: the same id gives the same vector
    torch.testing.assert_close(history[:, :, :4], emb.table("item_id")(batch.seq["hist_item_id"].ids))
    assert concat_dense(batch, ["price", "image"]).shape == (3, 5)


def test_feature_embedding_sides_and_own_tables() -> None:
    features = [
        *tiny_schema().features,
        Feature("queries", "seq", "user", vocab_size=7, max_len=5),  # no embed_as: a table of its own
    ]
    schema = Schema(features=features)
    emb = FeatureEmbedding(schema, embedding_dim=4, sides=("user", "item"))
    assert emb.table("queries").num_embeddings == 7
    assert "hour" not in emb.tables  # context side left out
    with pytest.raises(KeyError, match="hour"):
        emb.table("hour")


# --- MLP and Dice ---------------------------------------------------------------------------------------------
def test_mlp_shapes() -> None:
    mlp = MLP(6, [5, 4], activation=Dice, dropout=0.1, output_dim=1)
    assert mlp(torch.randn(3, 6)).shape == (3, 1)
    assert MLP(6, [5, 4]).output_dim == 4


def test_dice_shapes_and_eval_determinism() -> None:
    torch.manual_seed(0)
    dice = Dice(4)
    with torch.no_grad():
        dice.alpha.fill_(0.25)
    x2, x3 = torch.randn(8, 4), torch.randn(3, 5, 4)
    assert dice(x2).shape == (8, 4)
    assert dice(x3).shape == (3, 5, 4)  # trains the running statistics too

    dice.eval()
    torch.testing.assert_close(dice(x3), dice(x3), rtol=0, atol=0)
    # eval uses running statistics: a row's output does not depend on the other rows
    torch.testing.assert_close(dice(x3)[:1], dice(x3[:1]))
    torch.testing.assert_close(dice(x3).reshape(15, 4), dice(x3.reshape(15, 4)))


# --- attention and pooling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
def test_target_attention_padding_invariance(train: bool) -> None:
    torch.manual_seed(0)
    B, L, E = 4, 5, 6
    attention = TargetAttention(E, hidden=[8, 4]).train(train)
    history, target = torch.randn(B, L, E), torch.randn(B, E)
    lengths = torch.tensor([0, 2, 3, 5])
    mask = torch.arange(L) < lengths.unsqueeze(1)  # (B, L)
    pooled, weights = attention(history, target, mask)
    assert pooled.shape == (B, E) and weights.shape == (B, L)
    assert torch.equal(weights[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(pooled[0], torch.zeros(E))  # an empty history pools to zeros

    # other values at padded positions (even non-finite ones): identical output
    noisy = torch.where(mask.unsqueeze(-1), history, torch.full_like(history, float("nan")))
    pooled_noisy, weights_noisy = attention(noisy, target, mask)
    assert torch.equal(pooled_noisy, pooled) and torch.equal(weights_noisy, weights)

    # longer padding: the same weights; the pooled sum gains exact zeros (a reduction order may differ: 1e-6)
    longer = torch.cat([history, torch.randn(B, 3, E)], dim=1)  # (B, L + 3, E)
    pooled_long, weights_long = attention(longer, target, torch.arange(L + 3) < lengths.unsqueeze(1))
    assert torch.equal(weights_long[:, :L], weights) and torch.equal(weights_long[:, L:], torch.zeros(B, 3))
    torch.testing.assert_close(pooled_long, pooled, rtol=0, atol=1e-6)


def test_masked_mean() -> None:
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [9.0]], [[2.0], [2.0], [2.0]]])  # (3, 3, 1)
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0], [7.0], [0.0]]))


# --- DIN ------------------------------------------------------------------------------------------------------
def tiny_din(schema: Schema) -> DIN:
    torch.manual_seed(0)
    return DIN(schema, embedding_dim=4, attention_hidden=[8, 4], mlp_hidden=[8, 4])


def test_din_shares_history_and_candidate_tables() -> None:
    model = tiny_din(tiny_schema())
    assert model.candidate == ["item_id", "cat"]
    assert model.embedding.table("hist_item_id") is model.embedding.table("item_id")


@pytest.mark.parametrize("train", [True, False])
def test_din_padding_invariance(train: bool) -> None:
    schema = tiny_schema()
    model = tiny_din(schema).train(train)
    batch = random_batch(schema)
    logits, weights = model.forward_with_attention(batch)
    mask = batch.seq["hist_item_id"].mask()
    assert weights.shape == mask.shape and torch.equal(weights[~mask], torch.zeros(int((~mask).sum())))

    changed = random_batch(schema)
    for name, seq in changed.seq.items():  # other ids at padded positions
        other = torch.randint(
            0, schema[name].vocab_size, seq.ids.shape, generator=torch.Generator().manual_seed(1)
        )
        changed.seq[name] = Seq(torch.where(seq.mask(), seq.ids, other), seq.lengths)
    assert torch.equal(model(changed), logits)

    longer = random_batch(schema)
    longer.seq = {name: pad_more(seq, extra=4, fill=1) for name, seq in longer.seq.items()}
    torch.testing.assert_close(model(longer), logits, rtol=0, atol=1e-6)


def test_din_needs_a_behaviour_history() -> None:
    features = [f for f in tiny_schema().features if f.kind != "seq"]
    with pytest.raises(ValueError, match="embed_as"):
        DIN(Schema(features=features))


def test_din_pools_other_seq_features() -> None:
    schema = Schema(
        features=[*tiny_schema().features, Feature("queries", "seq", "user", vocab_size=7, max_len=5)]
    )
    model = tiny_din(schema)
    assert model.other_seq == ["queries"]
    batch = random_batch(schema)
    model(batch).sum().backward()
    assert model.embedding.table("queries").weight.grad is not None


def test_din_pinned_output() -> None:
    # numbers pinned with a fixed init: any change to the architecture's arithmetic shows up here
    schema = tiny_schema()
    batch = random_batch(schema)
    model = tiny_din(schema)
    with torch.no_grad():
        logits, weights = model.forward_with_attention(batch)  # train: Dice normalises with batch statistics
        torch.testing.assert_close(logits.mean(), torch.tensor(0.06403003), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(weights.sum(), torch.tensor(-7.1356745), rtol=1e-4, atol=1e-5)

        logits, weights = model.eval().forward_with_attention(
            batch
        )  # eval: the running statistics just updated
        torch.testing.assert_close(logits.mean(), torch.tensor(0.05050659), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(weights.sum(), torch.tensor(-7.2802591), rtol=1e-4, atol=1e-5)


def test_dice_trains_on_fewer_than_two_samples():
    # the last batch of an epoch can hold one row, and a batch can have a single real history position
    dice = Dice(4).train()
    for rows in (0, 1):
        x = torch.randn(rows, 4, requires_grad=True)
        out = dice(x)
        assert out.shape == (rows, 4)
        assert torch.isfinite(out).all()
    attention = TargetAttention(4, hidden=[8]).train()
    history, target = torch.randn(3, 5, 4), torch.randn(3, 4)
    for real in (0, 1):
        mask = torch.zeros(3, 5, dtype=torch.bool)
        mask[0, :real] = True
        pooled, weights = attention(history, target, mask)
        assert pooled.shape == (3, 4) and (weights[~mask] == 0).all()
