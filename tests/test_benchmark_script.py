"""scripts/benchmark.py runs end to end on tiny sizes and reports positive throughputs."""

from __future__ import annotations

import json

from scripts.benchmark import main
from tests.helpers import SMALL_DATA


def test_benchmark_reports_positive_rates(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--models",
        "din",
        "two_tower",
        "--gather-batches",
        "2",
        "--train-batches",
        "2",
        "--eval-batches",
        "1",
    ]
    argv += ["--warmup", "1", "--out", str(out), *SMALL_DATA, f"paths.data_dir={tmp_path / 'data'}"]
    report = main(argv)

    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert [r["model"] for r in saved["results"]] == ["din", "two_tower"]
    for row in saved["results"]:
        for key in ("gather_rows_per_s", "train_samples_per_s", "eval_pairs_per_s"):
            assert row[key] > 0, (row["model"], key)
        assert 0.1 < row["peak_rss_gb"] < 64  # this process's peak resident memory, in GB
        assert row["gpu_peak_memory_gb"] is None and row["gpu_utilisation_pct"] is None  # on the CPU
    # two_tower scores every query against the whole catalogue: the item codes fitted on the training rows
    # of the small simulator (at most its 200 items, plus code 0 for unknown items)
    assert 100 < saved["results"][1]["catalogue_items"] <= 201
    printed = capsys.readouterr().out
    assert "| din | 256 / 512 |" in printed and "| two_tower | 256 / 512 |" in printed
    assert f"| {saved['results'][0]['peak_rss_gb']:.2f} RSS |" in printed


def test_fit_mode_reports_time_to_quality(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("scripts.benchmark.REPO", tmp_path)  # its run directories go under tmp_path/logs
    argv = [
        "--fit",
        "--models",
        "two_tower",
        "--time-to",
        "val/recall@50=0.0",
        "--time-to",
        "val/ndcg@10=2.0",
    ]
    argv += [*SMALL_DATA, "trainer.max_epochs=2", f"paths.data_dir={tmp_path / 'data'}"]
    (row,) = main(argv)["results"]
    assert row["model"] == "two_tower" and row["epochs"] == 2
    assert row["seconds_per_epoch"] > 0 and row["train_samples_per_s"] > 0
    assert 0 < row["seconds_to_val/recall@50>=0.0"] <= row["fit_seconds"]
    assert row["seconds_to_val/ndcg@10>=2.0"] is None
    assert 0 <= row["metrics"]["test/recall@10"] <= row["metrics"]["test/recall@50"]
    printed = capsys.readouterr().out
    assert "| model | s/epoch | samples/s | s to val/recall@50>=0.0 | s to val/ndcg@10>=2.0 |" in printed
    assert "| two_tower |" in printed and "| — |" in printed  # the value never reached
    assert list((tmp_path / "logs" / "benchmark").glob("two_tower-*/results.json"))
