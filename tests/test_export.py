"""Export (recsys_lab/serving/export.py, scripts/export.py): the exported query tower and ranker score like the
trained modules (ONNX Runtime and torch.export, within 1e-4) on the run's test rows, with other batch sizes,
history lengths and empty histories; LoRA is merged into the exported text tower; the item files and index
match the model; int8 stays within measured tolerances; bad input gives one clear error."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="export needs the serve extra (pip install -e '.[serve]')")
faiss = pytest.importorskip("faiss", reason="export needs the serve extra (pip install -e '.[serve]')")
onnx = pytest.importorskip("onnx", reason="export needs the serve extra (pip install -e '.[serve]')")

from recsys_lab.data.batch import Batch, Seq  # noqa: E402
from recsys_lab.serving.export import (  # noqa: E402
    PARITY_ATOL,
    Exported,
    export_run,
    index_recall,
    quantize_eager,
    read_inputs,
    sample_batch,
    servable,
)
from recsys_lab.serving.index import ItemIndex  # noqa: E402
from recsys_lab.serving.runs import load_run  # noqa: E402
from recsys_lab.utils.checks import ConfigError  # noqa: E402
from scripts.export import main  # noqa: E402
from tests.helpers import model_overrides  # noqa: E402


@pytest.fixture(scope="module")
def exported(served_runs, tmp_path_factory) -> dict:
    """The served runs exported once through scripts/export.py (ONNX, with int8): role -> (run, out folder)."""
    out = {}
    for role, run_dir in served_runs.items():
        folder = tmp_path_factory.mktemp(f"export_{role}")
        main([str(run_dir), "--out", str(folder), "--int8"])
        out[role] = (load_run(run_dir), folder)
    return out


def scores(run, batch: Batch, part: str) -> np.ndarray:
    with torch.no_grad():
        return (run.net.encode_query(batch) if part == "query_tower" else run.net(batch)).numpy()


def shorter_histories(batch: Batch, length: int) -> Batch:
    """The batch with every history cut to its first `length` positions (another L than the export's)."""
    seq = {
        name: Seq(
            s.ids[:, :length], s.lengths.clamp(max=length), None if s.times is None else s.times[:, :length]
        )
        for name, s in batch.seq.items()
    }
    return dataclasses.replace(batch, seq=seq)


def empty_histories(batch: Batch, rows: slice) -> Batch:
    """The batch with the histories of `rows` emptied (a new user): lengths 0, ids left as they are."""
    seq = {}
    for name, s in batch.seq.items():
        lengths = s.lengths.clone()
        lengths[rows] = 0
        seq[name] = Seq(s.ids, lengths, s.times)
    return dataclasses.replace(batch, seq=seq)


# ---- float parity -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("role, part", [("retrieval", "query_tower"), ("ranking", "ranker")])
def test_onnx_scores_equal_the_trained_module(exported, role, part):
    run, folder = exported[role]
    manifest = json.loads((folder / "manifest.json").read_text())
    graph = manifest["graph"]
    assert graph["part"] == part and graph["format"] == "onnx" and (folder / graph["file"]).is_file()
    assert graph["parity"]["max_abs_diff"] <= PARITY_ATOL and graph["parity"]["rows"] == 256
    assert manifest["run"]["model"].endswith("TwoTower" if role == "retrieval" else "DIN")
    assert {"torch", "onnx", "onnxruntime", "faiss"} <= set(manifest["versions"])
    inputs = {i["name"]: i for i in graph["inputs"]}
    assert inputs["seq.hist_item_id.ids"]["shape"] == ["B", "L"] and inputs["sparse.user_id"]["shape"] == [
        "B"
    ]
    assert inputs["sparse.user_id"]["dtype"] == "int64"

    model = Exported.from_dir(folder)
    batch = sample_batch(run, part, 100, seed=1)  # other rows than the export's
    for variant in (
        batch,
        batch.select(torch.arange(1)),
        shorter_histories(batch, 7),
        empty_histories(batch, slice(0, 50)),
    ):
        np.testing.assert_allclose(model(variant), scores(run, variant, part), rtol=0, atol=PARITY_ATOL)
    assert model(batch).shape == ((100, 64) if part == "query_tower" else (100,))


def test_the_graph_reads_only_what_the_model_reads(exported):
    run, folder = exported["retrieval"]
    names = [i["name"] for i in json.loads((folder / "manifest.json").read_text())["graph"]["inputs"]]
    # the query tower reads the user's features and history, not the context a ranking query carries
    assert "sparse.hour" not in names and "sparse.item_id" not in names
    assert names == read_inputs(run.net, "encode_query", sample_batch(run, "query_tower", 4))
    assert {"sparse.user_id", "seq.hist_item_id.ids", "seq.hist_item_id.lengths"} <= set(names)
    ranker = json.loads((exported["ranking"][1] / "manifest.json").read_text())["graph"]
    assert {"sparse.item_id", "sparse.hour", "dense.price"} <= {i["name"] for i in ranker["inputs"]}


@pytest.mark.parametrize("role", ["retrieval", "ranking"])
def test_torch_export_program_equals_the_trained_module(exported, role, tmp_path):
    run, _ = exported[role]
    manifest = export_run(run, tmp_path, fmt="torch_export", rows=64)
    graph = manifest["graph"]
    assert graph["file"].endswith(".pt2") and graph["parity"]["max_abs_diff"] <= PARITY_ATOL
    batch = sample_batch(run, graph["part"], 50, seed=2)
    model = Exported.from_dir(tmp_path)
    for variant in (batch, empty_histories(batch, slice(0, 10))):
        np.testing.assert_allclose(
            model(variant), scores(run, variant, graph["part"]), rtol=0, atol=PARITY_ATOL
        )


def test_item_files_match_the_model_and_the_index_finds_the_exact_neighbours(exported):
    import polars as pl

    run, folder = exported["retrieval"]
    vectors = np.load(folder / "item_encodings.npy")
    items = pl.read_parquet(folder / "items.parquet")
    codes = items["item_code"].to_numpy()
    assert vectors.shape == (run.store.num_item_codes - 1, 64) and codes.tolist() == list(
        range(1, len(codes) + 1)
    )
    with torch.no_grad():
        want = run.net.encode_item(run.store.items_batch(torch.as_tensor(codes))).numpy()
    np.testing.assert_allclose(vectors, want, rtol=0, atol=1e-6)
    prepared = run.datamodule.prepared().items
    raw = dict(zip(prepared["item_id_code"].to_list(), prepared["item_id"].to_list(), strict=True))
    assert items["item_id"].to_list() == [raw[c] for c in codes.tolist()]

    index = faiss.read_index(str(folder / "index.faiss"))
    queries = Exported.from_dir(folder)(sample_batch(run, "query_tower", 20, seed=3))
    rows = index.search(queries, 10)[1]
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    assert (rows == exact).mean() > 0.99  # ties aside, the same rows in the same order


# ---- LoRA ---------------------------------------------------------------------------------------------------
@pytest.mark.slow  # an export through the dynamo exporter (~2-3 s); CI runs it
def test_lora_is_merged_into_the_exported_text_tower(make_cfg, tmp_path):
    """A tiny-BERT text tower fine-tuned with LoRA (a large step size, so the adapter moves the scores): the export
    scores like the adapted model, not like the base encoder, and holds no adapter weight."""
    from recsys_lab.train import train

    overrides = [
        *model_overrides("two_tower_text", tmp_path),
        "model/finetune=lora",
        "model.net.finetune.dropout=0",
    ]
    overrides += ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "trainer.limit_val_batches=1"]
    train(make_cfg([*overrides, "model.optimizer.lr=0.05"]))
    run = load_run(tmp_path / "run")
    assert any("lora_" in name for name, _ in run.net.named_parameters())
    manifest = export_run(run, tmp_path / "export", rows=64)
    assert manifest["graph"]["parity"]["max_abs_diff"] <= PARITY_ATOL

    base = _without_lora(run.net)
    batch = sample_batch(run, "query_tower", 64, seed=1)
    adapted = scores(run, batch, "query_tower")
    exported = Exported.from_dir(tmp_path / "export")(batch)
    np.testing.assert_allclose(exported, adapted, rtol=0, atol=PARITY_ATOL)
    with torch.no_grad():
        base_scores = base.encode_query(batch).numpy()
    assert (
        np.abs(base_scores - adapted).max() > 10 * PARITY_ATOL
    )  # LoRA changed the function the export keeps

    codes = torch.arange(1, run.store.num_item_codes)
    with torch.no_grad():
        adapted_items = run.net.encode_item(run.store.items_batch(codes)).numpy()
        base_items = base.encode_item(run.store.items_batch(codes)).numpy()
    vectors = np.load(tmp_path / "export" / "item_encodings.npy")
    np.testing.assert_allclose(vectors, adapted_items, rtol=0, atol=PARITY_ATOL)
    assert np.abs(vectors - base_items).max() > 10 * PARITY_ATOL
    merged = servable(run.net)
    assert not any("lora_" in name for name, _ in merged.named_parameters())  # folded into the weights
    assert any("lora_" in name for name, _ in run.net.named_parameters())  # the run's own model is untouched


def _without_lora(net: torch.nn.Module) -> torch.nn.Module:
    """The base model: the same weights with every LoRA update B A set to zero."""
    import copy

    base = copy.deepcopy(net).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.zero_()  # in place: bumps the version, so the text tower's item cache is recomputed
    return base


# ---- int8 ---------------------------------------------------------------------------------------------------
# Measured on the served runs (2,000 test rows): the int8 query encodings (unit norm) move by at most 0.013
# (eager) / 0.007 (ONNX Runtime), cosine >= 0.9996, and keep 98% of the float top-10; DIN's click probabilities
# move by at most 0.027 / 0.010 (logits 0.36 / 0.17), Spearman >= 0.996 and the AUC by < 0.003. The bounds below
# leave about 3x margin.
@pytest.mark.parametrize("kind", ["eager", "onnxruntime"])
def test_int8_query_tower_stays_close_and_keeps_the_neighbours(exported, kind):
    run, folder = exported["retrieval"]
    batch = sample_batch(run, "query_tower", 500, seed=1)
    floats = scores(run, batch, "query_tower")
    if kind == "eager":
        with torch.no_grad():
            int8 = quantize_eager(servable(run.net)).encode_query(batch).numpy()
    else:
        int8 = Exported.from_dir(folder, int8=True)(batch)
    assert 1e-3 < np.abs(int8 - floats).max() < 0.04  # quantised (far above float rounding), and close
    cosine = (int8 * floats).sum(1) / np.linalg.norm(int8, axis=1) / np.linalg.norm(floats, axis=1)
    assert cosine.min() > 0.998
    items = np.load(folder / "item_encodings.npy")
    top_float = np.argsort(-(floats @ items.T), axis=1)[:, :10]
    top_int8 = np.argsort(-(int8 @ items.T), axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_float, top_int8, strict=True)])
    assert overlap > 0.93


@pytest.mark.parametrize("kind", ["eager", "onnxruntime"])
def test_int8_ranker_stays_close_and_keeps_the_ranking(exported, kind):
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    run, folder = exported["ranking"]
    batch = sample_batch(run, "ranker", 2000, seed=1)
    floats = scores(run, batch, "ranker")
    if kind == "eager":
        with torch.no_grad():
            int8 = quantize_eager(servable(run.net))(batch).numpy()
    else:
        int8 = Exported.from_dir(folder, int8=True)(batch)
    probability = torch.sigmoid(torch.as_tensor(int8)) - torch.sigmoid(torch.as_tensor(floats))
    assert 1e-3 < probability.abs().max() < 0.08  # quantised (far above float rounding), and close
    assert spearmanr(floats, int8).statistic > 0.985
    labels = batch.labels["click"].numpy()
    assert abs(roc_auc_score(labels, int8) - roc_auc_score(labels, floats)) < 0.01
    graph = json.loads((folder / "manifest.json").read_text())["graph"]
    assert 0.01 < graph["int8_change"]["max_abs_diff"] < 0.5  # the logit change recorded at export
    # int8 weights: the graph's matrix products run on integers, and the file is under half the float one
    ops = {node.op_type for node in onnx.load(str(folder / graph["int8_file"])).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    assert (folder / graph["int8_file"]).stat().st_size < 0.5 * (folder / graph["file"]).stat().st_size


@pytest.mark.parametrize("kind, floor", [("sq8", 0.97), ("ivfpq", 0.6)])
def test_compressed_indexes_recall_the_exact_top_k_of_the_item_encodings(exported, kind, floor):
    run, folder = exported["retrieval"]
    vectors = np.load(folder / "item_encodings.npy")
    queries = Exported.from_dir(folder)(sample_batch(run, "query_tower", 200, seed=4))
    # a catalogue of under 200 items: 4-bit PQ codes (16 centroids per sub-quantiser, trainable on it)
    index = ItemIndex(
        vectors, np.arange(1, len(vectors) + 1), kind=kind, nlist=16, nprobe=8, pq_m=16, pq_bits=4
    )
    assert index_recall(index, vectors, queries, 50) >= floor


# ---- errors -------------------------------------------------------------------------------------------------
def test_a_ranker_has_no_query_tower(exported, tmp_path):
    run, _ = exported["ranking"]
    with pytest.raises(ConfigError, match="--part query_tower: DIN has no encode_query / encode_item"):
        export_run(run, tmp_path, part="query_tower")
    with pytest.raises(ConfigError, match="--int8 writes ONNX Runtime's int8 graph: use --format onnx"):
        export_run(run, tmp_path, fmt="torch_export", int8=True)
    manifest = json.loads((exported["ranking"][1] / "manifest.json").read_text())
    manifest["graph"]["int8_file"] = None  # what an export without --int8 writes
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="no int8 graph"):
        Exported.from_dir(tmp_path, int8=True)


def test_the_script_turns_a_bad_path_into_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"scripts/export.py: error: run .*nope: no such run directory"):
        main([str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="not a folder written by scripts/export.py"):
        Exported.from_dir(tmp_path)


@pytest.mark.slow  # four variants of each served run, timed and evaluated: ~10 s
def test_benchmark_prints_the_tables_with_the_runs_own_float_metrics(served_runs, capsys):
    from scripts.benchmark_export import main as benchmark

    argv = ["--ranking-run", str(served_runs["ranking"]), "--retrieval-run", str(served_runs["retrieval"])]
    report = benchmark([*argv, "--repeats", "3", "--warmup", "1", "--synthetic-items", "2000"])
    assert (
        report.splitlines()[0]
        == f"`python scripts/benchmark_export.py {' '.join(argv)} --repeats 3 --warmup 1 --synthetic-items 2000`"
    )
    results = {
        role: json.loads((served_runs[role] / "results.json").read_text())["metrics"] for role in served_runs
    }
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in report.splitlines()
        if line.startswith("| ")
    }
    # the float rows reproduce the runs' own test metrics: the same evaluation, the same model
    assert float(report.split("| eager float | ")[1].split(" |")[0]) == pytest.approx(
        results["ranking"]["test/auc"], abs=1e-4
    )
    assert float(report.split("| eager float | ")[2].split(" |")[0]) == pytest.approx(
        results["retrieval"]["test/recall@50"], abs=1e-4
    )
    for variant in ("eager int8", "ONNX Runtime float", "ONNX Runtime int8", "flat", "sq8"):
        assert variant in rows
    assert float(rows["flat"][2]) == 1.0  # the exact index recalls itself
    assert capsys.readouterr().out.strip() == report
