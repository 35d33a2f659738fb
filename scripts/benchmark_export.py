"""Accuracy and speed of the exported and int8 models and of the compressed item indexes, as markdown tables.

    python scripts/benchmark_export.py --ranking-run /work/tables/s18/din --retrieval-run /work/tables/s18/tt

Everything runs on one thread (`torch.set_num_threads(1)`, ONNX Runtime with one intra-op thread); a latency is
the median of `--repeats` timed calls after `--warmup` untimed ones, each call on another user's request.

- Ranker (a CTR run, e.g. DIN): the test AUC over the run's test impressions, through the task's own evaluation
  (so the float figure is the run's `test/auc`), for the trained model in float, eager int8
  (`quantize_eager`), ONNX Runtime float and ONNX Runtime int8 (`quantize_onnx`); and the latency of scoring
  one request's 200 candidate rows (one user, 200 random catalogue items, unknown context).
- Query tower (a retrieval run, e.g. two_tower): test recall@50 over the whole catalogue, through the task's
  evaluation (the float figure is the run's `test/recall@50`), with the float or int8 query tower against the
  float item encodings, and the latency of encoding one request (batch of 1).
- Item index over the run's item encodings: recall@50 of the exact top-50 (brute-force inner product) and
  search latency per query (batch of 1) for flat, sq8, ivfpq and hnsw; then the same on `--synthetic-items`
  random Gaussian vectors of the same width, where the catalogue is large enough for the compression to pay.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.serving.export import Exported, export_run, index_recall, quantize_eager, servable
from recsys_lab.serving.index import ItemIndex
from recsys_lab.serving.runs import load_run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/benchmark_export.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranking-run", type=Path, default=None, help="a CTR run (DIN)")
    parser.add_argument(
        "--retrieval-run", type=Path, default=None, help="a run with encode_query (two_tower)"
    )
    parser.add_argument("--candidates", type=int, default=200, help="candidate rows per ranking request")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--synthetic-items", type=int, default=100_000, help="0: no synthetic index table")
    return parser.parse_args(argv)


def median_ms(fn: Callable[[Any], object], requests: list, repeats: int, warmup: int) -> float:
    """Median wall time (ms) of `repeats` calls fn(request), cycling through `requests`."""
    for i in range(warmup):
        fn(requests[i % len(requests)])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(requests[i % len(requests)])
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


class OnnxRanker(nn.Module):
    """An exported ranker behind the model interface the task's evaluation calls: forward(batch) -> logits."""

    def __init__(self, exported: Exported) -> None:
        super().__init__()
        self.exported = exported

    def forward(self, batch: Batch) -> Tensor:
        return torch.from_numpy(self.exported(batch))


class OnnxQueryTower(nn.Module):
    """An exported query tower with the float model's item tower: encode_query / encode_item for evaluation."""

    def __init__(self, exported: Exported, net: nn.Module) -> None:
        super().__init__()
        self.exported, self.items = exported, net

    def encode_query(self, batch: Batch) -> Tensor:
        return torch.from_numpy(self.exported(batch))

    def encode_item(self, batch: Batch) -> Tensor:
        return self.items.encode_item(batch)


def test_metric(run, net: nn.Module, name: str) -> float:
    """The run's test `name` (auc, recall@50) with `net` in place of its model, through the task's evaluation."""
    task, trained = run.task, run.task.net
    task.net = net
    try:
        task.begin_evaluation("test")
        with torch.no_grad():
            for batch in run.datamodule.test_dataloader():
                task.evaluate_batch(batch, "test")
        return float(task.end_evaluation("test")[name])
    finally:
        task.net = trained


def variants(run, out: Path) -> dict[str, nn.Module | Exported]:
    """float, eager int8, ONNX Runtime float and int8 of the run's exported part (exported into `out`)."""
    export_run(run, out, int8=True)
    return {
        "eager float": run.net,
        "eager int8": quantize_eager(servable(run.net)),
        "ONNX Runtime float": Exported.from_dir(out),
        "ONNX Runtime int8": Exported.from_dir(out, int8=True),
    }


def bench_ranker(run, args, out: Path) -> list[str]:
    store = run.store
    models = variants(run, out)
    g = torch.Generator().manual_seed(0)
    users = store.user[(store.split == 2).nonzero().squeeze(1)].unique()
    users = users[torch.randperm(len(users), generator=g)[:50]]
    codes = torch.randint(1, store.num_item_codes, (len(users), args.candidates), generator=g)
    requests = [store.pairs(u.view(1), 2, c.view(1, -1)) for u, c in zip(users, codes, strict=True)]
    lines = [
        f"Ranker: {run.model_name} ({run.path}), test AUC over the run's test impressions; latency per request of "
        f"{args.candidates} candidate rows (ms, median of {args.repeats}, one thread)",
        "",
        "| variant | test AUC | Δ AUC | latency (ms) | speed-up |",
        "|---|---|---|---|---|",
    ]
    base_auc = base_ms = None
    for name, model in models.items():
        wrapped = OnnxRanker(model) if isinstance(model, Exported) else model
        auc = test_metric(run, wrapped, "auc")
        with torch.no_grad():
            ms = median_ms(wrapped, requests, args.repeats, args.warmup)
        base_auc, base_ms = base_auc or auc, base_ms or ms
        lines.append(f"| {name} | {auc:.4f} | {auc - base_auc:+.4f} | {ms:.3f} | {base_ms / ms:.2f}x |")
    return lines


def bench_query_tower(run, args, out: Path) -> tuple[list[str], np.ndarray]:
    store = run.store
    models = variants(run, out)
    test = (store.split == 2).nonzero().squeeze(1)
    rows = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:200]]
    requests = [store.histories(r.view(1)) for r in rows]
    lines = [
        f"Query tower: {run.model_name} ({run.path}), test recall@50 over the whole catalogue (float item "
        f"encodings); latency of encoding one request (ms, median of {args.repeats}, one thread)",
        "",
        "| variant | test recall@50 | Δ recall@50 | latency (ms) | speed-up |",
        "|---|---|---|---|---|",
    ]
    base_recall = base_ms = None
    for name, model in models.items():
        if isinstance(model, Exported):
            wrapped, encode = OnnxQueryTower(model, run.net), model
        else:
            wrapped, encode = model, model.encode_query
        recall = test_metric(run, wrapped, "recall@50")
        with torch.no_grad():
            ms = median_ms(encode, requests, args.repeats, args.warmup)
        base_recall, base_ms = base_recall or recall, base_ms or ms
        lines.append(
            f"| {name} | {recall:.4f} | {recall - base_recall:+.4f} | {ms:.3f} | {base_ms / ms:.2f}x |"
        )
    with torch.no_grad():  # float query encodings of test requests: the index table's queries
        encoded = run.net.encode_query(store.histories(rows)).numpy()
    return lines, encoded


def bench_indexes(title: str, vectors: np.ndarray, queries: np.ndarray, args) -> list[str]:
    n, dim = vectors.shape
    nlist = max(1, min(1024, n // 39))  # FAISS's k-means wants >= 39 training points per cell
    pq_m = next(m for m in (16, 8, 4, 2, 1) if dim % m == 0)
    options = {
        "flat": {},
        "sq8": {},
        "ivfpq": {
            "nlist": nlist,
            "nprobe": 16,
            "pq_m": pq_m,
            "pq_bits": 8 if n >= 256 else 4,
        },  # 2^bits centroids
        "hnsw": {"hnsw_m": 32, "ef_search": 128},
    }
    lines = [
        f"Item index: {title}, {n} items x {dim}; recall@50 of the exact top-50 over {len(queries)} queries; "
        f"search latency per query (batch of 1, ms, median of {args.repeats}, one thread)",
        "",
        "| index | vector bytes / item | recall@50 | latency (ms) | speed-up |",
        "|---|---|---|---|---|",
    ]
    base_ms = None
    for kind, opts in options.items():
        index = ItemIndex(vectors, kind=kind, **opts)
        recall = index_recall(index, vectors, queries, 50)
        one_query = [q[None] for q in queries[:200]]  # (1, D) each: a request
        ms = median_ms(lambda q, index=index: index.search(q, 50), one_query, args.repeats, args.warmup)
        base_ms = base_ms or ms
        # bytes of the stored vector (HNSW adds its links, IVF-PQ an 8-byte id per list entry; not counted)
        size = {"flat": 4 * dim, "sq8": dim, "ivfpq": pq_m * opts.get("pq_bits", 0) // 8, "hnsw": 4 * dim}[
            kind
        ]
        detail = ", ".join(f"{k}={v}" for k, v in opts.items())
        lines.append(
            f"| {kind}{f' ({detail})' if detail else ''} | {size} | {recall:.3f} | {ms:.3f} | {base_ms / ms:.2f}x |"
        )
    return lines


def main(argv: list[str] | None = None) -> str:
    os.environ.setdefault("WANDB_MODE", "disabled")
    args = parse_args(argv)
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    command = "python scripts/benchmark_export.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    sections = [
        f"`{command}`",
        f"torch {torch.__version__}, one thread; {os.cpu_count()} CPU cores on the machine, load average {load:.2f} "
        "(other processes on the CPU slow every figure)",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if args.ranking_run is not None:
            sections.append("\n".join(bench_ranker(load_run(args.ranking_run), args, Path(tmp) / "ranker")))
        if args.retrieval_run is not None:
            run = load_run(args.retrieval_run)
            lines, queries = bench_query_tower(run, args, Path(tmp) / "query")
            sections.append("\n".join(lines))
            vectors = np.load(Path(tmp) / "query" / "item_encodings.npy")
            sections.append(
                "\n".join(bench_indexes(f"{run.model_name}'s item encodings", vectors, queries, args))
            )
            if args.synthetic_items:
                rng = np.random.default_rng(0)
                synthetic = rng.normal(size=(args.synthetic_items, vectors.shape[1])).astype(np.float32)
                probes = rng.normal(size=(500, vectors.shape[1])).astype(np.float32)
                title = "synthetic Gaussian vectors (a harder case for quantisation than trained encodings)"
                sections.append("\n".join(bench_indexes(title, synthetic, probes, args)))
    report = "\n\n".join(sections)
    print(report)
    return report


if __name__ == "__main__":
    main()
