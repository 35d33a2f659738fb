"""Ranking evaluation shared by every task: one scoring contract, so every model runs under every protocol.

A query batch (see `RecDataModule`) carries `eval.targets`, `eval.seen` and, for sampled protocols,
`eval.candidates` (item codes). Scores come from the fastest path the model offers:

* `encode_query` / `encode_item` models: the catalogue is encoded once per evaluation epoch and each query
  batch is one chunk of the score matrix, `q @ items.T` (full) or a gather of candidate rows (sampled);
* any other model (`forward(batch) -> logits`): (query, candidate) rows are built by the DataModule and scored
  in chunks of at most `pair_chunk` rows.

Full ranking masks code 0 (items unknown to the training vocabulary) and every item the user interacted with
before the period; `FullRankingMetrics` then reduces each chunk with `torch.topk`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.metrics import FullRankingMetrics


class RankingEvaluation(nn.Module):
    """Ranking metrics per stage plus the scoring of query batches.

    Args:
        ks: cut-offs of recall/ndcg/hit.
        pair_chunk: (query, candidate) rows per forward pass for models without encoders.
        item_chunk: items per forward pass when encoding the catalogue.
    """

    def __init__(
        self, ks: Sequence[int] = (10, 20, 50), pair_chunk: int = 65536, item_chunk: int = 65536
    ) -> None:
        super().__init__()
        self.ks = tuple(ks)
        self.pair_chunk, self.item_chunk = pair_chunk, item_chunk
        self.metrics = nn.ModuleDict({stage: FullRankingMetrics(self.ks) for stage in ("val", "test")})
        self._items: Tensor | None = None

    @staticmethod
    def has_encoders(net: nn.Module) -> bool:
        return callable(getattr(net, "encode_query", None)) and callable(getattr(net, "encode_item", None))

    @torch.no_grad()
    def start(self, net: nn.Module, datamodule, device: torch.device) -> None:
        """Encode the catalogue once per evaluation epoch (encoder models only)."""
        self._items = None
        if self.has_encoders(net):
            items = datamodule.catalogue()
            n = len(items)
            self._items = torch.cat(
                [
                    net.encode_item(items.select(torch.arange(s, min(s + self.item_chunk, n))).to(device))
                    for s in range(0, n, self.item_chunk)
                ]
            )  # (V, D)

    def _pair_scores(self, net: nn.Module, datamodule, batch: Batch, codes: Tensor, stage: str) -> Tensor:
        """(B, C) logits of (query, candidate) rows built by the DataModule, chunked over candidates."""
        B, C = codes.shape
        step = max(1, self.pair_chunk // max(B, 1))
        parts = []
        for s in range(0, C, step):
            pairs = datamodule.pairs(batch, codes[:, s : s + step], stage).to(codes.device)
            parts.append(net(pairs).view(B, -1))
        return torch.cat(parts, 1)

    def step(self, net: nn.Module, datamodule, batch: Batch, stage: str) -> None:
        targets, seen = batch.seq["eval.targets"], batch.seq["eval.seen"]
        B = len(targets.lengths)
        rows = torch.arange(B, device=targets.ids.device).unsqueeze(1)
        if "eval.candidates" in batch.seq:  # sampled protocol: targets first, then the stored negatives
            cands = batch.seq["eval.candidates"]
            if self._items is not None:
                q = net.encode_query(batch)  # (B, D)
                scores = (q.unsqueeze(1) * self._items[cands.ids]).sum(-1)  # (B, C)
            else:
                scores = self._pair_scores(net, datamodule, batch, cands.ids, stage)
            position = torch.arange(cands.ids.shape[1], device=scores.device).unsqueeze(0)  # (1, C)
            scores = scores.masked_fill(~cands.mask(), float("-inf"))
            relevant = position < targets.lengths.unsqueeze(1)  # (B, C)
        else:  # full ranking over every item code
            if self._items is not None:
                scores = net.encode_query(batch) @ self._items.T  # (B, V)
            else:
                V = datamodule.schema.num_items
                codes = torch.arange(V, device=targets.ids.device).expand(B, V)
                scores = self._pair_scores(net, datamodule, batch, codes, stage)
            V = scores.shape[1]
            # padded positions point at code 0, which is masked anyway: a scratch column keeps them harmless
            scores = torch.cat([scores, scores.new_zeros(B, 1)], 1)  # (B, V + 1)
            scores[:, 0] = float("-inf")
            scores[rows, torch.where(seen.mask(), seen.ids, V)] = float("-inf")
            relevant = torch.zeros_like(scores, dtype=torch.bool)
            relevant[rows, torch.where(targets.mask(), targets.ids, V)] = True
            scores, relevant = scores[:, :V], relevant[:, :V]
        self.metrics[stage].update(scores, relevant)

    def end(self, stage: str) -> dict[str, Tensor]:
        values = self.metrics[stage].compute()
        self.metrics[stage].reset()
        self._items = None
        return values
