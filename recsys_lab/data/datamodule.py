"""One LightningDataModule for every source: cache, split, fit on train, gather batches by tensor indexing.

Two views of the same prepared data, chosen by the task (`set_view`):

* "ctr" — one row per impression (labels: click, purchase); val/test score every impression of their period.
* "retrieval" — training rows are the positive training interactions (for in-batch softmax); val/test are
  full-ranking queries, one per user with positives in the period: the user as of the period's start, the
  distinct items they clicked in the period that they had not clicked before (targets), and the items they
  had clicked before (masked from the ranking).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Feature, Schema
from recsys_lab.data.sources.base import SourceData, load_cache, save_cache
from recsys_lab.data.splits import TEST, TRAIN, VAL, TemporalSplit
from recsys_lab.data.store import FeatureStore, Ragged, TextTables
from recsys_lab.data.text import tokenize_texts

VIEWS = ("ctr", "retrieval")
STAGE_CODE = {"train": TRAIN, "val": VAL, "test": TEST}


@dataclass
class TextSpec:
    """What a language model needs from the data: its tokenizer and the pair layout.

    Args:
        pretrained: tokenizer folder (or hub id) — the cross-encoder's own weights folder.
        max_length: tokens per (history, candidate) pair.
        max_item_tokens: tokens kept per item text.
        max_history_items: most recent history items whose titles are put in front of the candidate.
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


def _identity(batch: Batch) -> Batch:
    return batch


class RecDataModule(pl.LightningDataModule):
    """Prepares a source for training and evaluation.

    Args:
        source: an object with `name`, `fingerprint()`, `describe()` and `load() -> SourceData`.
        split: the splitting protocol (e.g. `TemporalSplit`).
        cache_dir: where prepared source tables are cached (keyed by the source fingerprint).
        batch_size / eval_batch_size: rows per training / evaluation batch.
        history_len: L, the most recent positives carried as the behaviour sequence.
        history_features: item-table categorical columns carried along the history besides the item id.
        log_dense: dense item columns that are log1p-transformed before standardisation (heavy-tailed prices).
        text: tokenizer and pair layout for language models; None for models without text.
        max_train_rows / max_eval_rows: seeded subsample of training rows / evaluation rows (or queries);
            None keeps all. Used to keep CPU runs of large models short; printed with the results.
        num_workers: DataLoader workers (gathering is vectorised, so 0 is usually fastest).
        seed: seed of the subsamples and of the training shuffle's generator.
    """

    def __init__(
        self,
        source: Any,
        split: TemporalSplit,
        cache_dir: str,
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
    ) -> None:
        super().__init__()
        for key, value in {"batch_size": batch_size, "eval_batch_size": eval_batch_size}.items():
            if value < 1:
                raise ValueError(f"data.{key}={value}: expected a positive integer")
        if history_len < 1:
            raise ValueError(f"data.history_len={history_len}: expected a positive integer")
        self.source, self.split = source, split
        self.cache_dir = Path(cache_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.history_len = history_len
        self.history_features = list(history_features)
        self.log_dense = list(log_dense)
        self.text = text
        self.max_train_rows, self.max_eval_rows = max_train_rows, max_eval_rows
        self.num_workers, self.seed = num_workers, seed
        self.view = "ctr"
        self._prepared = False

    # ---- Lightning hooks ---------------------------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        return self.cache_dir / f"{self.source.name}-{self.source.fingerprint()}"

    def prepare_data(self) -> None:
        """Build the source tables once and cache them (runs on one process)."""
        if load_cache(self.cache_path, self.source.fingerprint()) is None:
            save_cache(self.source.load(), self.cache_path, self.source.fingerprint())

    def setup(self, stage: str | None = None) -> None:
        if self._prepared:
            return
        data = load_cache(self.cache_path, self.source.fingerprint())
        if data is None:  # setup() without prepare_data(), e.g. in a notebook
            data = self.source.load()
            save_cache(data, self.cache_path, self.source.fingerprint())
        self._build(data)
        self._prepared = True

    def set_view(self, view: str) -> None:
        if view not in VIEWS:
            raise ValueError(f"data view '{view}' is unknown; expected one of {VIEWS}")
        self.view = view

    # ---- preparation -------------------------------------------------------------------------------------
    def _build(self, data: SourceData) -> None:
        inter = data.interactions
        positive = data.labels[0]  # the first label defines positives (history, retrieval targets)
        for col in ("user_id", "item_id", "timestamp", *data.labels):
            if col not in inter.columns:
                raise ValueError(f"source '{self.source.name}': interactions lack column '{col}'")
        users = inter["user_id"].to_numpy().astype(np.int64)
        items = inter["item_id"].to_numpy().astype(np.int64)
        ts = inter["timestamp"].to_numpy().astype(np.int64)
        split, (t_val, t_test) = self.split.assign(ts)
        self.cutoffs = {"val": t_val, "test": t_test}
        n_users, n_items = data.vocab_sizes["user_id"], data.vocab_sizes["item_id"]
        train = split == TRAIN
        is_pos = inter[positive].to_numpy().astype(bool)

        # statistics fitted on the training split only
        item_counts = np.bincount(items[train & is_pos], minlength=n_items).astype(np.float32)
        item_dense = self._fit_dense(data, items[train])

        # each user's positives in time order: the behaviour sequence and the retrieval "seen" set
        order = np.lexsort((ts, users))
        pos_rows = order[is_pos[order]]
        history = Ragged.from_groups(users[pos_rows], items[pos_rows], n_users)
        history_ts = torch.as_tensor(ts[pos_rows])
        n_prior = history.count_before(history_ts, torch.as_tensor(users), torch.as_tensor(ts))

        cat_cols = lambda frame, key: [c for c in frame.columns if c in data.vocab_sizes and c != key]  # noqa: E731
        user_sparse = {c: torch.as_tensor(data.users[c].to_numpy().astype(np.int64)) for c in cat_cols(data.users, "user_id")}
        item_sparse = {c: torch.as_tensor(data.items[c].to_numpy().astype(np.int64)) for c in cat_cols(data.items, "item_id")}
        context = [c for c in cat_cols(inter, "user_id") if c != "item_id"]
        for name in self.history_features:
            if name not in item_sparse:
                raise ValueError(
                    f"data.history_features: '{name}' is not a categorical item column; item columns are "
                    f"{sorted(item_sparse)}"
                )

        self.text_tables = self._tokenize(data) if self.text is not None else None
        self.store = FeatureStore(
            user_key="user_id",
            item_key="item_id",
            user_sparse=user_sparse,
            item_sparse=item_sparse,
            item_dense=item_dense,
            row_sparse={c: torch.as_tensor(inter[c].to_numpy().astype(np.int64)) for c in context},
            labels={c: torch.as_tensor(inter[c].to_numpy().astype(np.float32)) for c in data.labels},
            user=torch.as_tensor(users),
            item=torch.as_tensor(items),
            timestamp=torch.as_tensor(ts),
            history=history,
            n_prior=n_prior,
            history_len=self.history_len,
            history_features=self.history_features,
            text=self.text_tables,
        )

        # rows per stage (seeded subsamples where configured)
        rng = np.random.default_rng(self.seed)
        self.rows = {}
        for stage, code in STAGE_CODE.items():
            rows = np.flatnonzero(split == code)
            limit = self.max_train_rows if stage == "train" else self.max_eval_rows
            if limit is not None and len(rows) > limit:
                rows = np.sort(rng.choice(rows, size=limit, replace=False))
            if len(rows) == 0:
                raise ValueError(f"data: the {stage} split is empty; check data.split fractions")
            self.rows[stage] = torch.as_tensor(rows)
        self.positive_train_rows = self.rows["train"][torch.as_tensor(is_pos)[self.rows["train"]]]
        self.queries = {
            stage: self._queries(users, items, ts, is_pos, split, stage, rng, history, history_ts, n_items)
            for stage in ("val", "test")
        }
        self.oracle = data.oracle
        self._oracle_prob = (
            torch.as_tensor(inter[data.oracle].to_numpy().astype(np.float32)) if data.oracle else None
        )
        self.counts = {
            "interactions": int(len(ts)),
            "users": n_users,
            "items": n_items,
            **{f"{s}_rows": int(len(r)) for s, r in self.rows.items()},
            **{f"{s}_queries": int(len(q["users"])) for s, q in self.queries.items()},
        }
        self.schema = self._schema(data, user_sparse, item_sparse, context, item_dense, item_counts)

    def _fit_dense(self, data: SourceData, train_items: np.ndarray) -> dict[str, torch.Tensor]:
        """Standardise dense item columns with statistics of the items seen in training."""
        seen = np.unique(train_items)
        out = {}
        for name in data.dense:
            if name not in data.items.columns:
                raise ValueError(f"source '{self.source.name}': items lack dense column '{name}'")
            values = np.asarray(data.items[name].to_numpy(), dtype=np.float32)
            if name in self.log_dense:
                if (values < 0).any():
                    raise ValueError(f"data.log_dense: column '{name}' has negative values; log1p needs >= 0")
                values = np.log1p(values)
            mean, std = values[seen].mean(0), values[seen].std(0) + 1e-6
            out[name] = torch.as_tensor((values - mean) / std, dtype=torch.float32)
        return out

    def _tokenize(self, data: SourceData) -> TextTables:
        from transformers import AutoTokenizer

        from recsys_lab.utils.pretrained import resolve_pretrained

        spec = self.text
        if data.item_text is None:
            raise ValueError(f"data.text is set but source '{self.source.name}' has no item text column")
        path = resolve_pretrained(spec.pretrained, allow_download=spec.allow_download)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=not spec.allow_download)
        tokens, lengths = tokenize_texts(tokenizer, data.items[data.item_text].to_list(), spec.max_item_tokens)
        return TextTables(
            item_tokens=tokens,
            item_lengths=lengths,
            cls_id=tokenizer.cls_token_id,
            sep_id=tokenizer.sep_token_id,
            pad_id=tokenizer.pad_token_id,
            max_length=spec.max_length,
            max_history_items=spec.max_history_items,
        )

    def _queries(self, users, items, ts, is_pos, split, stage: str, rng, history, history_ts, n_items) -> dict:
        """Per-user full-ranking queries of one period (see the module docstring)."""
        cutoff = self.cutoffs[stage]
        in_period = (split == STAGE_CODE[stage]) & is_pos
        before = (ts < cutoff) & is_pos
        # distinct (user, item) pairs via a combined key
        key = lambda mask: np.unique(users[mask] * n_items + items[mask])  # noqa: E731
        seen_pairs = key(before)
        target_pairs = np.setdiff1d(key(in_period), seen_pairs, assume_unique=True)
        query_users = np.unique(target_pairs // n_items)
        if self.max_eval_rows is not None and len(query_users) > self.max_eval_rows:
            query_users = np.sort(rng.choice(query_users, size=self.max_eval_rows, replace=False))
        keep_t = np.isin(target_pairs // n_items, query_users)
        keep_s = np.isin(seen_pairs // n_items, query_users)
        index = np.full(int(users.max()) + 1, -1)
        index[query_users] = np.arange(len(query_users))
        targets = Ragged.from_groups(index[target_pairs[keep_t] // n_items], target_pairs[keep_t] % n_items, len(query_users))
        seen = Ragged.from_groups(index[seen_pairs[keep_s] // n_items], seen_pairs[keep_s] % n_items, len(query_users))
        q_users = torch.as_tensor(query_users, dtype=torch.long)
        n_prior = history.count_before(history_ts, q_users, torch.full_like(q_users, cutoff))
        return {"users": q_users, "n_prior": n_prior, "targets": targets, "seen": seen}

    def _schema(self, data, user_sparse, item_sparse, context, item_dense, item_counts) -> Schema:
        v = data.vocab_sizes
        L = self.history_len
        feats = [Feature("user_id", "sparse", "user", vocab_size=v["user_id"])]
        feats += [Feature(c, "sparse", "user", vocab_size=v[c]) for c in user_sparse]
        feats += [Feature("item_id", "sparse", "item", vocab_size=v["item_id"])]
        feats += [Feature(c, "sparse", "item", vocab_size=v[c]) for c in item_sparse]
        feats += [Feature(c, "sparse", "context", vocab_size=v[c]) for c in context]
        feats += [
            Feature(c, "dense", "item", dim=1 if t.dim() == 1 else int(t.shape[1])) for c, t in item_dense.items()
        ]
        feats += [Feature("hist_item_id", "seq", "user", vocab_size=v["item_id"], max_len=L, embed_as="item_id")]
        feats += [
            Feature(f"hist_{c}", "seq", "user", vocab_size=v[c], max_len=L, embed_as=c)
            for c in self.history_features
        ]
        if self.text_tables is not None:
            feats += [Feature("pair_text", "text", "context", max_len=self.text.max_length)]
        return Schema(feats, labels=list(data.labels), item_counts=torch.as_tensor(item_counts))

    # ---- loaders -----------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=_identity,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def dataset(self, stage: str) -> Dataset:
        """Rows of one stage under the current view."""
        if self.view == "retrieval" and stage == "train":
            rows = self.positive_train_rows
            return _Rows(len(rows), lambda i: self.store.impressions(rows[i]))
        if self.view == "retrieval":
            q = self.queries[stage]
            return _Rows(
                len(q["users"]),
                lambda i: self.store.queries(q["users"][i], q["n_prior"][i], q["targets"], q["seen"], i),
            )
        rows = self.rows[stage]
        return _Rows(len(rows), lambda i: self.store.impressions(rows[i]))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train"), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size, shuffle=False)

    # ---- what tasks and the results table read -----------------------------------------------------------
    def catalogue(self) -> Batch:
        """Every item's item-side features (what `encode_item` reads for full ranking)."""
        return self.store.items_batch(torch.arange(self.schema.num_items))

    def reference_metrics(self, stage: str) -> dict[str, float]:
        """Baselines on exactly the rows a CTR task scores in `stage`: the oracle AUC (true click
        probabilities, simulated data only) and the AUC of ranking by training popularity."""
        from sklearn.metrics import roc_auc_score

        rows = self.rows[stage]
        label = self.store.labels[self.schema.labels[0]][rows].numpy()
        if label.min() == label.max():
            return {}
        out = {"popularity_auc": float(roc_auc_score(label, self.schema.item_counts[self.store.item[rows]].numpy()))}
        if self._oracle_prob is not None:
            out["oracle_auc"] = float(roc_auc_score(label, self._oracle_prob[rows].numpy()))
        return out

    def describe(self) -> dict:
        """Every protocol choice, for the logged config and the results table."""
        return {
            **self.source.describe(),
            **self.split.describe(),
            "history_len": self.history_len,
            "history_features": self.history_features,
            "max_train_rows": self.max_train_rows,
            "max_eval_rows": self.max_eval_rows,
            "retrieval_eval": "full catalogue, per user at period start, previously clicked items masked",
            **({"text": vars(self.text)} if self.text is not None else {}),
            **self.counts,
        }

    def fingerprint(self) -> str:
        blob = json.dumps({"source": self.source.fingerprint(), **self.describe()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
