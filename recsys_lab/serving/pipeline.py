"""Retrieve → rank → diversify: the serving pipeline, assembled from trained run directories.

1. Retrieval: a model with `encode_query` / `encode_item` (two-tower, SASRec, GRU4Rec, text towers, MF, ...)
   encodes the catalogue once into an `ItemIndex` (FAISS: exact, HNSW or IVF-PQ); each request's query
   encoding fetches the N best items by inner product, its seen items filtered. Without a retrieval run (or for
   a request with nothing to encode: an unknown user with no items) the candidates are the most popular items
   of the training data — "popularity in context": the ranker then orders them with the request's context.
2. Ranking: a CTR model (DIN, DeepFM, DCNv2, ..., or the cross-encoder) scores the N candidates with the
   request's context; a model with `forward_with_attention` (DIN) also returns, per recommended item, the
   history items that drove its score.
3. Diversity and business rules: maximal marginal relevance (Carbonell & Goldstein, SIGIR 1998) over the
   retrieval model's item encodings, `diversity` = 0 (off) .. 1 (diversity only), and the request's filters
   (category values, numeric ranges in raw units, excluded ids).

Every stage is timed per call; `Pipeline.recommend` answers single requests (the service),
`Pipeline.retrieve` / `rank` / `diversify` take whole batches (the offline evaluation, `scripts/eval_pipeline.py`,
measures the same code).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recsys_lab.data.text import load_tokenizer, tokenize_texts
from recsys_lab.serving.index import ItemIndex
from recsys_lab.serving.requests import (
    EncodedRequests,
    OnlineHistories,
    Request,
    RequestEncoder,
    RequestError,
)
from recsys_lab.serving.runs import LoadedRun, encode_items, load_run
from recsys_lab.tasks.ranking import has_encoders
from recsys_lab.utils.checks import ConfigError


@dataclass
class IndexConfig:
    """The retrieval index: `kind` ("flat", "hnsw", "ivfpq", ...) and its `ItemIndex` options."""

    kind: str = "flat"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recommendation:
    """One request's answer: raw item ids best first, their final scores, the retrieval scores, the history
    items that drove each score (ranker with attention), how the request was served and the stage timings."""

    items: list[Any]
    scores: list[float]
    retrieval_scores: list[float | None]
    because: list[list[dict[str, Any]]] | None
    source: str  # "personal" (query encoded), "text" (a free-text search), "popularity" (nothing to encode)
    unknown_items: list[Any]
    timings_ms: dict[str, float]


class Pipeline:
    """Retrieval and / or ranking runs over one catalogue (see the module docstring).

    Args:
        retrieval: a loaded retrieval run, or None (candidates by popularity).
        ranking: a loaded ranking run, or None (the retrieval order is final).
        candidates: N, items retrieved per request for the ranker.
        index: the retrieval index's kind and options.
        diversity: MMR's weight on dissimilarity, 0 (off) .. 1.
        exclude_seen: leave each user's past positives out of the recommendations.
        explain: how many history items `because` lists per recommended item (ranker with attention).
        online: the events posted to the service, shared with the `RequestEncoder`s.
        ranking_export: a folder `scripts/export.py` wrote for the ranking run's ranker: its ONNX graph scores
            the candidates in ONNX Runtime instead of the eager model (the same scores within the export's
            parity bound, 1e-4; faster on CPU). The graph returns logits only, so there is no `because`.
        ranking_int8: with `ranking_export`, its int8 graph (`--int8`).
    """

    def __init__(
        self,
        retrieval: LoadedRun | None = None,
        ranking: LoadedRun | None = None,
        candidates: int = 200,
        index: IndexConfig | None = None,
        diversity: float = 0.0,
        exclude_seen: bool = True,
        explain: int = 3,
        online: OnlineHistories | None = None,
        ranking_export: str | None = None,
        ranking_int8: bool = False,
    ) -> None:
        if retrieval is None and ranking is None:
            raise ConfigError("serving needs retrieval_run, ranking_run or both")
        if candidates < 1:
            raise ConfigError(f"candidates={candidates}: expected a positive integer")
        if not 0.0 <= diversity <= 1.0:
            raise ConfigError(f"diversity={diversity}: expected a weight in [0, 1]")
        if retrieval is not None and not has_encoders(retrieval.net):
            raise ConfigError(
                f"retrieval_run={retrieval.path}: {retrieval.model_name} has no encode_query / encode_item, so it "
                "cannot fill a nearest-neighbour index; use it as ranking_run"
            )
        if retrieval is not None and ranking is not None:
            _check_same_catalogue(retrieval, ranking)
        self.retrieval, self.ranking = retrieval, ranking
        self.ranker_graph = _ranker_graph(ranking, ranking_export, ranking_int8) if ranking_export else None
        self.n_candidates, self.diversity = candidates, float(diversity)
        self.exclude_seen, self.explain = exclude_seen, explain
        self.online = online if online is not None else OnlineHistories()
        base = retrieval or ranking
        self.encoders = {
            role: _encoder(run, self.online)
            for role, run in (("retrieval", retrieval), ("ranking", ranking))
            if run
        }
        self.catalogue = self.encoders["retrieval" if retrieval else "ranking"]
        # popularity of every item code, and the codes most popular first (the fallback candidates; ties in
        # code order; code 0, unknown, never recommended)
        self.popularity = base.store.item_counts.numpy().astype(np.float32)
        self.popular = np.argsort(-self.popularity, kind="stable")
        self.popular = self.popular[self.popular != 0]
        self.item_vectors: np.ndarray | None = None
        self.index: ItemIndex | None = None
        self.tokenizer = None  # free-text search: a retrieval model that encodes text, with its tokenizer
        if retrieval is not None and callable(getattr(retrieval.net, "encode_text", None)):
            self.tokenizer = load_tokenizer(retrieval.datamodule.text)
        self._tokenizer_lock = threading.Lock()
        if retrieval is not None:
            codes = torch.arange(retrieval.store.num_item_codes)
            self.item_vectors = encode_items(retrieval.net, retrieval.store, codes)  # (V, D), row = item code
            index = index or IndexConfig()
            codes = np.arange(1, len(self.item_vectors))  # code 0 is "unknown", never a candidate
            self.index = ItemIndex(self.item_vectors[1:], codes, kind=index.kind, **index.options)

    @classmethod
    def from_runs(
        cls, retrieval_run: str | None, ranking_run: str | None, data_dir: str | None = None, **kwargs
    ) -> Pipeline:
        return cls(
            load_run(retrieval_run, data_dir) if retrieval_run else None,
            load_run(ranking_run, data_dir) if ranking_run else None,
            **kwargs,
        )

    @property
    def num_items(self) -> int:
        return len(self.popularity)

    # ---- stages (batched) ----------------------------------------------------------------------------------
    @torch.no_grad()
    def retrieve(
        self, encoded: EncodedRequests, n: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The n best admissible items per query: scores float32 (B, n), item codes (B, n) (-1 past the
        admissible ones), and per query whether it was encoded ("personal") or fell back to popularity."""
        B = len(encoded.known_user)
        texts = encoded.texts or [None] * B
        searched = np.array([t is not None for t in texts])
        if searched.any() and self.tokenizer is None:
            raise RequestError(
                "text: free-text search needs a retrieval model with encode_text (a text tower, "
                "model=two_tower_text); this service's retrieval model has none"
            )
        has_input = (encoded.known_user | (encoded.history.lengths > 0)).numpy() & ~searched
        personal = has_input & (self.index is not None)
        scores = np.full((B, n), -np.inf, dtype=np.float32)
        codes = np.full((B, n), -1, dtype=np.int64)
        for rows, queries in (
            (
                np.flatnonzero(personal),
                lambda rows: self.retrieval.net.encode_query(encoded.batch.select(rows)),
            ),
            (np.flatnonzero(searched), lambda rows: self._encode_texts([texts[b] for b in rows.tolist()])),
        ):
            if len(rows) == 0:
                continue
            query = queries(torch.as_tensor(rows)).numpy()
            exclude = [encoded.exclude[b] for b in rows]
            if allowed is None:  # excluded ids are filtered by the index's over-fetch
                scores[rows], codes[rows] = self.index.search(query, n, exclude)
            else:  # filtered: the admissible items scored exactly (the filter may leave few of them)
                scores[rows], codes[rows] = _exact_top(query, self.item_vectors, n, exclude, allowed)
        personal = personal | searched
        for b in np.flatnonzero(~personal):  # the most popular admissible items, no sort per request
            keep = np.ones(self.num_items, dtype=bool) if allowed is None else allowed.copy()
            keep[encoded.exclude[b]] = False
            top = self.popular[keep[self.popular]][:n]
            scores[b, : len(top)], codes[b, : len(top)] = self.popularity[top], top
        return scores, codes, personal

    def _encode_texts(self, texts: list[str]) -> Tensor:
        """Free-text searches as query encodings (B, D), tokenized like the item texts."""
        with self._tokenizer_lock:  # a Rust fast tokenizer refuses concurrent calls ("Already borrowed")
            tokens, lengths = tokenize_texts(
                self.tokenizer, texts, self.retrieval.datamodule.text.max_item_tokens
            )
        return self.retrieval.net.encode_text(tokens, lengths)

    @torch.no_grad()
    def rank(self, encoded: EncodedRequests, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Ranker logits of each query's candidates (B, C) (-inf where the code is -1) and, for a ranker with
        attention, the weight of each history position per candidate (B, C, L)."""
        net = self.ranking.net
        valid = codes >= 0
        safe = torch.as_tensor(np.where(valid, codes, 0))
        rows = self.encoders["ranking"].candidate_rows(encoded, safe)
        B, C = codes.shape
        if self.ranker_graph is not None:  # the exported graph in ONNX Runtime: logits only
            return np.where(valid, self.ranker_graph(rows).reshape(B, C), -np.inf), None
        if callable(getattr(net, "forward_with_attention", None)):
            logits, weights = net.forward_with_attention(rows)
            weights = weights.reshape(B, C, -1).numpy()
        else:
            logits, weights = net(rows), None
        scores = logits.reshape(B, C).float().numpy()
        return np.where(valid, scores, -np.inf), weights

    def diversify(self, scores: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
        """Positions (B, k) of the candidates in the final order: by score, or by MMR when `diversity` > 0
        (relevance = the scores min-max scaled per query, so that the weight means the same for any model's
        score scale; similarity = cosine of the retrieval model's item encodings). -1 past the valid ones."""
        B, C = scores.shape
        k = min(k, C)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        if self.diversity == 0.0 or self.item_vectors is None:
            return np.where(np.take_along_axis(np.isfinite(scores), order, 1), order, -1)
        out = np.full((B, k), -1, dtype=np.int64)
        for b in range(B):
            out[b] = _mmr(scores[b], self.item_vectors[np.clip(codes[b], 0, None)], k, self.diversity)
        return out

    # ---- one request ---------------------------------------------------------------------------------------
    def recommend(self, request: Request) -> Recommendation:
        """The k best items for one request through every configured stage (see the module docstring)."""
        t0 = time.perf_counter()
        allowed = self.catalogue.allowed(request.filters)
        encoded = {role: enc.encode([request], self.exclude_seen) for role, enc in self.encoders.items()}
        first = encoded["retrieval" if self.retrieval else "ranking"]
        timings = {"encode": _ms(t0)}
        k = min(request.k, self.num_items - 1)
        # N candidates for a ranker or for MMR to choose among; k when the retrieval order is final
        n = max(k, self.n_candidates) if self.ranking is not None or self.diversity > 0 else k
        t = time.perf_counter()
        r_scores, codes, personal = self.retrieve(first, n, allowed)  # by popularity without retrieval
        timings["retrieve"] = _ms(t)
        weights = None
        scores = r_scores
        if self.ranking is not None:
            t = time.perf_counter()
            scores, weights = self.rank(encoded["ranking"], codes)
            timings["rank"] = _ms(t)
        t = time.perf_counter()
        pos = self.diversify(np.where(codes >= 0, scores, -np.inf), codes, k)[0]
        pos = pos[pos >= 0]
        timings["diversify"] = _ms(t)
        timings["total"] = _ms(t0)
        chosen = codes[0, pos]
        raw = self.catalogue.code_raw
        because = None
        if weights is not None and self.explain > 0:
            because = [self._because(encoded["ranking"], weights[0, p]) for p in pos]
        return Recommendation(
            items=[raw[c] for c in chosen],
            scores=[float(s) for s in scores[0, pos]],
            # popularity counts order the fallback's candidates but are no retrieval scores
            retrieval_scores=[float(s) if personal[0] else None for s in r_scores[0, pos]],
            because=because,
            source="text" if request.text is not None else "personal" if personal[0] else "popularity",
            unknown_items=first.unknown_items[0],
            timings_ms=timings,
        )

    def _because(self, encoded: EncodedRequests, weights: np.ndarray) -> list[dict[str, Any]]:
        """The history items with the largest attention weights for one candidate, largest first; an item the
        user interacted with several times carries the sum of its positions' weights."""
        length = int(encoded.history.lengths[0])
        if length == 0:
            return []
        entities, where = np.unique(encoded.history.ids[0, :length].numpy(), return_inverse=True)
        per_item = np.bincount(where, weights=weights[:length], minlength=len(entities))  # (distinct items,)
        top = np.argsort(-per_item, kind="stable")[: self.explain]
        items_raw = self.encoders["ranking"].items_raw
        return [{"item_id": items_raw[entities[i]], "weight": float(per_item[i])} for i in top]

    def describe(self) -> dict:
        """What `/metadata` reports: the runs, the index, the stage settings."""
        return {
            "retrieval": self.retrieval.describe() if self.retrieval else None,
            "ranking": self.ranking.describe() if self.ranking else None,
            "index": {"kind": self.index.kind, "size": len(self.index)} if self.index else None,
            "ranker_backend": "eager"
            if self.ranker_graph is None
            else f"onnxruntime ({self.ranker_graph.path.name})",
            "catalogue_items": self.num_items - 1,
            "users": len(self.catalogue.user_entity),
            # some raw user ids the data knows (a client's or a load test's first requests)
            "user_id_sample": list(self.catalogue.user_entity)[:1000],
            "candidates": self.n_candidates,
            "diversity": self.diversity,
            "exclude_seen": self.exclude_seen,
        }


# ---- helpers ---------------------------------------------------------------------------------------------------
def _encoder(run: LoadedRun, online: OnlineHistories) -> RequestEncoder:
    prepared = run.datamodule.prepared()
    return RequestEncoder(
        run.store, prepared.users["user_id"].to_list(), prepared.items["item_id"].to_list(), online
    )


def _check_same_catalogue(a: LoadedRun, b: LoadedRun) -> None:
    """Both stages must number items alike: a candidate code of one is the same item for the other."""
    ia, ib = a.datamodule.prepared().items, b.datamodule.prepared().items
    same = ia.height == ib.height and ia.select("item_id", "item_id_code").equals(
        ib.select("item_id", "item_id_code")
    )
    if not same:
        raise ConfigError(
            f"retrieval_run={a.path} and ranking_run={b.path} were trained on different catalogues (item ids or "
            "codes differ); train both on the same data"
        )


def _ranker_graph(ranking: LoadedRun | None, folder: str, int8: bool):
    """The exported ranker of `folder`, checked to be the ranking run's own (same checkpoint)."""
    from recsys_lab.serving.export import Exported, read_manifest

    if ranking is None:
        raise ConfigError("ranking_export needs ranking_run: the export scores that run's candidates")
    manifest = read_manifest(folder)
    if manifest["graph"].get("part") not in (None, "ranker") or manifest.get("run", {}).get(
        "checkpoint"
    ) != str(ranking.checkpoint):
        raise ConfigError(
            f"ranking_export={folder}: exported from {manifest.get('run', {}).get('checkpoint')} "
            f"({manifest['graph'].get('part')}), not the ranker of ranking_run's {ranking.checkpoint}"
        )
    return Exported.from_dir(folder, int8=int8, threads=1)


def _exact_top(
    query: np.ndarray,
    vectors: np.ndarray,
    n: int,
    exclude: Sequence[np.ndarray],
    allowed: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-n by inner product over item codes 1..V-1 that `allowed` admits and `exclude` does not:
    scores (B, n) and codes (B, n), padded with -inf / -1."""
    scores = query.astype(np.float32) @ vectors.T.astype(np.float32, copy=False)  # (B, V)
    scores[:, 0] = -np.inf
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    for b, seen in enumerate(exclude):
        scores[b, seen] = -np.inf
    n_take = min(n, scores.shape[1])
    # the n best without sorting all V: a partition, then a stable sort of those n (ties keep code order)
    part = np.argpartition(-scores, n_take - 1, axis=1)[:, :n_take] if n_take < scores.shape[1] else None
    if part is None:
        top = np.argsort(-scores, axis=1, kind="stable")
    else:
        part.sort(axis=1)
        top = np.take_along_axis(
            part, np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable"), 1
        )
    top_scores = np.take_along_axis(scores, top, 1)
    out_s = np.full((len(query), n), -np.inf, dtype=np.float32)
    out_c = np.full((len(query), n), -1, dtype=np.int64)
    ok = np.isfinite(top_scores)
    out_s[:, :n_take] = np.where(ok, top_scores, -np.inf)
    out_c[:, :n_take] = np.where(ok, top, -1)
    return out_s, out_c


def _mmr(scores: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """Maximal marginal relevance: greedily the candidate maximising (1 - d) * relevance - d * (its largest
    cosine to the already chosen), relevance = scores scaled to [0, 1]. Returns k positions (-1 past the
    valid candidates)."""
    available = np.isfinite(scores)  # valid and not chosen yet
    out = np.full(k, -1, dtype=np.int64)
    if not available.any():
        return out
    s = np.where(available, scores, np.nan)
    lo, hi = np.nanmin(s), np.nanmax(s)
    relevance = np.where(available, (s - lo) / (hi - lo) if hi > lo else 1.0, 0.0)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # (C, D)
    closest = np.zeros(len(scores))  # largest cosine to the chosen set (0 while empty)
    for j in range(min(k, int(available.sum()))):
        # unavailable candidates masked apart (a weight times -inf would be NaN at the weights' ends)
        gain = np.where(available, (1 - diversity) * relevance - diversity * closest, -np.inf)
        best = int(np.argmax(gain))
        out[j] = best
        available[best] = False  # chosen: never again
        closest = np.maximum(closest, unit @ unit[best])
    return out


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3
