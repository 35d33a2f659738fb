"""The serving pipeline evaluated offline as one system, against each stage alone:
`python scripts/eval_pipeline.py retrieval_run=<run dir> ranking_run=<run dir> [candidates=200 k=10]`.

On the runs' own ranking queries (`stage`, full catalogue, seen items masked; the history as of the stage's
start, exactly as training's evaluation gathers it) it scores four systems with the pipeline's own stage code:

- retrieval alone: the index's top k;
- ranker alone: the ranker over the whole catalogue (what the pipeline approximates);
- retrieve → rank: the ranker over the N retrieved candidates;
- retrieve → rank → MMR (`diversity` > 0).

Reported: stage-1 recall@N (the share of the targets among the N candidates: the ceiling of the ranking
stage), Recall@k and NDCG@k (the lab's definitions, `FullRankingMetrics`), intra-list diversity@k (mean
1 − cosine of the retrieval model's item encodings) and the latency of each stage per request (one query at a
time, median and p95 over `latency_queries`, on `threads` torch threads). Writes results.json and prints a
markdown table with the command that produced it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from recsys_lab.metrics.ranking import FullRankingMetrics
from recsys_lab.serving.pipeline import IndexConfig, Pipeline
from recsys_lab.train import CONFIG_DIR
from recsys_lab.utils.checks import ConfigError

STAGE_NAMES = ("encode", "retrieve", "rank", "mmr")  # the latency columns, in pipeline order
LEVEL = {"val": 0, "test": 1}  # the timeline a stage's queries read: everything before the stage


def _as_scores(codes: np.ndarray, num_items: int) -> torch.Tensor:
    """Ranked code lists (B, n) (-1 = none) as a score matrix (B, V) the ranking metrics read: the listed items
    in order on top, every other item tied below (so @k for k <= n is the list's own metric)."""
    B, n = codes.shape
    scores = torch.full((B, num_items), -1e9)
    rows = np.repeat(np.arange(B), n)
    flat = codes.reshape(-1)
    keep = flat >= 0
    scores[rows[keep], flat[keep]] = torch.as_tensor(
        np.tile(np.arange(n, 0, -1), B)[keep], dtype=torch.float32
    )
    return scores


def _relevant(targets: list[np.ndarray], num_items: int) -> torch.Tensor:
    rel = torch.zeros(len(targets), num_items, dtype=torch.bool)
    for b, t in enumerate(targets):
        rel[b, torch.as_tensor(t, dtype=torch.long)] = True
    return rel


def _ild(codes: np.ndarray, vectors: np.ndarray) -> float:
    """Mean over lists of the mean pairwise 1 - cosine of the listed items' encodings."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    values = []
    for row in codes:
        row = row[row >= 0]
        if len(row) < 2:
            continue
        sim = unit[row] @ unit[row].T
        values.append(1.0 - sim[np.triu_indices(len(row), 1)].mean())
    return float(np.mean(values)) if values else float("nan")


def _rank_all(pipe: Pipeline, encoded, exclude: list[np.ndarray], k: int, chunk_rows: int) -> np.ndarray:
    """The ranker over every item code: top k codes per query (seen items and code 0 out)."""
    B = len(exclude)
    V = pipe.num_items
    codes = np.broadcast_to(np.arange(V), (B, V)).copy()
    scores = np.empty((B, V), dtype=np.float32)
    step = max(1, chunk_rows // B)
    for s in range(0, V, step):
        scores[:, s : s + step] = pipe.rank(encoded, codes[:, s : s + step])[0]
    scores[:, 0] = -np.inf
    for b, seen in enumerate(exclude):
        scores[b, seen] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def evaluate_pipeline(cfg: DictConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    if cfg.stage not in LEVEL:
        raise ConfigError(f"stage={cfg.stage}: expected 'val' or 'test'")
    if cfg.retrieval_run is None or cfg.ranking_run is None:
        raise ConfigError("eval_pipeline compares the stages: give both retrieval_run and ranking_run")
    index = IndexConfig(cfg.index.kind, OmegaConf.to_container(cfg.index.options) or {})
    pipe = Pipeline.from_runs(
        cfg.retrieval_run, cfg.ranking_run, cfg.data_dir, candidates=cfg.candidates, index=index,
        diversity=cfg.diversity,
    )  # fmt: skip
    V = pipe.num_items
    N, K = min(cfg.candidates, V - 1), min(cfg.k, V - 1)  # no more candidates than items (code 0 is none)
    queries = pipe.retrieval.datamodule.queries[cfg.stage]
    rng = np.random.default_rng(cfg.seed)
    order = np.arange(len(queries))
    if cfg.max_queries is not None and len(order) > cfg.max_queries:
        order = np.sort(rng.choice(order, size=cfg.max_queries, replace=False))
    level = LEVEL[cfg.stage]
    systems = ["retrieval alone", "ranker alone", "retrieve → rank"] + (
        ["retrieve → rank → MMR"] if cfg.diversity > 0 else []
    )
    metrics = {name: FullRankingMetrics([K]) for name in systems}
    stage1 = FullRankingMetrics([N])
    lists: dict[str, list[np.ndarray]] = {name: [] for name in systems}

    with torch.no_grad():
        for s in range(0, len(order), cfg.batch_size):
            users, exclude, wanted = _query_rows(queries, order[s : s + cfg.batch_size])
            enc = {role: e.encode_stored(users, level, exclude) for role, e in pipe.encoders.items()}
            rel = _relevant(wanted, V)
            _, cand, _ = pipe.retrieve(enc["retrieval"], N)  # (B, N)
            stage1.update(_as_scores(cand, V), rel)
            ranked, _ = pipe.rank(enc["ranking"], cand)  # (B, N)
            by_rank = np.take_along_axis(cand, np.argsort(-ranked, axis=1, kind="stable")[:, :K], 1)
            out = {
                "retrieval alone": cand[:, :K],
                "ranker alone": _rank_all(pipe, enc["ranking"], exclude, K, cfg.chunk_rows),
                "retrieve → rank": by_rank,
            }
            if cfg.diversity > 0:
                pos = pipe.diversify(ranked, cand, K)
                out["retrieve → rank → MMR"] = np.where(
                    pos >= 0, np.take_along_axis(cand, np.clip(pos, 0, None), 1), -1
                )
            for name, codes in out.items():
                metrics[name].update(_as_scores(codes, V), rel)
                lists[name].append(codes)

        latency = _latencies(pipe, queries, order[: cfg.latency_queries], level, N, K)
    recall_n = float(stage1.compute()[f"recall@{N}"])
    rows = {}
    for name in systems:
        m = metrics[name].compute()
        rows[name] = {
            f"recall@{N} (stage 1)": recall_n if name != "ranker alone" else None,
            f"recall@{K}": float(m[f"recall@{K}"]),
            f"ndcg@{K}": float(m[f"ndcg@{K}"]),
            f"ild@{K}": _ild(np.concatenate(lists[name]), pipe.item_vectors),
            **latency[name],
        }
    results = {
        "command": "python " + " ".join(sys.argv),
        "stage": cfg.stage,
        "queries": int(len(order)),
        "candidates": N,
        "k": K,
        "diversity": cfg.diversity,
        "index": OmegaConf.to_container(cfg.index),
        "threads": cfg.threads,
        "pipeline": pipe.describe(),
        "protocol": pipe.retrieval.info.get("protocol", {}).get("split"),
        "systems": rows,
    }
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results))
    return results


def _query_rows(queries, idx: np.ndarray) -> tuple[torch.Tensor, list[np.ndarray], list[np.ndarray]]:
    """Queries `idx` of a QuerySet: their user entities, seen item codes (excluded) and target codes."""
    rows = torch.as_tensor(idx)
    seen, targets = queries.seen.gather(rows), queries.targets.gather(rows)
    exclude = [seen.ids[b, : seen.lengths[b]].numpy() for b in range(len(idx))]
    wanted = [targets.ids[b, : targets.lengths[b]].numpy() for b in range(len(idx))]
    return queries.users[rows], exclude, wanted


def _latencies(pipe: Pipeline, queries, idx: np.ndarray, level: int, N: int, K: int) -> dict[str, dict]:
    """Per-request latency of each system's stages, one query at a time: median and p95 in ms."""
    times: dict[str, dict[str, list[float]]] = {}

    def clock(system: str, stage: str, start: float) -> None:
        times.setdefault(system, {}).setdefault(stage, []).append((time.perf_counter() - start) * 1e3)

    for q in idx:
        users, exclude, _ = _query_rows(queries, np.array([q]))
        t = time.perf_counter()
        enc = {role: e.encode_stored(users, level, exclude) for role, e in pipe.encoders.items()}
        encode_ms = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        _, cand, _ = pipe.retrieve(enc["retrieval"], N)
        clock("retrieve → rank", "retrieve", t)
        t = time.perf_counter()
        pipe.retrieve(enc["retrieval"], K)
        clock("retrieval alone", "retrieve", t)
        t = time.perf_counter()
        ranked, _ = pipe.rank(enc["ranking"], cand)
        clock("retrieve → rank", "rank", t)
        t = time.perf_counter()
        pipe.diversify(ranked, cand, K)
        clock("retrieve → rank", "mmr", t)
        t = time.perf_counter()
        _rank_all(pipe, enc["ranking"], exclude, K, 1 << 30)
        clock("ranker alone", "rank", t)
        for system in times:
            times[system].setdefault("encode", []).append(encode_ms)
    out = {}
    for system in ("retrieval alone", "ranker alone", "retrieve → rank", "retrieve → rank → MMR"):
        stages = dict(times.get(system if system != "retrieve → rank → MMR" else "retrieve → rank", {}))
        if system == "retrieve → rank":
            stages.pop("mmr", None)
        total = np.sum([v for v in stages.values()], axis=0)
        out[system] = {f"{s} ms": float(np.median(stages[s])) if s in stages else None for s in STAGE_NAMES}
        out[system] |= {
            "total ms p50": float(np.median(total)),
            "total ms p95": float(np.percentile(total, 95)),
        }
    return out


def markdown(results: dict) -> str:
    rows = results["systems"]
    columns = list(next(iter(rows.values())))
    lines = [
        f"`{results['command']}` — {results['queries']} {results['stage']} queries, N = {results['candidates']}, "
        f"k = {results['k']}, index {results['index']['kind']}, {results['threads']} thread(s)",
        "",
        "| system | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in rows.items():
        cells = ["–" if v is None else (f"{v:.4f}" if "ms" not in c else f"{v:.2f}") for c, v in row.items()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval_pipeline")
def main(cfg: DictConfig) -> None:
    try:
        evaluate_pipeline(cfg)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None


if __name__ == "__main__":
    main()
