"""One LightningDataModule for every source: prepare (cached), audit, and serve the view a task asks for.

The DataModule orchestrates; each job lives where it belongs:

    source.load() ─ prepare() (recsys_lab.data.prepare, cached by PreparedCache) ─ FeatureStore.from_prepared
    (tables, timelines, the schema) ─ seeded subsamples ─ TrainingNegatives ─ audit ─ a View (recsys_lab.data.views)
    chosen by the task, whose datasets the loaders serve.

Ranking queries: one per user with new positives in the period; the user as of the period's start (history =
all positives of the earlier splits), the items to find, the items to mask and, for sampled protocols, the
stored candidates (`recsys_lab.data.queries.QuerySet`, carried in `batch.eval`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from recsys_lab.data.audit import audit
from recsys_lab.data.batch import Batch
from recsys_lab.data.prepare import PREPARE_VERSION, STAGES, Inherited, Prepared, PreparedCache, prepare
from recsys_lab.data.processing import Preprocess
from recsys_lab.data.queries import QuerySet
from recsys_lab.data.sampling import TrainingNegatives, candidates_from_spec, negatives_from_spec
from recsys_lab.data.store import FeatureStore
from recsys_lab.data.text import TextSpec  # noqa: F401  (run configs of older checkpoints name it here)
from recsys_lab.data.views import TensorBatches, View, ViewData

CTR_EVALS = ("impressions", "ranking")


def _identity(batch: Batch) -> Batch:
    return batch


def _check_int(key: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"data.{key}={value}: expected {what}{' or null' if allow_none else ''}")


def prepared_folder(path: str | Path) -> Path:
    """The prepared-data folder `data.vocab_from` names: the folder itself when it holds a prepared dataset
    (meta.json), else the folder of the run directory or checkpoint's data (rebuilt from the config the
    checkpoint carries, as `scripts/evaluate.py` does; nothing is prepared here)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    # lazy: checkpoints are only read when a run is named
    import hydra
    from omegaconf import OmegaConf

    from recsys_lab.utils.checks import ConfigError, load_run_checkpoint

    if not path.exists():
        raise ConfigError(
            f"data.vocab_from={path}: no such run directory, checkpoint or prepared-data folder"
        )
    try:
        _, _, info = load_run_checkpoint(path)
    except ConfigError as err:
        raise ConfigError(f"data.vocab_from={path}: {err}") from None
    earlier = hydra.utils.instantiate(OmegaConf.create(info["config"]["data"]), _convert_="partial")
    folder = earlier.cache_path
    if not (folder / "meta.json").is_file():
        raise ConfigError(
            f"data.vocab_from={path}: the run's prepared data ({folder}) are no longer there; point "
            "data.vocab_from at a folder that holds them, or re-run the earlier run's preparation"
        )
    return folder


class RecDataModule(pl.LightningDataModule):
    """Prepares a source for training and evaluation under an explicit, logged protocol.

    Args:
        source: an object with `name`, `fingerprint()`, `describe()` and `load() -> RawData`.
        split: the splitting protocol (`TemporalSplit`, `LeaveOneOutSplit`, `RandomRatioSplit`, `PreSplit`,
            `LastSamplesSplit`, `WindowSplit`).
        cache_dir: where prepared data are cached (keyed by a fingerprint of source, protocol and code).
        preprocess: implicit conversion, duplicates, k-core, minimum history (`Preprocess`).
        eval_candidates: "full" / None (whole catalogue, seen items masked), "uniform_N" / "popularity_N" (N
            sampled negatives per target, drawn once with `seed` and stored), or a candidates object.
        train_negatives: sampled negatives per positive for CTR training on implicit data: "uniform_N",
            "popularity_N" or a sampler object; None uses the logged labels as they are.
        ctr_eval: how CTR objectives are evaluated: "impressions" (logged rows: AUC, GAUC, LogLoss) or "ranking".
        batch_size / eval_batch_size: rows per training / evaluation batch (evaluation: queries for ranking).
        eval_max_scores: under full ranking, the most scores one evaluation batch may hold (queries x catalogue
            items): fewer than `eval_batch_size` queries go into a batch when the catalogue is large, so that
            the score matrix, its masks and top-k stay memory-bounded on any device (2**28 scores: 1 GiB of
            float32; 1M items: 268 queries a batch). None: no bound. Metrics do not depend on the batching.
        history_len: L, the most recent positives carried as the behaviour sequence.
        history_features: item categorical columns carried along the history besides the item id.
        context: False drops the interaction context features (the simulator's hour, weekday, device, ...;
            `context` columns of your own data) from every batch and from the schema, so that any model can be
            run without them: the context ablation. Printed with the results as `context_features`.
        log_dense: numeric columns that are log1p-transformed before standardisation.
        numeric_buckets: {numeric column: n}: the column enters every model as a categorical feature of up to n
            equal-frequency buckets (quantiles of the training split) instead of one standardised value that
            models project linearly. Per feature; the others stay linear.
        time_context: context computed from each interaction's timestamp for any source: "hour" (hour of day),
            "weekday", "gap" (log seconds since the user's previous interaction); columns `time_<name>`.
        cold_items: give catalogue items without a training interaction codes of their own (after the training
            vocabulary) so that they are ranking candidates and targets: content models (text, image) can rank
            them, id embeddings cannot (theirs never train). Every ranking evaluation then also logs the
            cold-start slice `{stage}/cold/...` (targets on those items). Off: they keep code 0 and their
            held-out interactions are counted as `*_targets_unknown_item`.
        text: tokenizer and pair layout for language models; None for models without text.
        max_train_rows / max_eval_rows: seeded subsample of training rows / evaluation rows or queries; None
            keeps all. Used to keep CPU runs of large models short; printed with the results.
        num_workers: DataLoader workers (gathering is vectorised, so 0 is usually fastest; a resumed run
            reproduces the uninterrupted one exactly only with 0).
        seed: seed of the subsamples, the evaluation candidates and the training negatives.
        vocab_from: an earlier run directory (or checkpoint, or prepared-data folder): its vocabularies and
            normalisers are kept instead of fitted, every id it knew keeps its code and this training split's
            new ids get codes after them (incremental training; pair it with `init_from`). The earlier data's
            fingerprint is part of this cache's key and is printed with the protocol.
        vocab_extend: with `vocab_from`, append this training split's new ids (True) or keep the earlier
            vocabularies exactly, new ids reading code 0 "unknown" (False: the earlier model evaluated as it
            was, never updated).
        hash_buckets: {sparse feature: rows}: that feature's ids are hashed into a fixed table of this many rows
            (`HashedEmbedding`) instead of one row per id, so a growing vocabulary (new users and items of an
            incremental update) needs no new rows; for models whose id tables are `FeatureEmbedding`s.
        qr_embeddings: {sparse feature: m}: that feature is embedded by quotient-remainder tables of
            ceil(V / m) + m rows (`QREmbedding`, Shi et al. KDD 2020), every id keeping a distinct vector; for
            models whose id tables are `FeatureEmbedding`s.
        torchrec_tables: [sparse feature, ...]: those features' tables are TorchRec `EmbeddingCollection`s
            (`TorchRecEmbedding`, an optional extra), which `trainer=torchrec` shards across processes; for models
            whose id tables are `FeatureEmbedding`s.
        path / version / columns / window: shorthands that the source or split config interpolates
            (`data.path=...`, `data.version=...`, `data.columns.user=...`, `data.window=...` with
            `protocol=window`); recorded in the protocol.
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
        eval_max_scores: int | None = 2**28,
        history_len: int = 30,
        history_features: list[str] | tuple[str, ...] = (),
        context: bool = True,
        log_dense: list[str] | tuple[str, ...] = (),
        numeric_buckets: dict[str, int] | None = None,
        time_context: list[str] | tuple[str, ...] = (),
        cold_items: bool = False,
        text: TextSpec | None = None,
        max_train_rows: int | None = None,
        max_eval_rows: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        vocab_from: str | None = None,
        vocab_extend: bool = True,
        hash_buckets: dict[str, int] | None = None,
        qr_embeddings: dict[str, int] | None = None,
        torchrec_tables: list[str] | tuple[str, ...] | None = None,
        path: str | None = None,
        version: str | None = None,
        columns: dict | None = None,
        window: int | None = None,
    ) -> None:
        super().__init__()
        for key, value in {"batch_size": batch_size, "eval_batch_size": eval_batch_size}.items():
            _check_int(key, value, 1)
        _check_int("history_len", history_len, 1)
        _check_int("eval_max_scores", eval_max_scores, 1, allow_none=True)
        _check_int("max_train_rows", max_train_rows, 1, allow_none=True)
        _check_int("max_eval_rows", max_eval_rows, 1, allow_none=True)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        if ctr_eval not in CTR_EVALS:
            raise ValueError(f"data.ctr_eval='{ctr_eval}': expected one of {CTR_EVALS}")
        self.source, self.split = source, split
        self.preprocess = preprocess if preprocess is not None else Preprocess()
        self.eval_candidates = candidates_from_spec(eval_candidates, seed)
        self.train_negatives = negatives_from_spec(train_negatives)
        self.ctr_eval = ctr_eval
        self.path, self.version, self.columns, self.window = path, version, columns, window
        self.vocab_from, self.vocab_extend = vocab_from, bool(vocab_extend)
        self.hash_buckets = dict(hash_buckets or {})
        self.qr_embeddings = dict(qr_embeddings or {})
        self.torchrec_tables = list(torchrec_tables or [])
        self._inherited: Inherited | None = None
        self.cache_dir = Path(cache_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.eval_max_scores = eval_max_scores
        self.history_len = history_len
        self.history_features = list(history_features)
        self.context = bool(context)
        self.log_dense = list(log_dense)
        self.numeric_buckets = dict(numeric_buckets or {})
        self.time_context = list(time_context or ())
        self.cold_items = bool(cold_items)
        self.text = text
        self.max_train_rows, self.max_eval_rows = max_train_rows, max_eval_rows
        self.num_workers, self.seed = num_workers, seed
        self.negatives: TrainingNegatives | None = None
        self._view: View | None = None
        self._loaded: Prepared | None = None
        self._ready = False

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
                "numeric_buckets": self.numeric_buckets,
                "time_context": self.time_context,
                "cold_items": self.cold_items,
                "prepare_version": PREPARE_VERSION,
                # only when set, so that every other config keeps its cache
                **({"vocab_from": self._vocab_from_description()} if self.vocab_from else {}),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def inherited(self) -> Inherited | None:
        """The encodings `vocab_from` names, read once (None without it)."""
        if self.vocab_from and self._inherited is None:
            self._inherited = Inherited.read(prepared_folder(self.vocab_from), grow=self.vocab_extend)
        return self._inherited

    def _vocab_from_description(self) -> dict:
        """What identifies the inherited encodings: the earlier data's fingerprint (not its path, which differs
        between machines) and whether they grow."""
        return {"fingerprint": self.inherited().fingerprint, "extend": self.vocab_extend}

    @property
    def cache_path(self) -> Path:
        return self.cache_dir / f"{self.source.name}-{self.protocol_fingerprint()}"

    def prepared(self) -> Prepared:
        """The prepared data: read from the cache once per process, built (by one process) when missing."""
        if self._loaded is None:
            self._loaded = PreparedCache(self.cache_path, self.protocol_fingerprint()).load_or_build(
                self._build
            )
        return self._loaded

    def _build(self) -> Prepared:
        raw = self.source.load()
        return prepare(
            raw,
            self.preprocess,
            self.split,
            self.eval_candidates,
            self.log_dense,
            oracle=raw.oracle,
            numeric_buckets=self.numeric_buckets,
            time_context=self.time_context,
            cold_items=self.cold_items,
            inherited=self.inherited(),
        )

    # ---- Lightning hooks ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Build and cache the prepared data once (runs on one process)."""
        self.prepared()

    def setup(self, stage: str | None = None) -> None:
        """Feature tables, schema, seeded subsamples, training negatives and the leakage audit."""
        if self._ready:
            return
        p = self.prepared()
        if p.meta.cutoffs and getattr(self.split, "cutoffs_", None) is None:
            self.split.cutoffs_ = tuple(p.meta.cutoffs)  # cached data: `assign` did not run in this process
        self.store = FeatureStore.from_prepared(
            p, self.history_len, self.history_features, self.text, context=self.context
        )
        self.schema = self.store.schema()
        if self.hash_buckets:
            self.schema = self.schema.with_buckets(self.hash_buckets)
        if self.qr_embeddings:
            self.schema = self.schema.with_qr(self.qr_embeddings)
        if self.torchrec_tables:
            self.schema = self.schema.with_torchrec(self.torchrec_tables)
        self.rows, self.queries = self._subsample(p)
        if self.train_negatives is not None:
            self.negatives = self.store.training_negatives(self.train_negatives, self.seed)
        self.audit_report = audit(p, self.store, self.queries)
        self.counts = {
            **p.meta.counts,
            "users": p.users.height,
            "items": p.items.height,
            **{f"{s}_rows_used": int(len(r)) for s, r in self.rows.items()},
            **{f"{s}_queries_used": len(q) for s, q in self.queries.items()},
        }
        self._ready = True

    def _subsample(self, p: Prepared) -> tuple[dict[str, torch.Tensor], dict[str, QuerySet]]:
        """Rows and queries per stage, each cut to its seeded `max_*_rows` subsample (kept in this order so the
        draws stay the same run after run)."""
        rng = np.random.default_rng(self.seed)
        rows: dict[str, torch.Tensor] = {}
        for stage, code in STAGES.items():
            idx = (self.store.split == code).nonzero().squeeze(1).numpy()
            limit = self.max_train_rows if stage == "train" else self.max_eval_rows
            if limit is not None and len(idx) > limit:
                idx = np.sort(rng.choice(idx, size=limit, replace=False))
            rows[stage] = torch.as_tensor(idx)
        queries = {}
        for stage in ("val", "test"):
            q = QuerySet.from_frame(p.queries[stage])
            if self.max_eval_rows is not None and len(q) > self.max_eval_rows:
                q = q.subset(
                    torch.as_tensor(np.sort(rng.choice(len(q), size=self.max_eval_rows, replace=False)))
                )
            queries[stage] = q
        return rows, queries

    # ---- the view a task trains on -------------------------------------------------------------------------
    def use_view(
        self, view_type: type[View], reads_history: bool = True, reads_features: bool = True
    ) -> View:
        """Build `view_type` over the prepared tables; the loaders serve it from now on. With `reads_history`
        False its batches carry no `hist_*` features; with `reads_features` False (a model that reads the user
        and item ids only) they carry nothing but the ids, labels and targets."""
        self.setup()
        oracle_column = self.prepared().meta.oracle
        oracle = (
            torch.as_tensor(self.prepared().rows[oracle_column].to_numpy().astype(np.float32))
            if oracle_column
            else None
        )
        store = self.store if reads_history else self.store.without_history()
        store = store if reads_features else store.ids_only()
        data = ViewData(store, self.rows, self.queries, self.negatives, self.ctr_eval, oracle, self.seed)
        self._view = view_type(data)
        return self._view

    @property
    def view(self) -> View:
        if self._view is None:
            raise RuntimeError("RecDataModule: no view yet; call use_view(task.view) (train.build does)")
        return self._view

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        order = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
        # Under DDP the batches are sharded here (`TensorBatches`: the same global batches as one process,
        # evaluation rows never repeated); the trainer configs set `use_distributed_sampler: false`.
        trainer = self.trainer
        shard = (
            (trainer.global_rank, trainer.world_size)
            if trainer is not None and trainer.world_size > 1
            else None
        )
        return DataLoader(
            dataset,
            batch_sampler=TensorBatches(order, batch_size, drop_last=False, shard=shard),
            collate_fn=_identity,
            # batches are gathered on the CPU; to a GPU they go from page-locked memory, without blocking
            pin_memory=trainer is not None and trainer.strategy.root_device.type == "cuda",
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # Lightning turns shuffling off for `overfit_batches` by looking at `DataLoader.sampler`, which a
        # batch sampler leaves sequential, so it would not see ours: do what it would do
        overfit = self.trainer is not None and bool(self.trainer.overfit_batches)
        return self._loader(self.view.train_dataset(), self.batch_size, shuffle=not overfit)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.view.eval_dataset("val"), self.eval_rows(), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.view.eval_dataset("test"), self.eval_rows(), shuffle=False)

    def eval_rows(self) -> int:
        """Rows per evaluation batch: `eval_batch_size`, fewer under full ranking where that many queries times
        the catalogue would exceed `eval_max_scores` (sampled candidates and impressions are narrow)."""
        view = self.view
        full = view.evaluation == "ranking" and self.store.meta.eval_candidates.startswith("full")
        if not full or self.eval_max_scores is None:
            return self.eval_batch_size
        return max(1, min(self.eval_batch_size, self.eval_max_scores // self.store.num_item_codes))

    # ---- checkpointed state: the negative sampler's generator (a resumed run draws what it would have) ------
    def state_dict(self) -> dict[str, Any]:
        return {"negatives": self.negatives.state_dict()} if self.negatives is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.negatives is not None and "negatives" in state_dict:
            self.negatives.load_state_dict(state_dict["negatives"])

    # ---- what the test analysis reads (recsys_lab.analysis.evaluation) ---------------------------------------
    def analysis_data(self, spec):
        """Slices, popularity and content tables of this data for the test analysis (`evaluation` config),
        read from the full feature store (every feature, whatever the model reads)."""
        import polars

        from recsys_lab.analysis.evaluation import build_analysis_data

        self.setup()
        users_raw = self.prepared().users["user_id"].cast(polars.Utf8).to_list()
        return build_analysis_data(self.store, users_raw, spec)

    # ---- what the results table reads ----------------------------------------------------------------------
    def describe(self) -> dict:
        """Every protocol choice and count, for the logged config and the results table."""
        return {
            **self.source.describe(),
            "preprocess": self.preprocess.describe(),
            **self.split.describe(),
            **(self._view.describe() if self._view is not None else {}),  # evaluation kind, candidates
            "train_negatives": self.train_negatives.describe() if self.train_negatives is not None else None,
            "history_len": self.history_len,
            "history_features": self.history_features,
            "context_features": self.store.meta.context if self._ready else None,
            "time_context": self.time_context,
            "cold_items": self.cold_items,
            "hash_buckets": self.hash_buckets,
            "qr_embeddings": self.qr_embeddings,
            "torchrec_tables": self.torchrec_tables,
            "numeric_buckets": self.numeric_buckets,
            "max_train_rows": self.max_train_rows,
            "max_eval_rows": self.max_eval_rows,
            **({"text": asdict(self.text)} if self.text is not None else {}),
            **({"vocab_from": self._vocab_from_description()} if self.vocab_from else {}),
            "leakage_audit": self.audit_report,
            **self.counts,
        }

    def fingerprint(self) -> str:
        blob = json.dumps(
            {"prepared": self.protocol_fingerprint(), **self.describe()}, sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
