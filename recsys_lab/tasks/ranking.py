"""Ranking evaluation shared by every task: one scoring contract, so every model runs under every protocol.

A query batch (see `recsys_lab.data.views`) carries `batch.eval`: the query's user entity, the item codes to
find (`targets`), to mask (`seen`) and, for sampled protocols, the stored `candidates`. Scores come from the
fastest path the model offers:

* `encode_query` / `encode_item` models: the catalogue is encoded once per evaluation epoch and each query
  batch is one chunk of the score matrix, `q @ items.T` (full) or a gather of candidate rows (sampled);
* models that score pairs but can share work across a query's candidates offer `score_items(query batch,
  items (B, C) item codes) -> (B, C)` logits (NCF's MLP and NeuMF: the first layer's user half once per
  user), called in chunks of at most `pair_chunk` (query, candidate) pairs;
* any other model (`forward(batch) -> logits`): (query, candidate) rows come from the view's `PairBuilder`
  and are scored in chunks of at most `pair_chunk` rows.

Full ranking masks code 0 (items unknown to the training vocabulary) and every item the user interacted with
before the period; `FullRankingMetrics` then reduces each chunk (ties: the expected value under random
tie-breaking, see `recsys_lab.metrics.ranking`).

With `data.cold_items` the catalogue holds items that have no training interaction (codes >= the schema's
`first_cold_item`), and every stage also reports the cold-start slice `cold/...`: the queries with a target on
such an item, each of those targets ranked against the candidates less the query's other (warm) targets, so a
warm hit neither helps nor hurts it. A stage without such targets reports NaN for the slice.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recsys_lab.analysis.evaluation import TestAnalysis
from recsys_lab.data.batch import Batch
from recsys_lab.data.views import EvalContext, PairBuilder
from recsys_lab.metrics import FullRankingMetrics
from recsys_lab.utils.checks import ModelMismatchError

ENCODERS = ("encode_query", "encode_item")


def has_encoders(net: nn.Module) -> bool:
    """Whether the model scores queries and items apart (`encode_query` / `encode_item`)."""
    return all(callable(getattr(net, name, None)) for name in ENCODERS)


def require_methods(net: nn.Module, task: str, names: Sequence[str] = ENCODERS) -> None:
    """A ModelMismatchError (a TypeError) naming the task and the methods its model lacks."""
    missing = [name for name in names if not callable(getattr(net, name, None))]
    if missing:
        raise ModelMismatchError(
            f"{task} needs a model with {', '.join(names)}; {type(net).__name__} lacks {missing}"
        )


def column_codes(batch: Batch, scores: Tensor) -> Tensor:
    """The item code of each column of a query batch's scores: the stored candidates (B, C) under a sampled
    protocol, every code (V,) under full ranking."""
    cands = batch.eval.candidates
    return cands.ids if cands is not None else torch.arange(scores.shape[1], device=scores.device)


class RankingEvaluation(nn.Module):
    """Ranking metrics per stage plus the scoring of query batches.

    Args:
        ks: cut-offs of recall/ndcg/hit.
        pair_chunk: (query, candidate) rows per forward pass for models without encoders.
        item_chunk: items per forward pass when encoding the catalogue.
        first_cold_item: item codes >= this have no training interaction (`data.cold_items`); None: no
            cold-start slice.
    """

    def __init__(
        self,
        ks: Sequence[int] = (10, 20, 50),
        pair_chunk: int = 65536,
        item_chunk: int = 65536,
        first_cold_item: int | None = None,
    ) -> None:
        super().__init__()
        self.first_cold_item = first_cold_item
        slices = ("", "_cold") if first_cold_item is not None else ("",)
        self.metrics = nn.ModuleDict(
            {stage + part: FullRankingMetrics(ks) for stage in ("val", "test") for part in slices}
        )
        self.ks = self.metrics["val"].ks
        self.pair_chunk, self.item_chunk = pair_chunk, item_chunk
        self._items: Tensor | None = None

    @property
    def per_query_names(self) -> list[str]:
        """The ranking metrics in the column order of `FullRankingMetrics.per_query`."""
        return self.metrics["val"].names

    def metric_names(self) -> list[str]:
        names = self.per_query_names
        return names + ([f"cold/{n}" for n in names] if self.first_cold_item is not None else [])

    @torch.no_grad()
    def start(self, net: nn.Module, context: EvalContext, device: torch.device) -> None:
        """Encode the catalogue once per evaluation epoch (encoder models only)."""
        self._items = None
        if has_encoders(net):
            items = context.catalogue()
            n = len(items)
            self._items = torch.cat(
                [
                    net.encode_item(items.select(torch.arange(s, min(s + self.item_chunk, n))).to(device))
                    for s in range(0, n, self.item_chunk)
                ]
            )  # (V, D)

    def _pair_scores(
        self, net: nn.Module, pairs: PairBuilder, batch: Batch, codes: Tensor, stage: str
    ) -> Tensor:
        """(B, C) logits of (query, candidate) pairs, chunked over candidates: by the model's `score_items` where
        it has one, else by `forward` on (query, candidate) rows from the view's PairBuilder."""
        B, C = codes.shape
        step = max(1, self.pair_chunk // max(B, 1))
        if callable(getattr(net, "score_items", None)):
            parts = [net.score_items(batch, codes[:, s : s + step]) for s in range(0, C, step)]
        else:
            user = batch.eval.user
            parts = [net(pairs(user, codes[:, s : s + step], stage)).view(B, -1) for s in range(0, C, step)]
        return torch.cat(parts, 1)

    def scores(
        self, net: nn.Module, batch: Batch, stage: str, pairs: PairBuilder | None, num_items: int
    ) -> tuple[Tensor, Tensor]:
        """Scores (B, C) of each query's candidates — masked items at -inf — and their relevance (B, C)."""
        query = batch.eval
        if query is None:
            raise ValueError("ranking evaluation needs query batches (batch.eval is None)")
        targets, seen = query.targets, query.seen
        B = len(targets.lengths)
        rows = torch.arange(B, device=targets.ids.device).unsqueeze(1)
        if query.candidates is not None:  # sampled protocol: targets first, then the stored negatives
            cands = query.candidates
            if self._items is not None:
                q = net.encode_query(batch)  # (B, D)
                scores = (q.unsqueeze(1) * self._items[cands.ids]).sum(-1)  # (B, C)
            else:
                scores = self._pair_scores(net, pairs, batch, cands.ids, stage)
            position = torch.arange(cands.ids.shape[1], device=scores.device).unsqueeze(0)  # (1, C)
            scores = scores.masked_fill(~cands.mask(), float("-inf"))
            return scores, position < targets.lengths.unsqueeze(1)
        if self._items is not None:  # full ranking over every item code
            scores = net.encode_query(batch) @ self._items.T  # (B, V)
        else:
            codes = torch.arange(num_items, device=targets.ids.device).expand(B, num_items)
            scores = self._pair_scores(net, pairs, batch, codes, stage)
        V = scores.shape[1]
        # padded positions point at code 0, which is masked anyway: a scratch column keeps them harmless
        scores = torch.cat([scores, scores.new_zeros(B, 1)], 1)  # (B, V + 1)
        scores[:, 0] = float("-inf")
        scores[rows, torch.where(seen.mask(), seen.ids, V)] = float("-inf")
        relevant = torch.zeros_like(scores, dtype=torch.bool)
        relevant[rows, torch.where(targets.mask(), targets.ids, V)] = True
        return scores[:, :V], relevant[:, :V]

    def step(
        self,
        net: nn.Module,
        batch: Batch,
        stage: str,
        pairs: PairBuilder | None,
        num_items: int,
        analysis: TestAnalysis | None = None,
    ) -> None:
        """Score a query batch into the stage's metrics (and into `analysis`, the test stage's extras)."""
        scores, relevant = self.scores(net, batch, stage, pairs, num_items)
        metric = self.metrics[stage]
        if analysis is None:
            metric.update(scores, relevant)
        else:
            values = metric.per_query(scores, relevant)  # (B, M): the metrics of each query
            metric.update(scores, relevant, values)
            codes = column_codes(batch, scores)
            analysis.ranking_step(metric.per_query, batch, scores, relevant, codes, values)
        if self.first_cold_item is not None:
            self._update_cold(batch, stage, scores, relevant)

    def _update_cold(self, batch: Batch, stage: str, scores: Tensor, relevant: Tensor) -> None:
        """The cold-start slice: queries with a target on an untrained item, only those targets relevant and
        the query's other targets taken out of the ranking."""
        codes = column_codes(batch, scores)
        cold = relevant & (codes >= self.first_cold_item)  # (B, C)
        rows = cold.any(1)
        if rows.any():
            cold, relevant = cold[rows], relevant[rows]
            self.metrics[f"{stage}_cold"].update(
                scores[rows].masked_fill(relevant & ~cold, float("-inf")), cold
            )

    def end(self, stage: str) -> dict[str, Tensor]:
        values = self.metrics[stage].compute()
        self.metrics[stage].reset()
        if self.first_cold_item is not None:
            cold = self.metrics[f"{stage}_cold"]
            try:  # compute() syncs the counts first, so every process takes the same branch
                with warnings.catch_warnings():  # "compute before update": expected where no target is cold
                    warnings.simplefilter("ignore", UserWarning)
                    sliced = cold.compute()
            except RuntimeError:  # no query of this stage has a cold target
                sliced = dict.fromkeys(values, values["mrr"].new_tensor(float("nan")))
            values |= {f"cold/{k}": v for k, v in sliced.items()}
            cold.reset()
        self._items = None
        return values
