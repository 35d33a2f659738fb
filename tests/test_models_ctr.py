"""Feature-interaction CTR models: the schema-driven field embedding, DeepFM's FM term and DCN-V2's cross layers
against explicit computations, and DCN-V2's config errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from recsys_lab.data.batch import Seq
from recsys_lab.models.dcnv2 import CrossLayer, DCNv2, MixtureCrossLayer
from recsys_lab.models.deepfm import DeepFM, fm_second_order
from recsys_lab.modules.fields import FieldEmbedding
from recsys_lab.train import train
from recsys_lab.utils.checks import user_error_message
from recsys_lab.utils.testing import random_batch, tiny_schema
from tests.helpers import model_overrides


# ---- field embedding -----------------------------------------------------------------------------------------
def test_field_embedding_fields_in_schema_order_with_their_values():
    schema = tiny_schema()
    batch = random_batch(schema)
    torch.manual_seed(0)
    fields = FieldEmbedding(schema, embedding_dim=3)
    out = fields(batch)

    names = ["user_id", "age", "item_id", "cat", "hour", "price", "image", "hist_item_id", "hist_cat"]
    assert fields.names == names  # schema order, every sparse, dense and seq feature, nothing else
    assert out.shape == (len(batch), len(names), 3)

    tables = fields.tables
    # seq features are looked up in the table their embed_as names: one table, shared with the candidate
    assert tables.table("hist_item_id") is tables.table("item_id")
    torch.testing.assert_close(out[:, 2], tables.table("item_id")(batch.sparse["item_id"]))
    # a scalar dense feature: value * w_f + b_f
    price = fields.dense["price"]
    expected = batch.dense["price"].unsqueeze(-1) * price.weight[:, 0] + price.bias
    torch.testing.assert_close(out[:, 5], expected)
    torch.testing.assert_close(out[:, 6], fields.dense["image"](batch.dense["image"]))
    # a seq feature: the mean over its real positions, zeros for an empty history
    seq = batch.seq["hist_item_id"]
    for row in range(len(batch)):
        n = int(seq.lengths[row])
        mean = tables.table("item_id")(seq.ids[row, :n]).mean(0) if n else torch.zeros(3)
        torch.testing.assert_close(out[row, 7], mean)

    # sides keep only their features (the tables a kept seq feature points to are kept with it)
    assert FieldEmbedding(schema, 3, sides=["item"]).names == ["item_id", "cat", "price", "image"]


def test_field_embedding_masked_mean_ignores_padding():
    schema = tiny_schema()
    batch = random_batch(schema)
    fields = FieldEmbedding(schema, embedding_dim=4)
    before = fields(batch)
    lengths = batch.seq["hist_item_id"].lengths
    assert (lengths < batch.seq["hist_item_id"].ids.shape[1]).any()  # the batch has padding to change

    padding = ~batch.seq["hist_item_id"].mask()
    for name in ("hist_item_id", "hist_cat"):
        s = batch.seq[name]
        other = (s.ids + 1) % schema[name].vocab_size  # a different id at every position
        batch.seq[name] = Seq(ids=torch.where(padding, other, s.ids), lengths=s.lengths)
    torch.testing.assert_close(fields(batch), before, rtol=0, atol=0)

    # ...while a real position does count (the check above is not vacuous)
    s = batch.seq["hist_item_id"]
    row = int(lengths.argmax())
    ids = s.ids.clone()
    ids[row, 0] = (ids[row, 0] + 1) % schema["hist_item_id"].vocab_size
    batch.seq["hist_item_id"] = Seq(ids=ids, lengths=s.lengths)
    changed = fields(batch)
    assert not torch.equal(changed[row, 7], before[row, 7])


# ---- DeepFM ----------------------------------------------------------------------------------------------------
def pairwise(v: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} <v_i, v_j> over the fields of v (B, F, D), pair by pair: (B,)."""
    F = v.shape[1]
    return sum((v[:, i] * v[:, j]).sum(-1) for i, j in itertools.combinations(range(F), 2))


def test_fm_term_equals_the_explicit_pairwise_sum():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 5, 3, generator=g)
    torch.testing.assert_close(fm_second_order(v), pairwise(v))

    # inside the model: the FM part of the logit is that sum over the model's own field embeddings
    schema = tiny_schema()
    batch = random_batch(schema)
    torch.manual_seed(0)
    model = DeepFM(schema, embedding_dim=3, mlp_hidden=[8]).eval()
    with torch.no_grad():
        for param in model.fields.parameters():  # unit scale, so the pairwise products are far from 0
            nn.init.normal_(param)
        model.bias.fill_(0.7)  # w_0 starts at 0: make it visible
    with torch.no_grad():
        linear, fm, deep = model.forward_parts(batch)
        fields = model.fields(batch)
        assert fm.abs().min() > 0.1
        torch.testing.assert_close(fm, pairwise(fields))
        torch.testing.assert_close(model(batch), linear + fm + deep)
        # the first-order part: the 1-wide field of every feature, summed, plus w_0
        torch.testing.assert_close(linear, model.first_order(batch).sum((1, 2)) + model.bias)


# ---- DCN-V2 ----------------------------------------------------------------------------------------------------
def test_cross_layer_by_hand():
    layer = CrossLayer(2)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
        layer.linear.bias.copy_(torch.tensor([0.5, -0.5]))
    x0 = torch.tensor([[1.0, 2.0]])
    x = torch.tensor([[3.0, -1.0]])
    # W x = [1*3 + 2*(-1), 0*3 + (-1)*(-1)] = [1, 1]; + b = [1.5, 0.5]; x0 ⊙ = [1.5, 1.0]; + x = [4.5, 0.0]
    torch.testing.assert_close(layer(x0, x), torch.tensor([[4.5, 0.0]]))


@pytest.mark.parametrize("num_experts", [1, 3])
def test_mixture_cross_layer_is_the_papers_sum_over_experts(num_experts):
    torch.manual_seed(0)
    d, r = 5, 2
    layer = MixtureCrossLayer(d, low_rank=r, num_experts=num_experts)
    with torch.no_grad():
        layer.bias.normal_()
    x0, x = torch.randn(4, d), torch.randn(4, d)
    # E_i = x0 ⊙ (U_i tanh(C_i tanh(V_i^T x)) + b); x_next = sum_i G_i(x) E_i + x, G = softmax(W_g x)
    gates = torch.softmax(layer.gate(x), -1) if num_experts > 1 else torch.ones(4, 1)
    expected = x.clone()
    for i in range(num_experts):
        U, C, V = layer.U[i].T, layer.C[i].T, layer.V[i]  # as (d, r), (r, r), (d, r) matrices: U_i, C_i, V_i
        inner = torch.tanh(C @ torch.tanh(V.T @ x.T))  # (r, B)
        expert = x0 * ((U @ inner).T + layer.bias)  # (B, d)
        expected = expected + gates[:, i : i + 1] * expert
    torch.testing.assert_close(layer(x0, x), expected)


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
def test_dcnv2_structures(structure):
    schema = tiny_schema()
    batch = random_batch(schema)
    torch.manual_seed(0)
    model = DCNv2(schema, embedding_dim=3, num_cross_layers=2, mlp_hidden=[8], structure=structure).eval()
    with torch.no_grad():
        x0 = model.fields(batch).flatten(1)
        x = model.cross[1](x0, model.cross[0](x0, x0))
        if structure == "stacked":  # cross network, then the DNN on its output
            expected = model.head(model.dnn(x))
        else:  # both read x0, side by side
            expected = model.head(torch.cat([x, model.dnn(x0)], -1))
        torch.testing.assert_close(model(batch), expected.squeeze(-1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"structure": "diagonal"}, "structure='diagonal': expected one of stacked, parallel"),
        ({"num_experts": 4}, "num_experts=4: expected 1 for full-rank cross layers"),
        ({"low_rank": 0}, "low_rank=0: expected a positive integer"),
        ({"num_cross_layers": 0}, "num_cross_layers=0: expected a positive integer"),
        ({"structure": "parallel", "mlp_hidden": []}, "structure='parallel' needs a DNN"),
    ],
)
def test_dcnv2_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DCNv2(tiny_schema(), **kwargs)


def test_dcnv2_bad_structure_through_train_is_one_line(make_cfg, tmp_path):
    cfg = make_cfg([*model_overrides("dcnv2", tmp_path), "model.net.structure=diagonal"])
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert user_error_message(err.value) == (
        "error: DCNv2: structure='diagonal': expected one of stacked, parallel"
    )
