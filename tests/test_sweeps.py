"""Multirun: a grid over models x seeds and an Optuna sweep complete through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest
import yaml

from tests.helpers import REPO, SMALL_DATA

FAST = [*SMALL_DATA, "logger=none", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]


def run_cli(
    args: list[str], tmp_path, data_dir, launcher: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """train.py with `args` in a fresh interpreter (under `launcher`, e.g. torchrun's arguments, if given)."""
    env = {**os.environ, "RECSYS_LAB_DATA": str(data_dir), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, *launcher, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_grid_multirun_models_by_seeds(tmp_path, data_dir):
    run_cli(["-m", "model=din,two_tower", "seed=1,2", *FAST], tmp_path, data_dir)
    results = [
        json.loads(p.read_text()) for p in (tmp_path / "logs").glob("train/multiruns/*/*/results.json")
    ]
    assert sorted((r["model"].rsplit(".", 1)[1], r["seed"]) for r in results) == [
        ("DIN", 1),
        ("DIN", 2),
        ("TwoTower", 1),
        ("TwoTower", 2),
    ]
    for r in results:
        key = "test/auc" if r["model"].endswith("DIN") else "test/recall@50"
        assert 0.0 < r["metrics"][key] <= 1.0


SWEEPS = {
    "din_optuna": ("val/auc", {"model.optimizer.lr", "model.net.embedding_dim", "model.net.dropout"}),
    "two_tower_optuna": (
        "val/recall@50",
        {"model.optimizer.lr", "model.loss.temperature", "model.net.output_dim"},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("search", list(SWEEPS))
def test_optuna_sweep_two_trials(search, tmp_path, data_dir):
    metric, params = SWEEPS[search]
    run_cli(["-m", f"hparams_search={search}", "hydra.sweeper.n_trials=2", *FAST], tmp_path, data_dir)
    sweeps = list((tmp_path / "logs").glob("train/multiruns/*"))
    assert len(sweeps) == 1
    trials = list(sweeps[0].glob("*/results.json"))
    assert len(trials) == 2
    best = yaml.safe_load((sweeps[0] / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == params
    # Optuna maximised the best validation value each trial returned
    returned = [json.loads(t.read_text())["metrics"][f"best_{metric}"] for t in trials]
    assert best["best_value"] == pytest.approx(max(returned))


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path, data_dir):
    run_cli(["trainer=ddp_cpu", *FAST], tmp_path, data_dir)
    (results,) = list((tmp_path / "logs").glob("train/runs/*/results.json"))
    r = json.loads(results.read_text())
    # both ranks trained and evaluated; rank 0 alone wrote the (synced) results
    assert {"test/auc", "test/gauc", "test/oracle_auc", "test/popularity_auc"} <= set(r["metrics"])
    # the test analysis under DDP: every impression once in the per-user file, calibration and slices reduced
    frame = pl.read_parquet(results.parent / "per_query.parquet")
    assert frame["impressions"].sum() == r["protocol"]["test_rows_used"]
    assert 0 <= r["metrics"]["test/ece"] < 1 and "test/slice/item_popularity/head/auc" in r["metrics"]
    assert r["metrics"]["test/oracle_auc"] > r["metrics"]["test/popularity_auc"]
    assert r["protocol"]["leakage_audit"]["status"] == "passed"
    # what DDP changes is printed with the results: two processes, twice the rows per optimizer step
    training = r["training"]
    assert training["world_size"] == 2 and training["global_batch"] == 2 * training["batch_size_per_process"]
    steps = -(-training["train_examples"] // training["global_batch"])  # ceil
    assert training["optimizer_steps_per_epoch"] == steps


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lightgcn", "sasrec"])
def test_ddp_trains_graph_and_sequence_models(model, tmp_path, data_dir):
    # LightGCN's graph is a sparse matrix, which DDP's start-up broadcast of buffers cannot take; sequence
    # models train on the SequenceView's per-user rows, sharded by the distributed sampler
    run_cli(["trainer=ddp_cpu", f"model={model}", *FAST], tmp_path, data_dir)
    (results,) = list((tmp_path / "logs").glob("train/runs/*/results.json"))
    r = json.loads(results.read_text())
    assert r["training"]["world_size"] == 2
    assert 0 < r["metrics"]["test/ndcg@10"] <= 1
    # the test analysis under DDP: records all-gathered, one row per test query (padding repeats dropped)
    frame = pl.read_parquet(results.parent / "per_query.parquet")
    assert frame.height == frame["query_key"].n_unique() == r["protocol"]["test_queries_used"]
    assert (
        any(k.startswith("test/slice/user_history/") for k in r["metrics"])
        and "test/coverage@10" in r["metrics"]
    )


# (model, extra overrides, tolerance on every test metric). The two-tower is exact: the same global batches
# and negatives gathered from both processes (cross_rank_negatives). SASRec differs by float summation order
# only. DIN's Dice activation normalises with each process's own batch statistics (BatchNorm without
# synchronisation: trainer.sync_batchnorm needs GPUs), so half batches move it slightly.
DDP_EQUALS_ONE_PROCESS = [
    ("two_tower", [], 1e-6),
    ("sasrec", ["model.net.dropout=0"], 1e-3),
    ("din", ["model.net.dropout=0"], 5e-3),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "extra", "tolerance"), DDP_EQUALS_ONE_PROCESS, ids=[m for m, *_ in DDP_EQUALS_ONE_PROCESS]
)
def test_two_processes_equal_one_on_the_same_global_batch(model, extra, tolerance, tmp_path, data_dir):
    """2 gloo processes with data.batch_size=32 train and test as 1 process with 64: the same global batches
    (the DataModule shards them), the same first-epoch order, no repeated evaluation rows."""
    common = [f"model={model}", *extra, *FAST, "evaluation=accuracy"]
    assert_two_processes_equal_one(common, "trainer=ddp_cpu", tolerance, tmp_path, data_dir)


def assert_two_processes_equal_one(
    common: list[str], trainer: str, tolerance: float, tmp_path, data_dir
) -> None:
    """Runs `common` as 1 process with data.batch_size=64 and as 2 processes of `trainer` with 32 (the same
    global batch), and checks every test metric agrees within `tolerance`, with as many optimizer steps."""
    results = {}
    for name, args in (("one", ["data.batch_size=64"]), ("two", ["data.batch_size=32", trainer])):
        run_cli([*common, *args, f"hydra.run.dir={tmp_path / name}"], tmp_path, data_dir)
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    one, two = results["one"]["metrics"], results["two"]["metrics"]
    assert set(one) == set(two) and results["two"]["training"]["world_size"] == 2
    assert (
        results["two"]["training"]["optimizer_steps_per_epoch"]
        == results["one"]["training"]["optimizer_steps_per_epoch"]
    )
    for key, value in one.items():
        assert two[key] == pytest.approx(value, abs=tolerance), key


@pytest.mark.slow
def test_torchrun_and_multirun_launches_equal_one_process(tmp_path, data_dir):
    """The supported launches of a 2-process run give the single-process result (two-tower, exact): torchrun
    starting both processes (Lightning sees its environment and launches nothing), and a Hydra multirun of
    `trainer=ddp_cpu` jobs (Lightning re-launches each job's second process with that job's overrides)."""
    common = ["model=two_tower", "seed=1", *FAST, "evaluation=accuracy"]
    run_cli([*common, "data.batch_size=64", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path, data_dir)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    # every process must write into the same run directory: a fixed hydra.run.dir, not a timestamp each
    args = [*common, "data.batch_size=32", "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'torchrun'}"]
    run_cli(args, tmp_path, data_dir, launcher=torchrun)
    multirun = [
        "-m",
        *[a if a != "seed=1" else "seed=1,2" for a in common],
        "data.batch_size=32",
        "trainer=ddp_cpu",
    ]
    run_cli([*multirun, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, data_dir)
    one = json.loads((tmp_path / "one" / "results.json").read_text())["metrics"]
    for launched in (tmp_path / "torchrun", tmp_path / "sweep" / "0"):
        results = json.loads((launched / "results.json").read_text())
        assert results["training"]["world_size"] == 2 and results["seed"] == 1
        for key, value in one.items():
            assert results["metrics"][key] == pytest.approx(value, abs=1e-6), (launched.name, key)
    assert json.loads((tmp_path / "sweep" / "1" / "results.json").read_text())["seed"] == 2
