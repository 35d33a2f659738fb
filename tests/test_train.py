"""End-to-end: every model config trains through train.py's code path; checkpoints resume and re-evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from recsys_lab.tasks.base import CheckpointMismatchError
from recsys_lab.train import CONFIG_DIR, train
from recsys_lab.utils.checks import ConfigError
from tests.helpers import REPO, SMALL_DATA, model_overrides

MODELS = [
    "din",
    "dien",
    "bst",
    "deepfm",
    "dcnv2",
    "shared_bottom",
    "mmoe",
    "ple",
    "esmm",
    "two_tower",
    "two_tower_text",
    "bert_cross_encoder",
    "llm_ranker",
    "popularity",
    "popularity_retrieval",
    "gru4rec",
    "sasrec",
    "bert4rec",
    "hstu",
    "mf_bpr",
    "gmf",
    "mlp",
    "neumf",
    "lightgcn",
    "ease",
]
CTR_MODELS = {
    "din",
    "dien",
    "bst",
    "deepfm",
    "dcnv2",
    "bert_cross_encoder",
    "llm_ranker",
    "popularity",
    "gmf",
    "mlp",
    "neumf",
}
# scored on impressions like the CTR models, with the same metrics per label as well (`test/<label>/auc`)
MULTITASK_MODELS = {"shared_bottom", "mmoe", "ple", "esmm"}
CTR_KEYS = {f"test/{k}" for k in ("auc", "gauc", "logloss", "oracle_auc", "popularity_auc")}
PER_LABEL_KEYS = {f"test/{t}/{k}" for t in ("click", "purchase") for k in ("auc", "gauc", "logloss")}


def test_every_model_config_is_covered():
    configs = {p.stem for p in (REPO / "conf" / "model").glob("*.yaml")}
    assert configs == set(MODELS), "add the new model config to MODELS (and the contract test)"


@pytest.mark.parametrize("model", MODELS)
def test_fast_dev_run(model, make_cfg, tmp_path):
    cfg = make_cfg([*model_overrides(model, tmp_path), "debug=fast_dev_run"])
    results = train(cfg)
    metrics = results["metrics"]
    # the test analysis (evaluation=default) adds its sets; their own tests are in test_analysis.py
    analysis = {k for k in metrics if k.startswith(("test/slice/", "test/gap/"))}
    if model in CTR_MODELS | MULTITASK_MODELS:
        expected = CTR_KEYS | PER_LABEL_KEYS if model in MULTITASK_MODELS else CTR_KEYS
        assert set(metrics) - analysis == expected | {"test/ece"}
        assert "test/slice/item_popularity/head/auc" in analysis
        # the reference scorers are computed on the whole test split: the truth beats popularity there
        assert metrics["test/oracle_auc"] > metrics["test/popularity_auc"] + 0.05
        assert metrics["test/logloss"] > 0
    else:
        ranking = {
            f"test/{m}@{k}" for m in ("recall", "ndcg", "hit", "precision", "mrr") for k in (10, 20, 50)
        } | {"test/mrr"}
        beyond = {
            f"test/{m}@{k}" for m in ("coverage", "gini", "popularity", "novelty") for k in (10, 20, 50)
        }
        assert ranking | beyond <= set(metrics) - analysis
        assert "test/slice/user_history/0-5/recall@10" in analysis
        assert metrics["test/recall@10"] <= metrics["test/recall@20"] <= metrics["test/recall@50"]
        assert metrics["test/hit@10"] <= metrics["test/hit@20"] <= metrics["test/hit@50"]
        assert metrics["test/recall@50"] <= metrics["test/hit@50"]  # a hit needs only one of the targets
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert saved["metrics"] == pytest.approx(metrics, nan_ok=True)  # a one-class slice has no AUC
    assert saved["protocol"]["split"] == "temporal" and saved["protocol"]["n_users"] == 300
    assert saved["data_fingerprint"] == results["data_fingerprint"] and len(saved["data_fingerprint"]) == 16


def test_overfit_batches_drives_loss_down(make_cfg, tmp_path):
    cfg = make_cfg(
        [
            *model_overrides("din", tmp_path),
            "debug=overfit",
            "logger=csv",
            "trainer.log_every_n_steps=1",
            "trainer.max_epochs=40",
            "model.net.dropout=0.0",
            "model.optimizer.lr=0.01",
        ]
    )
    train(cfg)
    log = pl.read_csv(next(Path(cfg.paths.output_dir).glob("csv/version_*/metrics.csv")))
    loss = log["train/loss"].drop_nulls().to_numpy()
    assert len(loss) >= 40
    assert loss[-4:].mean() < 0.25 * loss[:4].mean()


def test_training_values_are_logged_when_the_logger_writes_and_at_each_epoch_end(monkeypatch):
    # self.log costs about as much as an MF-BPR step: tasks log at the logger's cadence, plus the epoch's last
    # batch so that every epoch has a value
    from types import SimpleNamespace

    from recsys_lab.models.mf_bpr import MFBPR
    from recsys_lab.tasks.pairwise import PairwiseTask
    from recsys_lab.utils.testing import tiny_schema

    task = PairwiseTask(MFBPR(tiny_schema(), embedding_dim=4), tiny_schema(), optimizer=None)
    task._trainer = SimpleNamespace(log_every_n_steps=3, num_training_batches=7)
    logged = []
    monkeypatch.setattr(task, "log", lambda name, value, **kw: logged.append((batch, name, kw["prog_bar"])))
    for batch in range(7):
        task.log_training({"train/loss": torch.tensor(1.0), "train/other": torch.tensor(2.0)}, batch, 8)
    assert logged == [(b, n, n == "train/loss") for b in (2, 5, 6) for n in ("train/loss", "train/other")]


def test_checkpoint_resume_evaluate_and_mismatch(make_cfg, tmp_path):
    base = [*model_overrides("din", tmp_path), "callbacks.early_stopping=null"]
    first = make_cfg([*base, "trainer.max_epochs=1"], run_dir=tmp_path / "first")
    r1 = train(first)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    ck1 = torch.load(last, map_location="cpu", weights_only=True)
    steps = ck1["global_step"]
    assert ck1["epoch"] == 0 and steps > 0
    assert ck1["recsys_lab_model"]["net"] == "recsys_lab.models.din.DIN"
    assert ck1["recsys_lab_run"]["config"]["model"]["net"]["_target_"] == "recsys_lab.models.din.DIN"

    # resume: the epoch counter and Adam's state continue instead of starting over
    second = make_cfg([*base, "trainer.max_epochs=2", f"ckpt_path={last}"], run_dir=tmp_path / "second")
    train(second)
    ck2 = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck2["epoch"] == 1
    assert ck2["global_step"] == 2 * steps
    adam_steps = {float(s["step"]) for s in ck2["optimizer_states"][0]["state"].values()}
    assert adam_steps == {2.0 * steps}

    # re-evaluation from the checkpoint alone reproduces the run's test metrics
    from scripts.evaluate import evaluate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        eval_cfg = compose(
            "eval", overrides=[f"ckpt_path={r1['best_checkpoint']}", "+evaluation.slice_columns=[gender]"]
        )
    with open_dict(eval_cfg):
        eval_cfg.paths = {"output_dir": str(tmp_path / "eval")}
    evaluated = evaluate(eval_cfg)
    assert evaluated["metrics"]["test/auc"] == pytest.approx(r1["metrics"]["test/auc"], abs=1e-6)
    assert evaluated["metrics"]["test/oracle_auc"] == pytest.approx(r1["metrics"]["test/oracle_auc"])
    assert (tmp_path / "eval" / "results.json").exists()
    # the test analysis too, with the evaluation overrides merged over the run's own
    assert evaluated["metrics"]["test/ece"] == pytest.approx(r1["metrics"]["test/ece"], abs=1e-6)
    assert (tmp_path / "eval" / "per_query.parquet").exists()
    users = {k.split("/")[2] for k in evaluated["metrics"] if k.startswith("test/slice/user:")}
    assert users == {"user:gender"} and "test/slice/user:age/0/auc" in r1["metrics"]

    # a DIN checkpoint cannot be resumed by another model: one clear error naming both
    other = make_cfg(
        [*model_overrides("two_tower", tmp_path), "trainer.max_epochs=2", f"ckpt_path={last}"],
        run_dir=tmp_path / "other",
    )
    with pytest.raises(CheckpointMismatchError, match="net: checkpoint has recsys_lab.models.din.DIN"):
        train(other)


def test_bad_max_epochs_is_rejected(make_cfg, tmp_path):
    cfg = make_cfg([*model_overrides("din", tmp_path), "trainer.max_epochs=-1"])
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=-1: expected a positive integer"):
        train(cfg)


def test_missing_pretrained_folder_is_named(make_cfg, tmp_path):
    missing = tmp_path / "no_such_model"
    cfg = make_cfg(
        [
            *model_overrides("bert_cross_encoder", tmp_path),
            f"model.net.pretrained={missing}",
            "debug=fast_dev_run",
        ]
    )
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train(cfg)


@pytest.mark.slow  # a fresh interpreter (~5 s); CI runs it
def test_unknown_model_group_option_names_the_choices(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "model=nope"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Could not find 'model/nope'" in proc.stderr
    assert "din" in proc.stderr and "two_tower" in proc.stderr  # the available options are listed


def test_cli_config_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "trainer.max_epochs=-1", *SMALL_DATA, "logger=none"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "RECSYS_LAB_DATA": str(tmp_path / "data")},
    )
    assert proc.returncode != 0
    assert "config error: trainer.max_epochs=-1: expected a positive integer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_timing_records_time_to_quality(make_cfg, tmp_path):
    """results.json "timing": seconds per training epoch, to the best epoch, and to target validation values
    (a value reached at once, one never reached)."""
    cfg = make_cfg(
        [
            *model_overrides("two_tower", tmp_path),
            "trainer.max_epochs=2",
            "callbacks.early_stopping=null",
            "time_to={val/recall@50: 0.0, val/ndcg@10: 2.0}",
        ]
    )
    timing = train(cfg)["timing"]
    assert timing["epochs"] == 2 and 0 < timing["seconds_per_epoch"] < timing["fit_seconds"]
    assert timing["best_epoch"] in (0, 1) and 0 < timing["seconds_to_best"] <= timing["fit_seconds"]
    assert 0 < timing["seconds_to_val/recall@50>=0.0"] <= timing["seconds_to_best"] + 1e-9  # the first epoch
    assert timing["seconds_to_val/ndcg@10>=2.0"] is None  # never reached


@pytest.mark.slow  # a fresh interpreter (~5 s); CI runs it
def test_cli_run_without_checkpoints_exits_cleanly(tmp_path):
    """fast_dev_run keeps no checkpoint, so there is no best validation value: a single run still exits 0
    (only a sweep, which needs the value, stops)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "model=two_tower",
            *SMALL_DATA,
            "logger=none",
            "debug=fast_dev_run",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "RECSYS_LAB_DATA": str(tmp_path / "data")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
