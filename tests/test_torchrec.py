"""TorchRec tables (`data.torchrec_tables`, an optional extra): in one process they are nn.Embedding tables
held by an `EmbeddingCollection` (same init, same outputs, same training); under `trainer=torchrec_cpu` they are
sharded over 2 gloo processes and train as one process on the same global batch."""

from __future__ import annotations

import json
import sys
from functools import partial as _partial

import pytest
import torch

torchrec = pytest.importorskip("torchrec")

from recsys_lab.data.schema import Schema  # noqa: E402
from recsys_lab.models.din import DIN  # noqa: E402
from recsys_lab.modules.embeddings import FeatureEmbedding, TorchRecEmbedding, import_torchrec  # noqa: E402
from recsys_lab.utils.testing import random_batch, tiny_schema  # noqa: E402
from recsys_lab.utils.torchrec_strategy import TorchRecStrategy, _fused_optimizer  # noqa: E402
from tests.test_sweeps import FAST, assert_two_processes_equal_one  # noqa: E402

TABLES = ["item_id", "user_id"]


def test_torchrec_tables_look_up_as_nn_embedding_tables() -> None:
    plain_schema = tiny_schema()
    schema = plain_schema.with_torchrec(TABLES)
    torch.manual_seed(0)
    plain = FeatureEmbedding(plain_schema, embedding_dim=4)
    torch.manual_seed(0)
    trec = FeatureEmbedding(schema, embedding_dim=4)
    assert all(isinstance(trec.tables[name], TorchRecEmbedding) for name in TABLES)
    assert trec.table("hist_item_id") is trec.table("item_id")  # the history shares the TorchRec table
    assert not isinstance(trec.tables["cat"], TorchRecEmbedding)
    for name in TABLES:  # the same init from the same seed: nn.Embedding's N(0, 1), not TorchRec's uniform
        assert torch.equal(trec.table(name).weight, plain.table(name).weight)

    with torch.no_grad():  # and the same weights, whatever they are
        for name in plain.tables:
            plain.tables[name].weight.normal_(0, 3)
            trec.tables[name].weight.copy_(plain.tables[name].weight)
    batch = random_batch(schema, batch_size=5)
    outputs = {}
    for key, emb in (("plain", plain), ("trec", trec)):
        ids = emb.sparse(batch, ["user_id", "item_id", "cat"])  # (B, F, D): single ids
        history = emb.seq(batch, ["hist_item_id", "hist_cat"])  # (B, L, 2D): histories
        (ids.square().sum() + history.sum()).backward()
        outputs[key] = ids, history, [emb.table(n).weight.grad for n in TABLES]
    assert outputs["trec"][0].shape == (5, 3, 4) and outputs["trec"][1].shape == (5, 5, 8)
    assert torch.equal(outputs["trec"][0], outputs["plain"][0])
    assert torch.equal(outputs["trec"][1], outputs["plain"][1])
    for got, want in zip(outputs["trec"][2], outputs["plain"][2], strict=True):
        assert torch.equal(got, want)


def test_seeded_din_with_torchrec_tables_trains_as_with_nn_embedding_tables() -> None:
    """One Adam step of DIN: the same logits, loss and updated tables with either kind of table."""
    plain_schema = tiny_schema()
    results = {}
    for key, schema in (("plain", plain_schema), ("trec", plain_schema.with_torchrec(TABLES))):
        torch.manual_seed(0)
        net = DIN(schema, embedding_dim=4, attention_hidden=[8, 4], mlp_hidden=[8, 4])
        optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
        batch = random_batch(schema, batch_size=6)
        logits = net(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels["click"])
        loss.backward()
        optimizer.step()
        results[key] = logits.detach(), {n: net.embedding.table(n).weight.detach().clone() for n in TABLES}
    torch.testing.assert_close(results["trec"][0], results["plain"][0], rtol=0, atol=0)
    for name in TABLES:
        torch.testing.assert_close(results["trec"][1][name], results["plain"][1][name], rtol=0, atol=0)


def test_torchrec_option_keeps_other_schemas_and_refuses_compressed_features() -> None:
    schema = tiny_schema()
    marked = schema.with_torchrec(["item_id"])
    assert "torchrec_table" not in json.dumps(schema.to_dict())  # unchanged layout and fingerprint
    assert marked.fingerprint() != schema.fingerprint()
    assert Schema.from_dict(marked.to_dict())["item_id"].torchrec_table is True
    with pytest.raises(ValueError, match="data.torchrec_tables: 'hist_item_id' is not a sparse feature"):
        schema.with_torchrec(["hist_item_id"])
    with pytest.raises(
        ValueError, match="data.torchrec_tables.item_id=True: 'item_id' is in data.hash_buckets"
    ):
        schema.with_buckets({"item_id": 8}).with_torchrec(["item_id"])


def test_missing_torchrec_names_the_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchrec", None)  # import torchrec now raises ImportError
    with pytest.raises(ImportError, match="pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0"):
        import_torchrec()
    with pytest.raises(ImportError, match="data.torchrec_tables"):
        FeatureEmbedding(tiny_schema().with_torchrec(["item_id"]), embedding_dim=4)


def test_strategy_options_are_checked() -> None:
    with pytest.raises(ValueError, match="sharding_type='diagonal'"):
        TorchRecStrategy(sharding_type="diagonal")
    assert _fused_optimizer(_partial(torch.optim.SGD, lr=0.01)) == (torch.optim.SGD, {"lr": 0.01})
    assert _fused_optimizer(_partial(torch.optim.Adam, lr=0.01), "cuda") == (torch.optim.Adam, {"lr": 0.01})
    betas = _fused_optimizer(_partial(torch.optim.Adam, lr=0.01, betas=(0.8, 0.9)), "cuda")[1]
    assert betas == {"lr": 0.01, "beta1": 0.8, "beta2": 0.9}
    with pytest.raises(ValueError, match="AdamW has no fused TorchRec kernel on cuda"):
        _fused_optimizer(_partial(torch.optim.AdamW, lr=0.01), "cuda")
    with pytest.raises(ValueError, match="Adam has no fused TorchRec kernel on cpu"):  # FBGEMM's CPU kernels
        _fused_optimizer(_partial(torch.optim.Adam, lr=0.01))
    with pytest.raises(ValueError, match="takes no {'momentum': 0.9}"):
        _fused_optimizer(_partial(torch.optim.SGD, lr=0.01, momentum=0.9))


# (model, overrides). SGD trains the sharded tables (fused, in the backward pass) exactly as torch.optim.SGD
# trains whole ones, also when a step looks a table up several times (candidate and history); Adam would not
# (FBGEMM's fused Adam moves only the rows a batch looked up) and has no CPU kernel. DCN-V2 is a CTR model with
# continuous test metrics (AUC, log loss over every test impression); the two-tower also encodes the whole
# catalogue through the sharded item table at evaluation. Tables must be 4k wide for FBGEMM (DeepFM's 10 and 1 are refused).
SHARDED_EQUALS_ONE_PROCESS = [
    ("dcnv2", ["model.optimizer.lr=0.1"]),
    ("two_tower", ["model.optimizer.lr=0.5"]),
]


@pytest.mark.slow  # ~25 s for one process, ~70 s for two (each imports torchrec and fbgemm) per model
@pytest.mark.parametrize(
    ("model", "extra"), SHARDED_EQUALS_ONE_PROCESS, ids=[m for m, _ in SHARDED_EQUALS_ONE_PROCESS]
)
def test_sharded_tables_on_two_processes_equal_one_process(model, extra, tmp_path, data_dir):
    """trainer=torchrec_cpu (tables table-wise sharded over 2 gloo processes, data.batch_size=32) trains and
    tests as 1 process with 64 (tables unsharded): the same global batches as under trainer=ddp_cpu, rank 0's
    initial tables, the tables' gradients averaged over the processes, checkpoints with whole tables (the test
    stage reloads the best one)."""
    common = [
        f"model={model}",
        "seed=1",
        "model.net.dropout=0",
        "model.optimizer._target_=torch.optim.SGD",
        *extra,
        f"data.torchrec_tables=[{','.join(TABLES)}]",
        *FAST,
        "evaluation=accuracy",
    ]
    # float summation order only (measured: 0 for DCN-V2, < 1e-9 for the two-tower)
    assert_two_processes_equal_one(common, "trainer=torchrec_cpu", 1e-6, tmp_path, data_dir)
