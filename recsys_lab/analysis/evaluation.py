"""What the test stage reports besides accuracy: beyond-accuracy metrics, slices and fairness gaps, per-query
values, metric@K curves and the data behind the end-of-run plots (`conf/evaluation/*`, key `evaluation`).

Metric sets (`evaluation.metric_sets`), each logged as `test/...` like the accuracy metrics:

- `beyond_accuracy` (ranking): coverage, Gini of exposure, popularity, novelty and intra-list diversity of the
  top-k lists at every k of `model.ks` (`recsys_lab.metrics.beyond`);
- `calibration` (impressions): the expected calibration error `test/ece` (torchmetrics'
  `BinaryCalibrationError`, equal-width bins, L1) of the predicted click probabilities;
- `slices`: every metric on groups of queries (ranking) or impressions (CTR), logged as
  `test/slice/<grouping>/<group>/<metric>` with the group's size (`.../queries` or `.../impressions`), and
  the fairness gap `test/gap/<grouping>/<metric>` = the largest minus the smallest group value among groups
  of at least `min_group_size`. Groupings:
  * `user_history`: users by the length of their history before the period (`history_bins`; the short end
    is the cold-start users);
  * `item_popularity`: head / torso / tail items by training popularity (`popularity_bands`: the catalogue
    sorted by training positives, head = the first share, torso = up to the second, tail = the rest, items
    never seen in training included);
  * `item_cold`: warm / cold items (`data.cold_items`: items without a training interaction);
  * `user:<column>` / `item:<column>`: the values of categorical user or item columns
    (`slice_columns`; `auto` = every user-side categorical column with at most `max_slice_groups` values).

  A user grouping partitions the queries, so the query-weighted mean of its groups is the overall metric. An
  item grouping restricts each query to its targets in the group — the query's other targets are taken out of
  the ranking, as the cold-start slice does — so a query whose targets fall in several groups counts once in
  each; with one target per query (leave-one-out) the item groupings partition the queries too.

`per_query` keeps every test query's metric values (and the CTR runs' per-user AUC and log loss) for
`per_query.parquet`, the input of the paired significance tests of `scripts/compare.py`; `curves_max_k` adds
metric@K for K = 1..max at test (the metric@K plot). Analysis runs on the test stage only: validation stays
what model selection reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import BinaryCalibrationError

from recsys_lab.metrics.beyond import BeyondAccuracy
from recsys_lab.metrics.ctr import group_auc, per_group_auc
from recsys_lab.metrics.ranking import FullRankingMetrics

METRIC_SETS = ("beyond_accuracy", "calibration", "slices")
UNKNOWN = "(unknown)"


# ---- the config -------------------------------------------------------------------------------------------
@dataclass
class EvaluationSpec:
    """`evaluation.*` (see the module docstring and conf/evaluation/default.yaml)."""

    metric_sets: tuple[str, ...] = METRIC_SETS
    per_query: bool = True
    plots: bool = True
    curves_max_k: int = 100
    history_bins: tuple[int, ...] = (5, 20)
    popularity_bands: tuple[float, float] = (0.2, 0.8)
    slice_columns: tuple[str, ...] | str = "auto"
    max_slice_groups: int = 25
    min_group_size: int = 10
    slice_metrics: tuple[str, ...] | None = None
    category: str | None = "auto"
    item_vectors: str | None = "auto"
    calibration_bins: int = 15

    @classmethod
    def from_config(cls, cfg: Any) -> EvaluationSpec:
        """The spec from `cfg.evaluation` (None: the defaults); a ValueError names a wrong key or value."""
        if cfg is None:
            return cls()
        values = (
            OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
        )
        if not isinstance(values, dict):
            raise ValueError(f"evaluation must be a mapping of options, got {values!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"evaluation.{unknown[0]} is not an option; options are {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        bad = [m for m in self.metric_sets if m not in METRIC_SETS]
        if bad:
            raise ValueError(
                f"evaluation.metric_sets: {bad[0]!r} is not a metric set; choose from {list(METRIC_SETS)}"
            )

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        bins = self.history_bins
        if (
            not isinstance(bins, (list, tuple))
            or not bins
            or any(not is_int(b) or b < 0 for b in bins)
            or list(bins) != sorted(set(bins))
        ):
            raise ValueError(
                f"evaluation.history_bins must be a non-empty list of increasing ints >= 0, got {bins!r}"
            )
        if isinstance(self.slice_metrics, str):
            self.slice_metrics = (self.slice_metrics,)
        if isinstance(self.slice_columns, (list, tuple)) and any(
            not isinstance(c, str) for c in self.slice_columns
        ):
            raise ValueError(
                f"evaluation.slice_columns must be 'auto' or a list of column names, got {self.slice_columns!r}"
            )
        bands = list(self.popularity_bands)
        if len(bands) != 2 or not 0 < bands[0] < bands[1] < 1:
            raise ValueError(
                f"evaluation.popularity_bands must be [head, head+torso] with 0 < a < b < 1, got {bands}"
            )
        if not is_int(self.curves_max_k) or self.curves_max_k < 0:
            raise ValueError(
                f"evaluation.curves_max_k must be an int >= 0 (0: no curves), got {self.curves_max_k!r}"
            )
        for key in ("max_slice_groups", "min_group_size", "calibration_bins"):
            value = getattr(self, key)
            if not is_int(value) or value < 1:
                raise ValueError(f"evaluation.{key} must be a positive int, got {value!r}")

    def wants(self, metric_set: str) -> bool:
        return metric_set in self.metric_sets

    def describe(self) -> dict:
        """What is printed with the results and stored in results.json."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


# ---- the data the analysis reads ---------------------------------------------------------------------------
@dataclass
class Grouping:
    """One way of slicing: a group code per user entity, per item code or per history length.

    side: "user" (codes index user entities), "item" (codes index item codes) or "history" (codes index history
    lengths, clamped to the last entry); labels[c] names group c.
    """

    name: str
    side: str
    codes: Tensor
    labels: list[str]


@dataclass
class AnalysisData:
    """What the analysis needs of a dataset, built once by the DataModule (`RecDataModule.analysis_data`).

    users_raw: raw id of every user entity; item_counts: float [V] training positives per item code;
    groupings: the slices; categories [V, G] / vectors [V, D]: per item code, for intra-list diversity (None
    when the data has no such column), with their column names; user_history: int64 [users], each user's
    positives before the test period (ranking queries; None: 0); row_user / row_item_code / row_history: per
    interaction row, its user entity, item code and positives before it (impression analysis).
    """

    users_raw: list[str]
    item_counts: Tensor
    groupings: list[Grouping] = field(default_factory=list)
    categories: Tensor | None = None
    category_column: str | None = None
    vectors: Tensor | None = None
    vector_column: str | None = None
    user_history: Tensor | None = None
    row_user: Tensor | None = None
    row_item_code: Tensor | None = None
    row_history: Tensor | None = None


def _history_grouping(bins: Sequence[int]) -> Grouping:
    """Group of each history length 0..max(bins)+1 (the last code holds every longer history)."""
    edges = list(bins)
    labels, lows = [], [0] + [b + 1 for b in edges]
    for low, high in zip(lows, edges, strict=False):
        labels.append(f"{low}-{high}")
    labels.append(f"{lows[-1]}+")
    lengths = torch.arange(edges[-1] + 2)
    codes = torch.bucketize(lengths, torch.tensor(edges), right=False)  # length <= edges[i] -> i
    return Grouping("user_history", "history", codes, labels)


def _popularity_grouping(item_counts: Tensor, bands: Sequence[float]) -> Grouping:
    """head / torso / tail of the catalogue (codes 1..V-1) by training popularity, ties by code."""
    V = item_counts.numel()
    order = torch.argsort(-item_counts[1:].double(), stable=True) + 1  # (V-1,): most popular first
    rank = torch.empty(V, dtype=torch.long)
    rank[order] = torch.arange(V - 1)
    rank[0] = 0
    n = V - 1
    head, torso = round(bands[0] * n), round(bands[1] * n)
    codes = torch.where(rank < head, 0, torch.where(rank < torso, 1, 2))
    return Grouping("item_popularity", "item", codes, ["head", "torso", "tail"])


def build_analysis_data(store, users_raw: Sequence[Any], spec: EvaluationSpec) -> AnalysisData:
    """The slices and content tables of `store` (a FeatureStore with every feature) under `spec`."""
    from recsys_lab.data.prepare import STAGES

    meta = store.meta
    counts = store.item_counts.double()
    users = torch.arange(len(users_raw))
    data = AnalysisData(
        users_raw=[str(u) for u in users_raw],
        item_counts=counts,
        # positives before the test period: what a test query's model sees as the user's history
        user_history=store.timelines[STAGES["test"] - 1].lengths(users),
        row_user=store.user,
        row_item_code=store.item_codes(store.item),
        row_history=store.n_prior,
    )

    def labels_of(column: str, size: int) -> list[str]:
        vocab = meta.vocabularies.get(column, [])
        return [UNKNOWN] + [str(v) for v in vocab] + [f"code {c}" for c in range(len(vocab) + 1, size)]

    if spec.wants("slices"):
        data.groupings.append(_history_grouping(spec.history_bins))
        data.groupings.append(_popularity_grouping(counts, spec.popularity_bands))
        if meta.first_cold_item is not None:
            cold = (torch.arange(counts.numel()) >= meta.first_cold_item).long()
            data.groupings.append(Grouping("item_cold", "item", cold, ["warm", "cold"]))
        categorical = {
            n: f for n, f in meta.features.items() if f.side in ("user", "item") and f.kind == "categorical"
        }
        columns = spec.slice_columns
        if columns == "auto":
            columns = [
                n
                for n, f in categorical.items()
                if f.side == "user" and meta.vocab_sizes[n] - 1 <= spec.max_slice_groups
            ]
        elif isinstance(columns, str):
            columns = [columns]
        for name in columns:
            if name not in categorical:
                raise ValueError(
                    f"evaluation.slice_columns: '{name}' is not a categorical user or item column of this "
                    f"data; those are {sorted(categorical)}"
                )
            side = categorical[name].side
            table = (
                store.users.sparse[name] if side == "user" else store.items.sparse[name][store.item_entity]
            )
            labels = labels_of(name, meta.vocab_sizes[name])
            data.groupings.append(Grouping(f"{side}:{name}", side, table.long(), labels))

    if spec.wants("beyond_accuracy"):
        column = _item_column(
            store, spec.category, ("categorical", "multi_categorical"), "evaluation.category"
        )
        if column is not None:
            if column in store.items.sparse:
                table = store.items.sparse[column].unsqueeze(1)  # (items, 1)
            else:
                table = store.items.seq[column][0]  # (items, G), padded with 0
            data.category_column, data.categories = column, table[store.item_entity]
        column = _item_column(store, spec.item_vectors, ("dense_vector",), "evaluation.item_vectors")
        if column is not None:
            data.vector_column, data.vectors = column, store.items.dense[column][store.item_entity]
    return data


def _item_column(store, choice: str | None, kinds: tuple[str, ...], key: str) -> str | None:
    """The item column `choice` names (null: none; "auto": the first item column of one of `kinds`, none if
    the data has no such column); a ValueError naming `key` for a column of another kind or side."""
    found = [
        n for n, f in store.meta.features.items() if f.side == "item" and f.kind in kinds and n != "item_id"
    ]
    if choice is None or (choice == "auto" and not found):
        return None
    if choice == "auto":
        return found[0]
    if choice not in found:
        raise ValueError(
            f"{key}: '{choice}' is not an item column of kind {' or '.join(kinds)}; those are {found}"
        )
    return choice


# ---- streaming records --------------------------------------------------------------------------------------
class Records(Metric):
    """Rows of named tensors appended batch by batch and concatenated at `compute()` (across DDP processes).

    Each field starts with a zero-row tensor of its shape and dtype, so a process that saw no row still
    contributes a well-formed part to the all-gather (torchmetrics' fallback for an empty list state is a 1-D
    float tensor, which cannot be concatenated with [N, M] rows).

    Args:
        fields: {name: (shape of one row, dtype)}, e.g. {"values": ((M,), torch.float64)}.
    """

    full_state_update = False

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        super().__init__()
        self.fields = dict(fields)
        for name in self.fields:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self._prime()

    def _prime(self) -> None:
        for name, (shape, dtype) in self.fields.items():
            getattr(self, name).append(torch.zeros((0, *shape), dtype=dtype, device=self.device))

    def reset(self) -> None:
        super().reset()
        self._prime()

    def update(self, **values: Tensor) -> None:
        for name, (_, dtype) in self.fields.items():
            getattr(self, name).append(values[name].detach().to(dtype))

    def compute(self) -> dict[str, Tensor]:
        """Every field's rows, on the CPU."""
        out = {}
        for name in self.fields:
            parts = getattr(self, name)
            out[name] = (torch.cat(parts) if isinstance(parts, list) else parts).cpu()
        return out


def _group_means(codes: Tensor, values: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Mean of the rows of `values` [N, M] per group code [N] (0..n_groups-1), float64 [n_groups, M], and the
    group sizes int64 [n_groups]; empty groups get NaN."""
    sums = torch.zeros(n_groups, values.shape[1], dtype=torch.float64).index_add_(0, codes, values.double())
    counts = torch.bincount(codes, minlength=n_groups)
    return sums / counts.unsqueeze(1).clamp(min=1), counts


def slice_report(
    grouping: Grouping, means: Tensor, counts: Tensor, names: Sequence[str], min_group_size: int, unit: str
) -> dict[str, float]:
    """`slice/<grouping>/<group>/<metric>` for non-empty groups, their sizes and the fairness gaps."""
    out: dict[str, float] = {}
    for g, label in enumerate(grouping.labels):
        if int(counts[g]) == 0:
            continue
        out[f"slice/{grouping.name}/{label}/{unit}"] = float(counts[g])
        for j, name in enumerate(names):
            out[f"slice/{grouping.name}/{label}/{name}"] = float(means[g, j])
    large = counts >= min_group_size
    if int(large.sum()) >= 2:
        for j, name in enumerate(names):
            column = means[large, j]
            column = column[~torch.isnan(column)]
            if column.numel() >= 2:
                out[f"gap/{grouping.name}/{name}"] = float(column.max() - column.min())
    return out


# restricted re-rankings of queries whose targets fall in several groups are done in chunks of rows of at
# most this many scores, so that a large catalogue does not multiply the evaluation's memory
_RESTRICT_CHUNK = 1 << 24
IMPRESSION_METRICS = ("auc", "gauc", "logloss")


# ---- the analysis of one test stage -----------------------------------------------------------------------
class TestAnalysis(nn.Module):
    """Streams the test stage's extra metrics and records; `end()` reduces them (see the module docstring).

    Args:
        spec: the `evaluation` config.
        data: the dataset's `AnalysisData`.
        kind: "ranking" or "impressions" (the connected evaluation).
        ks: the ranking cut-offs (`model.ks`).
        names: the per-query metric names of the ranking metrics, in `FullRankingMetrics.per_query` order.
    """

    __test__ = False  # not a pytest class, whatever its name

    def __init__(
        self, spec: EvaluationSpec, data: AnalysisData, kind: str, ks: Sequence[int], names: Sequence[str]
    ) -> None:
        super().__init__()
        self.spec, self.data, self.kind = spec, data, kind
        self.ks = tuple(ks)
        self.names = list(names) if kind == "ranking" else list(IMPRESSION_METRICS)
        wanted = spec.slice_metrics if spec.slice_metrics is not None else self._default_slice_metrics()
        missing = [w for w in wanted if w not in self.names]
        if missing:  # checked now, not after a whole fit
            raise ValueError(
                f"evaluation.slice_metrics: {missing[0]!r} is not a metric of this evaluation; they are {self.names}"
            )
        self.slice_columns = [self.names.index(w) for w in wanted]
        self.item_groupings = [g for g in data.groupings if g.side == "item"]
        # lookups that follow the task's device
        history = data.user_history if data.user_history is not None else torch.zeros(len(data.users_raw))
        self.register_buffer("user_history", history.long(), persistent=False)
        for i, grouping in enumerate(self.item_groupings):
            self.register_buffer(f"item_groups_{i}", grouping.codes.long(), persistent=False)
        self.beyond = self.curves = self.calibration = None
        if kind == "ranking":
            if spec.wants("beyond_accuracy"):
                self.beyond = BeyondAccuracy(ks, data.item_counts, data.categories, data.vectors)
            if spec.curves_max_k > 0:
                self.curves = FullRankingMetrics(range(1, spec.curves_max_k + 1))
            fields = {
                "user": ((), torch.long),
                "history": ((), torch.long),
                "values": ((len(self.names),), torch.float64),
            }
            fields |= {f"group_{i}": ((), torch.long) for i in range(len(self.item_groupings))}
            if self.beyond is not None:
                fields["beyond"] = ((len(self.beyond.names),), torch.float64)
            self.records = Records(fields)
            # queries of an item grouping with targets in several of its groups: one entry per (query, group)
            self.mixed = nn.ModuleList(
                Records({"group": ((), torch.long), "values": ((len(self.names),), torch.float64)})
                for _ in self.item_groupings
            )
        else:
            if spec.wants("calibration"):
                self.calibration = BinaryCalibrationError(n_bins=spec.calibration_bins, norm="l1")
            self.records = Records(
                {"row": ((), torch.long), "logit": ((), torch.float64), "label": ((), torch.float32)}
            )
        self.results: dict[str, Any] = {}

    def describe(self) -> dict:
        """The analysis's settings as results.json records them: the config, and what `auto` resolved to."""
        return self.spec.describe() | {
            "category_column": self.data.category_column,
            "vector_column": self.data.vector_column,
            "groupings": [g.name for g in self.data.groupings],
        }

    def _default_slice_metrics(self) -> list[str]:
        """Every ranking metric at the smallest k and the untruncated MRR; the CTR metrics."""
        if self.kind != "ranking":
            return list(IMPRESSION_METRICS)
        k = self.ks[0]
        return [f"{m}@{k}" for m in ("recall", "ndcg", "hit", "precision", "mrr")] + ["mrr"]

    def _history_codes(self, grouping: Grouping, lengths: Tensor) -> Tensor:
        """The user_history group of history lengths (longer than the table: its last group)."""
        return grouping.codes[lengths.cpu().clamp(max=len(grouping.codes) - 1)]

    # ---- ranking ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def ranking_step(
        self, per_query, batch, scores: Tensor, relevant: Tensor, codes: Tensor, values: Tensor
    ) -> None:
        """Record one query batch. per_query: the stage's `FullRankingMetrics.per_query`; scores / relevant
        (B, C) as ranked; codes: the item code of each column, [C] (full ranking) or [B, C] (candidates);
        values: the batch's per-query metrics (B, M)."""
        query = batch.eval
        B = scores.shape[0]
        codes = codes.expand(B, -1)
        entry: dict[str, Tensor] = {
            "user": query.user,
            "history": self.user_history[query.user],
            "values": values,
        }
        if self.item_groupings:
            rows, cols = relevant.nonzero(as_tuple=True)  # (M,): the targets, row by row
            target_codes = codes[rows, cols]  # (M,)
            for i in range(len(self.item_groupings)):
                table = getattr(self, f"item_groups_{i}")
                entry[f"group_{i}"] = self._item_groups(
                    per_query, table[target_codes], rows, cols, self.mixed[i], scores, relevant
                )
        if self.beyond is not None:
            k = min(self.ks[-1], scores.shape[1])
            top, idx = torch.topk(scores, k, dim=1)  # (B, k)
            listed = torch.where(top > float("-inf"), codes.gather(1, idx), -1)  # (B, k)
            entry["beyond"] = self.beyond.per_list(listed)
            self.beyond.update(listed, entry["beyond"])
        if self.curves is not None:
            self.curves.update(scores, relevant)
        self.records.update(**entry)

    def _item_groups(
        self,
        per_query,
        target_group: Tensor,
        rows: Tensor,
        cols: Tensor,
        mixed: Records,
        scores: Tensor,
        relevant: Tensor,
    ) -> Tensor:
        """Each query's group under an item grouping, int64 [B] (-1 when its targets fall in several groups;
        those queries are scored once per group, restricted to its targets, into `mixed`).

        target_group: (M,) the group of each target at (rows, cols) of `relevant`."""
        B = scores.shape[0]
        high = torch.full((B,), -1, dtype=torch.long, device=scores.device).scatter_reduce(
            0, rows, target_group, reduce="amax"
        )  # (B,)
        low = torch.full_like(high, torch.iinfo(torch.long).max).scatter_reduce(
            0, rows, target_group, reduce="amin"
        )
        single = high == low
        several = ~single[rows]  # (M,): targets of queries whose targets fall in several groups
        step = max(1, _RESTRICT_CHUNK // max(scores.shape[1], 1))
        for g in torch.unique(target_group[several]).tolist():
            pick = several & (target_group == g)
            query_rows = torch.unique(rows[pick])  # (R,)
            for start in range(0, len(query_rows), step):
                part = query_rows[start : start + step]  # (R',)
                take = pick & (rows >= part[0]) & (rows <= part[-1])
                in_group = torch.zeros((len(part), relevant.shape[1]), dtype=torch.bool, device=scores.device)
                in_group[torch.searchsorted(part, rows[take]), cols[take]] = True  # (R', C)
                ranked = scores[part].masked_fill(relevant[part] & ~in_group, float("-inf"))
                values = per_query(ranked, in_group)  # (R', M)
                mixed.update(
                    group=torch.full((len(part),), g, dtype=torch.long, device=scores.device), values=values
                )
        return torch.where(single, high, -1)

    # ---- impressions -------------------------------------------------------------------------------------
    @torch.no_grad()
    def impression_step(self, rows: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Record one batch of logged impressions: their row indices, logits and 0/1 labels (B,)."""
        if self.calibration is not None:
            self.calibration.update(torch.sigmoid(logits.float()), labels.long())
        self.records.update(row=rows, logit=logits, label=labels)

    # ---- the end of the stage ----------------------------------------------------------------------------
    def end(self) -> dict[str, Tensor]:
        """The extra `test/` metrics (keys without the stage prefix); keeps `results` (records, curves,
        exposure) for the files and plots of the run. Every process computes (the records are all-gathered),
        so every process takes the same branches."""
        self.results = {}
        records = self.records.compute()
        if len(next(iter(records.values()))) == 0:  # no test batch anywhere (e.g. limit_test_batches=0)
            self._reset()
            return {}
        out = self._end_ranking(records) if self.kind == "ranking" else self._end_impressions(records)
        self._reset()
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}

    def _reset(self) -> None:
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()

    def _end_ranking(self, rec: dict[str, Tensor]) -> dict[str, float]:
        # one query per user and stage: rows repeated by a distributed sampler's padding are dropped
        users, first = _first_occurrence(rec["user"])
        rec = {k: v[first] for k, v in rec.items()}
        values, history = rec["values"], rec["history"]
        out: dict[str, float] = {}
        if self.beyond is not None:
            out |= {k: float(v) for k, v in self.beyond.compute().items()}
            k = self.ks[-1]
            self.results["exposure"] = (k, self.beyond.exposure_at(k).cpu().numpy())
        if self.curves is not None:
            curve = self.curves.compute()
            self.results["curves"] = {
                "k": list(self.curves.ks),
                **{
                    m: [float(curve[f"{m}@{k}"]) for k in self.curves.ks]
                    for m in ("recall", "ndcg", "hit", "precision", "mrr")
                },
            }
        names = [self.names[j] for j in self.slice_columns]
        slices: dict[str, Tensor] = {}  # the group of every query per user-side grouping (per_query file)
        item_index = {id(g): j for j, g in enumerate(self.item_groupings)}
        for grouping in self.data.groupings:
            if grouping.side == "item":
                j = item_index[id(grouping)]
                group = rec[f"group_{j}"]
                extra = self.mixed[j].compute()
                codes = torch.cat([group[group >= 0], extra["group"]])
                vals = torch.cat([values[group >= 0], extra["values"]])
            else:
                codes = (
                    grouping.codes[users]
                    if grouping.side == "user"
                    else self._history_codes(grouping, history)
                )
                vals = values
                slices[grouping.name] = codes
            if self.spec.wants("slices"):
                means, counts = _group_means(codes, vals[:, self.slice_columns], len(grouping.labels))
                out |= slice_report(grouping, means, counts, names, self.spec.min_group_size, "queries")
        if self.spec.per_query:
            frame = {
                "user": [self.data.users_raw[u] for u in users.tolist()],
                "history_length": history.numpy(),
            }
            frame |= {name: values[:, j].numpy() for j, name in enumerate(self.names)}
            if self.beyond is not None:
                frame |= {name: rec["beyond"][:, j].numpy() for j, name in enumerate(self.beyond.names)}
            for j, grouping in enumerate(self.item_groupings):
                groups = rec[f"group_{j}"].tolist()
                frame[f"slice:{grouping.name}"] = [grouping.labels[g] if g >= 0 else "mixed" for g in groups]
            for name, codes in slices.items():
                grouping = next(g for g in self.data.groupings if g.name == name)
                frame[f"slice:{name}"] = [grouping.labels[c] for c in codes.tolist()]
            frame = pl.DataFrame(frame)
            self.results["per_query"] = frame.insert_column(0, frame["user"].alias("query_key"))
        return out

    def _end_impressions(self, rec: dict[str, Tensor]) -> dict[str, float]:
        # an impression row repeated by a distributed sampler's padding counts once
        rows, first = _first_occurrence(rec["row"])
        logits, labels = rec["logit"][first], rec["label"][first]
        out: dict[str, float] = {}
        if self.calibration is not None:
            out["ece"] = float(self.calibration.compute())
        losses = F.binary_cross_entropy_with_logits(logits, labels.double(), reduction="none")  # (M,)
        users = self.data.row_user[rows]
        self.results["predictions"] = (logits.numpy(), labels.numpy())
        if self.spec.wants("slices"):
            for grouping in self.data.groupings:
                if grouping.side == "user":
                    codes = grouping.codes[users]
                elif grouping.side == "item":
                    codes = grouping.codes[self.data.row_item_code[rows]]
                else:  # positives before the impression: what the model saw as the user's history
                    codes = self._history_codes(grouping, self.data.row_history[rows])
                out |= self._impression_slices(grouping, codes, logits, labels, losses, users)
        if self.spec.per_query:
            groups, auc, n = per_group_auc(logits, labels, users)
            loss_sum = torch.zeros(len(groups), dtype=torch.float64)
            loss_sum.index_add_(0, torch.searchsorted(groups, users), losses)
            self.results["per_query"] = pl.DataFrame(
                {
                    "query_key": [self.data.users_raw[u] for u in groups.tolist()],
                    "user": [self.data.users_raw[u] for u in groups.tolist()],
                    "impressions": n.numpy(),
                    "gauc": auc.numpy(),
                    "logloss": (loss_sum / n).numpy(),
                }
            )
        return out

    def _impression_slices(
        self, grouping: Grouping, codes: Tensor, logits: Tensor, labels: Tensor, losses: Tensor, users: Tensor
    ) -> dict[str, float]:
        """AUC, GAUC (per user) and log loss of each group's impressions."""
        n_groups = len(grouping.labels)
        means = torch.full((n_groups, 3), float("nan"), dtype=torch.float64)
        counts = torch.bincount(codes, minlength=n_groups)
        for g in counts.nonzero().squeeze(1).tolist():
            mask = codes == g
            sub_logits, sub_labels = logits[mask], labels[mask]
            auc = group_auc(sub_logits, sub_labels, torch.zeros_like(users[mask]))
            gauc = group_auc(sub_logits, sub_labels, users[mask])
            means[g] = torch.tensor(
                [float(auc), float(gauc), float(losses[mask].mean())], dtype=torch.float64
            )
        names = [self.names[j] for j in self.slice_columns]
        return slice_report(
            grouping, means[:, self.slice_columns], counts, names, self.spec.min_group_size, "impressions"
        )


def _first_occurrence(ids: Tensor) -> tuple[Tensor, Tensor]:
    """(ids without repeats, in their order of first appearance; the positions of those first appearances)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    position = torch.full((len(unique),), len(ids), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(ids)), reduce="amin"
    )
    first = torch.sort(position).values
    return ids[first], first
