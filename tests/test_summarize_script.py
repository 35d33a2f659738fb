"""scripts/summarize.py: results.json files of a multirun into one mean ± sd table, checked by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import summarize  # noqa: E402


def write_run(folder: Path, model: str, seed: int, ndcg: float, seconds: float, candidates="full") -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      model: {model}\n")
    results = {
        "model": "recsys_lab.models.sasrec.SASRec",
        "seed": seed,
        "metrics": {"test/ndcg@10": ndcg, "test/recall@10": 2 * ndcg},
        "protocol": {"protocol_preset": "recbole_sequential", "eval_candidates": candidates},
        "timing": {"seconds_to_best": seconds, "best_epoch": seed},
    }
    (folder / "results.json").write_text(json.dumps(results))


def test_groups_runs_and_prints_mean_and_sample_sd(tmp_path):
    for i, (model, ndcg, seconds) in enumerate(
        [("sasrec", 0.1, 10.0), ("sasrec", 0.2, 20.0), ("sasrec", 0.3, 30.0)]
    ):
        write_run(tmp_path / str(i), model, i + 1, ndcg, seconds)
    write_run(tmp_path / "3", "sasrec", 1, 0.5, 5.0, candidates="uniform_100")
    write_run(tmp_path / "4", "gru4rec", 1, 0.25, 7.0)
    lines = summarize.table(summarize.load_runs([tmp_path]), ["ndcg@10", "recall@10"]).splitlines()
    assert lines[0] == (
        "| model | protocol | candidates | runs | ndcg@10 | recall@10 | s to best epoch | best epoch |"
    )
    # mean 0.2, sample sd of (0.1, 0.2, 0.3) = 0.1; seconds 20 ± 10; best epochs 1, 2, 3 -> 2 ± 1
    assert (
        lines[2]
        == "| sasrec | recbole_sequential | full | 3 | 0.2000 ± 0.1000 | 0.4000 ± 0.2000 | 20.0 ± 10.0 | 2.0 ± 1.0 |"
    )
    assert lines[3] == "| sasrec | recbole_sequential | uniform_100 | 1 | 0.5000 | 1.0000 | 5.0 | 1.0 |"
    assert lines[4] == "| gru4rec | recbole_sequential | full | 1 | 0.2500 | 0.5000 | 7.0 | 1.0 |"


def test_a_metric_missing_from_some_runs_is_an_error(tmp_path):
    write_run(tmp_path / "0", "sasrec", 1, 0.1, 1.0)
    write_run(tmp_path / "1", "sasrec", 2, 0.2, 1.0)
    data = json.loads((tmp_path / "1" / "results.json").read_text())
    del data["metrics"]["test/ndcg@10"]
    (tmp_path / "1" / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="test/ndcg@10 is missing from some runs"):
        summarize.table(summarize.load_runs([tmp_path]), ["ndcg@10"])


def test_cli_names_an_empty_folder(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "summarize.py"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert f"no results.json under {tmp_path}" in done.stderr


def test_by_overrides_splits_a_sweep_on_what_its_runs_were_given(tmp_path):
    for i, (content, ndcg) in enumerate([("image", 0.1), ("image", 0.3), ("[text,image]", 0.4)]):
        write_run(tmp_path / str(i), "two_tower", i + 1, ndcg, 1.0)
        overrides = ["model=two_tower", f"model/content={content}", f"seed={i + 1}", "logger=none"]
        (tmp_path / str(i) / ".hydra" / "overrides.yaml").write_text("\n".join(f"- {o}" for o in overrides))
    merged = summarize.table(summarize.load_runs([tmp_path]), ["ndcg@10"]).splitlines()
    assert len(merged) == 3 and "| two_tower | recbole_sequential | full | 3 |" in merged[2]
    split = summarize.table(summarize.load_runs([tmp_path], by_overrides=True), ["ndcg@10"]).splitlines()
    assert split[2].startswith(
        "| two_tower model/content=image | recbole_sequential | full | 2 | 0.2000 ± 0.1414 |"
    )
    assert split[3].startswith(
        "| two_tower model/content=[text,image] | recbole_sequential | full | 1 | 0.4000 |"
    )
