"""Learnability on the default simulator: the models find the signal the simulator planted."""

from __future__ import annotations

import pytest

from recsys_lab.train import train

# Full default-size runs: minutes on 2 cores, so they run in CI's full `pytest` but not in `-m "not slow"`.
pytestmark = pytest.mark.slow

DEFAULT_DATA = ["data=ecommerce", "logger=none", "trainer.enable_progress_bar=false"]


def test_din_closes_half_the_gap_to_the_oracle(make_cfg):
    results = train(make_cfg(["model=din", *DEFAULT_DATA, "trainer.max_epochs=2"]))
    m = results["metrics"]
    auc, popularity, oracle = m["test/auc"], m["test/popularity_auc"], m["test/oracle_auc"]
    assert popularity < auc < oracle
    assert (auc - popularity) / (oracle - popularity) >= 0.5, m
    assert m["test/gauc"] > 0.5


def test_two_tower_beats_popularity_on_recall_at_50(make_cfg, tmp_path):
    tower = train(make_cfg(["model=two_tower", *DEFAULT_DATA], run_dir=tmp_path / "tower"))
    pop = train(
        make_cfg(
            ["model=popularity_retrieval", *DEFAULT_DATA, "trainer.max_epochs=1"], run_dir=tmp_path / "pop"
        )
    )
    # both were scored on the same queries under the same protocol
    assert tower["protocol"]["test_queries"] == pop["protocol"]["test_queries"] > 500
    assert tower["metrics"]["test/recall@50"] > pop["metrics"]["test/recall@50"] + 0.03, (tower, pop)
    assert tower["metrics"]["test/ndcg@10"] > pop["metrics"]["test/ndcg@10"]
