"""Explanations ("because you viewed …"): which items of a user's history drive a trained model's score.

`explain(run, user, item)` takes raw ids (as the data spell them) and returns an `Explanation`: the model's
score of (user, item), and each distinct item of the user's history with a weight, largest first.
`recommend_and_explain(run, user, k)` first ranks the items the user has not interacted with (a
recommendation never repeats a seen item, even under protocols whose evaluation leaves seen items rankable)
and explains each of the k best. `Explainer` does both for one run, its catalogue encoded once.

The history is the query ranking evaluation builds (`RequestEncoder.encode_stored`, the store's `_query_part`)
as of a timeline level — by default the test stage's view: every positive of the training and validation
periods, of which the model reads the `data.history_len` most recent. Older positives never reach the model,
so they get no weight. Two ways to weigh the history items:

* "attention" — models with `forward_with_attention(batch) -> (logits (B,), weights (B, L))` (DIN, DIEN, BST):
  the weights the model gives the history positions for this (user, item) row, summed over the positions that
  hold the same item (`Pipeline.rank` and `Pipeline._because`, as the service explains its recommendations).
  They say where the model looked, not how much the score would change without the item. DIN's weights are
  not normalised (its paper keeps their sum as the intensity of the interest) and can be negative; DIEN's
  sum to 1; BST's (the candidate slot's, last block) to less than 1.
* "occlusion" — any model that reads the history: weight of item j = score(history) - score(history with every
  occurrence of j removed, the rest in order, re-padded). Positive: the item raised the score. The history
  gets shorter (an older positive does not slide into the window): the weight is about what the model read.
  All K + 1 histories are one batch, scored through `RankingEvaluation.scores` — the contract evaluation
  scores every model with (pairs for CTR models, `encode_query` · `encode_item` for retrieval and sequence
  models).

"auto" is attention where the model has it, occlusion otherwise. Scores are logits (CTR models) or inner
products (encoder models), the numbers evaluation ranks by.

Titles are the source's item text column (`FeatureStore.item_texts`), cut before appended attributes
("Toy Story (1995). Genres: …" → "Toy Story (1995)"); a source without one shows raw ids.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from recsys_lab.data.batch import EvalTargets, Seq
from recsys_lab.data.prepare import STAGES
from recsys_lab.data.store import LEVELS, history_feature
from recsys_lab.data.views import EvalContext
from recsys_lab.serving.pipeline import Pipeline
from recsys_lab.serving.requests import EncodedRequests
from recsys_lab.serving.runs import LoadedRun
from recsys_lab.tasks.ranking import RankingEvaluation

METHODS = ("auto", "attention", "occlusion")
ATTENTION_MODELS = ("DIN", "DIEN", "BST")  # the models with forward_with_attention (for error messages)
TEST_LEVEL = STAGES["test"] - 1  # the timeline the test stage reads: training and validation positives
AS_OF = {0: "the validation period", 1: "the test period", 2: "the end of the log"}  # by timeline level
# "<title>. Genres: a, b" (MovieLens), "<title>. Categories: a. Brand: x" (Amazon): attributes after the title
_ATTRIBUTES = re.compile(r"\. [A-Z][A-Za-z ]*: ")


@dataclass
class Reason:
    """One history item behind a score: raw id, title (None without item texts), weight, and how often it
    occurs in the history the model read."""

    item_id: Any
    title: str | None
    weight: float
    count: int

    @property
    def label(self) -> str:
        return self.title or str(self.item_id)


@dataclass
class Explanation:
    """Why `model` scores `item_id` for `user_id`.

    Args:
        user_id / item_id: raw ids; title: the item's title (None without item texts).
        score: the model's score of (user, item) with the full history (logit or inner product).
        method: "attention" or "occlusion" (what "auto" chose).
        model: the model class name.
        reasons: the distinct history items, largest weight first (at most `top` of them).
        history: raw ids of the history the model read, oldest first (up to `data.history_len`).
        history_total: the user's positives before the cutoff (the model reads the last `len(history)`).
        as_of: the cutoff, in words ("the test period").
    """

    user_id: Any
    item_id: Any
    title: str | None
    score: float
    method: str
    model: str
    reasons: list[Reason] = field(default_factory=list)
    history: list[Any] = field(default_factory=list)
    history_total: int = 0
    as_of: str = AS_OF[TEST_LEVEL]

    @property
    def label(self) -> str:
        return self.title or str(self.item_id)

    def summary(self, top: int = 5, prefix: str = "Recommended") -> str:
        """`Recommended: Heat (1995) (score 1.23) — because you viewed: "Toy Story (1995)" (0.41), …`.
        Occlusion weights are score differences and carry a sign."""
        shown = [
            f'"{r.label}" ({r.weight:{"+.2f" if self.method == "occlusion" else ".2f"}})'
            for r in self.reasons[:top]
        ]
        more = ", …" if len(self.reasons) > top else ""
        return (
            f"{prefix}: {self.label} (score {self.score:.2f}) — because you viewed: {', '.join(shown)}{more}"
        )


class Explainer:
    """Explanations of one trained run's scores (see the module docstring).

    Args:
        run: a loaded run (`recsys_lab.serving.runs.load_run`).
        level: the timeline the history is read from: 0 as of validation, 1 as of test (default), 2 the whole
            log.
    """

    def __init__(self, run: LoadedRun, level: int = TEST_LEVEL) -> None:
        if level not in range(LEVELS):
            raise ValueError(
                f"level={level}: expected a timeline level in 0..{LEVELS - 1} (1: as of the test period)"
            )
        if not run.datamodule.view.store.gather_history:
            raise ValueError(
                f"{type(run.net).__name__} reads no history (its batches carry the user and item ids only): "
                "its scores do not depend on what the user viewed, so there is nothing to explain"
            )
        self.run, self.level = run, level
        # the service's request encoder and ranking stage; `explain` = L lists every distinct history item
        self.pipeline = Pipeline(ranking=run, explain=run.store.history_len)
        self.encoder = self.pipeline.encoders["ranking"]
        self.num_items = run.store.num_item_codes
        # evaluation's scoring contract; `start` encodes the catalogue once (encoder models only)
        self.evaluation = RankingEvaluation(ks=(1,))
        catalogue = functools.partial(run.datamodule.view.store.items_batch, torch.arange(self.num_items))
        self.evaluation.start(run.net, EvalContext("ranking", self.num_items, catalogue), torch.device("cpu"))
        self.has_attention = callable(getattr(run.net, "forward_with_attention", None))

    # ---- public --------------------------------------------------------------------------------------------
    def explain(self, user: Any, item: Any, method: str = "auto", top: int = 10) -> Explanation:
        """The explanation of the model's score of (user, item), raw ids."""
        method = self._method(method)
        encoded, total = self._query(user)
        return self._explain(user, encoded, total, torch.tensor([self._item_code(item)]), method, top)[0]

    @torch.no_grad()
    def recommend(self, user: Any, k: int = 3, method: str = "auto", top: int = 10) -> list[Explanation]:
        """The user's k best items by the model — code 0 and the items the user interacted with before the
        cutoff left out (whatever the protocol's evaluation masks) — each with its explanation, best first."""
        if k < 1:
            raise ValueError(f"k={k}: expected a positive number of items")
        method = self._method(method)
        encoded, total = self._query(user)
        seen = torch.as_tensor(encoded.exclude[0]).unsqueeze(0)  # (1, S) codes
        scores = self._scores(encoded, None, Seq(seen, torch.tensor([seen.shape[1]])))[0]  # (V,)
        order = torch.argsort(-scores, stable=True)  # ties in code order
        best = order[: min(k, int(torch.isfinite(scores).sum()))]
        return self._explain(user, encoded, total, best, method, top)

    # ---- the query and the item ----------------------------------------------------------------------------
    def _method(self, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"method='{method}': expected one of {METHODS}")
        if method == "attention" and not self.has_attention:
            raise ValueError(
                f"method='attention': {type(self.run.net).__name__} returns no attention weights (the models "
                f"with forward_with_attention are {', '.join(ATTENTION_MODELS)}); use method='occlusion', "
                "which explains any model"
            )
        if method == "auto":
            return "attention" if self.has_attention else "occlusion"
        return method

    def _query(self, user: Any) -> tuple[EncodedRequests, int]:
        """The user's query as of the cutoff (its history: item entities, most recent last) and the number of
        positives before the cutoff; `exclude` holds their item codes (what evaluation masks as seen)."""
        entity = self.encoder.user_entity_of(user)
        if entity is None:
            sample = list(self.encoder.user_entity)[:5]
            raise ValueError(
                f"user {user!r} is not in the data of run {self.run.path} ({len(self.encoder.user_entity)} "
                f"users, e.g. {sample})"
            )
        users = torch.tensor([entity])
        timeline = self.run.store.timelines[self.level]
        total = int(timeline.lengths(users)[0])
        if total == 0:
            raise ValueError(
                f"user {user!r} has no positive interaction before {AS_OF[self.level]}: no history, so "
                "nothing to explain"
            )
        seen = np.unique(self.run.store.item_codes(timeline.gather(users).ids[0, :total]).numpy())
        return self.encoder.encode_stored(users, self.level, [seen]), total

    def _item_code(self, item: Any) -> int:
        entities, unknown = self.encoder.item_entities([item])
        if unknown:
            sample = self.encoder.items_raw[:5]
            raise ValueError(
                f"item {item!r} is not in the catalogue of run {self.run.path} "
                f"({len(self.encoder.items_raw)} items, e.g. {sample})"
            )
        code = int(self.run.store.item_codes(torch.tensor(entities))[0])
        if code == 0:
            raise ValueError(
                f"item {item!r} has no training interaction: the model has no id for it (code 0, 'unknown') "
                "and evaluation never ranks it"
            )
        return code

    # ---- scores and weights --------------------------------------------------------------------------------
    @torch.no_grad()
    def _scores(self, encoded: EncodedRequests, codes: Tensor | None, seen: Seq | None = None) -> Tensor:
        """Scores of B queries: of their candidate item codes (B, C), or of every item code (B, V) with code
        0 and `seen` at -inf (codes None), by `RankingEvaluation.scores`: evaluation's contract for any model.
        A CTR model's (query, candidate) rows come from the queries as given (their histories), not from the
        store's timelines, so an occluded history is scored as such."""
        B = len(encoded.known_user)
        none = Seq(torch.zeros(B, 0, dtype=torch.long), torch.zeros(B, dtype=torch.long))
        candidates = None if codes is None else Seq(codes, torch.full((B,), codes.shape[1]))
        user = torch.zeros(
            B, dtype=torch.long
        )  # only the evaluator's pair builder reads it; `pairs` ignores it
        query = dataclasses.replace(encoded.batch, eval=EvalTargets(user, none, seen or none, candidates))

        def pairs(users: Tensor, chunk: Tensor, stage: str):  # (B, c) codes -> B*c rows, query-major
            return self.encoder.candidate_rows(encoded, chunk)

        scores, _ = self.evaluation.scores(self.run.net, query, "test", pairs, self.num_items)
        return scores

    @torch.no_grad()
    def _attention(self, encoded: EncodedRequests, codes: Tensor) -> tuple[Tensor, list[dict[int, float]]]:
        """Scores (C,) of one query's candidates and, per candidate, {history item entity: attention summed
        over its positions}: the service's ranking stage and its `because`."""
        scores, weights = self.pipeline.rank(encoded, codes.unsqueeze(0).numpy())  # (1, C), (1, C, L)
        per_item = []
        for c in range(len(codes)):
            because = self.pipeline._because(encoded, weights[0, c])  # every distinct item (explain = L)
            per_item.append({self.encoder.item_entity[str(b["item_id"])]: b["weight"] for b in because})
        return torch.as_tensor(scores[0]), per_item

    @torch.no_grad()
    def _occlusion(self, encoded: EncodedRequests, codes: Tensor) -> tuple[Tensor, list[dict[int, float]]]:
        """Scores (C,) of one query's candidates and, per candidate, {history item entity: score with the full
        history - score with every occurrence of the item removed}. The K distinct items give K + 1 histories,
        gathered as one batch (row 0 the full history) and scored in one call."""
        hist = encoded.history  # item entities (1, L), lengths (1,)
        n, L = int(hist.lengths[0]), hist.ids.shape[1]
        window = hist.ids[0, :n]  # (n,) the history the model reads, oldest first
        entities, where = torch.unique(window, return_inverse=True)  # (K,), (n,)
        K = len(entities)
        keep = where.unsqueeze(0) != torch.arange(K).unsqueeze(1)  # (K, n): variant k drops item k
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # (K, n): kept positions first
        lengths = torch.cat([hist.lengths[:1], keep.sum(1)])  # (K+1,)
        real = torch.arange(n).unsqueeze(0) < lengths[1:].unsqueeze(1)  # (K, n) after re-padding

        ids = hist.ids.new_zeros(K + 1, L)
        ids[0], ids[1:, :n] = hist.ids[0], window[order] * real  # (K+1, L)
        times = encoded.batch.seq[history_feature(self.run.store.item_key)].times  # (1, L) or None
        if times is not None:  # time-aware models (BST, HSTU) read each behaviour's timestamp
            times_k = times.new_zeros(K + 1, L)
            times_k[0], times_k[1:, :n] = times[0], times[0, :n][order] * real
            times = times_k
        batch = encoded.batch.select(torch.zeros(K + 1, dtype=torch.long))  # the query K + 1 times
        self.run.store.write_history(batch, Seq(ids, lengths, times))  # every hist_* feature, rewritten
        variants = EncodedRequests(
            batch,
            Seq(ids, lengths),
            encoded.known_user.expand(K + 1),
            [[] for _ in range(K + 1)],
            encoded.exclude * (K + 1),
        )
        scores = self._scores(variants, codes.unsqueeze(0).expand(K + 1, -1))  # (K+1, C)
        drop = scores[0].unsqueeze(0) - scores[1:]  # (K, C)
        per_item = [dict(zip(entities.tolist(), drop[:, c].tolist(), strict=True)) for c in range(len(codes))]
        return scores[0], per_item

    def _explain(
        self, user: Any, encoded: EncodedRequests, total: int, codes: Tensor, method: str, top: int
    ) -> list[Explanation]:
        if top < 1:
            raise ValueError(f"top={top}: expected a positive number of history items")
        weigh = self._attention if method == "attention" else self._occlusion
        scores, per_item = weigh(encoded, codes)
        n = int(encoded.history.lengths[0])
        window = encoded.history.ids[0, :n].tolist()  # item entities, oldest first
        counts = {e: window.count(e) for e in set(window)}
        raw = self.encoder.items_raw
        out = []
        for c, code in enumerate(codes.tolist()):
            entity = int(self.run.store.item_entity[code])
            # largest first; ties in entity order (np.unique's, as `Pipeline._because` sorts)
            ranked = sorted(per_item[c].items(), key=lambda kv: (-kv[1], kv[0]))[:top]
            out.append(
                Explanation(
                    user_id=user,
                    item_id=raw[entity],
                    title=self._title(entity),
                    score=float(scores[c]),
                    method=method,
                    model=type(self.run.net).__name__,
                    reasons=[Reason(raw[e], self._title(e), float(w), counts[e]) for e, w in ranked],
                    history=[raw[e] for e in window],
                    history_total=total,
                    as_of=AS_OF[self.level],
                )
            )
        return out

    def _title(self, entity: int) -> str | None:
        texts = self.run.store.item_texts
        return display_title(texts[entity]) if texts is not None else None


# ---- one call each -----------------------------------------------------------------------------------------
def explain(
    run: LoadedRun, user: Any, item: Any, method: str = "auto", top: int = 10, level: int = TEST_LEVEL
) -> Explanation:
    """Why the run's model scores `item` for `user` (raw ids): see the module docstring."""
    return Explainer(run, level).explain(user, item, method, top)


def recommend_and_explain(
    run: LoadedRun, user: Any, k: int = 3, method: str = "auto", top: int = 10, level: int = TEST_LEVEL
) -> list[Explanation]:
    """The user's k best unseen items by the run's model, each with its explanation."""
    return Explainer(run, level).recommend(user, k, method, top)


def display_title(text: str) -> str | None:
    """An item text as a title: the part before appended attributes ("Toy Story (1995). Genres: …" → "Toy
    Story (1995)"); None for an empty text."""
    text = text.strip()
    return _ATTRIBUTES.split(text, maxsplit=1)[0] if text else None


# ---- figure ------------------------------------------------------------------------------------------------
def plot_explanations(explanations: Sequence[Explanation], path: str | Path, top: int = 10) -> Path:
    """Horizontal bars of each explanation's weights (one panel per explained item, largest weight on top),
    written as PNG to `path` (parent folders created). Returns the path."""
    if not explanations:
        raise ValueError("plot_explanations: `explanations` is empty; expected at least one explanation")
    rows = [min(top, len(e.reasons)) for e in explanations]
    fig = Figure(figsize=(7, sum(0.3 * max(r, 1) + 0.9 for r in rows)))  # no pyplot: no global figure state
    axes = fig.subplots(len(explanations), 1, squeeze=False, height_ratios=[max(r, 1) + 2 for r in rows])[
        :, 0
    ]
    for ax, e, r in zip(axes, explanations, rows, strict=True):
        reasons = e.reasons[:r]
        weights = [x.weight for x in reasons]
        labels = [_short(x.label) + (f" ×{x.count}" if x.count > 1 else "") for x in reasons]
        colours = ["tab:blue" if w >= 0 else "tab:red" for w in weights]
        ax.barh(range(r), weights, color=colours)
        ax.set_yticks(range(r), labels, fontsize=8)
        ax.invert_yaxis()  # the largest weight on top
        ax.axvline(0.0, color="black", linewidth=0.6)
        unit = "attention weight" if e.method == "attention" else "score drop without the item"
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(
            f"{_short(e.label, 50)} for user {e.user_id} — {e.model}, score {e.score:.2f}", fontsize=9
        )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    return path


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
