"""One LightningDataModule for every source: prepare (cached), audit, gather batches by tensor indexing.

Two views of the same prepared data, chosen by the task (`set_view`):

* "ctr" — training rows are the training interactions with their labels; on implicit data (positives only)
  each positive is followed by `train_negatives` sampled negatives. Validation/test either score the logged
  impressions of the period (`ctr_eval: impressions`: AUC, GAUC, LogLoss — needs real negatives, as the
  simulator's impression log has) or rank candidates per user (`ctr_eval: ranking`).
* "retrieval" — training rows are the positive training interactions (in-batch softmax); validation/test are
  ranking queries.

Ranking queries: one per user with new positives in the period; the user as of the period's start (history =
all positives of the earlier splits), the items to find (`eval.targets`), the items to mask (`eval.seen`) and,
for sampled protocols, the stored candidates (`eval.candidates`). See `recsys_lab/data/prepare.py`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytorch_lightning as pl_
import torch
from torch.utils.data import DataLoader, Dataset

from recsys_lab.data.audit import audit
from recsys_lab.data.batch import Batch
from recsys_lab.data.prepare import PREPARE_VERSION, STAGES, Prepared, prepare
from recsys_lab.data.processing import Preprocess
from recsys_lab.data.schema import Feature, Schema
from recsys_lab.data.store import EntityTable, FeatureStore, Ragged, TextTables
from recsys_lab.data.text import tokenize_texts

VIEWS = ("ctr", "retrieval")
CTR_EVALS = ("impressions", "ranking")


@dataclass
class TextSpec:
    """What a language model needs from the data: its tokenizer and the pair layout.

    Args:
        pretrained: tokenizer folder (or hub id) — the cross-encoder's own weights folder.
        max_length: tokens per (history, candidate) pair.
        max_item_tokens: tokens kept per item text.
        max_history_items: most recent history items whose texts are put in front of the candidate.
        allow_download: let transformers fetch a hub id (off: nothing waits on a network).
    """

    pretrained: str
    max_length: int = 128
    max_item_tokens: int = 24
    max_history_items: int = 5
    allow_download: bool = False


class _Rows(Dataset):
    """Map-style dataset whose `__getitems__` gathers a whole batch with tensor indexing."""

    def __init__(self, n: int, gather) -> None:
        self.n, self.gather = n, gather

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Batch:  # DataLoader uses __getitems__; kept for completeness
        return self.gather(torch.tensor([index]))

    def __getitems__(self, indices: list[int]) -> Batch:
        return self.gather(torch.as_tensor(indices, dtype=torch.long))


def parse_candidates(spec: Any, seed: int):
    """`eval_candidates` from config: an object, None / "full", or "uniform_N" / "popularity_N"."""
    from recsys_lab.data.sampling import FullRanking, SampledRanking

    if spec is None or spec == "full":
        return FullRanking()
    if isinstance(spec, str):
        kind, _, n = spec.partition("_")
        if kind not in ("uniform", "popularity") or not n.isdigit() or int(n) < 1:
            raise ValueError(
                f"data.eval_candidates='{spec}': expected 'full', 'uniform_N' or 'popularity_N' (e.g. uniform_100)"
            )
        return SampledRanking(kind=kind, n=int(n), seed=seed)
    return spec


def parse_negatives(spec: Any):
    """`train_negatives` from config: an object, None, or "uniform_N" / "popularity_N"."""
    from recsys_lab.data.sampling import PopularityNegatives, UniformNegatives

    if spec is None or not isinstance(spec, str):
        return spec
    kind, _, n = spec.partition("_")
    if kind not in ("uniform", "popularity") or not n.isdigit() or int(n) < 1:
        raise ValueError(
            f"data.train_negatives='{spec}': expected null, 'uniform_N' or 'popularity_N' (e.g. uniform_4)"
        )
    return UniformNegatives(n=int(n)) if kind == "uniform" else PopularityNegatives(n=int(n))


def _identity(batch: Batch) -> Batch:
    return batch


class RecDataModule(pl_.LightningDataModule):
    """Prepares a source for training and evaluation under an explicit, logged protocol.

    Args:
        source: an object with `name`, `fingerprint()`, `describe()` and `load() -> RawData`.
        split: the splitting protocol (`TemporalSplit`, `LeaveOneOutSplit`, `RandomRatioSplit`, `PreSplit`).
        cache_dir: where prepared data are cached (keyed by a fingerprint of source, protocol and code).
        preprocess: implicit conversion, duplicates, k-core, minimum history (`Preprocess`).
        eval_candidates: "full" / None (whole catalogue, seen items masked), "uniform_N" / "popularity_N" (N
            sampled negatives per target, drawn once with `seed` and stored), or a sampler object.
        train_negatives: sampled negatives per positive for CTR training on implicit data: "uniform_N",
            "popularity_N" or a sampler object; None uses the logged labels as they are.
        ctr_eval: how the "ctr" view evaluates: "impressions" (logged rows: AUC, GAUC, LogLoss) or "ranking".
        batch_size / eval_batch_size: rows per training / evaluation batch (evaluation: queries for ranking).
        history_len: L, the most recent positives carried as the behaviour sequence.
        history_features: item categorical columns carried along the history besides the item id.
        log_dense: numeric item/user columns that are log1p-transformed before standardisation.
        text: tokenizer and pair layout for language models; None for models without text.
        max_train_rows / max_eval_rows: seeded subsample of training rows / evaluation rows or queries; None
            keeps all. Used to keep CPU runs of large models short; printed with the results.
        num_workers: DataLoader workers (gathering is vectorised, so 0 is usually fastest).
        seed: seed of the subsamples, the evaluation candidates and the training negatives.
        path / version / columns: shorthands that the source config interpolates (`data.path=...`,
            `data.version=...`, `data.columns.user=...`); recorded in the protocol.
    """

    def __init__(
        self,
        source: Any,
        split: Any,
        cache_dir: str,
        preprocess: Preprocess | None = None,
        eval_candidates: Any = None,
        train_negatives: Any = None,
        ctr_eval: str = "impressions",
        batch_size: int = 1024,
        eval_batch_size: int = 4096,
        history_len: int = 30,
        history_features: list[str] | tuple[str, ...] = (),
        log_dense: list[str] | tuple[str, ...] = (),
        text: TextSpec | None = None,
        max_train_rows: int | None = None,
        max_eval_rows: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        path: str | None = None,
        version: str | None = None,
        columns: dict | None = None,
    ) -> None:
        super().__init__()
        for key, value in {
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
            "history_len": history_len,
        }.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key}={value}: expected a positive integer")
        if ctr_eval not in CTR_EVALS:
            raise ValueError(f"data.ctr_eval='{ctr_eval}': expected one of {CTR_EVALS}")
        self.source, self.split = source, split
        self.preprocess = preprocess if preprocess is not None else Preprocess()
        self.eval_candidates = parse_candidates(eval_candidates, seed)
        self.train_negatives = parse_negatives(train_negatives)
        self.ctr_eval = ctr_eval
        self.path, self.version, self.columns = path, version, columns
        self.cache_dir = Path(cache_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.history_len = history_len
        self.history_features = list(history_features)
        self.log_dense = list(log_dense)
        self.text = text
        self.max_train_rows, self.max_eval_rows = max_train_rows, max_eval_rows
        self.num_workers, self.seed = num_workers, seed
        self.view = "ctr"
        self._ready = False
        self._loaded: Prepared | None = None

    # ---- cache ---------------------------------------------------------------------------------------------
    def protocol_fingerprint(self) -> str:
        """Key of the prepared cache: source (parameters and files), every protocol choice, code version."""
        blob = json.dumps(
            {
                "source": self.source.fingerprint(),
                "preprocess": self.preprocess.describe(),
                "split": self.split.describe(),
                "eval_candidates": self.eval_candidates.describe(),
                "log_dense": sorted(self.log_dense),
                "prepare_version": PREPARE_VERSION,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def cache_path(self) -> Path:
        return self.cache_dir / f"{self.source.name}-{self.protocol_fingerprint()}"

    def _prepared(self) -> Prepared:
        """The prepared data: read from the cache once per process, built and cached when missing."""
        if self._loaded is not None:
            return self._loaded
        fingerprint = self.protocol_fingerprint()
        prepared = Prepared.load(self.cache_path, fingerprint)
        if prepared is None:
            raw = self.source.load()
            prepared = prepare(
                raw, self.preprocess, self.split, self.eval_candidates, self.log_dense, oracle=raw.oracle
            )
            prepared.save(self.cache_path, fingerprint)
            prepared = Prepared.load(self.cache_path, fingerprint)  # one code path for fresh and cached data
        self._loaded = prepared
        return prepared

    # ---- Lightning hooks ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Build and cache the prepared data once (runs on one process)."""
        self._prepared()

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        self._build(self._prepared())
        self._ready = True

    def set_view(self, view: str) -> None:
        if view not in VIEWS:
            raise ValueError(f"data view '{view}' is unknown; expected one of {VIEWS}")
        self.view = view

    # ---- in-memory tables ----------------------------------------------------------------------------------
    def _build(self, p: Prepared) -> None:
        meta = p.meta
        self.meta = meta
        if meta.get("cutoffs") and getattr(self.split, "cutoffs_", None) is None:
            self.split.cutoffs_ = tuple(meta["cutoffs"])  # cached data: `assign` did not run in this process
        features = meta["features"]
        for name in self.history_features:
            if features.get(name, {}).get("kind") != "categorical" or features[name]["side"] != "item":
                item_cats = sorted(
                    k for k, v in features.items() if v["side"] == "item" and v["kind"] == "categorical"
                )
                raise ValueError(
                    f"data.history_features: '{name}' is not a categorical item column; item columns are {item_cats}"
                )
        rows = p.rows
        user = torch.as_tensor(rows["user"].to_numpy().astype(np.int64))
        item = torch.as_tensor(rows["item"].to_numpy().astype(np.int64))
        split = torch.as_tensor(rows["split"].to_numpy().astype(np.int64))
        ts = torch.as_tensor(rows["timestamp"].to_numpy().astype(np.int64))
        positive = rows["positive"].to_numpy()
        n_users, n_items = p.users.height, p.items.height

        # timelines: positives of splits <= level, per user in time order
        order = np.lexsort((ts.numpy(), user.numpy()))
        timelines, timeline_ts = [], []
        for level in range(3):
            keep = order[positive[order] & (split.numpy()[order] <= level)]
            timelines.append(Ragged.from_groups(user.numpy()[keep], item.numpy()[keep], n_users))
            timeline_ts.append(torch.as_tensor(ts.numpy()[keep]))
        n_prior = torch.zeros_like(user)
        for level in range(3):
            at = (split == level).nonzero().squeeze(1)
            n_prior[at] = timelines[level].count_before(timeline_ts[level], user[at], ts[at])

        item_code = torch.as_tensor(p.items["item_id_code"].to_numpy().astype(np.int64))
        n_codes = meta["vocab_sizes"]["item_id"]
        item_entity = torch.zeros(n_codes, dtype=torch.long)
        known = item_code > 0
        item_entity[item_code[known]] = torch.arange(n_items)[known]

        self.text_tables = self._tokenize(p) if self.text is not None else None
        self.store = FeatureStore(
            item_key="item_id",
            users=self._entity_table(p.users, "user", features),
            items=self._entity_table(p.items, "item", features),
            item_entity=item_entity,
            row_sparse={c: torch.as_tensor(rows[c].to_numpy().astype(np.int64)) for c in meta["context"]},
            labels={c: torch.as_tensor(rows[c].to_numpy().astype(np.float32)) for c in meta["labels"]},
            user=user,
            item=item,
            split=split,
            timelines=timelines,
            n_prior=n_prior,
            history_len=self.history_len,
            history_features=self.history_features,
            text=self.text_tables,
        )
        self._positive = torch.as_tensor(positive)
        self._oracle = (
            torch.as_tensor(rows[meta["oracle"]].to_numpy().astype(np.float32))
            if meta.get("oracle")
            else None
        )
        self.item_counts = torch.as_tensor(meta["item_counts"], dtype=torch.float32)
        self.schema = self._schema(meta)

        # rows and queries per stage (seeded subsamples where configured)
        rng = np.random.default_rng(self.seed)
        self.rows: dict[str, torch.Tensor] = {}
        for stage, code in STAGES.items():
            idx = (split == code).nonzero().squeeze(1).numpy()
            limit = self.max_train_rows if stage == "train" else self.max_eval_rows
            if limit is not None and len(idx) > limit:
                idx = np.sort(rng.choice(idx, size=limit, replace=False))
            self.rows[stage] = torch.as_tensor(idx)
        self.queries = {}
        for stage in ("val", "test"):
            q = p.queries[stage]
            if self.max_eval_rows is not None and q.height > self.max_eval_rows:
                q = q[np.sort(rng.choice(q.height, size=self.max_eval_rows, replace=False))]
            self.queries[stage] = {
                "users": torch.as_tensor(q["user"].to_numpy().astype(np.int64)),
                "targets": Ragged.from_lists(q["targets"]),
                "seen": Ragged.from_lists(q["seen"]),
                "candidates": None
                if q["candidates"].null_count() == q.height
                else Ragged.from_lists(q["candidates"]),
            }
        self.train_positive_rows = self.rows["train"][self._positive[self.rows["train"]]]
        self._exclude = None
        if self.train_negatives is not None:
            from recsys_lab.data.sampling import PositiveSet

            train_pos = self.rows["train"][self._positive[self.rows["train"]]]
            self._exclude = PositiveSet(user[train_pos], item_code[item[train_pos]], n_codes)
            self._allowed = torch.ones(n_codes, dtype=torch.bool)
            self._allowed[0] = False
            self._generator = torch.Generator().manual_seed(self.seed)
        self.audit_report = audit(p, self.store, self.queries, self.item_counts)
        self.counts = {
            **meta["counts"],
            "users": n_users,
            "items": n_items,
            **{f"{s}_rows_used": int(len(r)) for s, r in self.rows.items()},
            **{f"{s}_queries_used": int(len(q["users"])) for s, q in self.queries.items()},
        }

    @staticmethod
    def _entity_table(frame: pl.DataFrame, side: str, features: dict) -> EntityTable:
        sparse = {f"{side}_id": torch.as_tensor(frame[f"{side}_id_code"].to_numpy().astype(np.int64))}
        seq, dense = {}, {}
        for name, f in features.items():
            if f["side"] != side:
                continue
            if f["kind"] == "categorical":
                sparse[name] = torch.as_tensor(frame[name].to_numpy().astype(np.int64))
            elif f["kind"] == "multi_categorical":
                r = Ragged.from_lists(frame[name])
                seq[name] = (
                    r.gather(torch.arange(frame.height), max_len=f["max_len"]).ids,
                    r.lengths(torch.arange(frame.height)),
                )
            elif f["kind"] == "numeric":
                dense[name] = torch.as_tensor(frame[name].to_numpy().astype(np.float32))
            elif f["kind"] == "dense_vector":
                dense[name] = torch.as_tensor(np.stack(frame[name].to_list()).astype(np.float32))
        return EntityTable(sparse, seq, dense)

    def _tokenize(self, p: Prepared) -> TextTables:
        from transformers import AutoTokenizer

        from recsys_lab.utils.pretrained import resolve_pretrained

        spec = self.text
        if p.meta.get("item_text") is None:
            raise ValueError(f"data.text is set but source '{self.source.name}' has no item text column")
        path = resolve_pretrained(spec.pretrained, allow_download=spec.allow_download)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=not spec.allow_download)
        tokens, lengths = tokenize_texts(
            tokenizer, p.items[p.meta["item_text"]].to_list(), spec.max_item_tokens
        )
        return TextTables(
            item_tokens=tokens,
            item_lengths=lengths,
            cls_id=tokenizer.cls_token_id,
            sep_id=tokenizer.sep_token_id,
            pad_id=tokenizer.pad_token_id,
            max_length=spec.max_length,
            max_history_items=spec.max_history_items,
        )

    def _schema(self, meta: dict) -> Schema:
        v, L = meta["vocab_sizes"], self.history_len
        feats = [Feature("user_id", "sparse", "user", vocab_size=v["user_id"])]
        feats.append(Feature("item_id", "sparse", "item", vocab_size=v["item_id"]))
        for name, f in meta["features"].items():
            if f["kind"] == "categorical":
                feats.append(Feature(name, "sparse", f["side"], vocab_size=v[name]))
            elif f["kind"] == "multi_categorical":
                feats.append(Feature(name, "seq", f["side"], vocab_size=v[name], max_len=f["max_len"]))
            elif f["kind"] in ("numeric", "dense_vector"):
                feats.append(Feature(name, "dense", f["side"], dim=f["dim"]))
        feats.append(
            Feature("hist_item_id", "seq", "user", vocab_size=v["item_id"], max_len=L, embed_as="item_id")
        )
        feats += [
            Feature(f"hist_{c}", "seq", "user", vocab_size=v[c], max_len=L, embed_as=c)
            for c in self.history_features
        ]
        if self.text_tables is not None:
            feats.append(Feature("pair_text", "text", "context", max_len=self.text.max_length))
        return Schema(feats, labels=list(meta["labels"]), item_counts=self.item_counts)

    # ---- datasets and loaders ------------------------------------------------------------------------------
    def _train_gather(self, rows: torch.Tensor):
        if self.train_negatives is None:
            return lambda i: self.store.impressions(rows[i])

        def gather(i: torch.Tensor) -> Batch:
            chosen = rows[i]
            negatives = self.train_negatives.sample(
                self.store.user[chosen],
                self._exclude,
                self.schema.num_items,
                self.item_counts,
                self._generator,
                allowed=self._allowed,
            )
            return self.store.with_negatives(chosen, negatives)

        return gather

    def _query_gather(self, stage: str):
        q = self.queries[stage]
        level = STAGES[stage] - 1  # history: every positive of the earlier splits

        def gather(i: torch.Tensor) -> Batch:
            seqs = {"eval.targets": q["targets"].gather(i), "eval.seen": q["seen"].gather(i)}
            if q["candidates"] is not None:
                seqs["eval.candidates"] = q["candidates"].gather(i)
            return self.store.queries(q["users"][i], level, seqs)

        return gather

    def dataset(self, stage: str) -> Dataset:
        """Rows of one stage under the current view."""
        ranking = self.view == "retrieval" or self.ctr_eval == "ranking"
        if stage == "train":
            if self.view == "retrieval":
                rows = self.train_positive_rows
                return _Rows(len(rows), lambda i: self.store.impressions(rows[i]))
            rows = self.rows["train"] if self.train_negatives is None else self.train_positive_rows
            if self.train_negatives is None and not bool((~self._positive[rows]).any()):
                raise ValueError(
                    "data.train_negatives is required: the training split has only positive labels (implicit "
                    "data); set e.g. data.train_negatives={_target_: recsys_lab.data.sampling.UniformNegatives, n: 4}"
                )
            return _Rows(len(rows), self._train_gather(rows))
        if ranking:
            return _Rows(len(self.queries[stage]["users"]), self._query_gather(stage))
        if not self.meta["has_negatives"][stage]:
            raise ValueError(
                f"data.ctr_eval=impressions needs negative labels in the {stage} split, and it has none "
                "(implicit data): use data.ctr_eval=ranking"
            )
        rows = self.rows[stage]
        return _Rows(len(rows), lambda i: self.store.impressions(rows[i]))

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train"), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size, shuffle=False)

    # ---- what tasks and the results table read -----------------------------------------------------------
    @property
    def evaluation(self) -> str:
        """How the current view's validation/test batches are scored: "impressions" or "ranking"."""
        return "ranking" if self.view == "retrieval" or self.ctr_eval == "ranking" else "impressions"

    def catalogue(self) -> Batch:
        """Item-side features of every item code (code 0, unknown, included: evaluators mask it)."""
        return self.store.items_batch(torch.arange(self.schema.num_items))

    def pairs(self, query: Batch, codes: torch.Tensor, stage: str) -> Batch:
        """(query, candidate) rows for models without separate query/item encoders (see FeatureStore.pairs)."""
        return self.store.pairs(query.sparse["eval.user"].cpu(), STAGES[stage] - 1, codes.cpu())

    def reference_metrics(self, stage: str) -> dict[str, float]:
        """Baselines on exactly the rows an impressions evaluation scores: the oracle AUC (true click
        probabilities, simulated data only) and the AUC of ranking by training popularity."""
        from sklearn.metrics import roc_auc_score

        if self.evaluation != "impressions":
            return {}
        rows = self.rows[stage]
        label = self.store.labels[self.schema.labels[0]][rows].numpy()
        if label.min() == label.max():
            return {}
        codes = self.store.items.sparse["item_id"][self.store.item[rows]]
        out = {"popularity_auc": float(roc_auc_score(label, self.item_counts[codes].numpy()))}
        if self._oracle is not None:
            out["oracle_auc"] = float(roc_auc_score(label, self._oracle[rows].numpy()))
        return out

    def describe(self) -> dict:
        """Every protocol choice and count, for the logged config and the results table."""
        return {
            **self.source.describe(),
            "preprocess": self.preprocess.describe(),
            **self.split.describe(),
            "evaluation": self.evaluation,
            "eval_candidates": self.meta["eval_candidates"]
            if self.evaluation == "ranking"
            else "logged impressions",
            "train_negatives": self.train_negatives.describe() if self.train_negatives is not None else None,
            "history_len": self.history_len,
            "history_features": self.history_features,
            "max_train_rows": self.max_train_rows,
            "max_eval_rows": self.max_eval_rows,
            **({"text": asdict(self.text)} if self.text is not None else {}),
            "leakage_audit": self.audit_report,
            **self.counts,
        }

    def fingerprint(self) -> str:
        blob = json.dumps(
            {"prepared": self.protocol_fingerprint(), **self.describe()}, sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
