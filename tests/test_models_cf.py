"""Collaborative-filtering models (MF-BPR, NeuMF with GMF and MLP, LightGCN, EASE) against hand-computed
cases and independent references, plus one end-to-end run of each config through `train.py`'s code path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Feature, Schema
from recsys_lab.models.ease import EASE
from recsys_lab.models.lightgcn import LightGCN, SymmetricSparseProduct, normalized_adjacency
from recsys_lab.models.mf_bpr import MFBPR
from recsys_lab.models.neumf import GMF, NCFMLP, NeuMF
from recsys_lab.tasks.fitted import FittedTask
from recsys_lab.tasks.pairwise import PairwiseTask
from recsys_lab.tasks.ranking import has_encoders
from recsys_lab.train import build, train
from recsys_lab.utils.testing import random_batch, tiny_schema
from tests.datamodule_fixtures import cache_root, dm, raw, ref  # noqa: F401  (fixtures)
from tests.helpers import model_overrides


def cf_schema(pairs: list[tuple[int, int]], num_users: int, num_items: int) -> Schema:
    """Only the user and item ids, with the given training (user code, item code) pairs."""
    features = [
        Feature("user_id", "sparse", "user", vocab_size=num_users),
        Feature("item_id", "sparse", "item", vocab_size=num_items),
    ]
    return Schema(features=features, train_pairs=torch.tensor(pairs, dtype=torch.long))


def ids(users: list[int], items: list[int]) -> Batch:
    return Batch(sparse={"user_id": torch.tensor(users), "item_id": torch.tensor(items)})


def catalogue(num_items: int) -> Batch:
    """Every item code and nothing else, as the ranking evaluation hands a catalogue to `encode_item`."""
    return Batch(sparse={"item_id": torch.arange(num_items)})


# ---- every model: the encoders and forward agree ---------------------------------------------------------------

ENCODER_MODELS = {
    "mf_bpr": lambda s: MFBPR(s, embedding_dim=4),
    "mf_bpr_item_bias": lambda s: MFBPR(s, embedding_dim=4, item_bias=True),
    "lightgcn": lambda s: LightGCN(s, embedding_dim=4, num_layers=2),
    "ease": lambda s: EASE(s, l2=2.0),
    "gmf": lambda s: GMF(s, embedding_dim=4),
}


@pytest.mark.parametrize("name", list(ENCODER_MODELS))
def test_encoder_scores_agree_with_forward(name):
    schema = tiny_schema()
    torch.manual_seed(0)
    model = ENCODER_MODELS[name](schema)
    for p in model.parameters():  # away from the initialisation, so that a dropped term would show
        nn.init.normal_(p, std=0.5)
    model.eval()
    batch = random_batch(schema, batch_size=8)
    with torch.no_grad():
        scores = model.encode_query(batch) @ model.encode_item(catalogue(schema.num_items)).T  # (B, V)
        expected = scores[torch.arange(8), batch.sparse["item_id"]]
        torch.testing.assert_close(model(batch), expected, rtol=1e-5, atol=1e-5)


def test_pair_scorers_have_no_encoders():
    # NeuMF's MLP branch is not a dot product: ranking must score (query, candidate) pairs through forward
    schema = tiny_schema()
    assert not has_encoders(NCFMLP(schema)) and not has_encoders(NeuMF(schema))
    assert has_encoders(GMF(schema))


@pytest.mark.parametrize(
    "make",
    [
        lambda s: NCFMLP(s, embedding_dim=4, hidden=[6, 3]),
        lambda s: NeuMF(s, gmf_dim=3, mlp_embedding_dim=4, mlp_hidden=[6, 5, 2], dropout=0.3),
    ],
    ids=["mlp", "neumf"],
)
def test_score_items_equals_forward_pair_by_pair(make):
    # ranking scores a query's candidates with score_items (the first layer split into a user and an item half);
    # it must give what forward gives on each (user, item) row, repeated items and all
    schema = tiny_schema()
    torch.manual_seed(0)
    model = make(schema)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    model.eval()
    users = torch.tensor([1, 4, 2])
    items = torch.tensor([[0, 3, 3, 7], [5, 1, 2, 6], [7, 7, 0, 4]])  # (B, C)
    with torch.no_grad():
        fast = model.score_items(Batch(sparse={"user_id": users}), items)
        slow = model(ids(users.repeat_interleave(4).tolist(), items.reshape(-1).tolist())).view(3, 4)
    assert fast.shape == (3, 4)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_mlp_branch_is_the_tower_on_the_concatenated_embeddings():
    # MLPBranch computes the first layer as a user half plus an item half (once per distinct user / item);
    # NCF's definition is the tower on [p_u, q_i]: both, in training mode too (dropout sits after the layer)
    schema = tiny_schema()
    torch.manual_seed(0)
    model = NeuMF(schema, gmf_dim=3, mlp_embedding_dim=4, mlp_hidden=[16, 8], dropout=0.0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    branch = model.mlp
    users, items = torch.tensor([1, 4, 1, 2, 4]), torch.tensor([3, 3, 7, 0, 5])  # repeated users and items
    expected = branch.tower(torch.cat([branch.user(users), branch.item(items)], dim=-1))  # (5, 8)
    assert (expected > 0).sum() >= 10  # ReLU outputs: enough live units for the comparison to mean something
    torch.testing.assert_close(branch(ids(users.tolist(), items.tolist())), expected, rtol=1e-5, atol=1e-6)
    grid = branch.pairs(users.unsqueeze(1), items.unsqueeze(0))  # every user x every item: (5, 5, 2)
    torch.testing.assert_close(
        grid[2, 4],
        branch.tower(torch.cat([branch.user(users[2]), branch.item(items[4])])),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("task", [PairwiseTask, FittedTask])
def test_encoder_tasks_name_what_a_pair_scorer_lacks(task):
    with pytest.raises(
        TypeError,
        match=rf"{task.__name__} needs a model with encode_query, encode_item; "
        r"NeuMF lacks \['encode_query', 'encode_item'\]",
    ):
        task(NeuMF(tiny_schema()), tiny_schema(), optimizer=None)


# ---- MF-BPR ------------------------------------------------------------------------------------------------------


def test_mf_bpr_score_is_the_dot_product_of_the_factors():
    schema = cf_schema([(1, 1)], num_users=4, num_items=5)
    model = MFBPR(schema, embedding_dim=3)
    batch = ids([1, 2, 3, 0], [4, 1, 1, 2])
    users, items = batch.sparse["user_id"], batch.sparse["item_id"]
    expected = (model.user.weight[users] * model.item.weight[items]).sum(-1)
    torch.testing.assert_close(model(batch), expected)

    biased = MFBPR(schema, embedding_dim=3, item_bias=True)
    with torch.no_grad():
        biased.bias.weight.copy_(torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]]))
    plain = (biased.user.weight[users] * biased.item.weight[items]).sum(-1)
    torch.testing.assert_close(biased(batch), plain + torch.tensor([4.0, 1.0, 1.0, 2.0]))


def test_mf_bpr_initial_scores_are_small():
    # xavier-normal factors: BPR's sigmoid starts unsaturated (N(0, 1) tables would give scores ~ sqrt(D) = 8)
    schema = tiny_schema(num_users=500, num_items=800)
    model = MFBPR(schema, embedding_dim=64)
    scores = model.encode_query(random_batch(schema, 64)) @ model.encode_item(catalogue(800)).T
    assert scores.abs().max() < 0.5


# ---- EASE --------------------------------------------------------------------------------------------------------

# Four items (codes 1..4; code 0 is the unknown item), three users (codes 1..3; user code 0 has no row);
# (1, 2) is listed twice and counts once, and the pairs come in no particular order.
EASE_PAIRS = [(3, 4), (1, 2), (2, 2), (1, 1), (3, 1), (2, 4), (1, 2), (3, 3), (2, 3)]


def numpy_ease(pairs: list[tuple[int, int]], num_users: int, num_items: int, l2: float) -> tuple:
    X = np.zeros((num_users, num_items))
    for u, i in pairs:
        X[u, i] = 1.0
    P = np.linalg.inv(X.T @ X + l2 * np.eye(num_items))
    B = np.eye(num_items) - P / np.diag(P)[None, :]  # I - P diagMat(1 / diag(P))
    np.fill_diagonal(B, 0.0)
    return X, B


def test_ease_closed_form_on_a_four_item_example():
    schema = cf_schema(EASE_PAIRS, num_users=4, num_items=5)
    model = EASE(schema, l2=1.0)
    X, B = numpy_ease(EASE_PAIRS, 4, 5, l2=1.0)
    np.testing.assert_allclose(model.B.numpy(), B, atol=1e-6)
    assert np.all(np.diag(model.B.numpy()) == 0)
    # the unknown item code 0 never co-occurs with anything: it neither recommends nor is recommended
    assert np.all(model.B.numpy()[0] == 0) and np.all(model.B.numpy()[:, 0] == 0)
    # one entry by hand: G = XᵀX + I on items 1..4 is [[3,1,1,1],[1,3,1,1],[1,1,3,2],[1,1,2,3]]
    G = np.array([[3, 1, 1, 1], [1, 3, 1, 1], [1, 1, 3, 2], [1, 1, 2, 3]], dtype=float)
    P = np.linalg.inv(G)
    assert model.B[1, 2].item() == pytest.approx(-P[0, 1] / P[1, 1], abs=1e-6)
    # B is the constrained least-squares optimum: for each column j, ((XᵀX + λI) B − XᵀX)_ij = 0 for i != j
    gram = X.T @ X
    residual = (gram + np.eye(5)) @ model.B.numpy().astype(float) - gram
    np.fill_diagonal(residual, 0.0)
    np.testing.assert_allclose(residual, 0.0, atol=1e-5)


def test_ease_scores_are_the_training_row_times_b():
    schema = cf_schema(EASE_PAIRS, num_users=4, num_items=5)
    model = EASE(schema, l2=1.0)
    X, B = numpy_ease(EASE_PAIRS, 4, 5, l2=1.0)
    users = ids([0, 1, 2, 3], [1, 1, 1, 1])
    np.testing.assert_array_equal(model.user_rows(users.sparse["user_id"]).numpy(), X)
    query = model.encode_query(users)  # (4, V)
    np.testing.assert_allclose(query.numpy(), X @ B, atol=1e-6)
    assert torch.all(query[0] == 0)  # user code 0 (unknown): no training row, no scores
    np.testing.assert_array_equal(model.encode_item(catalogue(5)).numpy(), np.eye(5))


def test_ease_refuses_large_catalogues_and_keeps_no_weights_in_checkpoints():
    schema = cf_schema(EASE_PAIRS, num_users=4, num_items=5)
    with pytest.raises(ValueError, match=r"5 item codes, above max_items=4"):
        EASE(schema, max_items=4)
    with pytest.raises(ValueError, match="l2 must be > 0"):
        EASE(schema, l2=0.0)
    with pytest.raises(ValueError, match="EASE needs schema.train_pairs"):
        EASE(Schema(features=schema.features))
    model = EASE(schema)
    assert list(model.parameters()) == [] and model.state_dict() == {}


# ---- LightGCN ----------------------------------------------------------------------------------------------------

# Three users (codes 1..3), three items (codes 1..3); (1, 1) is listed twice and is one edge.
GCN_PAIRS = [(1, 1), (1, 2), (2, 2), (3, 2), (3, 3), (1, 1)]


def test_lightgcn_adjacency_is_the_symmetric_normalisation_by_hand():
    # nodes: users 0..3, then items 0..3 as nodes 4..7; degrees u1 = 2, u2 = 1, u3 = 2, i1 = 1, i2 = 3, i3 = 1
    expected = torch.zeros(8, 8)
    for user, item, value in [
        (1, 1, 1 / math.sqrt(2 * 1)),
        (1, 2, 1 / math.sqrt(2 * 3)),
        (2, 2, 1 / math.sqrt(1 * 3)),
        (3, 2, 1 / math.sqrt(2 * 3)),
        (3, 3, 1 / math.sqrt(2 * 1)),
    ]:
        expected[user, 4 + item] = expected[4 + item, user] = value
    model = LightGCN(cf_schema(GCN_PAIRS, num_users=4, num_items=4), embedding_dim=2)
    torch.testing.assert_close(model.adjacency.to_dense(), expected)
    torch.testing.assert_close(normalized_adjacency(torch.tensor(GCN_PAIRS), 4, 4).to_dense(), expected)
    assert "adjacency" not in model.state_dict()  # rebuilt from the schema, not stored in checkpoints


def test_lightgcn_graph_holds_exactly_the_training_clicks(dm, ref):  # noqa: F811
    """On the simulator: edges = the training clicks of the raw log (read independently of the data layer), so
    no held-out click is an edge; and a held-out pair added to train_pairs would change the graph."""
    schema = dm.schema
    user_code = dm.store.users.sparse["user_id"].numpy()  # simulator entities are the raw ids

    def code_pairs(rows: np.ndarray) -> set[tuple[int, int]]:
        return {
            (int(user_code[u]), int(ref.code[i])) for u, i in np.stack([ref.user[rows], ref.item[rows]], 1)
        }

    train = code_pairs((ref.click == 1) & ref.is_train)
    held_out = code_pairs((ref.click == 1) & ~ref.is_train)
    held_out = {(u, i) for u, i in held_out - train if u > 0 and i > 0}  # pairs a leak would add as edges
    assert held_out  # the check below is not vacuous

    model = LightGCN(schema, embedding_dim=2)
    U = schema.num_users
    rows, cols = model.adjacency.to_sparse_coo().coalesce().indices()
    edges = {(r, c - U) for r, c in torch.stack([rows, cols], 1).tolist() if r < U}
    assert edges == train
    assert not edges & held_out

    # listing the pairs again changes nothing; one held-out interaction more would
    twice = Schema(
        features=schema.features, train_pairs=torch.cat([schema.train_pairs, schema.train_pairs[:50]])
    )
    torch.testing.assert_close(
        LightGCN(twice, embedding_dim=2).adjacency.to_dense(), model.adjacency.to_dense()
    )
    leak = torch.cat([schema.train_pairs, torch.tensor([sorted(held_out)[0]])])
    leaked = LightGCN(Schema(features=schema.features, train_pairs=leak), embedding_dim=2)
    assert not torch.equal(leaked.adjacency.to_dense(), model.adjacency.to_dense())


def test_lightgcn_without_layers_is_the_ego_embeddings():
    model = LightGCN(cf_schema(GCN_PAIRS, num_users=4, num_items=4), embedding_dim=3, num_layers=0)
    users, items = model.propagate()
    torch.testing.assert_close(users, model.user.weight)
    torch.testing.assert_close(items, model.item.weight)


def test_lightgcn_final_embedding_is_the_mean_of_the_layers():
    model = LightGCN(cf_schema(GCN_PAIRS, num_users=4, num_items=4), embedding_dim=3, num_layers=2)
    A = model.adjacency.to_dense()
    e0 = torch.cat([model.user.weight, model.item.weight]).detach()
    e1 = A @ e0
    e2 = A @ e1
    users, items = model.propagate()
    torch.testing.assert_close(torch.cat([users, items]), (e0 + e1 + e2) / 3)
    # the symmetric product's hand-written backward is the true gradient
    x = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: SymmetricSparseProduct.apply(A.double().to_sparse_csr(), x), (x,)
    )


def test_lightgcn_propagates_once_per_step_and_once_per_evaluation():
    model = LightGCN(tiny_schema(), embedding_dim=4)
    calls = []
    propagate = model.propagate
    model.propagate = lambda: calls.append(1) or propagate()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    batch, negatives = random_batch(tiny_schema(), seed=1), random_batch(tiny_schema(), seed=2)

    def step():  # what PairwiseTask.training_step does: three encoder calls, one loss
        q = model.encode_query(batch)
        loss = ((q * model.encode_item(negatives)).sum(-1) - (q * model.encode_item(batch)).sum(-1)).mean()
        loss.backward()

    model.train()
    step()
    assert len(calls) == 1
    optimizer.step()
    step()  # the weights changed: propagate again
    assert len(calls) == 2
    step()  # gradient accumulation: backward freed the last graph, so no reuse of it
    assert len(calls) == 3

    model.eval()
    with torch.no_grad():
        first = model(batch)
        for seed in range(3):
            model.encode_query(random_batch(tiny_schema(), seed=seed))
        assert len(calls) == 4  # one propagation for every query batch of the evaluation
        model.load_state_dict({k: 2 * v for k, v in model.state_dict().items()})
        torch.testing.assert_close(model(batch), 4 * first)  # new weights, fresh tables
    assert len(calls) == 5
    model.train()
    model.eval()
    with torch.no_grad():
        model(batch)
    assert len(calls) == 6  # train() dropped the cache


def test_lightgcn_adjacency_follows_the_embeddings_and_is_no_buffer():
    model = LightGCN(cf_schema(GCN_PAIRS, num_users=4, num_items=4), embedding_dim=2).double()
    assert model(ids([1, 2], [1, 3])).dtype == torch.float64
    assert model.adjacency.dtype == torch.float64
    # DDP broadcasts every buffer at start-up and cannot broadcast a sparse tensor; checkpoints need no graph
    assert not any(b.is_sparse or b.layout == torch.sparse_csr for b in model.buffers())
    assert set(model.state_dict()) == {"user.weight", "item.weight"}


# ---- NeuMF, GMF, MLP ---------------------------------------------------------------------------------------------


def save_like_train_py(net: nn.Module, schema: Schema, path: Path) -> str:
    """A checkpoint as `train.py` writes it: the task's state dict ("net." keys) and the model identity."""
    cls = type(net)
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "recsys_lab_model": {
                "task": "recsys_lab.tasks.ctr.CTRTask",
                "net": f"{cls.__module__}.{cls.__qualname__}",
                "schema_fingerprint": schema.fingerprint(),
            },
        },
        path,
    )
    return str(path)


@pytest.fixture
def pretrained(tmp_path):
    schema = tiny_schema()
    torch.manual_seed(0)
    gmf, mlp = GMF(schema, embedding_dim=4), NCFMLP(schema, embedding_dim=3, hidden=[6, 4])
    for p in [*gmf.parameters(), *mlp.parameters()]:  # as if trained: far from the N(0, 0.01) start
        nn.init.normal_(p, std=0.5)
    paths = (
        save_like_train_py(gmf, schema, tmp_path / "gmf.ckpt"),
        save_like_train_py(mlp, schema, tmp_path / "mlp.ckpt"),
    )
    return schema, gmf, mlp, paths


def test_neumf_from_pretrained_parts_reproduces_them(pretrained):
    schema, gmf, mlp, (gmf_path, mlp_path) = pretrained
    model = NeuMF(
        schema,
        gmf_dim=4,
        mlp_embedding_dim=3,
        mlp_hidden=[6, 4],
        gmf_checkpoint=gmf_path,
        mlp_checkpoint=mlp_path,
        alpha=0.3,
    )
    batch = random_batch(schema, batch_size=8)
    with torch.no_grad():
        torch.testing.assert_close(model.gmf(batch), gmf.branch(batch))
        torch.testing.assert_close(model.mlp(batch), mlp.branch(batch))
        # output layer [α h_GMF, (1 − α) h_MLP], bias α b_GMF + (1 − α) b_MLP: the fused logit is the mix
        torch.testing.assert_close(model(batch), 0.3 * gmf(batch) + 0.7 * mlp(batch))


def test_neumf_pretrained_files_are_checked(pretrained, tmp_path):
    schema, _, _, (gmf_path, mlp_path) = pretrained
    sizes = {"gmf_dim": 4, "mlp_embedding_dim": 3, "mlp_hidden": [6, 4]}

    def build(gmf_checkpoint, mlp_checkpoint, schema=schema, **kwargs):
        return NeuMF(
            schema, **{**sizes, **kwargs}, gmf_checkpoint=gmf_checkpoint, mlp_checkpoint=mlp_checkpoint
        )

    with pytest.raises(
        ValueError,
        match=rf"{mlp_path} holds a recsys_lab.models.neumf.NCFMLP; expected a checkpoint "
        r"of recsys_lab.models.neumf.GMF, as written by `python train.py model=gmf`",
    ):
        build(mlp_path, gmf_path)
    with pytest.raises(
        ValueError,
        match=rf"{gmf_path} holds a recsys_lab.models.neumf.GMF; expected a checkpoint "
        r"of recsys_lab.models.neumf.NCFMLP, as written by `python train.py model=mlp`",
    ):
        build(gmf_path, gmf_path)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(
        ValueError, match=rf"{text} is not a readable checkpoint .*recsys_lab.models.neumf.GMF"
    ):
        build(str(text), mlp_path)
    with pytest.raises(ValueError, match=r"missing.ckpt: no such file; expected a checkpoint of .*GMF"):
        build(str(tmp_path / "missing.ckpt"), mlp_path)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"net.x": torch.zeros(1)}}, foreign)
    with pytest.raises(ValueError, match=rf"{foreign} was not written by recsys_lab's train.py"):
        build(gmf_path, str(foreign))
    with pytest.raises(ValueError, match=r"set gmf_dim to the pre-trained model's sizes"):
        build(gmf_path, mlp_path, gmf_dim=5)
    with pytest.raises(ValueError, match=r"set mlp_embedding_dim / mlp_hidden"):
        build(gmf_path, mlp_path, mlp_hidden=[6, 5])
    with pytest.raises(ValueError, match="both gmf_checkpoint and mlp_checkpoint"):
        build(gmf_path, None)
    with pytest.raises(ValueError, match="another feature layout"):
        build(gmf_path, mlp_path, schema=tiny_schema(num_items=18))


# ---- end to end through train.py's code path ---------------------------------------------------------------------

CF_MODELS = ["mf_bpr", "lightgcn", "ease", "gmf", "mlp", "neumf"]
CTR = {"gmf", "mlp", "neumf"}


@pytest.mark.parametrize("model", CF_MODELS)
def test_fast_dev_run(model, make_cfg, tmp_path):
    cfg = make_cfg([*model_overrides(model, tmp_path), "debug=fast_dev_run"])
    results = train(cfg)
    metrics = results["metrics"]
    if model in CTR:  # the simulator's log has real negatives: CTR models are scored on the impressions
        assert {"test/auc", "test/gauc", "test/logloss"} <= set(metrics)
        assert 0.0 <= metrics["test/auc"] <= 1.0
    else:
        assert {"test/recall@10", "test/ndcg@10", "test/hit@10", "test/mrr"} <= set(metrics)
        assert 0.0 <= metrics["test/recall@10"] <= metrics["test/recall@50"] <= 1.0


def test_neumf_pretraining_recipe(make_cfg, tmp_path):
    """The three runs of conf/model/neumf.yaml: GMF, MLP, then NeuMF from their best checkpoints."""
    one_epoch = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
    best = {}
    for part in ("gmf", "mlp"):
        cfg = make_cfg([*model_overrides(part, tmp_path), *one_epoch], run_dir=tmp_path / part)
        best[part] = train(cfg)["best_checkpoint"]
        assert Path(best[part]).is_file()
    cfg = make_cfg(
        [
            *model_overrides("neumf", tmp_path),
            "debug=fast_dev_run",
            f"model.net.gmf_checkpoint={best['gmf']}",
            f"model.net.mlp_checkpoint={best['mlp']}",
            "model.optimizer._target_=torch.optim.SGD",
        ],
        run_dir=tmp_path / "neumf",
    )
    assert "test/auc" in train(cfg)["metrics"]
    # the fused output layer started as the α-mix of the parts' output layers
    parts = {p: torch.load(best[p], map_location="cpu", weights_only=True)["state_dict"] for p in best}
    _, task = build(cfg)
    weight = torch.cat([0.5 * parts["gmf"]["net.output.weight"], 0.5 * parts["mlp"]["net.output.weight"]], 1)
    torch.testing.assert_close(task.net.output.weight, weight)
    torch.testing.assert_close(task.net.gmf.user.weight, parts["gmf"]["net.branch.user.weight"])


def test_ease_trains_validates_and_checkpoints_with_the_default_callbacks(make_cfg, tmp_path):
    cfg = make_cfg([*model_overrides("ease", tmp_path), "trainer.enable_progress_bar=false"])
    results = train(cfg)
    assert "best_val/ndcg@10" in results["metrics"]
    assert Path(results["best_checkpoint"]).is_file()
