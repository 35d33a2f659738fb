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
    # two_tower scores every query against the whole catalogue: the item codes fitted on the training rows
    # of the small simulator (at most its 200 items, plus code 0 for unknown items)
    assert 100 < saved["results"][1]["catalogue_items"] <= 201
    printed = capsys.readouterr().out
    assert "| din | 256 / 512 |" in printed and "| two_tower | 256 / 512 |" in printed
