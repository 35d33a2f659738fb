"""Aggregate the `results.json` of many runs (a multirun over seeds) into one markdown table: mean ± sd per
model and protocol, with the seconds to the best epoch.

    python train.py -m model=sasrec,gru4rec data=movielens data.path=../shared/data/ml-100k \
        protocol=recbole_sequential seed=1,2,3
    python scripts/summarize.py logs/train/multiruns/<time> --metrics recall@10 ndcg@10 mrr@10

Runs are grouped by model config (Hydra's `model=` choice, from the run's `.hydra/hydra.yaml`; the model
class where that is missing), protocol preset and evaluation candidates. A group whose runs disagree on
anything but the seed (the data fingerprint, git commit or training setup) is still one row: the table says
how many runs it holds, and `--by` adds keys to split on; `--by-overrides` splits on the run's command-line
overrides (its `.hydra/overrides.yaml`) other than the seed, the model, the logger and hydra's own, e.g. the
`model/content=...` and fusion of a content sweep. The sd is the sample standard deviation (n - 1);
a single run prints its value alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from recsys_lab.analysis.runs import group_runs, load_runs

DEFAULT_METRICS = ("recall@10", "ndcg@10", "hit@10", "mrr@10")


def mean_sd(values: Sequence[float], digits: int) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(runs: list[dict], metrics: Sequence[str], by: Sequence[str] = ()) -> str:
    """The markdown table: one row per (model, protocol, candidates, *by) group, in first-seen order."""
    groups = group_runs(runs, by)
    header = ["model", "protocol", "candidates", *by, "runs", *metrics, "s to best epoch", "best epoch"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * 3 + "---|" * len(by) + "---:|" * (len(header) - 3 - len(by)),
    ]
    for key, members in groups.items():
        cells = [*key, str(len(members))]
        for metric in metrics:
            values = [r["metrics"][f"test/{metric}"] for r in members if f"test/{metric}" in r["metrics"]]
            if values and len(values) != len(members):
                raise ValueError(f"test/{metric} is missing from some runs of {key}")
            cells.append(mean_sd(values, 4))
        cells.append(
            mean_sd([r["timing"]["seconds_to_best"] for r in members if "seconds_to_best" in r["timing"]], 1)
        )
        cells.append(
            mean_sd([float(r["timing"]["best_epoch"]) for r in members if "best_epoch" in r["timing"]], 1)
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "folders", nargs="+", type=Path, help="run or multirun folders (or results.json files)"
    )
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), help="test metrics, without test/"
    )
    parser.add_argument(
        "--by", nargs="*", default=[], help="extra results.json keys to group by, e.g. training.global_batch"
    )
    parser.add_argument(
        "--by-overrides",
        action="store_true",
        help="group by each run's command-line overrides too (besides seed, model, logger and hydra's)",
    )
    args = parser.parse_args(argv)
    try:
        print(table(load_runs(args.folders, args.by_overrides), args.metrics, args.by))
    except (FileNotFoundError, ValueError) as err:
        print(f"summarize: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
