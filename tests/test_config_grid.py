"""Every model config x every data config composes through train.py's code path and runs one batch of each
stage (`debug=fast_dev_run`) on small data written in each source's own format. A new model or data config
is picked up here without editing this file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys_lab.train import train
from tests.helpers import REPO, SMALL_DATA, model_overrides
from tests.source_fixtures import random_amazon_2023, random_atomic, random_ml100k, random_tabular

MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
DATA = sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml") if not p.stem.startswith("_"))
RANKING_KEYS = {
    f"test/{m}@{k}" for m in ("recall", "ndcg", "hit", "precision", "mrr") for k in (10, 20, 50)
} | {"test/mrr"}
IMPRESSION_KEYS = {f"test/{k}" for k in ("auc", "gauc", "logloss", "oracle_auc", "popularity_auc")}
# a multi-task model also logs every metric per label (the simulator's two)
PER_LABEL_KEYS = {f"test/{t}/{k}" for t in ("click", "purchase") for k in ("auc", "gauc", "logloss")}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """One small dataset per real-data source, in its own file format."""
    root = tmp_path_factory.mktemp("sources")
    random_ml100k(root / "movielens", np.random.default_rng(0))
    random_atomic(root / "atomic", np.random.default_rng(1))
    random_amazon_2023(root / "amazon", np.random.default_rng(2))
    random_tabular(root / "clicks.csv", np.random.default_rng(3))
    return root


def data_overrides(data: str, files: Path) -> list[str]:
    small_protocol = ["data.preprocess.user_core=0", "data.preprocess.item_core=0"]
    return {
        "ecommerce": ["data=ecommerce", *SMALL_DATA],
        "ecommerce_small": ["data=ecommerce_small"],
        "movielens": ["data=movielens", f"data.path={files / 'movielens'}", *small_protocol],
        "atomic": ["data=atomic", "data.source.name=toy", f"data.path={files / 'atomic'}", *small_protocol],
        "amazon": ["data=amazon", "data.source.year=2023", f"data.path={files / 'amazon'}", *small_protocol],
        "tabular": [
            "data=tabular",
            f"data.path={files / 'clicks.csv'}",
            "data.columns.user=uid",
            "data.columns.item=sku",
            "data.columns.timestamp=when",
            "data.source.item_features={category: categorical, title: text}",
            *small_protocol,
        ],
    }[data]


def test_the_grid_covers_every_config():
    assert set(MODELS) >= {"din", "two_tower", "bert_cross_encoder", "popularity", "popularity_retrieval"}
    assert set(DATA) == {"ecommerce", "ecommerce_small", "movielens", "atomic", "amazon", "tabular"}


# ecommerce_small is the simulator again at another size: its column runs with the slow tests (CI runs both)
GRID_DATA = [pytest.param(d, marks=pytest.mark.slow) if d == "ecommerce_small" else d for d in DATA]


@pytest.mark.parametrize("data", GRID_DATA)
@pytest.mark.parametrize("model", MODELS)
def test_model_and_data_configs_compose_and_run(model, data, files, make_cfg, tmp_path):
    model_part = [
        o for o in model_overrides(model, tmp_path) if o not in SMALL_DATA and o != "data=ecommerce"
    ]
    cfg = make_cfg([*model_part, *data_overrides(data, files), "debug=fast_dev_run"])
    results = train(cfg)
    protocol, metrics = results["protocol"], results["metrics"]
    assert protocol["leakage_audit"]["status"] == "passed"
    # the simulator's CTR models are scored on logged impressions, everything else by ranking
    multitask = results["task"].endswith("MultiTaskTask")
    impressions = data.startswith("ecommerce") and (results["task"].endswith("CTRTask") or multitask)
    assert protocol["evaluation"] == ("impressions" if impressions else "ranking")
    # the test analysis (evaluation=default) runs on every model and data too; its keys are checked in
    # test_analysis.py, here only that it ran
    analysis = {k for k in metrics if k.startswith(("test/slice/", "test/gap/"))}
    if impressions:
        expected = IMPRESSION_KEYS | PER_LABEL_KEYS if multitask else IMPRESSION_KEYS
        assert set(metrics) - analysis == expected | {"test/ece"}
    else:
        beyond = {k for k in metrics if k.startswith(("test/coverage@", "test/gini@", "test/novelty@"))}
        assert set(metrics) - analysis - beyond >= RANKING_KEYS and len(beyond) == 9
        assert any(k.startswith("test/slice/item_popularity/") for k in analysis)
    assert Path(results["output_dir"], "results.json").exists()
