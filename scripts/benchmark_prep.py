"""Throughput and memory of preprocessing and splitting on a MovieLens-25M-sized ratings table.

Run from the repository root (after `pip install -e .`):

    python scripts/benchmark_prep.py                               # 25,000,095 rows in a temporary folder
    python scripts/benchmark_prep.py --rows 1000000 --out /tmp/prep --json prep.json

The table is synthetic but shaped like ml-25m: 162,541 users with at least 20 ratings each (log-normal
activity, mean ~154, median ~85), 59,047 items whose popularity follows a Zipf-Mandelbrot law
p(k) ∝ (k + 300)^-2 (the top item gets ~0.2% of the ratings; ml-25m's gets 0.33%), no user rating an item
twice, ml-25m's half-star rating distribution (about half the ratings are >= 4) and timestamps from 1995 to
2019. Users and items shrink in proportion with `--rows`. It is generated column by column with numpy, in a
child process so that the parent's peak memory is that of reading and processing only, and written as
parquet to `--out` (reused when the file exists) or to a temporary folder that is deleted afterwards.

Timed steps, each on the previous step's output: reading the parquet file; `Preprocess(rating_threshold=4,
user_core=5, item_core=5)`; `LeaveOneOutSplit`, `TemporalSplit(0.1, 0.1)` and `RandomRatioSplit(8:1:1)` on
the preprocessed table; then the whole pipeline of `train.py data=tabular` from the file (`RecDataModule`
prepare + setup: read, preprocess, leave-one-out, vocabularies and encoding, ranking queries, cache, histories,
leakage audit). For each: wall seconds, input rows per second, the peak resident memory during the
step (a background thread samples /proc/self/statm every 10 ms) and the process's peak so far
(`getrusage(RUSAGE_SELF).ru_maxrss`). Other processes sharing the CPU lower every number, so the load
average before and after is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_lab.data.datamodule import RecDataModule
from recsys_lab.data.processing import Preprocess
from recsys_lab.data.sources.tabular import Tabular
from recsys_lab.data.splits import TEST, TRAIN, VAL, LeaveOneOutSplit, RandomRatioSplit, TemporalSplit

ML25M_ROWS, ML25M_USERS, ML25M_ITEMS = 25_000_095, 162_541, 59_047
MIN_PER_USER = 20  # ml-25m keeps users with at least 20 ratings
RATINGS = np.arange(1, 11) / 2  # 0.5 .. 5.0
# ml-25m's share of each half-star rating, 0.5 .. 5.0
RATING_P = np.array([1.6, 3.1, 1.6, 6.6, 5.0, 19.6, 12.7, 26.6, 8.5, 14.5])
T_START, T_END = 789_652_009, 1_574_327_703  # first and last ml-25m timestamps (1995-01-09, 2019-11-21)
GB = 1024**3


def generate(rows: int, path: Path, seed: int = 0) -> None:
    """Write a synthetic ml-25m-like ratings table with exactly `rows` rows to `path` (parquet)."""
    rng = np.random.default_rng(seed)
    n_users = max(1, round(ML25M_USERS * rows / ML25M_ROWS))
    # at least 4x the mean ratings per user, so that heavy users (capped at half the catalogue) fit
    n_items = max(round(ML25M_ITEMS * rows / ML25M_ROWS), 4 * rows // n_users, 2)
    floor = min(MIN_PER_USER, rows // n_users)
    # ratings per user: the floor plus a log-normal share of the rest (capped at half the catalogue), rounded
    # down, the remainder spread over random users below the cap
    cap = max(floor + 1, n_items // 2)
    extra = rng.lognormal(0.0, 1.2, n_users)
    counts = np.minimum(
        floor + np.floor(extra / extra.sum() * (rows - floor * n_users)).astype(np.int64), cap
    )
    while (missing := rows - int(counts.sum())) > 0:
        room = np.flatnonzero(counts < cap)
        if len(room) == 0:
            raise ValueError(f"--rows {rows}: {n_users} users x {cap} items each cannot hold {rows} rows")
        counts[rng.choice(room, min(missing, len(room)), replace=False)] += 1

    # items without repeats within a user, like ml-25m: draw by popularity, drop repeated (user, item) pairs,
    # draw again for the users still short. Heavy users soon hold most popular items, so after 5 rounds the
    # draws follow the square root of the popularity and after 30 the uniform law, to finish in a few dozen
    # rounds. Pairs are int64 keys user * n_items + popularity rank.
    rank = np.arange(1, n_items + 1, dtype=np.float64)
    popularity = (rank + 300 * n_items / ML25M_ITEMS) ** -2.0
    popularity /= popularity.sum()
    flatter = np.sqrt(popularity) / np.sqrt(popularity).sum()
    keys = np.empty(0, dtype=np.int64)  # sorted, distinct
    need = counts
    for round_ in range(100):
        user = np.repeat(np.arange(n_users, dtype=np.int64), need)
        if round_ < 30:
            drawn = rng.choice(n_items, size=len(user), p=popularity if round_ < 5 else flatter)
        else:
            drawn = rng.integers(0, n_items, len(user))
        new = np.unique(user * n_items + drawn)
        if len(keys):
            at = np.minimum(np.searchsorted(keys, new), len(keys) - 1)
            new = new[keys[at] != new]
        keys = np.sort(np.concatenate([keys, new]), kind="stable")  # two sorted runs: a cheap merge
        need = need - np.bincount(new // n_items, minlength=n_users)
        if not need.any():
            break
    user, item_rank = np.divmod(keys, n_items)  # sorted by user, then item: like ratings.csv
    del keys
    item_of_rank = rng.permutation(n_items).astype(np.int64) + 1  # ids unrelated to popularity
    item = item_of_rank[item_rank]
    del item_rank
    rating = rng.choice(RATINGS, size=rows, p=RATING_P / RATING_P.sum())

    # each user is active from a uniform start for an exponential span (mean two years), within the ml-25m range
    start = rng.integers(T_START, T_END, n_users)
    span = np.minimum(rng.exponential(2 * 365 * 86_400, n_users), T_END - start)
    timestamp = start[user] + (rng.random(rows) * span[user]).astype(np.int64)
    del span, start
    table = pl.DataFrame({"user_id": user, "item_id": item, "rating": rating, "timestamp": timestamp})
    table.write_parquet(path)


class PeakSampler:
    """Peak resident memory of this process, sampled from /proc/self/statm in a background thread."""

    def __init__(self, every_s: float = 0.01) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.rss())

    def reset(self) -> None:
        self.peak = self.rss()

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed(name: str, rows: int, fn: Callable[[], Any], sampler: PeakSampler, results: list[dict]) -> Any:
    sampler.reset()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    sampler.peak = max(sampler.peak, sampler.rss())
    results.append(
        {
            "step": name,
            "rows_in": rows,
            "seconds": seconds,
            "rows_per_s": rows / seconds,
            "step_peak_rss_gb": sampler.peak / GB,
            "process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
        }
    )
    print(f"  {name}: {seconds:.2f} s", flush=True)
    return out


def split_counts(codes: np.ndarray) -> dict[str, int]:
    return {
        name: int((codes == code).sum()) for name, code in (("train", TRAIN), ("val", VAL), ("test", TEST))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ML25M_ROWS, help="rows to generate (default: ml-25m's)")
    parser.add_argument("--out", type=Path, help="folder for the parquet file, kept (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--generate-only", type=Path, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()
    if args.generate_only is not None:
        generate(args.rows, args.generate_only, args.seed)
        return

    folder = args.out or Path(tempfile.mkdtemp(prefix="benchmark_prep_"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ratings_{args.rows}_seed{args.seed}.parquet"
    load_before = os.getloadavg()
    try:
        if not path.exists():
            print(f"generating {args.rows:,} rows into {path} ...", flush=True)
            start = time.perf_counter()
            command = [sys.executable, __file__, "--rows", str(args.rows), "--seed", str(args.seed)]
            subprocess.run([*command, "--generate-only", str(path)], check=True)
            child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB
            print(
                f"  generated in {time.perf_counter() - start:.1f} s, peak RSS {child_peak:.2f} GB",
                flush=True,
            )
        results: list[dict] = []
        with PeakSampler() as sampler:
            raw = timed("read parquet", args.rows, lambda: pl.read_parquet(path), sampler, results)
            prep = Preprocess(rating_threshold=4, user_core=5, item_core=5)
            inter, stats = timed("Preprocess", raw.height, lambda r=raw: prep(r, labels=[]), sampler, results)
            del raw
            splits = {}
            for split in (
                LeaveOneOutSplit(),
                TemporalSplit(0.1, 0.1),
                RandomRatioSplit((0.8, 0.1, 0.1), seed=0),
            ):
                name = type(split).__name__
                codes = timed(name, inter.height, lambda s=split, x=inter: s.assign(x), sampler, results)
                splits[name] = split_counts(codes)
            del inter
            # the whole pipeline that `train.py data=tabular` runs: read, preprocess, split, vocabularies and
            # encoding, ranking queries, cache write and read, histories, leakage audit
            source = Tabular(
                str(path),
                columns={"user": "user_id", "item": "item_id", "timestamp": "timestamp", "rating": "rating"},
            )
            dm = RecDataModule(
                source, LeaveOneOutSplit(), cache_dir=str(folder / "prepared"), preprocess=prep
            )
            timed(
                "RecDataModule prepare + setup",
                args.rows,
                lambda: (dm.prepare_data(), dm.setup()),
                sampler,
                results,
            )
            audit = dm.audit_report["status"]
    finally:
        if args.out is None:
            shutil.rmtree(folder, ignore_errors=True)

    machine = {
        "cpus": os.cpu_count(),
        "polars_threads": pl.thread_pool_size(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "polars": pl.__version__,
        "numpy": np.__version__,
    }
    print(f"\nPreprocess({prep.describe()})\n  {stats}")
    print(f"splits (rows): {splits}")
    print(f"full pipeline: {dm.counts['test_queries']} test queries, leakage audit {audit}")
    print(f"machine: {machine}\n")
    print("| step | rows in | seconds | rows/s | peak RSS in step (GB) | process peak RSS (GB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['step']} | {r['rows_in']:,} | {r['seconds']:.2f} | {r['rows_per_s'] / 1e6:.2f}M | "
            f"{r['step_peak_rss_gb']:.2f} | {r['process_peak_rss_gb']:.2f} |"
        )
    if args.json is not None:
        blob = {
            "rows": args.rows,
            "steps": results,
            "preprocess": stats,
            "splits": splits,
            "machine": machine,
        }
        args.json.write_text(json.dumps(blob, indent=2))


if __name__ == "__main__":
    main()
