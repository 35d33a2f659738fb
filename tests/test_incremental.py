"""Training that keeps up with new data: the time-window split, vocabularies that grow and keep old codes, the
warm start that keeps old embedding rows in place, and a tiny window 0 -> window 1 update end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import pytorch_lightning as pl_lightning
import torch
from torch import nn

from recsys_lab.data.datamodule import prepared_folder
from recsys_lab.data.splits import HISTORY, TEST, TRAIN, UNUSED, VAL, WindowSplit
from recsys_lab.data.vocab import UNKNOWN, encode, extend_vocab
from recsys_lab.train import build, train
from recsys_lab.utils.warm_start import WarmStartError, init_from, warm_start
from tests.helpers import SMALL_DATA, model_overrides

H, T, V, S, U = HISTORY, TRAIN, VAL, TEST, UNUSED  # short names for the literal expectations


# --- the window split -----------------------------------------------------------------------------------------
def test_window_split_assigns_rows_as_documented():
    # timestamps 0..39 shuffled: span 40, 4 windows of 10 seconds starting at 0, 10, 20, 30
    ts = np.random.default_rng(0).permutation(40)
    inter = pl.DataFrame({"user_id": np.zeros(40, int), "timestamp": ts})
    split = WindowSplit(windows=4, window=1, train="window", val_fraction=0.2)
    codes = split.assign(inter)
    assert split.edges_ == [0, 10, 20, 30, 40]
    # window 1 = 10..19; np.quantile (linear) of 10..19 at 0.8: 10 + 9 * 0.8 = 17.2 -> ceil 18 starts validation
    assert split.cutoffs_ == (18, 20)
    by_time = np.empty(40, dtype=np.int8)
    by_time[ts] = codes  # the code of timestamp t, whatever row it was in
    assert by_time.tolist() == [H] * 10 + [T] * 8 + [V] * 2 + [S] * 10 + [U] * 10

    everything = WindowSplit(windows=4, window=1, train="all", val_fraction=0.2).assign(inter)
    by_time[ts] = everything
    assert by_time.tolist() == [T] * 18 + [V] * 2 + [S] * 10 + [U] * 10


def test_window_split_uneven_span_and_errors():
    # span 7..16 (10 seconds) in 3 windows: starts 7 + ceil(k * 10 / 3) = 7, 11, 14 and the end 17
    inter = pl.DataFrame({"timestamp": [7, 10, 11, 13, 14, 16]})
    split = WindowSplit(windows=3, window=0, val_fraction=0.5)
    assert split.assign(inter).tolist() == [T, V, S, S, U, U]  # window 0 = {7, 10}: the later half validates
    assert split.edges_ == [7, 11, 14, 17]
    with pytest.raises(ValueError, match=r"data\.window .*0\.\.2"):
        WindowSplit(windows=4, window=3)  # window 3 would have no test window
    with pytest.raises(ValueError, match="data.split.train='last'"):
        WindowSplit(train="last")


# --- growing vocabularies -------------------------------------------------------------------------------------
def test_extended_vocabulary_keeps_old_codes_and_appends_new_ids():
    previous = pl.Series(
        ["b", "a", "d"]
    )  # code order: b = 1, a = 2, d = 3 (not sorted: codes are kept, not refit)
    train_values = pl.Series(["e", "a", None, "c", "e"])  # a is known; c and e are new
    vocab = extend_vocab(previous, train_values)
    assert dict(vocab.iter_rows()) == {"b": 1, "a": 2, "d": 3, "c": 4, "e": 5}  # new ones after, sorted
    assert encode(pl.Series(["a", "c", "zz", "d", None]), vocab).tolist() == [2, 4, UNKNOWN, 3, UNKNOWN]

    frozen = extend_vocab(previous, train_values, grow=False)  # the never-updated model's view
    assert dict(frozen.iter_rows()) == {"b": 1, "a": 2, "d": 3}
    assert encode(pl.Series(["e", "d"]), frozen).tolist() == [UNKNOWN, 3]
    ids = extend_vocab(pl.Series([30, 10]), pl.Series([20, 10, 40]))  # integer ids work alike
    assert dict(ids.iter_rows()) == {30: 1, 10: 2, 20: 3, 40: 4}


# --- warm start -----------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self, n_ids: int, hidden: int = 3, bias_rows: int = 2) -> None:
        super().__init__()
        self.ids = nn.Embedding(n_ids, 4)
        self.head = nn.Linear(4, hidden)
        self.bias = nn.Parameter(torch.randn(bias_rows))  # not an embedding table: it may not grow


def test_warm_start_copies_old_rows_in_place_and_keeps_new_rows():
    torch.manual_seed(0)
    old, new = Tiny(5), Tiny(8)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    report = warm_start(new, old.state_dict())
    assert torch.equal(new.ids.weight[:5], old.ids.weight)  # old ids: their rows, at the same indices
    assert torch.equal(new.ids.weight[5:], fresh["ids.weight"][5:])  # new ids: as initialised
    for key in ("head.weight", "head.bias", "bias"):  # same shapes: copied
        assert torch.equal(new.state_dict()[key], old.state_dict()[key])
    assert report["grown"] == ["ids.weight: 5 -> 8 rows"]
    assert sorted(report["copied"]) == ["bias", "head.bias", "head.weight"]


@pytest.mark.parametrize(
    ("earlier", "message"),
    [
        (Tiny(5, hidden=2), r"tensor 'head\.weight' has shape \(2, 4\) in the earlier model and \(3, 4\)"),
        (Tiny(9), r"embedding table 'ids\.weight' has shape \(9, 4\) in the earlier model and \(8, 4\)"),
        (Tiny(5, bias_rows=1), r"tensor 'bias' has shape \(1,\) in the earlier model and \(2,\)"),
    ],
    ids=["another layer width", "a table that shrank", "a grown tensor that is no table"],
)
def test_warm_start_refuses_a_real_mismatch_and_changes_nothing(earlier, message):
    model = Tiny(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WarmStartError, match=message):
        warm_start(model, earlier.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_warm_start_refuses_another_architecture():
    with pytest.raises(WarmStartError, match=r"only in the new model \['head\.bias'"):
        warm_start(Tiny(8), {k: v for k, v in Tiny(8).state_dict().items() if k != "head.bias"})


# --- end to end: window 0, then the incremental update on window 1 --------------------------------------------
def _codes(datamodule, side: str) -> dict:
    """raw id -> code of every id with a code (> 0) in a set-up datamodule."""
    table = getattr(datamodule.prepared(), f"{side}s")
    known = table.filter(pl.col(f"{side}_id_code") > 0)
    return dict(zip(known[f"{side}_id"].to_list(), known[f"{side}_id_code"].to_list(), strict=True))


def test_incremental_update_adds_new_ids_and_keeps_old_rows(make_cfg, tmp_path):
    base = [
        *model_overrides("din", tmp_path),
        "protocol=window",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    ]
    first = train(make_cfg([*base, "data.window=0"], run_dir=tmp_path / "w0"))
    assert first["protocol"]["split"] == "window" and first["protocol"]["window"] == 0
    assert first["protocol"]["leakage_audit"]["status"] == "passed"
    earlier = torch.load(first["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    old_dm, _ = build(make_cfg([*base, "data.window=0"], run_dir=tmp_path / "w0"))
    assert prepared_folder(tmp_path / "w0") == old_dm.cache_path  # a run directory names its prepared data

    update = [*base, "data.window=1", f"data.vocab_from={tmp_path / 'w0'}", f"init_from={tmp_path / 'w0'}"]
    cfg = make_cfg(update, run_dir=tmp_path / "w1")
    pl_lightning.seed_everything(cfg.seed)
    dm, fresh = build(cfg)
    assert dm.audit_report["status"] == "passed"  # inherited ids without a window-1 interaction are allowed
    assert dm.counts["history_only_rows"] > 0 and dm.counts["unused_rows_after_test"] > 0
    pl_lightning.seed_everything(cfg.seed)
    _, task = build(cfg)
    init_from(task, tmp_path / "w0")

    for side in ("user", "item"):
        old_codes, new_codes = _codes(old_dm, side), _codes(dm, side)
        n_old = len(old_codes) + 1
        assert {i: new_codes[i] for i in old_codes} == old_codes  # every old id keeps its code
        added = sorted(c for i, c in new_codes.items() if i not in old_codes)
        assert added and added == list(range(n_old, len(new_codes) + 1))  # new ids appended after them
        key = f"net.embedding.tables.{side}_id.weight"
        table, initial = task.state_dict()[key], fresh.state_dict()[key]
        assert table.shape[0] == len(new_codes) + 1 > earlier[key].shape[0] == n_old
        assert torch.equal(table[:n_old], earlier[key])  # old rows in place, before any training
        assert torch.equal(table[n_old:], initial[n_old:])  # new rows as initialised
    old_meta, meta = old_dm.prepared().meta, dm.prepared().meta
    for col, values in old_meta.vocabularies.items():  # categorical columns too: old values keep their codes
        assert meta.vocabularies[col][: len(values)] == values, col
    assert meta.normalisers["price"] == old_meta.normalisers["price"]  # inputs keep the scale learned on
    head = "net.mlp.layers.0.weight"
    assert torch.equal(task.state_dict()[head], earlier[head])  # same-shaped weights copied

    second = train(cfg)  # and the update trains and tests, printing the protocol and the warm start
    assert second["protocol"]["window"] == 1 and second["protocol"]["vocab_from"]["extend"] is True
    assert second["training"]["warm_start"]["copied"] > 0 and second["training"]["warm_start"]["grown"]

    # never updated: the window-0 model on window 1's data, its vocabularies frozen (new ids read code 0)
    frozen = make_cfg([*update, "data.vocab_extend=false", "train=false"], run_dir=tmp_path / "never")
    frozen_dm, never = build(frozen)
    assert frozen_dm.protocol_fingerprint() not in (dm.protocol_fingerprint(), old_dm.protocol_fingerprint())
    assert init_from(never, tmp_path / "w0")["grown"] == []  # every shape equal: the earlier model, exactly
    assert all(torch.equal(v, earlier[k]) for k, v in never.state_dict().items())
    assert _codes(frozen_dm, "user") == _codes(old_dm, "user")


def test_incremental_script_reports_every_model_per_window(tmp_path, data_dir):
    from scripts.incremental import main

    out = tmp_path / "incremental"
    argv = ["--windows", "3", "--out", str(out), *SMALL_DATA, f"paths.data_dir={data_dir}"]
    report = main([*argv, "trainer.max_epochs=1", "trainer.enable_progress_bar=false"])
    rows = report["rows"]
    assert [r["window"] for r in rows] == [0, 1]
    assert rows[0]["incremental"] == rows[0]["never"] == rows[0]["scratch"]  # window 0: one model
    update, never = rows[1]["incremental"], rows[1]["never"]
    assert update["warm_start"]["grown"] and never["warm_start"]["grown"] == []
    assert never["train_seconds"] == 0 and never["epochs"] == 0  # evaluated as it was, not trained
    assert {r[k]["metric"] for r in rows for k in ("scratch", "incremental", "never")} == {"test/auc"}
    assert rows[1]["scratch"]["test_rows"] == update["test_rows"] == never["test_rows"]  # the same test rows
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"].startswith("python scripts/incremental.py --windows 3")
    assert (out / "incremental.svg").is_file() or (out / "incremental.png").is_file()


# ---- hashed ids: a table that never grows ---------------------------------------------------------------------
def test_hashed_embedding_rows_on_a_hand_example():
    from recsys_lab.modules.embeddings import HashedEmbedding

    table = HashedEmbedding(10, 4)
    # row = 1 + (id * 2654435761 mod 2^31) mod 9; id 0 stays row 0
    assert table.rows(torch.tensor([0, 1, 2, 3, 1000])).tolist() == [0, 6, 2, 7, 2]
    assert torch.equal(table(torch.tensor([[1, 0]])), table.weight[[6, 0]].unsqueeze(0))
    with pytest.raises(ValueError, match="buckets=1"):
        HashedEmbedding(1, 4)


def test_hash_buckets_config_hashes_feature_embedding_tables(make_cfg):
    """data.hash_buckets: DIN's user and item tables become fixed hashed tables (the history shares the item
    one); the unhashed schema keeps its fingerprint; a model with its own id tables is refused by name."""
    from recsys_lab.modules.embeddings import HashedEmbedding
    from recsys_lab.train import build
    from tests.helpers import model_overrides

    cfg = make_cfg([*model_overrides("din", Path(".")), "data.hash_buckets={user_id: 64, item_id: 128}"])
    datamodule, task = build(cfg)
    tables = task.net.embedding.tables
    assert isinstance(tables["user_id"], HashedEmbedding) and tables["user_id"].weight.shape[0] == 64
    assert isinstance(tables["item_id"], HashedEmbedding) and tables["item_id"].weight.shape[0] == 128
    assert task.net.embedding.table("hist_item_id") is tables["item_id"]
    plain = datamodule.store.schema()
    assert "buckets" not in plain.to_dict()["features"][0]  # unhashed layouts fingerprint as before
    assert datamodule.schema.fingerprint() != plain.fingerprint()
    with pytest.raises(ValueError, match="'price' is not a sparse feature"):
        plain.with_buckets({"price": 8})
    with pytest.raises(ValueError, match="SASRec builds its own id tables for \\['item_id'\\]"):
        build(make_cfg([*model_overrides("sasrec", Path(".")), "data.hash_buckets={item_id: 128}"]))


# ---- quotient-remainder embeddings: every id distinct in ~2 sqrt(V) rows ---------------------------------------
def test_qr_embedding_on_a_hand_example():
    from recsys_lab.modules.embeddings import QREmbedding

    table = QREmbedding(vocab_size=10, collisions=4, embedding_dim=3)
    assert table.quotient.weight.shape == (3, 3) and table.remainder.weight.shape == (
        4,
        3,
    )  # ceil(10/4) + 4 rows
    ids = torch.tensor([[0, 5], [9, 7]])
    # id 9 = 2 * 4 + 1: quotient row 2 times remainder row 1
    expected = table.quotient.weight[ids // 4] * table.remainder.weight[ids % 4]
    assert torch.equal(table(ids), expected)
    assert torch.equal(table(torch.tensor([9]))[0], table.quotient.weight[2] * table.remainder.weight[1])
    assert table.weight.shape == (10, 3)
    # complementary partitions: no two ids share both rows, so every id has its own vector
    pairs = {(i // 4, i % 4) for i in range(10)}
    assert len(pairs) == 10 and len(torch.unique(table.weight, dim=0)) == 10
    with pytest.raises(ValueError, match="collisions=10"):
        QREmbedding(10, 10, 3)


def test_qr_embeddings_config_builds_compositional_tables(make_cfg):
    from recsys_lab.modules.embeddings import QREmbedding
    from recsys_lab.train import build
    from tests.helpers import model_overrides

    cfg = make_cfg([*model_overrides("din", Path(".")), "data.qr_embeddings={item_id: 16}"])
    datamodule, task = build(cfg)
    table = task.net.embedding.tables["item_id"]
    V = datamodule.schema["item_id"].vocab_size
    assert isinstance(table, QREmbedding) and table.quotient.weight.shape[0] == -(-V // 16)
    assert task.net.embedding.table("hist_item_id") is table
    assert sum(p.numel() for p in table.parameters()) < V * table.quotient.weight.shape[1]
    plain = datamodule.store.schema()
    assert "qr_collisions" not in plain.to_dict()["features"][0]
    with pytest.raises(ValueError, match="data.qr_embeddings.item_id=1"):
        plain.with_qr({"item_id": 1})
    with pytest.raises(ValueError, match="in data.hash_buckets too"):
        plain.with_buckets({"item_id": 8}).with_qr({"item_id": 8})
    with pytest.raises(ValueError, match="SASRec builds its own id tables for \\['item_id'\\]"):
        build(make_cfg([*model_overrides("sasrec", Path(".")), "data.qr_embeddings={item_id: 16}"]))
